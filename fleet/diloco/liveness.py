"""Which workers a round may count on, and the grace they get after a Redis outage.

A worker is alive while its liveness key (renewed by its heartbeat, TTL
``FLEET_HEARTBEAT_TTL_S``) exists. While Redis is away no key can be renewed, so right
after an outage every worker may look dead; docs/design.md decision 9.
"""

from __future__ import annotations

import time

from fleet.client import Fleet

#: Seconds between two reads of worker liveness (2N+1 Redis calls; well under the
#: heartbeat TTL).
LIVENESS_INTERVAL_S = 0.5
#: A pause of the poll loop longer than this (seconds) means the orchestrator itself was
#: waiting for Redis: workers then get a grace period to re-announce themselves before
#: any of them is taken for lost (their liveness keys expired while Redis was away).
STALL_S = 1.0
#: Heartbeat intervals a worker seen alive must stay missing before a poll loop takes it
#: for lost (workers cut off together expire up to one interval apart).
CONFIRM_HEARTBEATS = 2


class Liveness:
    """Which workers are alive, read at most every :data:`LIVENESS_INTERVAL_S`.

    A worker whose liveness key is missing is lost, except within ``grace_s`` seconds
    after a Redis outage (every worker's key may have expired before its heartbeat could
    reconnect): after this orchestrator stalled (:data:`STALL_S`: it waited in Celery's
    own retries), or see :meth:`~fleet.registry.Registry.in_outage_grace`.

    In a poll loop (once ticked), a worker this liveness saw alive is lost only once its
    key has been missing from reads :data:`CONFIRM_HEARTBEATS` heartbeat intervals apart.
    Workers cut off together (a site's link, a frozen host) stop their heartbeats at the
    same moment, but their keys expire up to a heartbeat interval apart: without the
    confirmation the first one's replica would be re-run on a worker about to be found
    lost too, where it can only wait, rather than kept for them to come back."""

    def __init__(self, fleet: Fleet, grace_s: float) -> None:
        self.fleet = fleet
        self.grace_s = grace_s
        self._names: set[str] = set()
        self._read = float("-inf")
        self._tick = time.monotonic()
        self._ticking = False
        self._grace_until = float("-inf")
        self.confirm_s = CONFIRM_HEARTBEATS * fleet.settings.heartbeat_interval_s
        self._missing_since: dict[str, float] = {}
        """Workers seen alive, then missing: the read that first missed them."""

    def tick(self) -> None:
        """Call once per poll; notices a stall (more than :data:`STALL_S` since the last
        tick)."""
        now = time.monotonic()
        if now - self._tick > STALL_S:
            self._stalled(now)
        self._tick, self._ticking = now, True

    def _stalled(self, now: float) -> None:
        self._grace_until = now + self.grace_s
        self._read = float("-inf")

    def alive(self) -> set[str]:
        started = time.monotonic()
        if started - self._read >= LIVENESS_INTERVAL_S:
            names = {w.name for w in self.fleet.workers()}
            self._read = time.monotonic()
            for name in self._names - names:
                self._missing_since.setdefault(name, self._read)
            for name in names:
                self._missing_since.pop(name, None)
            self._names = names
            if self._read - started > STALL_S:  # the read itself waited for Redis
                self._stalled(self._read)
        return self._names

    def lost(self, worker: str) -> bool:
        """True if ``worker`` is not alive and no grace period runs (and, in a poll loop,
        it has been missing for ``confirm_s`` if it was seen alive).

        Once this liveness is ticked (a poll loop's), a stall since the last tick counts
        here too: what the loop did between the tick and this question may itself have
        waited out an outage unseen by fleet's clients. Celery's result backend
        (``future.ready()``) waits in its own retries, and its reply can come through on
        its old connection as the link returns, before any heartbeat could."""
        if self._ticking:
            self.tick()
        if worker in self.alive() or time.monotonic() < self._grace_until:
            return False
        missing_since = self._missing_since.get(worker, float("-inf"))
        if self._ticking and self._read - missing_since < self.confirm_s:
            return False  # not yet missing for long enough: confirm at a later read
        return not self.fleet.registry.in_outage_grace()

    def start_grace(self) -> None:
        """Start a grace period now: for ``grace_s`` seconds no worker is lost (and the
        next :meth:`alive` reads Redis again)."""
        self._stalled(time.monotonic())

    def refresh(self) -> None:
        """Read again at the next look (a new attempt's worker may postdate the last read)."""
        self._read = float("-inf")
