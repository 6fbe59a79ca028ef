"""torch state files written by workers: optimizer (and scheduler) states, saved with
``torch.save`` and published atomically (a reader sees the old file or the new one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO, cast

import torch

from fleet.errors import storage_error
from fleet.files import publishing

#: ``inner_optimizer_state_encoding`` of an optimizer's ``state_dict()`` (fleet's own loop).
TORCH_OPTIMIZER_STATE = "torch-optimizer-state-dict-v1"


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
