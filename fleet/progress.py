"""Progress and cooperative stopping for long tasks (docs/design.md decision 2).

A long task (``train_window``, ``run_inner_loop``) runs inside a :class:`StepMonitor`.
Between optimizer steps, call :func:`report` (fleet's own inner loop does; a workload
hook may too). It publishes progress as the Celery task state ``PROGRESS`` and a
``task-progress`` event (step, loss, examples/s), and raises
:class:`~fleet.errors.TaskAborted` when the task was asked to abort, or
:class:`~fleet.errors.DeadlineExceeded` once the deadline passed, so the task stops
cleanly between steps. Outside a monitored task, :func:`report` does nothing.

Training never waits for Redis: a :class:`TaskWatch` polls the abort flag and publishes
the latest progress from two threads of its own, and the step loop only reads what
they found. When Redis is away the task keeps training (an outage means "not
aborted"; one line is logged) and publishes its result once Redis is back.
"""

from __future__ import annotations

import contextvars
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fleet.errors import DeadlineExceeded, FleetError, TaskAborted

log = logging.getLogger("fleet.progress")

#: Minimum seconds between two progress publications (abort is checked every step).
PUBLISH_INTERVAL_S = 0.5
#: Seconds between two looks at a running task's abort flag.
ABORT_POLL_S = 0.2
#: Seconds a long task may run on after it was asked to abort before its thread is
#: interrupted (a hook stuck in a call that releases the GIL: a sleep, a socket read).
ABORT_INTERRUPT_S = 5.0
#: The signal that interrupts it (Celery's prefork children use SIGUSR1 for soft time
#: limits; SIGUSR2 is free).
INTERRUPT_SIGNAL = signal.SIGUSR2


@contextmanager
def interruptible(task_id: str | None) -> Iterator[Callable[[], None] | None]:
    """While the block runs on the main thread, :data:`INTERRUPT_SIGNAL` raises
    :class:`~fleet.errors.TaskAborted` in it; yields the function that sends the signal
    (None off the main thread, where Python cannot deliver it)."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    ident = threading.main_thread().ident
    armed = threading.Event()
    armed.set()

    def handler(signum: int, frame: object) -> None:
        if armed.is_set():
            armed.clear()
            raise TaskAborted(task_id, -1)

    def interrupt() -> None:
        if armed.is_set() and ident is not None:
            log.warning("task %s did not stop when asked to abort: interrupting it", task_id)
            signal.pthread_kill(ident, INTERRUPT_SIGNAL)

    previous = signal.signal(INTERRUPT_SIGNAL, handler)
    try:
        yield interrupt
    finally:
        armed.clear()
        signal.signal(INTERRUPT_SIGNAL, previous)


class TaskWatch:
    """The Redis side of a long task, off the training thread: one thread polls
    ``abort_requested()`` every :data:`ABORT_POLL_S` and sets :attr:`aborted`; another
    sends the newest progress given to :meth:`offer` with ``publish(meta)``. Either may
    block or fail while Redis is away; training goes on, and the failure is logged once
    per outage. ``snapshot(reason)`` (:meth:`fleet.stacks.StackRecorder.record`) is called
    from the watch thread when the task is asked to abort, and again before a task that
    did not stop is interrupted.
    """

    def __init__(
        self,
        abort_requested: Callable[[], bool],
        publish: Callable[[dict[str, Any]], None],
        interrupt: Callable[[], None] | None = None,
        snapshot: Callable[[str], None] | None = None,
    ) -> None:
        self.aborted = threading.Event()
        self._interrupt = interrupt
        self._snapshot = snapshot
        self._abort_requested = abort_requested
        self._publish = publish
        self._pending: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._poll_abort, name="fleet-abort-watch", daemon=True),
            threading.Thread(target=self._publish_loop, name="fleet-progress", daemon=True),
        ]

    def __enter__(self) -> TaskWatch:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._wake.set()

    def offer(self, meta: dict[str, Any]) -> None:
        """Publish ``meta`` soon (a newer offer replaces one not yet sent)."""
        with self._lock:
            self._pending = meta
        self._wake.set()

    def _poll_abort(self) -> None:
        failing = False
        while not self._stop.is_set() and not self.aborted.is_set():
            try:
                if self._abort_requested():
                    self.aborted.set()
                if failing:
                    log.warning("abort checks reach Redis again")
                failing = False
            except FleetError as exc:  # Redis away: keep training, say so once
                if not failing:
                    log.warning("cannot check the abort flag (%s); training on", exc)
                failing = True
            self._stop.wait(ABORT_POLL_S)
        if self._snapshot is not None and self.aborted.is_set() and not self._stop.is_set():
            self._snapshot("asked to abort")
        # asked to abort: a task that does not reach its next step check in time is
        # stuck in a call; interrupt it
        if self._interrupt is not None and not self._stop.wait(ABORT_INTERRUPT_S):
            if self._snapshot is not None:
                self._snapshot(f"stuck: still running {ABORT_INTERRUPT_S:g} s after the abort")
            self._interrupt()

    def _publish_loop(self) -> None:
        failing = False
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                meta, self._pending = self._pending, None
            if meta is None:
                continue
            try:
                self._publish(meta)
                failing = False
            except Exception as exc:  # Redis away (any client's error): say so once
                if not failing:
                    log.warning("cannot publish progress (%s); training on", exc)
                failing = True


class StepMonitor:
    """Tracks one long task's steps; publishes progress and decides when to stop.

    Args:
        task_id: the Celery task id (None outside Celery).
        publish: ``publish(meta)`` sends progress (PROGRESS state + event).
        abort_requested: returns True once the task should abort.
        deadline_unix_s: wall-clock deadline (seconds since the epoch), or None.
        total_steps: expected steps, for the progress fraction.
    """

    def __init__(
        self,
        task_id: str | None,
        publish: Callable[[dict[str, Any]], None],
        abort_requested: Callable[[], bool],
        deadline_unix_s: float | None = None,
        total_steps: int | None = None,
    ) -> None:
        self.task_id = task_id
        self.publish = publish
        self.abort_requested = abort_requested
        self.deadline_unix_s = deadline_unix_s
        self.total_steps = total_steps
        self.steps = 0
        self.examples = 0
        #: When the last step was reported (monotonic s; None before the first).
        self.last_step_at: float | None = None
        self.started = time.monotonic()
        self._last_publish = 0.0
        self._at_step: dict[int, Callable[[], None]] = {}

    def call_at(self, step: int, action: Callable[[], None]) -> None:
        """Run ``action`` on the task's thread once ``step`` steps are reported, before
        the next step starts (Streaming DiLoCo's late mix); :meth:`take` returns it if
        that never happened."""
        self._at_step[step] = action

    def take(self, step: int) -> Callable[[], None] | None:
        """The action registered at ``step`` that has not run (None if it ran)."""
        return self._at_step.pop(step, None)

    def check(self) -> None:
        """Raise if the task must stop now (abort or deadline)."""
        if self.abort_requested():
            raise TaskAborted(self.task_id, self.steps)
        if self.deadline_unix_s is not None and time.time() >= self.deadline_unix_s:
            raise DeadlineExceeded(self.task_id, self.steps)

    def step(self, step: int, *, loss: float | None, examples: int, force: bool = False) -> None:
        """Record that ``step`` steps are done (``examples`` more examples), publish
        progress at most every ``PUBLISH_INTERVAL_S``, then :meth:`check`."""
        self.steps = step
        self.last_step_at = time.monotonic()
        self.examples += examples
        now = time.monotonic()
        if force or now - self._last_publish >= PUBLISH_INTERVAL_S:
            self._last_publish = now
            elapsed = max(now - self.started, 1e-9)
            self.publish(
                {
                    "step": step,
                    "total_steps": self.total_steps,
                    "loss": loss,
                    "examples_per_s": self.examples / elapsed,
                    "elapsed_s": elapsed,
                }
            )
        self.check()
        action = self._at_step.pop(step, None)
        if action is not None:
            action()


_current: contextvars.ContextVar[StepMonitor | None] = contextvars.ContextVar(
    "fleet_step_monitor", default=None
)


@contextmanager
def monitoring(monitor: StepMonitor) -> Iterator[StepMonitor]:
    """Make ``monitor`` the current one for :func:`report` within the block."""
    token = _current.set(monitor)
    try:
        yield monitor
    finally:
        _current.reset(token)


def current() -> StepMonitor | None:
    """The monitor of the running long task, if any."""
    return _current.get()


def report(step: int, *, loss: float | None = None, examples: int = 0) -> None:
    """Call between optimizer steps of a long task: ``step`` steps are done, the last
    had ``loss`` over ``examples`` examples.

    Raises:
        TaskAborted: the task was asked to abort.
        DeadlineExceeded: the task's deadline passed.
    """
    monitor = _current.get()
    if monitor is not None:
        monitor.step(step, loss=loss, examples=examples)
