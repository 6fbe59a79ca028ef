"""Streaming DiLoCo (arXiv:2501.18512; fleet.diloco.fragments): the fragments partition
the model's values on codec blocks; a fragment's pseudo-gradient holds its values only,
with the rest of the residual carried; the outer step steps a fragment's values and
copies every other value of the global model and of the optimizer's buffers; one
fragment is synchronous DiLoCo bit for bit; and on real workers, a user's model with
four fragments and the sparse codec sends a quarter of the model a round, leaves the
other fragments' global values untouched, and trains from its own parameters."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from fleet.client import Fleet
from fleet.codec import read_pack, write_pack
from fleet.codec.codecs import codec_for
from fleet.codec.pack import write_values_pack
from fleet.codec.pseudo_gradient import parse_pseudo_gradient_manifest, writing_pseudo_gradient
from fleet.codec.readers import open_reader
from fleet.diloco import DiLoCoConfig, DiLoCoRun, OuterOptimizerConfig
from fleet.diloco.config import PseudoGradientConfig, StreamingConfig
from fleet.diloco.exchange import publish_pseudo_gradient
from fleet.diloco.fragments import (
    fragment_range,
    fragments_to_mix,
    mix_fragments,
    write_mixed_pack,
)
from fleet.diloco.optim import outer_optimizer
from fleet.diloco.outer import PackInput, stream_outer_step
from fleet.diloco.state import RoundRecord
from fleet.errors import (
    DigestMismatchError,
    FragmentSplitError,
    LayoutMismatchError,
    ManifestError,
)
from tests.harness import running_workers, settings_for

P = 10_000
NESTEROV = OuterOptimizerConfig(name="nesterov", lr=0.7, momentum=0.9)
USER_MLP = "benchmarks.user_mlp:make"


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
    for db, streaming in ((6, None), (7, StreamingConfig(fragments=1))):
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
    globals_ = [
        read_pack(root.resolve(f"runs/{run.job_id}/checkpoint-{r:04d}/global"))[1] for r in range(9)
    ]
    for r, (start, stop) in enumerate(fragments):
        before, after = globals_[r], globals_[r + 1]
        assert torch.equal(before[:start], after[:start]), r
        assert torch.equal(before[stop:], after[stop:]), r
        assert not torch.equal(before[start:stop], after[start:stop]), r
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
        "from fleet.diloco.config import PseudoGradientConfig, StreamingConfig\n"
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
