"""Streaming DiLoCo (arXiv:2501.18512; fleet.diloco.fragments): the fragments partition
the model's values on codec blocks; a fragment's pseudo-gradient holds its values only,
with the rest of the residual carried; the outer step steps a fragment's values and
copies every other value of the global model and of the optimizer's buffers; one
fragment is synchronous DiLoCo bit for bit; and on real workers, a user's model with
four fragments and the sparse codec sends a quarter of the model a round, leaves the
other fragments' global values untouched, and trains from its own parameters."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from fleet.client import Fleet
from fleet.codec import read_pack, write_pack
from fleet.codec.codecs import codec_for
from fleet.codec.pack import mix_range_into, write_values_pack
from fleet.codec.pseudo_gradient import parse_pseudo_gradient_manifest, writing_pseudo_gradient
from fleet.codec.readers import open_reader
from fleet.diloco import DiLoCoConfig, DiLoCoRun, OuterOptimizerConfig
from fleet.diloco.config import DatasetConfig, PseudoGradientConfig, StreamingConfig
from fleet.diloco.exchange import publish_pseudo_gradient
from fleet.diloco.fragments import (
    fragment_range,
    fragment_ranges,
    fragments_to_mix,
    mix_fragments,
    write_mixed_pack,
)
from fleet.diloco.globals import run_dir
from fleet.diloco.layout import RunLayout
from fleet.diloco.optim import outer_optimizer
from fleet.diloco.outer import PackInput, stream_outer_step
from fleet.diloco.state import RoundRecord
from fleet.errors import (
    DigestMismatchError,
    FragmentSplitError,
    LayoutMismatchError,
    ManifestError,
    NonFiniteValuesError,
)
from fleet.testing.shard_workload import write_shards
from tests.harness import DIGITS, running_workers, settings_for

P = 10_000
NESTEROV = OuterOptimizerConfig(name="nesterov", lr=0.7, momentum=0.9)
USER_MLP = "benchmarks.user_mlp:make"
SHARDS = "fleet.testing.shard_workload:make"


# --------------------------------------------------------------------------- fragments


@pytest.mark.parametrize(("count", "fragments", "align"), [(10_000, 4, 1024), (4096, 4, 1024)])
def test_fragments_partition_the_values_on_aligned_boundaries(count, fragments, align):
    ranges = [fragment_range(count, fragments, i, align) for i in range(fragments)]
    assert ranges[0][0] == 0 and ranges[-1][1] == count
    for (_, stop), (start, _) in pairwise(ranges):
        assert stop == start and start % align == 0
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes[:-1]) - min(sizes[:-1]) <= align  # equal shares, the last takes the rest


def test_a_model_too_small_for_its_fragments_is_a_typed_error():
    with pytest.raises(FragmentSplitError) as err:
        fragment_range(3000, 4, 0, 1024)
    assert (err.value.parameter_count, err.value.fragments, err.value.align) == (3000, 4, 1024)
    with pytest.raises(ValueError, match="fragment 4 of 4"):
        fragment_range(10_000, 4, 4, 1024)


def test_a_replica_mixes_in_the_fragments_synchronised_since_its_last_round():
    assert fragments_to_mix(5, 6, 4) == {1}  # round 5 synchronised fragment 1
    assert fragments_to_mix(2, 5, 4) == {2, 3, 0}  # it missed rounds 3 and 4
    assert fragments_to_mix(1, 9, 4) == {0, 1, 2, 3}
    assert fragments_to_mix(None, 3, 4) == {0, 1, 2, 3}
    own, theta = torch.zeros(8), torch.ones(8)
    mixed = mix_fragments(own.clone(), theta, [(0, 2), (6, 8)], alpha=0.25)
    assert mixed.tolist() == [0.75, 0.75, 0, 0, 0, 0, 0.75, 0.75]
    assert mix_fragments(own.clone(), theta, [(2, 4)], alpha=0.0).tolist()[2:4] == [1.0, 1.0]


def test_the_mixed_start_is_streamed_in_chunks_and_checks_its_inputs(tmp_path):
    """Chunks of 1000 values that cut the ranges anywhere give what mixing whole vectors
    gives, bit for bit; an own pack of another layout, or a global model that is not the
    named one, publishes nothing."""
    gen = torch.Generator().manual_seed(5)
    theta, own = torch.randn(P, generator=gen), torch.randn(P, generator=gen)
    like = write_pack(tmp_path / "global", {"w": theta.clone()}, "schema")
    write_values_pack(tmp_path / "own", own, like)
    ranges = [(1024, 3072), (7168, P)]
    write_mixed_pack(
        tmp_path / "mixed", tmp_path / "own", tmp_path / "global", ranges, 0.3,
        global_digest=like.values_digest, chunk_numel=1000,
    )  # fmt: skip
    expected = mix_fragments(own.clone(), theta, ranges, 0.3)
    assert torch.equal(read_pack(tmp_path / "mixed")[1], expected)
    other = write_pack(tmp_path / "other", {"w": torch.zeros(P - 1), "b": torch.zeros(1)}, "s")
    write_values_pack(tmp_path / "own-other", own, other)
    with pytest.raises(LayoutMismatchError):
        write_mixed_pack(tmp_path / "bad", tmp_path / "own-other", tmp_path / "global", ranges, 0)
    with pytest.raises(DigestMismatchError):
        write_mixed_pack(
            tmp_path / "bad", tmp_path / "own", tmp_path / "global", ranges, 0,
            global_digest="xxh3_64:" + "0" * 16,
        )  # fmt: skip
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- the exchange


def test_a_range_is_mixed_into_a_models_tensors_in_place(tmp_path):
    """The late mix between two inner steps: the pack's values [a, b) mixed into the
    model's tensors (a range across tensor edges, a transposed one included) match
    mixing the flat vectors, bit for bit, with alpha 0 and 0.25; only the range
    changes; a non-finite value there is refused, the model unchanged."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 20))
    with torch.no_grad():
        model[1].weight.set_(model[1].weight.detach().t().contiguous().t())  # not contiguous
    assert not model[1].weight.is_contiguous()
    stepped = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    write_pack(tmp_path / "stepped", stepped, "s")
    theta = read_pack(tmp_path / "stepped")[1]
    for alpha in (0.0, 0.25):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        write_pack(tmp_path / f"own-{alpha}", model, "s")
        flat = read_pack(tmp_path / f"own-{alpha}")[1]
        mix_range_into(tmp_path / "stepped", model, (1000, 1500), alpha)
        write_pack(tmp_path / f"mixed-{alpha}", model, "s")
        got = read_pack(tmp_path / f"mixed-{alpha}")[1]
        assert torch.equal(got, mix_fragments(flat.clone(), theta, [(1000, 1500)], alpha))
        assert torch.equal(got[:1000], flat[:1000]) and torch.equal(got[1500:], flat[1500:])
        assert not torch.equal(got[1000:1500], flat[1000:1500])
        model.load_state_dict(before)
    bad = dict(stepped)
    bad["1.bias"] = bad["1.bias"].clone()
    bad["1.bias"][3] = float("nan")
    write_pack(tmp_path / "bad", bad, "s")
    before = read_pack(tmp_path / "own-0.0")[1]
    with pytest.raises(NonFiniteValuesError):
        mix_range_into(tmp_path / "bad", model, (0, 40 * 30 + 30 + 30 * 20 + 20), 0.0)
    write_pack(tmp_path / "after", model, "s")
    assert torch.equal(read_pack(tmp_path / "after")[1], before)
    with pytest.raises(ValueError, match="values"):
        mix_range_into(tmp_path / "stepped", model, (0, 10**6), 0.0)


def _base(tmp_path: Path) -> tuple[torch.Tensor, torch.Tensor, object]:
    gen = torch.Generator().manual_seed(7)
    theta = torch.randn(P, generator=gen)
    trained = theta - 0.1 * torch.randn(P, generator=gen)
    like = write_pack(tmp_path / "global", {"w": theta.clone()}, "schema")
    write_values_pack(tmp_path / "trained", trained, like)
    return theta, trained, like


def test_a_fragments_pseudo_gradient_holds_its_values_and_carries_the_rest_of_the_residual(
    tmp_path,
):
    _, _, like = _base(tmp_path)
    old_residual = 0.01 * torch.randn(P, generator=torch.Generator().manual_seed(8))
    write_values_pack(tmp_path / "residual", old_residual, like)
    codec = codec_for("int8", 256)
    common = {"residual": tmp_path / "residual", "chunk_numel": 2048}
    publish_pseudo_gradient(
        tmp_path / "global", tmp_path / "trained", tmp_path / "all", codec,
        out_residual=tmp_path / "all-res", **common,
    )  # fmt: skip
    published = publish_pseudo_gradient(
        tmp_path / "global", tmp_path / "trained", tmp_path / "frag", codec,
        out_residual=tmp_path / "frag-res", value_range=(3072, 6144), **common,
    )  # fmt: skip
    manifest = json.loads((tmp_path / "frag" / "manifest.json").read_text())
    assert manifest["value_range"] == [3072, 6144] and manifest["parameter_count"] == 3072
    assert published.pseudo_gradient.parameter_count == 3072
    with open_reader(tmp_path / "frag") as reader:
        frag = reader.read_into(torch.empty(3072)).clone()
    with open_reader(tmp_path / "all") as reader:
        whole = reader.read_into(torch.empty(P)).clone()
    assert torch.equal(frag, whole[3072:6144])  # the blocks encode alike
    residual = read_pack(tmp_path / "frag-res")[1]
    assert torch.equal(residual[:3072], old_residual[:3072])  # the others' wait
    assert torch.equal(residual[6144:], old_residual[6144:])
    assert torch.equal(residual[3072:6144], read_pack(tmp_path / "all-res")[1][3072:6144])
    with pytest.raises(ValueError, match="codec block"):
        publish_pseudo_gradient(
            tmp_path / "global", tmp_path / "trained", tmp_path / "bad", codec,
            value_range=(100, 6144),
        )  # fmt: skip


def test_a_value_range_that_disagrees_with_the_count_is_a_manifest_error(tmp_path):
    _, _, like = _base(tmp_path)
    with writing_pseudo_gradient(
        tmp_path / "pg", like, codec_for("fp32"), value_range=(1024, 2048)
    ) as sink:
        sink.write(torch.zeros(1024))
    raw = json.loads((tmp_path / "pg" / "manifest.json").read_text())
    parse_pseudo_gradient_manifest(raw, "pg")
    for bad in ([1024, 4096], [2048, 1024], [-1, 1023]):
        with pytest.raises(ManifestError, match="value_range"):
            parse_pseudo_gradient_manifest({**raw, "value_range": bad}, "pg")


# --------------------------------------------------------------------------- the outer step


def _fp32_pg(path: Path, delta: torch.Tensor, like, value_range=None) -> PackInput:
    with writing_pseudo_gradient(
        path, like, codec_for("fp32"), base_values_digest=like.values_digest,
        value_range=value_range,
    ) as sink:  # fmt: skip
        sink.write(delta.clone())
    return PackInput(path)


def test_the_outer_step_steps_a_fragment_and_copies_every_other_value(tmp_path):
    """Nesterov with a momentum buffer: the fragment's values are what the step on the
    whole model gives them, bit for bit; every other value of the model and of the
    buffer is the old one (and a buffer not kept yet stays zero there)."""
    gen = torch.Generator().manual_seed(9)
    theta = torch.randn(P, generator=gen)
    like = write_pack(tmp_path / "global", {"w": theta.clone()}, "schema")
    deltas = [0.1 * torch.randn(P, generator=gen) for _ in range(2)]
    momentum = torch.randn(P, generator=gen)
    write_values_pack(tmp_path / "m", momentum, like)
    optimizer = outer_optimizer(NESTEROV)
    lo, hi = 2048, 5120

    def step(name: str, value_range, state) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = value_range or (0, P)
        pgs = [
            _fp32_pg(tmp_path / f"{name}-pg{i}", d[a:b], like, value_range)
            for i, d in enumerate(deltas)
        ]
        out = tmp_path / name
        stream_outer_step(
            PackInput(tmp_path / "global"), pgs, [1.0, 3.0], state, optimizer, "WeightedMean",
            out / "g", {"momentum": out / "m"}, chunk_bytes=4096,
        )  # fmt: skip
        return read_pack(out / "g")[1], read_pack(out / "m")[1]

    m_state = {"momentum": PackInput(tmp_path / "m")}
    whole_g, whole_m = step("whole", None, m_state)
    frag_g, frag_m = step("frag", (lo, hi), m_state)
    assert torch.equal(frag_g[lo:hi], whole_g[lo:hi])
    assert torch.equal(frag_m[lo:hi], whole_m[lo:hi])
    outside = torch.ones(P, dtype=torch.bool)
    outside[lo:hi] = False
    assert torch.equal(frag_g[outside], theta[outside])
    assert torch.equal(frag_m[outside], momentum[outside])
    assert not torch.equal(frag_g[lo:hi], theta[lo:hi])
    first_g, first_m = step("first", (lo, hi), {})  # the first round: no buffer kept yet
    assert torch.equal(first_m[outside], torch.zeros(P)[outside])
    assert torch.equal(first_g[outside], theta[outside])
    # replicas that hold different fragments cannot be merged
    mixed = [
        _fp32_pg(tmp_path / "x0", deltas[0][0:1024], like, (0, 1024)),
        _fp32_pg(tmp_path / "x1", deltas[1][1024:2048], like, (1024, 2048)),
    ]
    with pytest.raises(LayoutMismatchError, match="values"):
        stream_outer_step(
            PackInput(tmp_path / "global"), mixed, [1.0, 1.0], {}, outer_optimizer(
                OuterOptimizerConfig()), "WeightedMean", tmp_path / "x" / "g", {},
        )  # fmt: skip
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- on workers


def _run(fleet, on_round=None, job_id: str | None = None, **overrides: object) -> DiLoCoRun:
    values: dict[str, object] = {
        "workload": USER_MLP,
        "config": {"hidden": 256},
        "replicas": 2,
        "rounds": 3,
        "inner_steps": 5,
        "eval_every": 0,
        "outer": NESTEROV,
    }
    values.update(overrides)
    config = DiLoCoConfig(**values)  # type: ignore[arg-type]
    run = DiLoCoRun.start(fleet, config, job_id=job_id, on_round=on_round)
    job = run.run()
    assert job.status == "completed", job.error
    return run


def test_one_fragment_is_synchronous_diloco_bit_for_bit(redis_server, tmp_path, artifacts_dir):
    """The same job (its id seeds the replicas' data) on two clusters of their own (a
    Redis database, a shared root and worker caches each): synchronous, and streaming
    with one fragment; every round commits the same global model, bit for bit."""
    digests = []
    for db, streaming in ((6, None), (13, StreamingConfig(fragments=1))):
        base = redis_server.url.rsplit("/", 1)[0]
        settings = settings_for(
            f"{base}/{db}", tmp_path / f"shared-{db}", node=f"bitwise{db}",
            pool_queue=f"fleet.bitwise{db}", cache_dir=tmp_path / f"cache-{db}",
        )  # fmt: skip
        with running_workers(settings, [30, 31], artifacts_dir / "logs" / "streaming"):
            fleet = Fleet(settings)
            try:
                run = _run(fleet, job_id="bitwise", streaming=streaming)
            finally:
                fleet.close()
        digests.append([r.global_digest for r in run.rounds()])
    assert digests[0] == digests[1]
    assert len(set(digests[0])) == 3


def _assert_each_round_changed_its_fragment_only(
    fleet, job_id: str, fragments: list[tuple[int, int]]
) -> None:
    """Between the checkpoints entering rounds r and r + 1 (one every round), the global
    model's values of round r's fragment changed, and no other value, bit for bit."""
    globals_ = [
        read_pack(fleet.shared.resolve(f"runs/{job_id}/checkpoint-{r:04d}/global"))[1]
        for r in range(len(fragments) + 1)
    ]
    for r, (start, stop) in enumerate(fragments):
        before, after = globals_[r], globals_[r + 1]
        assert torch.equal(before[:start], after[:start]), r
        assert torch.equal(before[stop:], after[stop:]), r
        assert not torch.equal(before[start:stop], after[start:stop]), r


def test_four_fragments_with_the_sparse_codec_on_a_users_model(fleet):
    """`fleet diloco --fragments 4 --pseudo-gradient topk` on a model that is not ours:
    round r's pseudo-gradients hold fragment r mod 4 (the four partition the model),
    each a quarter of the model's bytes; the round's outer step changes those values of
    the global model and no other; and the model learns."""
    root = fleet.shared
    ranges: dict[int, set[tuple[int, int]]] = {}
    sizes: dict[int, list[int]] = {}

    def keep(record: RoundRecord) -> None:
        ranges[record.round], sizes[record.round] = set(), []
        for pg in record.step.replicas:
            path = root.resolve(pg.pack.path)
            manifest = json.loads((path / "manifest.json").read_text())
            assert manifest["codec"] == "topk"
            ranges[record.round].add(tuple(manifest["value_range"]))
            sizes[record.round].append(sum(p.stat().st_size for p in path.iterdir()))

    run = _run(
        fleet, keep, config={"hidden": 512}, rounds=8, inner_steps=20, eval_every=4,
        checkpoint_every=1, keep_checkpoints=9,
        pseudo_gradient=PseudoGradientConfig(codec="topk"),
        streaming=StreamingConfig(fragments=4, mixing=0.0),
    )  # fmt: skip
    records = run.rounds()
    count = records[0].parameter_count
    assert all(len(ranges[r]) == 1 for r in range(8))  # both replicas sent one fragment
    fragments = [next(iter(ranges[r])) for r in range(8)]
    assert fragments[4:] == fragments[:4]  # round r: fragment r mod 4
    assert sorted(fragments[:4]) == fragments[:4]
    assert fragments[0][0] == 0 and fragments[3][1] == count
    assert all(a[1] == b[0] for a, b in pairwise(fragments[:4]))
    whole = sum(size for _, size in codec_for("topk", 256).files(count))
    for r in range(8):
        for size in sizes[r]:
            assert 0.2 * whole < size < 0.3 * whole + 4096, (r, size, whole)
    _assert_each_round_changed_its_fragment_only(fleet, run.job_id, fragments)
    state = run.state()
    assert state is not None and state.initial_eval is not None
    evals = [r.eval.loss for r in records if r.eval is not None]
    assert evals and evals[-1] < 0.9 * state.initial_eval.loss, evals


def test_a_replica_trains_its_fragments_on_from_its_own_parameters(fleet):
    """Two fragments, int8 without error feedback: fragment 0's pseudo-gradient in
    round 2 is the change over two rounds of its replica's training (rounds 1 and 2:
    the replica kept its own values of fragment 0 after round 1 synchronised fragment
    1), where round 0's is one round's; a replica that restarted from the global model
    every round would send one round's change each time."""
    norms: dict[int, list[float]] = {}

    def keep(record: RoundRecord) -> None:
        norms[record.round] = []
        for pg in record.step.replicas:
            path = fleet.shared.resolve(pg.pack.path)
            count = json.loads((path / "manifest.json").read_text())["parameter_count"]
            with open_reader(path) as reader:
                norms[record.round].append(float(reader.read_into(torch.empty(count)).norm()))

    _run(
        fleet, keep, rounds=3, outer=OuterOptimizerConfig(),
        pseudo_gradient=PseudoGradientConfig(error_feedback=False),
        streaming=StreamingConfig(fragments=2),
    )  # fmt: skip
    # measured: 0.61 in round 0, then 0.93 and 0.73 (restarting from the global model
    # each round: 0.44 and 0.36)
    assert min(norms[1] + norms[2]) > max(norms[0]), norms


def test_a_fragment_merged_late_still_commits_its_round_once(fleet):
    """Pipelined rounds (tau = 3 of 10 inner steps, 4 fragments, a user's model): each
    round's attempts start before the previous round commits, mix its fragment in after
    3 steps from the outer step they applied themselves, and train from it: every
    replica's pseudo-gradient is against the committed global model (the outer step
    refuses any other), every round commits once with both replicas, only its fragment
    of the global model changes, and the model learns."""
    fragments: dict[int, tuple[int, int]] = {}

    def keep(record: RoundRecord) -> None:
        path = fleet.shared.resolve(record.step.replicas[0].pack.path)
        fragments[record.round] = tuple(
            json.loads((path / "manifest.json").read_text())["value_range"]
        )

    run = _run(
        fleet, keep, config={"hidden": 512}, rounds=6, inner_steps=10, eval_every=3,
        checkpoint_every=1, keep_checkpoints=7, outer=OuterOptimizerConfig(),
        streaming=StreamingConfig(fragments=4, delay_steps=3),
    )  # fmt: skip
    records = run.rounds()
    assert [r.round for r in records] == list(range(6))
    assert len(run.jobs.metrics(run.job_id)) == 6  # committed once each
    for before, record in pairwise(records):
        assert len(record.merged) == 2, record.replicas
        # launched with the previous round's outer step to apply (only an attempt
        # launched before that step committed gets one): it mixed it in after 3 steps
        assert record.started_at < before.started_at + before.wall_s
        for outcome in record.merged:
            assert outcome.late_mix_step == 3
            assert outcome.base_digest == record.input_digest
    assert all(o.late_mix_step is None for o in records[0].merged)
    _assert_each_round_changed_its_fragment_only(
        fleet, run.job_id, [fragments[r] for r in range(6)]
    )
    state = run.state()
    assert state is not None and state.initial_eval is not None
    evals = [r.eval.loss for r in records if r.eval is not None]
    assert len(evals) == 2 and evals[-1] < 0.9 * state.initial_eval.loss, evals


@pytest.mark.parametrize("delay_steps", [0, 2], ids=["streaming", "pipelined"])
def test_a_diverged_replica_is_given_up_and_its_round_commits_with_the_rest(fleet, delay_steps):
    """Replica 1's parameters turn NaN in round 2's last step (a hand-written workload):
    its worker refuses to publish them, naming the file; re-run, it diverges again each
    time, is given up, and round 2 commits with replica 0 alone. Pipelined, round 3's
    attempts are launched with that step (over replica 0) and are used. Every round
    commits once, and the run ends on a finite, evaluated model."""
    rounds, steps = 5, 4
    run = _run(
        fleet, workload=DIGITS, rounds=rounds, inner_steps=steps, eval_every=rounds,
        config={"diverge": {"replica": 1, "round": 2, "step": steps - 1}},
        outer=OuterOptimizerConfig(),
        streaming=StreamingConfig(fragments=2, delay_steps=delay_steps),
    )  # fmt: skip
    records = run.rounds()
    assert [r.round for r in records] == list(range(rounds))
    assert len(run.jobs.metrics(run.job_id)) == rounds  # committed once each
    for record in records:
        statuses = {(o.replica, o.attempt): o.status for o in record.replicas}
        if record.round == 2:
            assert statuses[0, 0] == "merged" and len(statuses) > 2, record.replicas
            failed = [o for o in record.replicas if o.replica == 1]
            assert all(o.status == "failed" for o in failed), failed
            assert all("NonFiniteValuesError" in (o.error or "") for o in failed), failed
        else:
            assert statuses == {(0, 0): "merged", (1, 0): "merged"}, record.replicas
    late = [o.late_mix_step for r in records[1:] for o in r.merged]
    assert late == [delay_steps or None] * len(late)
    assert records[-1].eval is not None and math.isfinite(records[-1].eval.loss)
    state = run.state()
    assert state is not None
    read_pack(fleet.shared.resolve(state.checkpoint.global_pack.path), check_finite=True)


def test_a_step_refused_after_the_next_round_launched_restarts_that_round(
    redis_server, tmp_path, artifacts_dir
):
    """Pipelined (tau = 2), two workers with caches of their own (as on two hosts):
    replica 1's pseudo-gradient of round 2 is truncated on the shared root after it is
    published, before round 2's quorum closes (and the copy its worker kept is dropped,
    so whichever worker runs the outer step reads the damaged one). Round 3's attempts
    are launched applying a step over both replicas; the outer step refuses the
    truncated pack by name and commits round 2 with replica 0 alone. Round 3's attempts
    are then aborted, and the round starts again from the commit: its attempts numbered
    after the aborted ones (its record shows them), none with a late step. Every round
    commits once, and round 4 is pipelined again."""
    rounds, steps, tau = 5, 4, 2
    job_id = f"refused-late-{time.time_ns()}"
    base = redis_server.url.rsplit("/", 1)[0]
    hosts = [
        settings_for(
            f"{base}/12",  # a registry of its own
            tmp_path / "shared",
            node="twohosts",
            pool_queue="fleet.twohosts",
            cache_dir=tmp_path / f"cache-{slot}",
        )
        for slot in (0, 1)
    ]
    truncated = tmp_path / "shared" / RunLayout(job_id).replica_pack(2, 1, 0)
    logs = artifacts_dir / "logs" / "streaming-two-caches"
    with running_workers(hosts[0], [40], logs), running_workers(hosts[1], [41], logs):
        fleet = Fleet(hosts[0])
        try:
            run = _run(
                fleet, job_id=job_id, workload=DIGITS, rounds=rounds, inner_steps=steps,
                config={"truncate_peer": {
                    "replica": 0, "round": 2, "step": steps - 1, "pack": str(truncated),
                    "held": str(run_dir(tmp_path / "cache-1", job_id) / "delta"),
                    "marker": str(tmp_path / "truncated"),
                }},
                outer=OuterOptimizerConfig(),
                streaming=StreamingConfig(fragments=2, delay_steps=tau),
            )  # fmt: skip
            records = run.rounds()
            said = [line.line for line in run.jobs.logs(run.job_id)]
        finally:
            fleet.close()
    assert [r.round for r in records] == list(range(rounds))
    assert (tmp_path / "truncated").exists()
    dropped = [o for o in records[2].replicas if o.status == "dropped"]
    assert [(o.replica, o.attempt) for o in dropped] == [(1, 0)], records[2].replicas
    assert "ValuesLengthError" in (dropped[0].error or "") and job_id in dropped[0].error
    assert [o.replica for o in records[2].merged] == [0]
    assert len([x for x in said if x.startswith("round 3 starts again")]) == 1, said
    statuses = {(o.replica, o.attempt): o.status for o in records[3].replicas}
    assert statuses == {(0, 0): "aborted", (1, 0): "aborted", (0, 1): "merged",
                        (1, 1): "merged"}, records[3].replicas  # fmt: skip
    assert [o.late_mix_step for o in records[3].merged] == [None, None]
    assert all(o.base_digest == records[3].input_digest for o in records[3].merged)
    assert [o.late_mix_step for o in records[4].merged] == [tau, tau]


def test_the_late_fragment_is_mixed_into_the_model_between_steps(fleet):
    """tau = H, alpha = 0: the fragment of round r is mixed into the held model after
    round r + 1's last step, through the loop's progress report: the parameters the
    replica keeps on its worker after round r + 1 hold round r's committed fragment of
    the global model, bit for bit (and their own values elsewhere)."""
    checked: list[int] = []

    def keep(record: RoundRecord) -> None:
        if record.round == 0:
            return
        ranges = fragment_ranges(record.parameter_count, 2, "int8", 256)
        start, stop = ranges[(record.round - 1) % 2]
        entering = fleet.shared.resolve(f"runs/{job_id}/checkpoint-{record.round:04d}/global")
        theta = read_pack(entering)[1]
        for outcome in record.merged:
            kept = run_dir(fleet.settings.cache_dir, job_id) / f"replica-{outcome.replica}"
            own = read_pack(kept / f"r{record.round}-a{outcome.attempt}" / "parameters")[1]
            assert torch.equal(own[start:stop], theta[start:stop]), record.round
            assert not torch.equal(own, theta)
            checked.append(record.round)

    job_id = f"late-mix-{time.time_ns()}"
    _run(
        fleet, keep, job_id=job_id, rounds=4, inner_steps=4, checkpoint_every=1,
        keep_checkpoints=5, outer=OuterOptimizerConfig(),
        pseudo_gradient=PseudoGradientConfig(block_size=256),
        streaming=StreamingConfig(fragments=2, delay_steps=4),
    )  # fmt: skip
    assert checked == [1, 1, 2, 2, 3, 3]


@pytest.fixture
def dataset(fleet_settings):
    """A 12-microshard dataset under the shared root."""
    name = f"datasets/digits-{time.time_ns()}"
    write_shards(Path(fleet_settings.shared_root) / name, 12, manifest=True)
    return name


def test_a_loop_that_reports_no_steps_mixes_the_late_fragment_in_after_it(fleet, dataset):
    """A burn_p2p workload whose ``run_inner_loop`` reports no progress (fleet's shard
    workload): the late fragment is mixed into its parameters after the loop, and its
    rounds commit with both replicas."""
    run = _run(
        fleet, workload=SHARDS, config={"hidden": 64}, rounds=3, inner_steps=6,
        dataset=DatasetConfig(path=dataset, microshards_per_lease=2),
        streaming=StreamingConfig(fragments=2, delay_steps=2),
    )  # fmt: skip
    records = run.rounds()
    for record in records[1:]:
        assert len(record.merged) == 2
        assert {o.late_mix_step for o in record.merged} == {6}
        assert all(o.base_digest == record.input_digest for o in record.merged)


def test_a_delay_beyond_the_round_is_a_config_error():
    with pytest.raises(ValueError, match=r"delay_steps \(5\) is above inner_steps \(4\)"):
        DiLoCoConfig(workload=USER_MLP, inner_steps=4,
                     streaming=StreamingConfig(fragments=2, delay_steps=5))  # fmt: skip


def test_a_model_too_small_for_its_fragments_fails_the_job_before_its_first_round(fleet):
    config = DiLoCoConfig(
        workload=USER_MLP, config={"hidden": 8}, replicas=2, rounds=2, inner_steps=2,
        eval_every=0, streaming=StreamingConfig(fragments=4),
    )  # fmt: skip
    run = DiLoCoRun.start(fleet, config)
    with pytest.raises(FragmentSplitError, match="1392 values cannot be split into 4 fragments"):
        run.run()
    job = run.jobs.get(run.job_id)
    assert job.status == "failed" and "FragmentSplitError" in (job.error or "")
    assert run.rounds() == []


def test_the_orchestrator_plans_fragments_without_torch():
    """The orchestrator runs where torch cannot be imported (tests/test_packaging.py):
    planning and checking a run's fragments must not need it."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from fleet.diloco import DiLoCoConfig\n"
        "from fleet.diloco.config import DatasetConfig, PseudoGradientConfig, StreamingConfig\n"
        "from fleet.diloco.fragments import check_fragments, fragment_spec\n"
        "import fleet.diloco.driver\n"
        "c = DiLoCoConfig(workload='x:y', streaming=StreamingConfig(fragments=4),\n"
        "                 pseudo_gradient=PseudoGradientConfig(codec='topk'))\n"
        "check_fragments(c, 100_000)\n"
        "print(fragment_spec(c, 5).index)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
