"""torch state files written by workers: optimizer (and scheduler) states, saved with
``torch.save`` and published atomically (a reader sees the old file or the new one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO, cast

import torch

from fleet.errors import storage_error
from fleet.files import publishing

#: ``inner_optimizer_state_encoding`` of a bare optimizer ``state_dict()`` (what fleet's
#: own loop wrote before :data:`INNER_STATE_ENCODING`; still read).
TORCH_OPTIMIZER_STATE = "torch-optimizer-state-dict-v1"
#: ``inner_optimizer_state_encoding`` of the inner state fleet's loop and TorchWorkload
#: write: ``torch.save({"optimizer": state_dict, "scheduler": state_dict | None})``.
INNER_STATE_ENCODING = "fleet-torch-workload-state-v1"


class _RecordingFile:
    """A binary file that remembers the OSError of a failed write: torch.save turns it
    into ``RuntimeError: [enforce fail at inline_container.cc]``."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path``, published atomically.

    Raises:
        StorageError: the file system failed (``StorageFullError`` when it is full),
            with the temp file removed.
    """
    with publishing(path) as tmp, open(tmp, "wb") as f:
        sink = _RecordingFile(f)
        try:
            torch.save(obj, cast(Any, sink))
        except RuntimeError as exc:
            if sink.error is None:
                raise
            raise storage_error(sink.error, str(path)) from exc


def save_inner_state(optimizer: Any, scheduler: Any, path: Path) -> None:
    """Save an inner optimizer's (and its scheduler's) state to ``path``
    (:data:`INNER_STATE_ENCODING`), atomically.

    Raises:
        StorageError: the file system failed.
    """
    save_torch(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
        },
        path,
    )


def load_inner_state(optimizer: Any, scheduler: Any, path: Path, device: Any = None) -> None:
    """Restore an optimizer (and scheduler) from ``path``: :data:`INNER_STATE_ENCODING`,
    or a bare optimizer state dict (:data:`TORCH_OPTIMIZER_STATE`)."""
    saved = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(saved, dict) or "optimizer" not in saved:
        optimizer.load_state_dict(saved)
        return
    optimizer.load_state_dict(saved["optimizer"])
    if saved.get("scheduler") is not None and scheduler is not None:
        scheduler.load_state_dict(saved["scheduler"])
