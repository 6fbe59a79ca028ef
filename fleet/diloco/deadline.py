"""When a round stops waiting for its stragglers: a fixed deadline
(``quorum.round_deadline_s``), an adaptive one from the replicas' observed speed, or
the earlier of the two.

The adaptive deadline is robust statistics over seconds per inner step (a replica's
time from its task's start to its published pack, over its steps): with ``m`` the
median and ``MAD`` the median absolute deviation over the merged attempts of the last
``window_rounds`` committed rounds,

    deadline_s = clamp(inner_steps * max(m + k * MAD, min_factor * m), floor_s, ceiling_s)

seconds after the round started. Median and MAD ignore the stragglers they are meant
to cut (a fixed timeout, as torchft's or hivemind's ``averaging_timeout``, must be
guessed; this one follows the hardware; hivemind issue #676 asks for it). A fleet of
unequal workers is not cut: their spread is in the MAD. This round's own finishers are
left out (with two replicas, the fast one alone would set the deadline of the slow
one). The first round has no adaptive deadline: nothing is observed yet.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable

from fleet.diloco.config import DiLoCoConfig
from fleet.diloco.state import ReplicaOutcome, RoundRecord

#: (k, min_factor, floor_s) when the config leaves them unset: generous, and tight.
GENEROUS = (10.0, 3.0, 10.0)
TIGHT = (3.0, 1.5, 0.5)


def seconds_per_step(outcome: ReplicaOutcome) -> float | None:
    """An attempt's wall seconds per completed inner step (None without steps)."""
    steps = outcome.steps_completed
    if not steps:
        return None
    return max(outcome.finished_at - outcome.started_at, 0.0) / steps


class RoundDeadline:
    """The deadline policy of a run: fed each committed round, asked each round."""

    def __init__(self, config: DiLoCoConfig, history: Iterable[RoundRecord] = ()) -> None:
        self.config = config
        adaptive = config.quorum.adaptive_deadline
        k, factor, floor = TIGHT if adaptive.tight else GENEROUS
        self.k = adaptive.k if adaptive.k is not None else k
        self.min_factor = adaptive.min_factor if adaptive.min_factor is not None else factor
        self.floor_s = adaptive.floor_s if adaptive.floor_s is not None else floor
        self._rounds: deque[list[float]] = deque(maxlen=adaptive.window_rounds)
        for record in history:
            self.observe(record)

    def observe(self, record: RoundRecord) -> None:
        """Add a committed round's merged attempts to the window."""
        rates = [seconds_per_step(o) for o in record.merged]
        self._rounds.append([r for r in rates if r is not None])

    def adaptive_s(self) -> float | None:
        """The adaptive deadline (seconds after the round's start); None when off or
        nothing is observed yet."""
        adaptive = self.config.quorum.adaptive_deadline
        if not adaptive.enabled:
            return None
        rates = [r for rnd in self._rounds for r in rnd]
        if not rates:
            return None
        median = statistics.median(rates)
        mad = statistics.median(abs(r - median) for r in rates)
        per_step = max(median + self.k * mad, self.min_factor * median)
        deadline = max(self.config.inner_steps * per_step, self.floor_s)
        if adaptive.ceiling_s is not None:
            deadline = min(deadline, adaptive.ceiling_s)
        return deadline

    def deadline_s(self) -> float | None:
        """The round's deadline: the earlier of the fixed and the adaptive one."""
        fixed = self.config.quorum.round_deadline_s
        adaptive = self.adaptive_s()
        given = [d for d in (fixed, adaptive) if d is not None]
        return min(given) if given else None
