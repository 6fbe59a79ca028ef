"""Progress and cooperative stopping for long tasks (DESIGN.md decision 2).

A long task (``train_window``, ``run_inner_loop``) runs inside a :class:`StepMonitor`.
Between optimizer steps, call :func:`report` (fleet's own inner loop does; a workload
hook may too). It publishes progress as the Celery task state ``PROGRESS`` and a
``task-progress`` event (step, loss, examples/s), and raises
:class:`~fleet.errors.TaskAborted` when the task was asked to abort, or
:class:`~fleet.errors.DeadlineExceeded` once the deadline passed, so the task stops
cleanly between steps. Outside a monitored task, :func:`report` does nothing.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fleet.errors import DeadlineExceeded, TaskAborted

#: Minimum seconds between two progress publications (abort is checked every step).
PUBLISH_INTERVAL_S = 0.5


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
        self.started = time.monotonic()
        self._last_publish = 0.0

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
