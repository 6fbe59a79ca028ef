"""The lease planner (fleet/data/leases.py) in process: the stream of microshards, give
backs, lease sizes. Each test pins a behaviour a DiLoCo run depends on (written against
what ``mutmut`` found unchecked; the fleet tests in tests/test_datasets.py run it end to
end)."""

from __future__ import annotations

from collections import Counter

import pytest

from fleet.data.leases import (
    DataCursor,
    Lease,
    LeasedShard,
    give_back,
    lease_sizes,
    permutation,
    plan_leases,
    take,
)


def test_the_order_of_an_epoch_is_fixed_by_seed_and_epoch():
    """A job's cursor is stored as (seed, epoch, position): the order it points into must
    come out the same on every host and every fleet version that resumes the job."""
    assert permutation(3, 0, 10) == [8, 6, 5, 2, 3, 4, 1, 7, 9, 0]
    assert permutation(3, 1, 10) == [1, 5, 0, 7, 3, 2, 4, 9, 6, 8]
    assert permutation(4, 0, 10) == [7, 6, 5, 2, 4, 3, 0, 8, 1, 9]
    assert sorted(permutation(7, 5, 100)) == list(range(100))


def test_each_epoch_uses_every_shard_once_and_epochs_follow_one_another():
    shards, cursor = take(DataCursor(seed=1), 5, 5 * 3)
    assert [s.epoch for s in shards] == [0] * 5 + [1] * 5 + [2] * 5, "no epoch skipped"
    for epoch in range(3):
        assert [s.index for s in shards if s.epoch == epoch] == permutation(1, epoch, 5)
    assert (cursor.epoch, cursor.position) == (2, 5)
    more, after = take(cursor, 5, 2)  # the next epoch starts at its first shard
    assert [(s.epoch, s.index) for s in more] == [(3, i) for i in permutation(1, 3, 5)[:2]]
    assert (after.epoch, after.position) == (3, 2)


def test_a_one_shard_dataset_is_leased_and_an_empty_one_refused():
    shards, _ = take(DataCursor(), 1, 3)
    assert [(s.epoch, s.index) for s in shards] == [(0, 0), (1, 0), (2, 0)]
    with pytest.raises(ValueError, match="without microshards cannot be leased"):
        take(DataCursor(), 0, 1)


@pytest.mark.parametrize("sizes", [[1], [3, 1], [2, 2, 2], [4, 0, 1]])
def test_every_lease_holds_exactly_its_size(sizes):
    ids = [f"s{i}" for i in range(5)]
    leases, cursor = plan_leases(DataCursor(), ids, sizes)
    assert [len(lease.shards) for lease in leases] == sizes
    assert [lease.replica for lease in leases] == list(range(len(sizes)))
    assert cursor.epoch * 5 + cursor.position == sum(sizes), "the cursor moved by as many"


def test_leased_shards_carry_their_microshard_ids():
    ids = [f"digits-{i:05d}" for i in range(6)]
    leases, _ = plan_leases(DataCursor(seed=2), ids, [3, 3])
    for lease in leases:
        assert [s.microshard_id for s in lease.shards] == [ids[s.index] for s in lease.shards]


def _shard(epoch: int, index: int) -> LeasedShard:
    return LeasedShard(index=index, epoch=epoch, microshard_id=f"s{index}")


def test_given_back_shards_come_first_oldest_epoch_first_and_none_is_lost():
    cursor = DataCursor(seed=0, epoch=2, position=1)
    dropped = [
        Lease(replica=0, shards=[_shard(2, 4), _shard(1, 3)]),
        Lease(replica=1, shards=[_shard(2, 0), _shard(1, 1)]),
    ]
    back = give_back(cursor, dropped)
    assert (back.epoch, back.position) == (2, 1), "the stream position stays"
    assert Counter(back.returned) == Counter(s for lease in dropped for s in lease.shards)
    first, after = take(back, 5, 3)  # (epoch, index) order, whatever order they came in
    assert [(s.epoch, s.index) for s in first] == [(1, 1), (1, 3), (2, 0)]
    assert after.returned == [_shard(2, 4)], "the rest stay given back"
    assert (after.epoch, after.position) == (2, 1)
    second, later = take(after, 5, 2)  # then the stream goes on where it was
    assert [(s.epoch, s.index) for s in second] == [(2, 4), (2, permutation(0, 2, 5)[1])]
    assert later.returned == [] and (later.epoch, later.position) == (2, 2)


def test_unknown_and_non_positive_speeds_count_as_the_mean_of_the_known_ones():
    # 100 and 300 known (mean 200), None as 200: 1 each, then 6 by 100:300:200
    assert lease_sizes(3, per_lease=None, per_round=9, speeds=[100.0, 300.0, None]) == [2, 4, 3]
    # a measured 0 (or less) is no measurement: it counts as the mean too
    assert lease_sizes(2, per_lease=None, per_round=8, speeds=[0.0, 100.0]) == [4, 4]
    assert lease_sizes(2, per_lease=None, per_round=8, speeds=[-5.0, 100.0]) == [4, 4]
    # slow workers measure below one work unit per second: those are real speeds
    assert lease_sizes(3, per_lease=None, per_round=10, speeds=[0.5, 1.5, None]) == [2, 5, 3]


def test_the_shards_left_over_go_to_the_largest_remainders():
    # budget 5 by 32:16:2 = 3.2, 1.6, 0.2: floors 3, 1, 0 and one left, for the 0.6
    assert lease_sizes(3, per_lease=None, per_round=8, speeds=[32.0, 16.0, 2.0]) == [4, 3, 1]
    # equal remainders: the lower replica first
    assert lease_sizes(3, per_lease=None, per_round=5, speeds=[1.0, 1.0, 1.0]) == [2, 2, 1]
