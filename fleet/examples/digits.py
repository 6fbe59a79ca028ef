"""digits: an MLP on scikit-learn's bundled handwritten digits (8x8 images, 10 classes),
written as a plain PyTorch model, optimizer, loss and DataLoaders on
:class:`~fleet.workloads.TorchWorkload`.

Real data that ships with scikit-learn (``load_digits``: 1,797 images), split 70/15/15
into train/validation/test with a fixed seed. Fast enough for tests.

Config: ``hidden`` (64), ``lr`` (1e-2, AdamW), ``batch_size`` (64), ``seed`` (0).
Without a dataset, replica ``i`` of ``N`` trains on every ``N``-th training example from
``i``. Dataset mode: :func:`write_dataset` (``fleet dataset write digits PATH``) writes
the training split as microshards (safetensors ``{"images", "labels"}``); a BatchRef's
shards are the only examples its steps see. Metrics: ``loss``, ``accuracy``.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save
from torch.utils.data import DataLoader, TensorDataset

from fleet.workloads import ShardPaths, TorchWorkload


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


def make(config: dict[str, Any]) -> TorchWorkload:
    """The workload factory (``fleet.examples.digits:make``)."""
    hidden, batch_size = int(config.get("hidden", 64)), int(config.get("batch_size", 64))
    splits = load_splits(int(config.get("seed", 0)))

    def train_data(shards: ShardPaths) -> DataLoader[Any]:
        if shards:
            files = [st_load_file(p) for p in shards]
            x, y = torch.cat([f["images"] for f in files]), torch.cat([f["labels"] for f in files])
        else:
            x, y = (t[shards.replica :: shards.num_replicas] for t in splits["Train"])
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)

    return TorchWorkload(
        model=lambda: torch.nn.Sequential(
            torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
        ),
        optimizer=lambda params: torch.optim.AdamW(params, lr=float(config.get("lr", 1e-2))),
        loss=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
        train_data=train_data,
        eval_data=lambda split: DataLoader(TensorDataset(*splits[split]), batch_size=512),
        metrics=lambda model, batch: {
            "accuracy": float((model(batch[0]).argmax(1) == batch[1]).float().mean())
        },
        config=config,
        name="digits-mlp",
    )
