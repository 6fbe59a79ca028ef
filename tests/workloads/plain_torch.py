"""A user's own PyTorch model on fleet, as the README shows it: an nn.Module, an
optimizer, a loss and DataLoaders, wrapped by TorchWorkload. The data is a plain
directory of ``torch.save``'d ``(x, y)`` shards (:func:`write_shards`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fleet.workloads import TorchWorkload


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _load(paths: list[str]) -> TensorDataset:
    parts = [torch.load(p, weights_only=True) for p in paths]
    return TensorDataset(torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))


def make(config: dict[str, Any]) -> TorchWorkload:
    held_out = Path(config["data_dir"]) / "held-out.pt"
    return TorchWorkload(
        model=Net,
        optimizer=lambda params: torch.optim.AdamW(params, lr=float(config.get("lr", 1e-2))),
        loss=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
        train_data=lambda shard_paths: DataLoader(_load(shard_paths), batch_size=32, shuffle=True),
        eval_data=lambda split: DataLoader(_load([str(held_out)]), batch_size=256),
        config=config,
    )


def write_shards(out_dir: Path, shards: int = 8, per_shard: int = 128, seed: int = 0) -> None:
    """A learnable problem (4 classes from a fixed linear map of 16 features) as
    ``shards`` files of ``per_shard`` examples plus ``held-out.pt`` (512 examples)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 4, generator=gen)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 16, generator=gen)
        return x, (x @ w).argmax(1)

    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        torch.save(sample(per_shard), out_dir / f"shard-{i:03d}.pt")
    torch.save(sample(512), out_dir / "held-out.pt")
