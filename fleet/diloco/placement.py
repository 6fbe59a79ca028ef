"""Which worker runs each replica of a round, a replacement for a lost one, and the outer step.

Every round places the replicas over the workers alive *now* (rebalancing): each worker
gets one replica before any gets two, so a restarted, reconnected or spare worker is
used from the next round on. A replica keeps its worker (and warm handle) when that
worker is alive and has no other replica yet; otherwise it moves to the least loaded
worker, preferring the run's preferred workers in order, then worker names. The outer
step runs on the worker of the first replica that finished (idle by then), else on the
pool queue.
"""

from __future__ import annotations

from collections.abc import Sequence

from fleet.diloco.state import HandleRef
from fleet.errors import NoWorkersError


def _ranked(alive: Sequence[str], preferred: Sequence[str] | None) -> list[str]:
    first = [w for w in (preferred or []) if w in alive]
    return first + sorted(w for w in alive if w not in first)


def place_replicas(
    replicas: int,
    alive: Sequence[str],
    warm: Sequence[HandleRef | None],
    preferred: Sequence[str] | None = None,
) -> list[str]:
    """The worker of each replica ``0..replicas-1`` this round.

    Args:
        alive: names of the workers alive now.
        warm: each replica's warm handle from the last round (or None).
        preferred: workers to use first, in order (others follow).

    Raises:
        NoWorkersError: no worker is alive.
    """
    ranked = _ranked(alive, preferred)
    if not ranked:
        raise NoWorkersError(1, 0, 0.0)
    load = dict.fromkeys(ranked, 0)
    placed: list[str | None] = [None] * replicas
    for i in range(replicas):
        handle = warm[i] if i < len(warm) else None
        if handle is not None and load.get(handle.worker) == 0:
            placed[i] = handle.worker
            load[handle.worker] = 1
    for i in range(replicas):
        if placed[i] is None:
            worker = min(ranked, key=lambda w: (load[w], ranked.index(w)))
            placed[i] = worker
            load[worker] += 1
    return [w for w in placed if w is not None]


def training_workers(alive: Sequence[str], eval_worker: str | None) -> list[str]:
    """The alive workers replicas may be placed on: all but ``eval_worker`` (kept for
    evaluations beside training), unless it is the only one."""
    return [w for w in alive if w != eval_worker] or list(alive)


def replacement_worker(
    alive: Sequence[str],
    load: dict[str, int],
    exclude: set[str],
    preferred: Sequence[str] | None = None,
) -> str | None:
    """The least loaded alive worker not in ``exclude`` (or, when every alive worker is
    excluded, the least loaded alive one); None if no worker is alive."""
    ranked = _ranked(alive, preferred)
    pool = [w for w in ranked if w not in exclude] or ranked
    if not pool:
        return None
    return min(pool, key=lambda w: (load.get(w, 0), ranked.index(w)))


def outer_step_worker(finished_in_order: Sequence[str], alive: Sequence[str]) -> str | None:
    """The worker of the first replica that finished, if it is still alive; None means
    the pool queue."""
    return next((w for w in finished_in_order if w in alive), None)
