"""Stacks of what hung: where every thread of a worker was when one of its tasks was
asked to abort (a round's deadline, a quorum, a cancel), was stuck in a hook and had to
be interrupted, hit its soft time limit, or was killed at its hard time limit.

Each task of a worker runs under :func:`watched`. The stacks go to the shared root at
:func:`stacks_path` (``runs/<job>/stacks/<task id>.txt`` for a job's task, else
``stacks/<task id>.txt``), one section per event, and a job's task records the file as
the job's artifact ``stacks/<task id>`` (so ``fleet jobs show`` lists it and ``fleet gc``
keeps it) and says so in the job's log.

- Asked to abort, and stuck: the task's abort watch (:class:`~fleet.progress.TaskWatch`)
  calls :meth:`StackRecorder.record` from its own thread when it sees the abort, and
  again before it interrupts a task that did not stop (Python's
  ``sys._current_frames``: the main thread is caught inside the hook).
- Soft time limit: Celery raises ``SoftTimeLimitExceeded`` in the task; the main
  thread's stack is the exception's traceback, down to the frame it was stuck in.
- Hard time limit (and ``revoke(terminate=True)``): Celery sends the pool child SIGTERM,
  then SIGKILL. While a task runs, :mod:`faulthandler` is registered for SIGTERM: in C,
  without needing the GIL (a hung collective holds it), it writes every thread's stack
  to a local file under ``<cache dir>/stacks/<worker>/`` before the child's own handler
  (billiard's, which exits) runs. The worker's next pool child uploads such files when
  it starts (:func:`upload_leftovers`).

py-spy is not used: it would show native frames too, but a process cannot ptrace its
own parent under Yama's default ``ptrace_scope=1``.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from fleet.runtime import WorkerRuntime

log = logging.getLogger("fleet.stacks")

#: First line of a local stacks file faulthandler fills at a kill: this marker and the
#: task's JSON (``job_id``, ``task_id``, ``method``, ``worker``).
LOCAL_MARKER = "# fleet-stacks "
#: The signal Celery's hard time limit and ``revoke(terminate=True)`` send first.
KILL_SIGNAL = signal.SIGTERM


def stacks_path(job_id: str | None, task_id: str) -> str:
    """Where task ``task_id``'s stacks go on the shared root (relative)."""
    return f"runs/{job_id}/stacks/{task_id}.txt" if job_id else f"stacks/{task_id}.txt"


def artifact_name(task_id: str) -> str:
    """The job artifact that points at task ``task_id``'s stacks."""
    return f"stacks/{task_id}"


def format_stacks(reason: str, *, main_traceback: TracebackType | None = None) -> str:
    """Every thread's Python stack in this process, most recent call last, under a
    header with ``reason`` and the time (UTC). ``main_traceback``: the main thread's
    stack as an exception caught it (its current stack is then the handler's)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    main, me = threading.main_thread().ident, threading.get_ident()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    lines = [f"== {reason} at {stamp} UTC (pid {os.getpid()} on {socket.gethostname()})\n"]
    for ident, frame in sorted(sys._current_frames().items(), key=lambda x: x[0] != main):
        name = names.get(ident, "?")
        note = " (main)" if ident == main else " (recording these stacks)" if ident == me else ""
        lines.append(f"\n-- thread {name} (ident {ident}){note}\n")
        if ident == main and main_traceback is not None:
            lines.append("   as the exception found it:\n")
            lines.extend(traceback.format_tb(main_traceback))
        else:
            lines.extend(traceback.format_stack(frame))
    return "".join(lines)


class StackRecorder:
    """Writes one task's stacks to the shared root (see the module docstring); every
    :meth:`record` adds a section to the same file. Thread-safe; never raises (a
    recording that fails is logged)."""

    def __init__(
        self, runtime: WorkerRuntime, task_id: str, job_id: str | None, method: str
    ) -> None:
        self.runtime = runtime
        self.task_id = task_id
        self.job_id = job_id
        self.method = method
        self.path = stacks_path(job_id, task_id)
        self._sections: list[str] = []
        self._lock = threading.Lock()

    def record(self, reason: str, main_traceback: TracebackType | None = None) -> None:
        """Add every thread's stack now, under ``reason``, and write the file."""
        try:
            text = format_stacks(
                f"{self.method} task {self.task_id}: {reason}", main_traceback=main_traceback
            )
            with self._lock:
                self._sections.append(text)
                data = "\n".join(self._sections).encode()
                first = len(self._sections) == 1
                self.runtime.shared.write_bytes(self.path, data)
            if first and self.job_id is not None:
                from fleet.jobs import JobStore

                JobStore(self.runtime.quick_registry).add_artifact(
                    self.job_id, artifact_name(self.task_id), self.path
                )
            log.warning(
                "%s %s: stacks of every thread written to %s", self.method, reason, self.path
            )
        except Exception as exc:  # a diagnostic never breaks the task it diagnoses
            log.warning("could not record the stacks of %s (%s: %s)", self.task_id,
                        type(exc).__name__, exc)  # fmt: skip


#: Set once this process found it cannot write stacks locally (warned once).
_no_local_disk = threading.Event()


def local_dir(runtime: WorkerRuntime) -> Path:
    """This worker's directory of stacks written at a kill, not yet uploaded."""
    return Path(runtime.settings.cache_dir) / "stacks" / runtime.identity.name


@contextmanager
def _dump_on_kill(recorder: StackRecorder) -> Iterator[None]:
    """While the block runs on the main thread: SIGTERM first makes faulthandler write
    every thread's stack to a local file (kept only if the process dies)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    path: Path | None = None
    out: IO[str] | None = None
    try:
        directory = local_dir(recorder.runtime)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{recorder.task_id}.txt"
        out = path.open("w")
        meta = {
            "job_id": recorder.job_id,
            "task_id": recorder.task_id,
            "method": recorder.method,
            "worker": recorder.runtime.identity.name,
        }
        out.write(LOCAL_MARKER + json.dumps(meta) + "\n")
        out.write(
            f"== {recorder.method} task {recorder.task_id}: killed (signal "
            f"{KILL_SIGNAL.name}: the hard time limit, or revoke(terminate=True)); pid "
            f"{os.getpid()} on {socket.gethostname()}, most recent call first\n"
        )
        out.flush()
        faulthandler.register(KILL_SIGNAL, file=out, all_threads=True, chain=True)
    except (OSError, ValueError, RuntimeError) as exc:  # no local disk: go on without
        if not _no_local_disk.is_set():
            log.warning("stacks at a kill will not be kept (said once): %s", exc)
            _no_local_disk.set()
        if out is not None:
            out.close()
            out = None
    dying = False
    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        # billiard's SIGTERM handler exits through the task's finally blocks: the dump
        # faulthandler just wrote stays for the next child
        dying = True
        raise
    finally:
        if out is not None:
            faulthandler.unregister(KILL_SIGNAL)
            out.close()
        if path is not None and not dying:
            path.unlink(missing_ok=True)


@contextmanager
def watched(
    runtime: WorkerRuntime, task_id: str | None, job_id: str | None, method: str
) -> Iterator[StackRecorder | None]:
    """Run a task under stack recording (module docstring); yields its recorder (None
    without a task id: a direct call, not a Celery task)."""
    if task_id is None:
        yield None
        return
    from celery.exceptions import SoftTimeLimitExceeded

    recorder = StackRecorder(runtime, task_id, job_id, method)
    with _dump_on_kill(recorder):
        try:
            yield recorder
        except Exception as exc:
            # the limit may reach here wrapped (a hook's failure is a HookFailedError)
            seen: BaseException | None = exc
            visited: set[int] = set()  # a chain may loop back on itself
            while seen is not None and not isinstance(seen, SoftTimeLimitExceeded):
                visited.add(id(seen))
                seen = seen.__cause__ or seen.__context__
                if seen is not None and id(seen) in visited:
                    seen = None
            if seen is not None:
                recorder.record("soft time limit exceeded", seen.__traceback__)
            raise


def upload_leftovers(runtime: WorkerRuntime) -> list[str]:
    """Upload the stacks files faulthandler wrote when this worker's previous pool
    child was killed: each to :func:`stacks_path`, recorded as its job's artifact and in
    its job's log. Returns the shared-root paths written; never raises."""
    written: list[str] = []
    directory = local_dir(runtime)
    try:
        files = sorted(directory.glob("*.txt"))
    except OSError:
        return written
    for path in files:
        try:
            text = path.read_text(errors="replace")
            first, _, rest = text.partition("\n")
            if not first.startswith(LOCAL_MARKER) or "Thread 0x" not in rest:
                path.unlink(missing_ok=True)  # a task that ended normally, or no dump
                continue
            meta = json.loads(first.removeprefix(LOCAL_MARKER))
            job_id, task_id = meta.get("job_id"), str(meta["task_id"])
            rel = stacks_path(job_id, task_id)
            runtime.shared.write_bytes(rel, rest.encode())
            line = (
                f"{meta.get('method')} was killed (time limit or terminate): stacks of every "
                f"thread written to {rel}"
            )
            log.warning("%s (task %s)", line, task_id)
            if job_id:
                from fleet.jobs import JobStore

                jobs = JobStore(runtime.registry)
                jobs.add_artifact(job_id, artifact_name(task_id), rel)
                jobs.append_log(
                    job_id,
                    worker=str(meta.get("worker") or runtime.identity.name),
                    task_id=task_id,
                    level="WARNING",
                    logger=log.name,
                    line=line,
                )
            path.unlink()
            written.append(rel)
        except Exception as exc:  # the next child tries again
            log.warning("could not upload the stacks in %s (%s: %s)", path,
                        type(exc).__name__, exc)  # fmt: skip
    return written
