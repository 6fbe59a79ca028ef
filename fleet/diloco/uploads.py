"""Checkpoints published off a round's critical path: one thread per worker process takes
uploads in order (a replica's state, a full global model) while the next round trains,
and records each in Redis once it has landed (:meth:`fleet.jobs.JobStore.
record_checkpoint`), so the orchestrator only ever relies on checkpoints that exist.

What a job hands the thread is already a private copy (hard links into a staging
directory), so the round that follows may prune its own files freely. An upload that
fails is logged and dropped: the run keeps its previous checkpoint. A worker that dies
mid-upload leaves no manifest, so no reader takes what it left (docs/protocol.md
section 5.5), and no record.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fleet.diloco")


@dataclass(frozen=True)
class Upload:
    """One background upload: ``run`` publishes (and records) it; ``staging`` (a
    directory of private copies) is deleted afterwards either way."""

    what: str
    run: Callable[[], None]
    staging: Path | None = None


class BackgroundUploads:
    """A worker process's upload thread (see the module docstring)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Upload] = queue.Queue()
        self._idle = threading.Condition()
        self._pending = 0
        self._thread = threading.Thread(target=self._loop, name="fleet-uploads", daemon=True)
        self._thread.start()

    def submit(self, upload: Upload) -> None:
        """Queue ``upload``; it runs after those queued before it."""
        with self._idle:
            self._pending += 1
        self._queue.put(upload)

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until every queued upload is done; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    @property
    def pending(self) -> int:
        """Uploads queued or running."""
        with self._idle:
            return self._pending

    def _loop(self) -> None:
        while True:
            upload = self._queue.get()
            try:
                upload.run()
                log.info("checkpoint %s published", upload.what)
            except Exception as exc:  # the run keeps its previous checkpoint
                log.warning(
                    "checkpoint %s not published: %s: %s", upload.what, type(exc).__name__, exc
                )
            finally:
                if upload.staging is not None:
                    shutil.rmtree(upload.staging, ignore_errors=True)
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()


_uploads: tuple[int, BackgroundUploads] | None = None
_lock = threading.Lock()


def background_uploads() -> BackgroundUploads:
    """This process's upload thread (a forked child makes its own)."""
    global _uploads
    with _lock:
        if _uploads is None or _uploads[0] != os.getpid():
            _uploads = (os.getpid(), BackgroundUploads())
        return _uploads[1]


__all__ = ["BackgroundUploads", "Upload", "background_uploads"]
