"""digits: an MLP on scikit-learn's bundled handwritten digits (8x8 images, 10 classes).

Real data that ships with scikit-learn (``load_digits``: 1,797 images), split 70/15/15
into train/validation/test with a fixed seed. Fast enough for tests.

Config: ``hidden`` (64), ``lr`` (1e-2, AdamW), ``batch_size`` (64), ``seed`` (0).
State: ``{"model": nn.Sequential, "optimizer": AdamW}``. Under DiLoCo without a dataset,
a batch's ``payload.replica`` / ``payload.num_replicas`` pick the replica's own shard.
Dataset mode: :func:`write_dataset` (``fleet dataset write digits PATH``) writes the
training split as microshards (safetensors ``{"images", "labels"}``); a BatchRef with
``shard_paths`` trains on those shards' examples only.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save

from examples.common import MergeHooks, batch_key, shard_paths_of


def load_splits(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train / Validation / Test splits: images float32 ``[n, 64]`` in [0, 1] and labels
    int64 ``[n]``."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_train, n_val = int(0.7 * len(x)), int(0.15 * len(x))
    return {
        "Train": (x[:n_train], y[:n_train]),
        "Validation": (x[n_train : n_train + n_val], y[n_train : n_train + n_val]),
        "Test": (x[n_train + n_val :], y[n_train + n_val :]),
    }


def write_dataset(out_dir: Any, microshards: int = 16, *, manifest: bool = True) -> dict[str, int]:
    """Write the training split as ``microshards`` microshards in ``out_dir``
    (safetensors ``{"images": float32 [n, 64], "labels": int64 [n]}``; with burn_p2p's
    ``fetch-manifest.json`` when ``manifest``). Returns ``{"microshards", "bytes"}``."""
    from pathlib import Path

    from fleet.data.dataset import write_dataset as write_microshards

    x, y = load_splits(0)["Train"]
    bounds = torch.linspace(0, len(x), microshards + 1).long().tolist()
    shards = [
        st_save({"images": x[a:b].clone(), "labels": y[a:b].clone()})
        for a, b in itertools.pairwise(bounds)
    ]
    index = write_microshards(
        Path(out_dir), shards, manifest=manifest, view_id=f"digits-{microshards}"
    )
    return {"microshards": len(index.microshards), "bytes": index.total_bytes}


class DigitsWorkload(MergeHooks):
    workload_name = "digits-mlp"

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = dict(config)
        self.hidden = int(config.get("hidden", 64))
        self.lr = float(config.get("lr", 1e-2))
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


def make(config: dict[str, Any]) -> DigitsWorkload:
    """The workload factory (``examples.digits:make``)."""
    return DigitsWorkload(config)
