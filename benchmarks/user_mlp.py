"""A model fleet has never seen, written as a user would: an MLP, AdamW at lr 1e-3, a
DataLoader over an in-memory dataset, and nothing else (no dataset directory, no
hooks). The task is a fixed random teacher MLP's argmax over 32 classes of 128
features, drawn fresh for every batch (so no run overfits), 4,096 examples held out.
``hidden: 2048`` gives 4.5M parameters. Used by benchmarks/outer_defaults.py."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from fleet.workloads import TorchWorkload

_GEN = torch.Generator().manual_seed(1234)
_TEACHER = [torch.randn(128, 256, generator=_GEN), torch.randn(256, 32, generator=_GEN)]


def _label(x: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(x @ _TEACHER[0]) @ _TEACHER[1]).argmax(1)


class _Fresh(IterableDataset):
    """Batches of 64 new examples, from torch's global generator (TorchWorkload seeds it
    per replica and round)."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        while True:
            x = torch.randn(64, 128)
            yield x, _label(x)


_HELD_X = torch.randn(4_096, 128, generator=_GEN)
_HELD_OUT = TensorDataset(_HELD_X, _label(_HELD_X))


def make(config: dict[str, Any]) -> TorchWorkload:
    hidden = int(config.get("hidden", 2048))

    def model() -> nn.Module:
        return nn.Sequential(
            nn.Linear(128, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, 32),
        )

    return TorchWorkload(
        model=model,
        optimizer=lambda params: torch.optim.AdamW(params, lr=float(config.get("lr", 1e-3))),
        loss=lambda m, batch: F.cross_entropy(m(batch[0]), batch[1]),
        train_data=lambda shard_paths: DataLoader(_Fresh(), batch_size=None),
        eval_data=lambda split: DataLoader(_HELD_OUT, batch_size=1024),
        config=config,
    )
