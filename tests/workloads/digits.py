"""The digits MLP as a hand-written protocol workload with fault injection, for the tests.

Extra config: ``fail_in`` (a hook that raises), ``hang_in`` (a hook that hangs for an
hour deaf to signals, as a call stuck in native code is: the soft time limit's and
fleet's interrupt signals are blocked; it first writes its pid to ``hang_pid_file``),
``step_sleep_s`` (slow steps), ``slow_replica`` (only that DiLoCo replica is slow),
``eval_sleep_s`` (a costly evaluation), ``ema_decay``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save

from fleet.data.batches import batch_key, shard_paths_of
from fleet.examples.digits import load_splits
from fleet.workloads import MergeHooks

#: The AdamW learning rate of a model made without ``lr`` in the config (apply_patch
#: changes it for the models the workload makes afterwards).
DEFAULT_LR = 1e-2


class HandWrittenDigits(MergeHooks):
    """The digits MLP written against the protocol's hooks by hand (no TorchWorkload), as
    a burn_p2p user writes a workload: its own data sampling, optimizer and merge."""

    workload_name = "digits-mlp"

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config)
        self.hidden = int(config.get("hidden", 64))
        self.lr = float(config.get("lr", DEFAULT_LR))
        self.batch_size = int(config.get("batch_size", 64))
        self.seed = int(config.get("seed", 0))
        self.data = load_splits(self.seed)
        self.cursor = 0
        self._uses: dict[str, int] = {}

    def runtime_device(self) -> str:
        return "python-torch-cuda" if torch.cuda.is_available() else "python-torch-cpu"

    def capability_probe(self) -> dict[str, Any]:
        """Measures training examples per second over a few real steps."""
        state = self.init_model("cpu")
        start = time.perf_counter()
        for _ in range(5):
            self.train_window(state, [])
        per_s = 5 * self.batch_size / (time.perf_counter() - start)
        backends = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
        return {
            "preferred_backends": backends,
            "work_units_per_second": per_s,
            "target_window_seconds": 10,
        }

    def init_model(self, device: str) -> dict[str, Any]:
        torch.manual_seed(self.seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, self.hidden), torch.nn.ReLU(), torch.nn.Linear(self.hidden, 10)
        ).to(device)
        return {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=self.lr)}

    def _shard_batch(
        self, batch: dict[str, Any], paths: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shards = [st_load_file(p) for p in paths]
        x = torch.cat([s["images"] for s in shards])
        y = torch.cat([s["labels"] for s in shards])
        key = batch_key(batch)
        uses = self._uses.get(key, 0)
        self._uses[key] = uses + 1
        idx = torch.arange(uses * self.batch_size, (uses + 1) * self.batch_size) % len(x)
        return x[idx], y[idx]

    def _batch(self, batch: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
        paths = shard_paths_of(batch)
        if batch is not None and paths:
            return self._shard_batch(batch, paths)
        x, y = self.data["Train"]
        payload = (batch or {}).get("payload")
        if isinstance(payload, dict) and "num_replicas" in payload:
            x = x[payload["replica"] :: payload["num_replicas"]]
            y = y[payload["replica"] :: payload["num_replicas"]]
        if batch and batch.get("ordinals"):
            start = (batch["ordinals"][0] * self.batch_size) % len(x)
        else:
            start = (self.cursor * self.batch_size) % len(x)
            self.cursor += 1
        idx = torch.arange(start, start + self.batch_size) % len(x)
        return x[idx], y[idx]

    def _step_delay(self, batch: dict[str, Any] | None) -> None:
        """Hook for subclasses that simulate slow hardware."""

    def train_window(self, state: dict[str, Any], batches: list[dict[str, Any]]) -> dict[str, Any]:
        model, optimizer = state["model"], state["optimizer"]
        device = next(model.parameters()).device
        model.train()
        losses = []
        steps: list[dict[str, Any] | None] = list(batches) or [None]
        for batch in steps:
            self._step_delay(batch)
            x, y = self._batch(batch)
            loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return {"loss": sum(losses) / len(losses), "examples": self.batch_size * len(losses)}

    def evaluate(self, state: dict[str, Any], split: Any) -> dict[str, Any]:
        name = split if isinstance(split, str) else "Validation"
        x, y = self.data[name]
        model = state["model"]
        device = next(model.parameters()).device
        model.eval()
        with torch.no_grad():
            logits = model(x.to(device)).cpu()
        return {
            "loss": float(torch.nn.functional.cross_entropy(logits, y)),
            "accuracy": float((logits.argmax(1) == y).float().mean()),
            "examples": len(x),
        }

    def materialize_model_artifact(self, state: dict[str, Any]) -> bytes:
        return st_save({k: v.contiguous().cpu() for k, v in state["model"].state_dict().items()})

    def load_model_artifact(self, state: dict[str, Any], data: bytes) -> None:
        state["model"].load_state_dict(st_load(data))


class DigitsWorkload(HandWrittenDigits):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.fail_in = config.get("fail_in")
        self.step_sleep_s = float(config.get("step_sleep_s", 0.0))
        self.ema_decay = float(config.get("ema_decay", 0.5))

    def _maybe_fail(self, hook: str) -> None:
        if self.fail_in == hook:
            raise ValueError(f"injected failure in {hook}")
        if self.config.get("hang_in") == hook:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
            if self.config.get("hang_pid_file"):
                Path(self.config["hang_pid_file"]).write_text(str(os.getpid()))
            time.sleep(3600)

    def _step_delay(self, batch: dict[str, Any] | None) -> None:
        payload = (batch or {}).get("payload") or {}
        slow = self.config.get("slow_replica")
        if self.step_sleep_s and (slow is None or payload.get("replica") == slow):
            time.sleep(self.step_sleep_s)

    def init_model(self, device: str) -> dict[str, Any]:
        self._maybe_fail("init_model")
        return super().init_model(device)

    def train_window(self, state: dict[str, Any], batches: list[dict[str, Any]]) -> dict[str, Any]:
        self._maybe_fail("train_window")
        metrics = super().train_window(state, batches)
        self._maybe_diverge(state, batches)
        self._maybe_truncate_peer(batches)
        return metrics

    def _maybe_truncate_peer(self, batches: list[dict[str, Any]]) -> None:
        """``truncate_peer: {"replica": i, "round": r, "step": s, "pack": dir, "held":
        dir, "marker": file}``: after step s of round r, replica i waits for another
        replica's pack ``dir`` to be published and kept by its worker (in ``held``, its
        cache of pseudo-gradients by digest), then truncates the pack's values to half
        and drops the kept copy, once (``marker`` says it is done): a pack damaged on
        the shared root after it was published, and read from there by any worker."""
        at = self.config.get("truncate_peer")
        for batch in batches if at else []:
            payload = (batch or {}).get("payload") or {}
            if not all(payload.get(k) == at[k] for k in ("replica", "round", "step")):
                continue
            pack = Path(at["pack"])
            manifest = pack / "manifest.json"
            _wait_for(manifest)  # another worker publishes it
            digest = json.loads(manifest.read_text())["values_digest"]
            held = Path(at["held"]) / digest.replace(":", "-")
            _wait_for(held / "manifest.json")  # and then keeps it
            try:
                Path(at["marker"]).open("x").close()
            except FileExistsError:
                return
            values = pack / "values.bin"
            os.truncate(values, values.stat().st_size // 2)
            shutil.rmtree(held)

    def _maybe_diverge(self, state: dict[str, Any], batches: list[dict[str, Any]]) -> None:
        """``diverge: {"replica": i, "round": r, "step": s}``: replica i's parameters turn
        NaN after step s of round r (a replica that diverged; its optimizer's state and
        the loss it reports stay finite)."""
        at = self.config.get("diverge")
        for batch in batches if at else []:
            payload = (batch or {}).get("payload") or {}
            if all(payload.get(k) == at[k] for k in ("replica", "round", "step")):
                with torch.no_grad():
                    next(state["model"].parameters()).fill_(float("nan"))

    def evaluate(self, state: dict[str, Any], split: Any) -> dict[str, Any]:
        self._maybe_fail("evaluate")
        time.sleep(float(self.config.get("eval_sleep_s", 0.0)))
        return super().evaluate(state, split)

    def merge_candidate_models(
        self, base: Any, candidates: list[dict[str, Any]], policy: Any
    ) -> Any:
        self._maybe_fail("merge_candidate_models")
        return super().merge_candidate_models(base, candidates, policy)

    def reconcile_canonical_model(self, local: Any, canonical: Any, strategy: Any) -> Any:
        if strategy == "Replace":
            return copy.deepcopy(local)
        return super().reconcile_canonical_model(local, canonical, strategy)

    def apply_patch(self, patch: dict[str, Any]) -> Any:
        if "lr" not in patch["values"]:
            return {"Rejected": "only 'lr' can be patched"}
        self.lr = float(patch["values"]["lr"])
        return "Applied"


class DigitsWithInnerLoop(DigitsWorkload):
    """Defines the protocol's run_inner_loop hook (and reports progress through fleet)."""

    def run_inner_loop(self, state: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        from fleet import progress

        losses = []
        for step in range(params["num_inner_steps"]):
            losses.append(self.train_window(state, [])["loss"])
            progress.report(step + 1, loss=losses[-1], examples=self.batch_size)
        return {"steps_completed": len(losses), "metrics": {"loss": losses[-1], "hook": True}}


def _wait_for(path: Path, timeout_s: float = 120.0) -> None:
    """Wait until ``path`` exists (another process writes it), at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def make_workload(config: dict[str, Any]) -> DigitsWorkload:
    return DigitsWorkload(config)


def make_inner_loop_workload(config: dict[str, Any]) -> DigitsWithInnerLoop:
    return DigitsWithInnerLoop(config)


def broken_factory(config: dict[str, Any]) -> Any:
    raise RuntimeError("factory exploded")
