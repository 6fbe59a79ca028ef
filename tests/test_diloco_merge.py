"""The outer step runs on the fleet: streamed and bit-identical to the in-memory step,
re-run elsewhere when its worker dies, refusing corrupt replica packs; superseded packs
are collected; the orchestrator imports no torch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import xxhash

from fleet.codec import read_pack, write_pack
from fleet.codec.pack import write_values_pack
from fleet.codec.readers import open_reader
from fleet.diloco import DiLoCoConfig, DiLoCoRun, OuterOptimizerConfig, average, outer_step
from fleet.diloco.config import PseudoGradientConfig
from fleet.diloco.optim import outer_optimizer
from fleet.diloco.outer import PackInput, stream_outer_step
from fleet.diloco.state import RoundRecord
from fleet.errors import DigestMismatchError, LayoutMismatchError, NonFiniteValuesError
from fleet.jobs import JobStore
from fleet.local import worker_env
from tests.harness import DIGITS, REPO, running_workers, wait_until

# --------------------------------------------------------------------------- the math


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    d = tmp_path_factory.mktemp("outer")
    torch.manual_seed(0)
    p = 50_021  # not a multiple of any chunk or vector width
    like = write_pack(d / "global", {"w": torch.randn(p)}, "s")
    for i in range(3):
        write_values_pack(d / f"r{i}", torch.randn(p), like)
    write_values_pack(d / "momentum", torch.randn(p), like)
    return d


@pytest.mark.parametrize("policy", ["WeightedMean", "NormClippedWeightedMean", "TrimmedMean"])
@pytest.mark.parametrize(
    "outer",
    [
        OuterOptimizerConfig(name="nesterov"),
        OuterOptimizerConfig(name="sgd", lr=0.3, momentum=0.5),
        OuterOptimizerConfig(name="sgd", lr=1.0, momentum=0.0),
    ],
    ids=["nesterov", "heavy-ball", "plain"],
)
@pytest.mark.parametrize("chunk_bytes", [4096, 4 * 1237, 16 << 20])
def test_the_streamed_step_is_bit_identical_to_the_in_memory_one(
    packs, tmp_path, policy, outer, chunk_bytes
):
    theta = read_pack(packs / "global")[1]
    replicas = [read_pack(packs / f"r{i}")[1] for i in range(3)]
    momentum = read_pack(packs / "momentum")[1]
    weights = [3.0, 1.0, 2.0]
    optimizer = outer_optimizer(outer)
    out_state = {name: tmp_path / name for name in optimizer.buffers}
    for m, m_input in (
        ({}, {}),
        ({"momentum": momentum}, {"momentum": PackInput(packs / "momentum")}),
    ):
        expected_theta, expected_state = outer_step(
            theta, average(replicas, weights, policy), m, outer
        )
        stream_outer_step(
            PackInput(packs / "global"),
            [PackInput(packs / f"r{i}") for i in range(3)],
            weights,
            {k: v for k, v in m_input.items() if k in optimizer.buffers},
            optimizer,
            policy,
            tmp_path / "g",
            out_state,
            chunk_bytes=chunk_bytes,
        )
        assert torch.equal(read_pack(tmp_path / "g", verify=True)[1], expected_theta)
        for name in optimizer.buffers:
            assert torch.equal(read_pack(out_state[name], verify=True)[1], expected_state[name])


def test_one_replica_with_lr_1_is_that_replica_exactly(packs, tmp_path):
    stream_outer_step(
        PackInput(packs / "global"),
        [PackInput(packs / "r1")],
        [7.0],
        {},
        outer_optimizer(OuterOptimizerConfig(name="sgd", lr=1.0, momentum=0.0)),
        "WeightedMean",
        tmp_path / "g",
        {},
        chunk_bytes=4096,
    )
    assert torch.equal(read_pack(tmp_path / "g")[1], read_pack(packs / "r1")[1])


def test_a_corrupt_input_names_itself_and_publishes_nothing(packs, tmp_path):
    def step(replicas: list, **kwargs: int) -> None:
        """The outer step of ``packs/global`` and these replica packs, equal weights."""
        stream_outer_step(
            PackInput(packs / "global"),
            [PackInput(r) for r in replicas],
            [1.0] * len(replicas),
            {},
            outer_optimizer(OuterOptimizerConfig(name="nesterov")),
            "WeightedMean",
            tmp_path / "g",
            {"momentum": tmp_path / "m"},
            **kwargs,
        )

    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("manifest.json", "values.f32le"):
        (bad / name).write_bytes((packs / "r2" / name).read_bytes())
    data = bytearray((bad / "values.f32le").read_bytes())
    data[4001] ^= 0x10  # one flipped bit, the length unchanged
    (bad / "values.f32le").write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError) as info:
        step([packs / "r0", bad], chunk_bytes=4096)
    assert str(bad) in info.value.path
    assert not (tmp_path / "g").exists() and not (tmp_path / "m").exists()
    other = tmp_path / "other-layout"
    other.mkdir()
    manifest = json.loads((packs / "r2" / "manifest.json").read_text())
    manifest["layout_hash"] = "torch-layout-" + "0" * 64  # a model of another shape
    (other / "manifest.json").write_text(json.dumps(manifest))
    (other / "values.f32le").write_bytes((packs / "r2" / "values.f32le").read_bytes())
    with pytest.raises(LayoutMismatchError) as layout_info:
        step([packs / "r0", other])
    assert str(other) in str(layout_info.value)
    assert not (tmp_path / "g").exists() and not (tmp_path / "m").exists()
    nan = tmp_path / "nan"
    write_values_pack(nan, torch.full((50_021,), float("nan")), read_pack(packs / "r0")[0])
    with pytest.raises(NonFiniteValuesError):
        step([nan])


# --------------------------------------------------------------------------- on the fleet


def _decoded(path) -> torch.Tensor:
    with open_reader(path, check_finite=True) as reader:
        out = torch.empty(reader.manifest.parameter_count)
        reader.read_into(out)
    return out


def test_sigkill_of_the_outer_step_worker_mid_step(fleet_settings, artifacts_dir, fleet):
    """The outer step's worker is stopped as soon as its task starts, then killed: the
    step runs again on another worker from the same inputs, and the global digest it
    commits is that of the hand-computed step (so every replica rebuilds those bits)."""
    root = fleet.shared
    wide = {"hidden": 60_000}  # ~4.5 M parameters: an outer step of ~0.4 s in 4 KiB chunks
    with running_workers(fleet_settings, [10, 11, 12], artifacts_dir / "logs") as workers:
        by_name = {w.name: w for w in workers}
        caught: list[str] = []  # the worker killed mid-step
        done = threading.Event()
        deltas: list[tuple[torch.Tensor, float]] = []

        def watch() -> None:
            """Stop the first outer step's worker as soon as its task starts, and kill it:
            the job's log stream is read blocking (XREAD), so the watcher wakes on the
            task's first line, a few ms into a step of ~0.4 s (no polling interval)."""
            for line in JobStore(fleet.registry).follow(run.job_id, block_ms=200):
                if done.is_set():
                    return
                if "outer_step started" not in line.line or line.worker not in by_name:
                    continue
                victim = by_name[line.worker]
                os.killpg(victim.proc.pid, signal.SIGSTOP)
                caught.append(victim.name)
                os.killpg(victim.proc.pid, signal.SIGKILL)
                return

        def keep(record: RoundRecord) -> None:
            if record.round == 0:
                deltas.extend(
                    (_decoded(root.resolve(w.pack.path)), w.weight) for w in record.step.replicas
                )

        cfg = DiLoCoConfig(
            workload=DIGITS,
            config=wide,
            replicas=2,
            rounds=2,
            inner_steps=2,
            eval_every=0,
            workers=list(by_name)[:2],
            outer_step_chunk_bytes=4096,
            pseudo_gradient=PseudoGradientConfig(codec="fp32"),
        )
        run = DiLoCoRun.start(fleet, cfg, on_round=keep)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            job = run.run()
        finally:
            done.set()
            watcher.join(5)
        assert job.status == "completed", job.error
        assert caught, "no outer step was caught in flight"
        first = run.rounds()[0]
        assert first.outer_step_worker != caught[0], (
            f"round 0's step committed from {caught[0]} before the watcher stopped it "
            f"({first.outer_step_s:.3f} s of step): too fast a step for this test's model"
        )
        assert first.outer_step_worker is not None
        theta = read_pack(root.resolve(f"runs/{job.job_id}/checkpoint-0000/global"))[1]
        delta = average([d for d, _ in deltas], [w for _, w in deltas])
        optimizer = outer_optimizer(cfg.outer)
        expected = optimizer.step(
            theta.clone(), theta - delta, delta.clone(), {"momentum": None},
            {"momentum": torch.empty_like(theta)},
        )  # fmt: skip
        digest = "xxh3_64:" + xxhash.xxh3_64(expected.numpy().tobytes()).hexdigest()
        assert first.global_digest == digest, "the re-run step gave the hand-computed bits"
        logs = [line.line for line in run.jobs.logs(run.job_id)]
        assert any("outer step's worker" in line and "lost" in line for line in logs)


def test_garbage_collection_keeps_what_keep_checkpoints_says(fleet, two_workers):
    """Checkpoints every 2 rounds (in the background) and after the last (6): the two
    newest stay, with nothing else of the run (its pseudo-gradients and replica states
    are deleted once the final checkpoint is in)."""
    cfg = DiLoCoConfig(
        workload=DIGITS, replicas=2, rounds=6, inner_steps=3, eval_every=0, checkpoint_every=2,
        outer=OuterOptimizerConfig(name="nesterov"),  # with its momentum buffer
    )  # fmt: skip
    run = DiLoCoRun.start(fleet, cfg)
    job = run.run()
    assert job.status == "completed"
    run_dir = fleet.shared.resolve(run.layout.run_dir)

    def listing() -> list[str]:
        return sorted(str(p.relative_to(run_dir)) for p in run_dir.glob("*/*"))

    expected = [
        "checkpoint-0004/global",
        "checkpoint-0004/global-momentum",
        "checkpoint-0006/global",
        "checkpoint-0006/global-momentum",
    ]
    wait_until(
        lambda: listing() == expected, timeout_s=20, interval_s=0.2
    )  # collected in the background
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-0004", "checkpoint-0006"]
    assert job.artifacts["final_pack"] == f"{run.layout.run_dir}/checkpoint-0006/global"
    state = run.state()
    assert [c.round for c in state.checkpoints] == [4, 6]
    assert [s.round for s in state.steps] == [4, 5]


def test_fleet_diloco_imports_no_torch(fleet_settings, two_workers):
    """The orchestrator (`fleet diloco`, a 2-round run) runs where torch, numpy and
    safetensors cannot be imported at all (the core install: no worker extra)."""
    code = (
        "import sys\n"
        "for name in ('torch', 'numpy', 'safetensors', 'matplotlib', 'sklearn'):\n"
        "    sys.modules[name] = None  # import raises ImportError\n"
        "from fleet.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:], standalone_mode=False)\n"
        "finally:\n"
        "    print('TORCH-LOADED' if sys.modules['torch'] is not None else 'NO-TORCH')\n"
    )
    args = ["diloco", "--workload", DIGITS, "--rounds", "2", "--inner-steps", "3"]
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=worker_env(fleet_settings, [str(REPO)]),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "completed" in out.stdout and out.stdout.strip().endswith("NO-TORCH"), out.stdout
    assert out.stderr.count("replicas merged") == 2, out.stderr  # two rounds ran, logged


def test_fleet_gc_removes_what_nothing_needs(fleet_settings, fleet, two_workers):
    from click.testing import CliRunner

    from fleet.cli import main

    root = fleet.shared.root
    job = DiLoCoRun.start(
        fleet, DiLoCoConfig(workload=DIGITS, replicas=1, rounds=2, inner_steps=2, eval_every=0)
    ).run()
    run_dir = root / "runs" / job.job_id
    handle = fleet.init_model("cpu", worker=two_workers[0].name)
    referenced = fleet.export_parameter_pack(handle, "tmp/exchange/kept/m-1", "x")
    old = time.time() - 7200
    stray = run_dir / "round-0000" / "replica-0-a7"
    orphan_opt = run_dir / "replica-0" / "state-0001-a3" / "optimizer"
    unreferenced = root / "tmp" / "exchange" / "gone" / "m-2"
    young = root / "tmp" / "exchange" / "young" / "m-3"
    temp = root / "packs" / ".half.tmp-0123abcd"
    unknown = root / "runs" / "no-such-job" / "round-0000" / "global"
    for path in (stray, unreferenced, young, unknown):
        write_pack(path, {"w": torch.zeros(4)}, "x")
    orphan_opt.parent.mkdir(parents=True, exist_ok=True)
    orphan_opt.write_bytes(b"opt")
    temp.parent.mkdir(parents=True, exist_ok=True)
    temp.write_bytes(b"half a file")
    for path in (stray, orphan_opt, unreferenced, temp, unknown, root / referenced.path):
        for item in [path, *path.rglob("*")]:  # age is the files' (an object store has no dirs)
            os.utime(item, (old, old))
    kept = [run_dir / "checkpoint-0002" / "global", run_dir / "checkpoint-0000" / "global"]
    runner = CliRunner(
        env={
            "FLEET_REDIS_URL": fleet_settings.redis_url,
            "FLEET_SHARED_ROOT": str(fleet_settings.shared_root),
        }
    )
    dry = runner.invoke(main, ["gc", "--dry-run"], terminal_width=300)
    assert dry.exit_code == 0, dry.output
    gone = [stray, orphan_opt, unreferenced, temp]
    for path in gone:  # a replica state is collected as its directory
        shown = path.parent if path == orphan_opt else path
        assert path.exists() and shown.relative_to(root).as_posix() in dry.output
    assert "kept no-such-job" in dry.output
    result = runner.invoke(main, ["gc"], terminal_width=300)
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in gone)
    assert all(p.exists() for p in [*kept, young, unknown, root / referenced.path])
    fleet.release_model(handle)


def test_trimmed_mean_in_a_real_run_takes_the_middle_replica_per_coordinate(fleet, two_workers):
    """Three replicas, TrimmedMean and plain averaging (SGD lr 1, no momentum), exact
    fp32 pseudo-gradients: the committed model is the initial one minus, coordinate by
    coordinate, the median of the three pseudo-gradients (the smallest and largest
    dropped), computed here with torch.median from the published packs."""
    root = fleet.shared
    deltas: list[torch.Tensor] = []

    def keep(record: RoundRecord) -> None:
        deltas.extend(_decoded(root.resolve(w.pack.path)) for w in record.step.replicas)

    cfg = DiLoCoConfig(
        workload=DIGITS,
        replicas=3,
        rounds=1,
        inner_steps=3,
        eval_every=0,
        merge_policy="TrimmedMean",
        outer=OuterOptimizerConfig(name="sgd", lr=1.0, momentum=0.0),
        pseudo_gradient=PseudoGradientConfig(codec="fp32"),
    )
    run = DiLoCoRun.start(fleet, cfg, on_round=keep)
    job = run.run()
    assert job.status == "completed", job.error
    assert len(deltas) == 3 and not torch.equal(deltas[0], deltas[1])
    state = run.state()
    assert state is not None
    first, last = state.checkpoints[0], state.checkpoints[-1]
    assert (first.round, last.round) == (0, 1)
    theta0 = read_pack(root.resolve(first.global_pack.path))[1]
    theta1 = read_pack(root.resolve(last.global_pack.path), verify=True)[1]
    median = torch.stack(deltas).median(dim=0).values
    assert torch.allclose(theta1, theta0 - median, rtol=0, atol=1e-6)
    # and not the plain mean, which the outlier-free middle differs from
    assert not torch.allclose(theta1, theta0 - torch.stack(deltas).mean(dim=0), rtol=0, atol=1e-6)
