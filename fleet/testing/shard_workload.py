"""A test workload for fleet's tests, benchmarks and a user's checks of their fleet,
written the way burn_p2p's torch MNIST demo is, not the way fleet's examples
are: it reads its training data only from the ``shard_paths`` of its BatchRefs
(``cached_microshard_group``) or ``payload.shard_paths`` (``micro_epoch``), keeps its
optimizer inside the model state and writes no optimizer file, defines no artifact
hooks, and returns few metrics.

Shards are safetensors files ``{"images": float32 [n, 64], "labels": int64 [n]}`` of
scikit-learn's digits, written by :func:`write_shards` as a plain directory
(``00000.bin`` ...) or with burn_p2p's ``fetch-manifest.json``.

Config: ``hidden`` (32), ``lr`` (0.1, SGD), ``batch_size`` (16), ``fake_speed``
(reported as ``work_units_per_second``), ``short_by`` (the inner loop stops this many
steps early), ``step_sleep_s`` (slow steps; only for replica ``slow_replica`` of a
``micro_epoch`` payload when that is set), ``read_log`` (a directory: each process
appends the shard paths it reads to ``<pid>.jsonl`` there), ``straggler`` (``{"replica":
i, "factor": 3, "rounds": [...]}``: that replica's steps take ``factor`` times longer in
those rounds, the others at ``step_sleep_s``), ``stuck`` (``{"replica": i, "round": r}``:
that replica's first step of that round sleeps for an hour, releasing the GIL, as a
hung collective or a stalled read does; with ``"hold_gil": true`` it blocks for ever in
a C call that holds the GIL instead, as a hung native call does: no Python signal handler
and no other thread of the process runs again).
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from fleet.data.dataset import write_dataset


def digit_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: images float32 ``[n, 64]`` in [0, 1], labels int64 ``[n]``."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)


def write_shards(
    root: Path, n_shards: int, *, manifest: bool = False, n_train: int = 1400
) -> list[Path]:
    """Write the first ``n_train`` digits as ``n_shards`` safetensors microshards in
    ``root`` (``00000.bin`` ...), and with ``manifest`` a burn_p2p ``fetch-manifest.json``
    (sha2-256 multihash content hashes). Returns the shard files."""
    images, labels = digit_arrays()
    bounds = torch.linspace(0, n_train, n_shards + 1).long().tolist()
    payloads = [
        save({"images": images[a:b].clone(), "labels": labels[a:b].clone()})
        for a, b in itertools.pairwise(bounds)
    ]
    write_dataset(root, payloads, manifest=manifest, view_id="digits-view")
    return [root / f"{i:05d}.bin" for i in range(n_shards)]


def _deadlock_holding_the_gil() -> None:
    """Acquire a held lock through the C API (``ctypes.pythonapi`` keeps the GIL and the
    C call retries through signals): this thread, and so the process, never runs Python
    again."""
    api = ctypes.pythonapi
    api.PyThread_allocate_lock.restype = ctypes.c_void_p
    api.PyThread_acquire_lock.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lock = api.PyThread_allocate_lock()
    api.PyThread_acquire_lock(lock, 1)
    api.PyThread_acquire_lock(lock, 1)


class ShardWorkload:
    """The burn_p2p-style workload (see the module docstring)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config)
        self.hidden = int(config.get("hidden", 32))
        self.lr = float(config.get("lr", 0.1))
        self.batch_size = int(config.get("batch_size", 16))
        self.short_by = int(config.get("short_by", 0))
        self.step_sleep_s = float(config.get("step_sleep_s", 0.0))
        self.slow_replica = config.get("slow_replica")
        self.read_log = config.get("read_log")
        self.straggler = config.get("straggler")
        self.stuck = config.get("stuck")
        images, labels = digit_arrays()
        self.eval_images, self.eval_labels = images[1400:], labels[1400:]

    def runtime_device(self) -> str:
        return "python-torch-cpu"

    def capability_probe(self) -> dict[str, Any]:
        speed = self.config.get("fake_speed")
        if speed is None:
            state, start = self.init_model("cpu"), time.perf_counter()
            self._step(state, torch.rand(64, 64), torch.randint(0, 10, (64,)), 0.0)
            speed = 64 / (time.perf_counter() - start)
        return {
            "preferred_backends": ["cpu"],
            "work_units_per_second": float(speed),
            "target_window_seconds": 1,
        }

    def init_model(self, device: str) -> dict[str, Any]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, self.hidden), torch.nn.ReLU(), torch.nn.Linear(self.hidden, 10)
        ).to(device)
        return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=self.lr)}

    # ------------------------------------------------------------------ data, as burn_p2p reads it

    def _shard_paths(self, batch: dict[str, Any]) -> list[str]:
        if batch.get("kind") == "micro_epoch":
            paths = (batch.get("payload") or {}).get("shard_paths", [])
        else:
            paths = batch.get("shard_paths", [])
        if not isinstance(paths, list):
            raise ValueError("shard_paths must be a list")
        return paths

    def _log_reads(self, paths: list[str]) -> None:
        if self.read_log:
            with open(Path(self.read_log) / f"{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps({"paths": paths}) + "\n")

    def _step_sleep_s(self, payload: dict[str, Any], first: bool) -> float:
        """Seconds each step of this batch sleeps: ``step_sleep_s``, times the
        ``straggler`` factor in its rounds; the ``stuck`` knob sleeps an hour here."""
        replica, round_index = payload.get("replica"), payload.get("round")
        stuck = self.stuck
        if stuck and first and (replica, round_index) == (stuck["replica"], stuck["round"]):
            if stuck.get("hold_gil"):
                _deadlock_holding_the_gil()
            time.sleep(3600)
        lag = self.straggler
        if lag and replica == lag["replica"] and round_index in lag.get("rounds", []):
            return self.step_sleep_s * float(lag.get("factor", 3))
        return self.step_sleep_s

    def _step(
        self, state: dict[str, Any], x: torch.Tensor, y: torch.Tensor, sleep_s: float
    ) -> float:
        if sleep_s:
            time.sleep(sleep_s)
        state["model"].train()
        loss = torch.nn.functional.cross_entropy(state["model"](x), y)
        state["optimizer"].zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        state["optimizer"].step()
        return float(loss)

    def _train(
        self, state: dict[str, Any], batches: list[dict[str, Any]], max_steps: int | None
    ) -> tuple[int, float]:
        steps, total = 0, 0.0
        while max_steps is None or steps < max_steps:
            progressed = False
            for batch in batches:
                paths = self._shard_paths(batch)
                self._log_reads(paths)
                given = batch.get("payload")
                payload: dict[str, Any] = given if isinstance(given, dict) else {}
                slow = self.slow_replica is None or payload.get("replica") == self.slow_replica
                sleep_s = self._step_sleep_s(payload, first=steps == 0) if slow else 0.0
                for path in paths:
                    shard = load_file(path)
                    for start in range(0, len(shard["labels"]), self.batch_size):
                        if max_steps is not None and steps >= max_steps:
                            break
                        end = start + self.batch_size
                        total += self._step(
                            state, shard["images"][start:end], shard["labels"][start:end], sleep_s
                        )
                        steps, progressed = steps + 1, True
            if max_steps is None:
                break
            if not progressed:
                raise ValueError("training batches did not produce any optimizer steps")
        return steps, total / max(steps, 1)

    # ------------------------------------------------------------------ protocol hooks

    def train_window(self, state: dict[str, Any], batches: list[dict[str, Any]]) -> dict[str, Any]:
        _, loss = self._train(state, batches, None)
        return {"loss": loss}

    def run_inner_loop(self, state: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
        steps, loss = self._train(state, job["batches"], job["num_inner_steps"] - self.short_by)
        return {"steps_completed": steps, "metrics": {"loss": loss}}

    def evaluate(self, state: dict[str, Any], split: Any) -> dict[str, Any]:
        state["model"].eval()
        with torch.no_grad():
            logits = state["model"](self.eval_images)
        return {"loss": float(torch.nn.functional.cross_entropy(logits, self.eval_labels))}

    def merge_candidate_models(
        self, base: Any, candidates: list[dict[str, Any]], policy: Any
    ) -> Any:
        if not candidates:
            return None
        merged = self.init_model("cpu")
        total = sum(c["sample_weight"] for c in candidates)
        with torch.no_grad():
            for key, tensor in merged["model"].state_dict().items():
                tensor.copy_(
                    sum(
                        c["model"]["model"].state_dict()[key] * (c["sample_weight"] / total)
                        for c in candidates
                    )
                )
        return merged

    def apply_single_root_ema(self, base: Any, merged: Any, policy: Any) -> Any:
        return merged

    def reconcile_canonical_model(self, local: Any, canonical: Any, strategy: Any) -> Any:
        return local if strategy == "Replace" else canonical


def make(config: dict[str, Any]) -> ShardWorkload:
    return ShardWorkload(config)
