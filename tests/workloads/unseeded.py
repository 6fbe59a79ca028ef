"""A user's bug the conformance check must catch: the training data is drawn afresh from
the operating system's entropy every time the DataLoader is built, so two runs of the
same job (or a re-run of a lost attempt) train on different data. With config
``{"seeded": true}`` the same model draws its data from a fixed seed instead."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fleet.workloads import TorchWorkload


def _data(seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=gen)
    return TensorDataset(x, (x.sum(1) > 0).long())


def _train_seed(config: dict[str, Any]) -> int:
    return 1 if config.get("seeded") else int.from_bytes(os.urandom(4), "little")


def make(config: dict[str, Any]) -> TorchWorkload:
    return TorchWorkload(
        model=lambda: torch.nn.Linear(8, 2),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        loss=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
        train_data=lambda shards: DataLoader(_data(_train_seed(config)), batch_size=16),
        eval_data=lambda split: DataLoader(_data(0), batch_size=64),
        config=config,
    )
