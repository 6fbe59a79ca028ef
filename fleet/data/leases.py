"""Leases: which microshards each replica trains on in a round.

The microshards of a dataset are consumed as one stream: epoch after epoch, each epoch
a permutation of every microshard, seeded by ``(seed, epoch)``. A round's leases take
the next shards of that stream, so within a round the replicas' leases are disjoint,
and an epoch uses every microshard once before the next epoch begins. The shards of a
lease whose replica was not merged (dropped by the quorum, lost, failed) are *given
back*: they go to the front of the stream and are leased again in a later round,
tagged with the epoch they belong to. Counting, over a whole run, the shards of the
leases that were merged therefore gives each microshard exactly once per epoch: no
shard is skipped and none is consumed twice (burn_p2p's lease idea; unlike a sampler
that drops what a failed worker held).

A :class:`DataCursor` (the position in the stream and the given-back shards) is part of
the driver's state and of each round's record, so a resumed run continues where the
last committed round left it.

Lease sizes: fixed (``microshards_per_lease``), or a round's budget of shards spread
over the replicas in proportion to the ``work_units_per_second`` their workers
measured in ``capability_probe``, at least one each.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field


class LeasedShard(BaseModel):
    """One microshard in a lease: its ``index`` in the dataset (ordinal order), the
    ``epoch`` it is consumed for, and its id (for the records)."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(ge=0)
    epoch: int = Field(ge=0)
    microshard_id: str = ""


class Lease(BaseModel):
    """The microshards replica ``replica`` trains on in one round."""

    model_config = ConfigDict(frozen=True)

    replica: int
    shards: list[LeasedShard]


class DataCursor(BaseModel):
    """Where a run is in its stream of microshards: ``epoch`` and ``position`` in that
    epoch's permutation, and the shards given back by replicas that were not merged
    (leased again first)."""

    model_config = ConfigDict(frozen=True)

    seed: int = 0
    epoch: int = 0
    position: int = 0
    returned: list[LeasedShard] = Field(default_factory=list)


def permutation(seed: int, epoch: int, n_shards: int) -> list[int]:
    """The order of the ``n_shards`` microshards in ``epoch`` (deterministic)."""
    order = list(range(n_shards))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def take(cursor: DataCursor, n_shards: int, count: int) -> tuple[list[LeasedShard], DataCursor]:
    """The next ``count`` shards of the stream (given-back ones first, oldest epoch
    first) and the cursor after them.

    Raises:
        ValueError: the dataset has no shards.
    """
    if n_shards <= 0:
        raise ValueError("a dataset without microshards cannot be leased")
    returned = sorted(cursor.returned, key=lambda s: (s.epoch, s.index))
    out = returned[:count]
    rest = returned[count:]
    epoch, position = cursor.epoch, cursor.position
    order = permutation(cursor.seed, epoch, n_shards)
    while len(out) < count:
        if position >= n_shards:
            epoch, position = epoch + 1, 0
            order = permutation(cursor.seed, epoch, n_shards)
        out.append(LeasedShard(index=order[position], epoch=epoch))
        position += 1
    after = DataCursor(seed=cursor.seed, epoch=epoch, position=position, returned=rest)
    return out, after


def give_back(cursor: DataCursor, leases: Sequence[Lease]) -> DataCursor:
    """The cursor with the shards of ``leases`` (not merged) given back."""
    shards = [s for lease in leases for s in lease.shards]
    return cursor.model_copy(update={"returned": [*cursor.returned, *shards]})


def lease_sizes(
    replicas: int, *, per_lease: int | None, per_round: int, speeds: Sequence[float | None]
) -> list[int]:
    """How many shards each replica's lease holds this round.

    ``per_lease`` fixes every lease's size. Otherwise ``per_round`` shards are split in
    proportion to ``speeds`` (work units per second of each replica's worker; unknown
    speeds count as the mean of the known ones, all unknown: equal shares), largest
    remainders first, at least one each.
    """
    if per_lease is not None:
        return [per_lease] * replicas
    known = [s for s in speeds if s is not None and s > 0]
    mean = sum(known) / len(known) if known else 1.0
    weights = [s if s is not None and s > 0 else mean for s in speeds]
    total = max(per_round, replicas)
    budget = total - replicas  # one each first, the rest by speed
    exact = [budget * w / sum(weights) for w in weights]
    sizes = [1 + math.floor(x) for x in exact]
    remainders = sorted(range(replicas), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    for i in remainders[: total - sum(sizes)]:
        sizes[i] += 1
    return sizes


def plan_leases(
    cursor: DataCursor, ids: Sequence[str], sizes: Sequence[int]
) -> tuple[list[Lease], DataCursor]:
    """Leases of ``sizes[i]`` shards for replicas ``0..len(sizes)-1``, disjoint, taken in
    replica order from the stream of the microshards ``ids`` (in dataset order); and the
    cursor after them."""
    leases = []
    for replica, size in enumerate(sizes):
        shards, cursor = take(cursor, len(ids), size)
        named = [s.model_copy(update={"microshard_id": ids[s.index]}) for s in shards]
        leases.append(Lease(replica=replica, shards=named))
    return leases, cursor
