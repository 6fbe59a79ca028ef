"""The outer step's averaging and the streamed step's contract, against hand-computed
expectations: weighted and trimmed means, pseudo-gradient inputs merged under each
policy, what it refuses before reading (and then publishes nothing), the refs it checks,
the one torch thread it computes on, and what it reports."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from fleet.codec import read_manifest, read_pack, write_pack
from fleet.codec.codecs import codec_for
from fleet.codec.pack import write_values_pack
from fleet.codec.pseudo_gradient import writing_pseudo_gradient
from fleet.diloco.optim import OuterOptimizer, outer_optimizer
from fleet.diloco.outer import PackInput, average, stream_outer_step
from fleet.errors import BaseMismatchError, DigestMismatchError, LayoutMismatchError
from fleet.protocol import OuterOptimizerConfig

P = 3000  # three chunks of 4096 bytes, the last one short

A = torch.tensor([1.0, 5.0, 9.0])
B = torch.tensor([2.0, 0.0, 7.0])
C = torch.tensor([3.0, 4.0, 8.0])
D = torch.tensor([10.0, -1.0, 6.0])
AVERAGING = OuterOptimizerConfig(name="sgd", lr=1.0, momentum=0.0)  # theta' = the average


# --------------------------------------------------------------------------- average()


@pytest.mark.parametrize("policy", [None, "WeightedMean", "NormClippedWeightedMean"])
def test_the_weighted_mean_divides_by_the_sum_of_the_weights(policy):
    replicas, copies = [A, B, C], [A.clone(), B.clone(), C.clone()]
    kwargs = {} if policy is None else {"policy": policy}
    got = average(replicas, [3.0, 1.0, 2.0], **kwargs)
    expected = torch.tensor([(3 + 2 + 6) / 6, (15 + 0 + 8) / 6, (27 + 7 + 16) / 6])
    assert torch.allclose(got, expected)
    assert all(torch.equal(r, c) for r, c in zip(replicas, copies, strict=True)), "inputs changed"


@pytest.mark.parametrize(
    ("replicas", "expected"),
    [
        ([A, B], [1.5, 2.5, 8.0]),  # two: the plain mean
        ([A, B, C], [2.0, 4.0, 8.0]),  # three: the median
        ([A, B, C, D], [2.5, 2.0, 7.5]),  # four: the mean of the middle two
    ],
)
def test_the_trimmed_mean_drops_each_coordinates_extremes_and_ignores_weights(replicas, expected):
    copies = [r.clone() for r in replicas]
    weights = [100.0] + [0.0] * (len(replicas) - 1)
    got = average(replicas, weights, "TrimmedMean")
    assert got.tolist() == expected
    assert all(torch.equal(r, c) for r, c in zip(replicas, copies, strict=True)), "inputs changed"


def test_replicas_and_weights_that_cannot_be_averaged_are_value_errors():
    with pytest.raises(ValueError, match="0 replicas with 0 weights"):
        average([], [])
    with pytest.raises(ValueError, match="1 replicas with 2 weights"):
        average([A], [1.0, 2.0])
    for weights in ([0.0, 0.0], [1.0, -1.0], [-1.0, -2.0]):
        with pytest.raises(ValueError, match="weights sum to"):
            average([A, B], weights)


# --------------------------------------------------------------------------- the streamed step


def _like(d: Path, theta: torch.Tensor):
    return write_pack(d / "global", {"w": theta.clone()}, "schema")


def _pseudo_gradient(path: Path, delta: torch.Tensor, like, base: str | None) -> PackInput:
    """``delta`` as an fp32 (exact) pseudo-gradient pack taken from ``base``."""
    with writing_pseudo_gradient(path, like, codec_for("fp32"), base_values_digest=base) as sink:
        for start in range(0, P, 1024):
            sink.write(delta[start : start + 1024].clone())
    return PackInput(path)


def _inputs(tmp_path: Path):
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(P, generator=gen)
    deltas = [0.1 * torch.randn(P, generator=gen) for _ in range(3)]
    like = _like(tmp_path, theta)
    return theta, deltas, like


def _step(tmp_path, replicas, weights, policy, config=AVERAGING, state=None, out=None, **kw):
    optimizer = outer_optimizer(config)
    out_state = (
        {name: tmp_path / "out" / name for name in optimizer.buffers} if out is None else out
    )
    return stream_outer_step(
        PackInput(tmp_path / "global"),
        replicas,
        weights,
        state or {},
        optimizer,
        policy,
        tmp_path / "out" / "g",
        out_state,
        chunk_bytes=4096,
        **kw,
    )


@pytest.mark.parametrize("zero_weights", [False, True])
def test_pseudo_gradients_are_merged_by_the_trimmed_mean(tmp_path, zero_weights):
    theta, deltas, like = _inputs(tmp_path)
    replicas = [
        _pseudo_gradient(tmp_path / f"pg{i}", d, like, like.values_digest)
        for i, d in enumerate(deltas)
    ]
    weights = [0.0, 0.0, 0.0] if zero_weights else [5.0, 1.0, 1.0]  # ignored by the policy
    _step(tmp_path, replicas, weights, "TrimmedMean")
    median = torch.stack(deltas).median(dim=0).values
    assert torch.allclose(read_pack(tmp_path / "out" / "g")[1], theta - median, atol=1e-6)


def test_pseudo_gradients_and_parameters_are_merged_by_the_weighted_mean(tmp_path):
    theta, deltas, like = _inputs(tmp_path)
    replicas = [
        _pseudo_gradient(tmp_path / "pg0", deltas[0], like, like.values_digest),
        _pseudo_gradient(tmp_path / "pg1", deltas[1], like, None),  # no base recorded
    ]
    write_values_pack(tmp_path / "params", theta - deltas[2], like)
    replicas.append(PackInput(tmp_path / "params"))
    _step(tmp_path, replicas, [3.0, 1.0, 2.0], "WeightedMean")
    delta = (3 * deltas[0] + deltas[1] + 2 * deltas[2]) / 6
    assert torch.allclose(read_pack(tmp_path / "out" / "g")[1], theta - delta, atol=1e-6)


def test_what_it_refuses_before_reading_publishes_nothing(tmp_path):
    theta, deltas, like = _inputs(tmp_path)
    write_values_pack(tmp_path / "r0", theta - deltas[0], like)
    write_values_pack(tmp_path / "r1", theta - deltas[1], like)
    write_values_pack(tmp_path / "m", deltas[2], like)
    r0, r1, m = PackInput(tmp_path / "r0"), PackInput(tmp_path / "r1"), PackInput(tmp_path / "m")
    nesterov = OuterOptimizerConfig(name="nesterov")
    out_m = {"momentum": tmp_path / "out" / "m"}
    with pytest.raises(ValueError, match="2 replicas with 1 weights"):
        _step(tmp_path, [r0, r1], [1.0], "WeightedMean")
    with pytest.raises(ValueError, match="0 replicas with 0 weights"):
        _step(tmp_path, [], [], "TrimmedMean")
    with pytest.raises(ValueError, match="weights sum to"):
        _step(tmp_path, [r0, r1], [1.0, -1.0], "WeightedMean")
    with pytest.raises(ValueError, match="weights sum to"):
        _step(tmp_path, [r0, r1], [0.0, 0.0], "NormClippedWeightedMean")
    with pytest.raises(ValueError, match="the optimizer keeps"):  # a buffer it does not keep
        _step(tmp_path, [r0], [1.0], "WeightedMean", nesterov, {"momentum": m, "extra": m}, out_m)
    with pytest.raises(ValueError, match="the optimizer keeps"):  # its buffer not written
        _step(tmp_path, [r0], [1.0], "WeightedMean", nesterov, {"momentum": m}, {})
    with pytest.raises(ValueError, match="the optimizer keeps"):  # none kept, one written
        _step(tmp_path, [r0], [1.0], "WeightedMean", AVERAGING, {}, out_m)
    assert not (tmp_path / "out").exists()


def test_the_refs_layout_hash_and_digest_are_checked(tmp_path):
    theta, deltas, like = _inputs(tmp_path)
    write_values_pack(tmp_path / "r0", theta - deltas[0], like)
    other = "torch-layout-" + "0" * 64
    with pytest.raises(LayoutMismatchError) as layout:
        _step(tmp_path, [PackInput(tmp_path / "r0", layout_hash=other)], [1.0], "WeightedMean")
    assert {layout.value.pack_layout_hash, layout.value.model_layout_hash} == {
        like.layout_hash,
        other,
    }
    wrong = "xxh3_64:" + "0" * 16
    with pytest.raises(DigestMismatchError) as digest:
        _step(tmp_path, [PackInput(tmp_path / "r0", values_digest=wrong)], [1.0], "WeightedMean")
    assert "r0" in digest.value.path and wrong in (digest.value.expected, digest.value.actual)
    assert not (tmp_path / "out").exists()


def test_an_input_of_another_layout_or_base_is_refused_with_both_names(tmp_path):
    theta, deltas, like = _inputs(tmp_path)
    small = write_pack(tmp_path / "small", {"w": torch.zeros(P - 1), "b": torch.zeros(1)}, "s")
    write_values_pack(tmp_path / "r-other", theta, small)
    with pytest.raises(LayoutMismatchError) as layout:
        _step(tmp_path, [PackInput(tmp_path / "r-other")], [1.0], "WeightedMean")
    assert layout.value.pack_layout_hash == small.layout_hash
    assert layout.value.model_layout_hash == like.layout_hash
    assert "r-other" in layout.value.path
    stale_base = "xxh3_64:" + "1" * 16
    stale = _pseudo_gradient(tmp_path / "stale", deltas[0], like, stale_base)
    with pytest.raises(BaseMismatchError) as base:
        _step(tmp_path, [stale], [1.0], "WeightedMean")
    assert (base.value.expected, base.value.actual) == (like.values_digest, stale_base)
    pg_global = _pseudo_gradient(tmp_path / "pg-global", theta, like, None)
    write_values_pack(tmp_path / "r0", theta - deltas[0], like)
    with pytest.raises(LayoutMismatchError, match="pseudo-gradient") as global_pg:
        stream_outer_step(
            pg_global, [PackInput(tmp_path / "r0")], [1.0], {}, outer_optimizer(AVERAGING),
            "WeightedMean", tmp_path / "out" / "g", {},
        )  # fmt: skip
    assert global_pg.value.path == str(tmp_path / "pg-global")
    assert not (tmp_path / "out").exists()


def test_it_reports_what_it_published_read_and_wrote(tmp_path):
    theta, deltas, like = _inputs(tmp_path)
    for i in range(2):
        write_values_pack(tmp_path / f"r{i}", theta - deltas[i], like)
    write_values_pack(tmp_path / "m", deltas[2], like)
    replicas = [PackInput(tmp_path / "r0"), PackInput(tmp_path / "r1")]
    pg = _pseudo_gradient(tmp_path / "pg", deltas[2], like, like.values_digest)
    started = time.perf_counter()
    result = _step(
        tmp_path, [*replicas, pg], [1.0, 1.0, 1.0], "WeightedMean",
        OuterOptimizerConfig(name="nesterov"),
        {"momentum": PackInput(tmp_path / "m")},
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    assert result.global_manifest == read_manifest(tmp_path / "out" / "g")
    assert result.state_manifests == {"momentum": read_manifest(tmp_path / "out" / "momentum")}
    # global + 2 v1 replicas + the fp32 pseudo-gradient + the momentum, 4 bytes a value
    assert result.bytes_read == 5 * 4 * P
    assert result.exchange_bytes == 3 * 4 * P
    assert result.bytes_written == 2 * 4 * P  # the new global and the new momentum
    assert 0.0 <= result.seconds <= elapsed


class ThreadsSeen(OuterOptimizer):
    """Averaging that records how many torch threads each step ran on."""

    def __init__(self, config: OuterOptimizerConfig) -> None:
        super().__init__(config)
        self.seen: set[int] = set()

    def step(
        self,
        theta: torch.Tensor,
        average: torch.Tensor,
        delta: torch.Tensor,
        state: Mapping[str, torch.Tensor | None],
        new_state: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        self.seen.add(torch.get_num_threads())
        return average


@pytest.mark.parametrize(("single_thread", "expected"), [(None, {1}), (True, {1}), (False, {2})])
def test_the_arithmetic_runs_on_one_torch_thread_unless_told(tmp_path, single_thread, expected):
    theta, deltas, like = _inputs(tmp_path)
    write_values_pack(tmp_path / "r0", theta - deltas[0], like)
    optimizer = ThreadsSeen(AVERAGING)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kwargs = {} if single_thread is None else {"single_thread": single_thread}
        stream_outer_step(
            PackInput(tmp_path / "global"), [PackInput(tmp_path / "r0")], [1.0], {}, optimizer,
            "WeightedMean", tmp_path / "out" / "g", {}, chunk_bytes=4096, **kwargs,
        )  # fmt: skip
        assert torch.get_num_threads() == 2, "the thread count is restored"
    finally:
        torch.set_num_threads(before)
    assert optimizer.seen == expected
    assert torch.equal(read_pack(tmp_path / "out" / "g")[1], theta - deltas[0])
