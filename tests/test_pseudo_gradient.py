"""Pseudo-gradient packs: each codec within its stated error, error feedback tracking the
true sum, the streamed outer step over them, a corrupt one refused; on the fleet, int8
with error feedback from the CLI on a workload that is not ours, and a replica re-run
after a SIGKILL publishing the same bits."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fleet.codec import read_pack, write_pack
from fleet.codec.codecs import codec_for
from fleet.codec.pack import write_values_pack
from fleet.codec.pseudo_gradient import writing_pseudo_gradient
from fleet.codec.readers import open_reader
from fleet.diloco import DiLoCoRun, OuterOptimizerConfig, average
from fleet.diloco.exchange import publish_pseudo_gradient
from fleet.diloco.optim import outer_optimizer
from fleet.diloco.outer import PackInput, stream_outer_step
from fleet.errors import BaseMismatchError, DigestMismatchError
from fleet.local import worker_env
from fleet.protocol import FullCheckpoint, GlobalModelSpec, ReplicaRoundRequest, ReplicaRoundResult
from fleet.testing.shard_workload import write_shards
from tests.harness import DIGITS, REPO, running_workers, wait_until

SHARDS = "fleet.testing.shard_workload:make"
P = 50_021  # not a multiple of any block, chunk or vector width


def _read(path: Path) -> torch.Tensor:
    out = torch.empty(P)
    with open_reader(path, check_finite=True) as reader:
        reader.read_into(out)
    return out


@pytest.fixture(scope="module")
def like(tmp_path_factory):
    d = tmp_path_factory.mktemp("pg")
    return write_pack(d / "global", {"w": torch.zeros(P)}, "schema")


# --------------------------------------------------------------------------- the format


@pytest.mark.parametrize(
    ("codec", "relative", "nbytes"),
    [("fp16", 2**-11, 2 * P), ("bf16", 2**-8, 2 * P), ("int8", None, P + 4 * -(-P // 256))],
)
def test_each_codec_round_trips_within_its_stated_error(tmp_path, like, codec, relative, nbytes):
    torch.manual_seed(1)
    x = torch.randn(P) * torch.logspace(-4, 0, P)  # magnitudes over four decades
    with writing_pseudo_gradient(tmp_path / codec, like, codec_for(codec, 256)) as sink:
        for start in range(0, P, 4096):
            sink.write(x[start : start + 4096])
    assert sink.manifest is not None and sink.manifest.exchange_bytes == nbytes
    got = _read(tmp_path / codec)
    if relative is not None:  # round to nearest: half an ulp of the value (fp16: of 2^-14
        # below its normal range, where its steps are 2^-24)
        floor = 2**-25 if codec == "fp16" else 0.0
        assert bool(((got - x).abs() <= (x.abs() * relative).clamp(min=floor)).all())
    else:  # absmax int8: half a step of each block's scale
        blocks = torch.nn.functional.pad(x, (0, -P % 256)).view(-1, 256)
        step = (blocks.abs().amax(1) / 127).repeat_interleave(256)[:P]
        assert bool(((got - x).abs() <= step / 2 * (1 + 1e-4)).all())  # + float rounding
    manifest = json.loads((tmp_path / codec / "manifest.json").read_text())
    assert manifest["format"] == "fleet-pseudo-gradient-v1" and manifest["codec"] == codec


def _packs(d: Path, theta: torch.Tensor, local: torch.Tensor, like) -> tuple[Path, Path]:
    write_values_pack(d / "theta", theta, like)
    write_values_pack(d / "local", local, like)
    return d / "theta", d / "local"


def test_error_feedback_makes_the_sum_of_sent_deltas_track_the_true_sum(tmp_path, like):
    """Twenty rounds of the same small delta beside one large value per block: int8
    without feedback rounds the small ones to zero every round; with it the residual
    carries them, and the sum of what was sent stays within one quantization step of
    the true sum (the last residual)."""
    true = torch.full((P,), 0.003)
    true[::256] = 1.0  # sets each block's scale: one step is 1/127
    theta = torch.zeros(P)
    sent_sum = {False: torch.zeros(P), True: torch.zeros(P)}
    for feedback in (False, True):
        residual = None
        for r in range(20):
            d = tmp_path / f"{feedback}-{r}"
            base, local = _packs(d, theta, theta - true, like)
            out_res = d / "residual" if feedback else None
            publish_pseudo_gradient(
                base, local, d / "pg", codec_for("int8"), residual=residual, out_residual=out_res
            )
            sent_sum[feedback] += _read(d / "pg")
            residual = out_res
    total = true * 20
    assert float((sent_sum[False] - total).abs().max()) == pytest.approx(0.06, rel=1e-3)
    assert float((sent_sum[True] - total).abs().max()) <= 0.5 / 127 + 1e-6
    last = read_pack(tmp_path / "True-19" / "residual")[1]
    assert torch.allclose(total - sent_sum[True], last, atol=1e-6), "the residual is the gap"


def test_the_streamed_outer_step_over_pseudo_gradients(tmp_path, like):
    """Replicas as int8/bf16 pseudo-gradients and one as parameters, chunked and not:
    the same bits as the optimizer on whole vectors; a flipped byte refused by name."""
    torch.manual_seed(2)
    theta, m = torch.randn(P), torch.randn(P)
    write_values_pack(tmp_path / "global", theta, like)
    write_values_pack(tmp_path / "momentum", m, like)
    locals_ = [theta - 0.01 * torch.randn(P) for _ in range(3)]
    inputs = []
    for i, (local, codec) in enumerate(zip(locals_, ["int8", "bf16", None], strict=True)):
        if codec is None:
            write_values_pack(tmp_path / f"r{i}", local, like)
        else:
            base, trained = _packs(tmp_path / f"in{i}", theta, local, like)
            publish_pseudo_gradient(base, trained, tmp_path / f"r{i}", codec_for(codec))
        inputs.append(PackInput(tmp_path / f"r{i}"))
    deltas = [_read(tmp_path / "r0"), _read(tmp_path / "r1"), theta - locals_[2]]
    weights = [3.0, 1.0, 2.0]
    delta = average(deltas, weights)
    optimizer = outer_optimizer(OuterOptimizerConfig(name="nesterov"))
    expected_m = torch.empty(P)
    expected = optimizer.step(
        theta.clone(), theta - delta, delta.clone(), {"momentum": m}, {"momentum": expected_m}
    )
    for chunk in (4096, 16 << 20):
        out = tmp_path / f"out-{chunk}"
        result = stream_outer_step(
            PackInput(tmp_path / "global"),
            inputs,
            weights,
            {"momentum": PackInput(tmp_path / "momentum")},
            optimizer,
            "WeightedMean",
            out / "g",
            {"momentum": out / "m"},
            chunk_bytes=chunk,
        )
        assert torch.equal(read_pack(out / "g", verify=True)[1], expected)
        assert torch.equal(read_pack(out / "m", verify=True)[1], expected_m)
        assert result.exchange_bytes == (P + 4 * -(-P // 256)) + 2 * P + 4 * P
    data = bytearray((tmp_path / "r0" / "values.bin").read_bytes())
    data[777] ^= 0x01
    (tmp_path / "r0" / "values.bin").write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError) as info:
        stream_outer_step(
            PackInput(tmp_path / "global"),
            inputs,
            weights,
            {},
            optimizer,
            "WeightedMean",
            tmp_path / "bad" / "g",
            {"momentum": tmp_path / "bad" / "m"},
        )
    assert "r0" in info.value.path and not (tmp_path / "bad" / "g").exists()
    # a pseudo-gradient taken from another global model is refused by name
    other = tmp_path / "other-base"
    base, trained = _packs(other, theta + 1.0, locals_[0], like)
    publish_pseudo_gradient(base, trained, tmp_path / "stale", codec_for("int8"))
    with pytest.raises(BaseMismatchError) as stale:
        stream_outer_step(
            PackInput(tmp_path / "global"),
            [PackInput(tmp_path / "stale"), inputs[1]],
            [1.0, 1.0],
            {},
            optimizer,
            "WeightedMean",
            tmp_path / "bad2" / "g",
            {"momentum": tmp_path / "bad2" / "m"},
        )
    assert "stale" in stale.value.path and not (tmp_path / "bad2" / "g").exists()


# --------------------------------------------------------------------------- on the fleet


@pytest.fixture
def shards_dataset(fleet_settings):
    name = f"datasets/pg-{time.time_ns()}"
    write_shards(Path(fleet_settings.shared_root) / name, 12)
    return name


def _run_cli(fleet_settings, args: list[str], cwd: Path) -> tuple[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "fleet", "diloco", *args],
        env=worker_env(fleet_settings, [str(REPO)]),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.split("job ", 1)[1].split()[0], out.stdout + out.stderr


def test_int8_with_error_feedback_from_the_cli_on_a_workload_not_ours(
    fleet_settings, fleet, two_workers, shards_dataset, tmp_path
):
    """`fleet diloco --pseudo-gradient int8 --adaptive-deadline` on the burn_p2p-style
    workload (no optimizer file, data only from shard_paths): each replica publishes an
    int8 pseudo-gradient (about a quarter of its float32 parameters) and a residual the
    next round reads; `fleet jobs show` gives the bytes; the loss falls as with fp32."""
    common = ["--workload", SHARDS, "--replicas", "2", "--rounds", "4", "--inner-steps", "12"]
    common += ["--dataset", shards_dataset, "--microshards-per-lease", "2"]
    params = 64 * 32 + 32 + 32 * 10 + 10
    per_replica = {"fp32": 4 * params, "int8": params + 4 * -(-params // 256)}
    losses = {}
    for codec, flags in (("fp32", []), ("int8", ["--adaptive-deadline"])):
        job_id, _ = _run_cli(
            fleet_settings, [*common, "--pseudo-gradient", codec, *flags], tmp_path
        )
        run = DiLoCoRun.resume(fleet, job_id)
        records = run.rounds()
        assert len(records) == 4 and all(r.merged for r in records)
        losses[codec] = [r.eval.loss for r in records]
        for r in records:  # what each replica uploaded: its pseudo-gradient (+ manifest, result)
            for o in r.merged:
                assert per_replica[codec] <= o.sent_bytes <= per_replica[codec] + 16_000
        # from round 1 on every replica starts from the state (optimizer, residual) its
        # worker kept, and from the global model it stepped to itself
        assert all(o.state_source == "held" for r in records[1:] for o in r.merged)
        # the outer step's worker holds the new global model, and so does the other
        # worker: the test workers share one cache directory, as workers on one box do
        assert all(o.global_source == "held" for r in records[1:] for o in r.merged)
    assert all(r.deadline_s is not None for r in records[1:]), "adaptive from round 1"
    show = subprocess.run(
        [sys.executable, "-m", "fleet", "jobs", "show", job_id],
        env=worker_env(fleet_settings, [str(REPO)]),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "exchange MB" in show and "deadline s" in show and "B/param" in show
    assert losses["int8"][-1] < losses["int8"][0]
    assert losses["int8"][-1] == pytest.approx(losses["fp32"][-1], rel=0.03)


def test_a_replica_re_run_after_sigkill_publishes_the_same_pseudo_gradient(
    fleet_settings, artifacts_dir, fleet, two_workers, tmp_path
):
    """One replica attempt with int8 and error feedback, SIGKILLed on its worker mid-loop
    and run again on another to the same paths, publishes the bits the same request
    gives on a third."""
    w0, w1 = two_workers
    global_pack = fleet.export_parameter_pack(
        fleet.init_model("cpu", workload=DIGITS, worker=w0.name),
        f"pg-rerun/{time.time_ns()}/g",
        "s",
    )
    spec = GlobalModelSpec(
        round=0,
        values_digest=global_pack.values_digest,
        layout_hash=global_pack.layout_hash,
        parameter_count=global_pack.parameter_count,
        model_schema_hash="s",
        checkpoint=FullCheckpoint(round=0, global_pack=global_pack),
    )
    batches = [
        {
            "kind": "micro_epoch",
            "lease_id": "pg-rerun",
            "microshard_ids": ["shard-0"],
            "ordinals": [step],
            "bytes_len": 0,
            "pipeline_kind": "test",
            "payload": {"replica": 0, "num_replicas": 1, "round": 0, "step": step},
        }
        for step in range(40)
    ]
    config = {"step_sleep_s": 0.1}
    run_id = f"pg-rerun-{time.time_ns()}"

    def attempt(worker: str, out: str, wait: bool = True):
        handle = fleet.init_model("cpu", workload=DIGITS, config=config, worker=worker)
        request = ReplicaRoundRequest(
            run=run_id, replica=0, round=0, attempt=0, model_id=handle.model_id,
            batches=batches, num_inner_steps=40, model_schema_hash="s",
            global_model=spec, output_path=out,
        )  # fmt: skip
        call = fleet.prepare("replica_round", request, ReplicaRoundResult.model_validate)
        return fleet.run(call, wait, 120)

    base = str(Path(global_pack.path).parent)
    reference = attempt(w1.name, f"{base}/reference")
    with running_workers(fleet_settings, [13], artifacts_dir / "logs") as (victim,):
        future = attempt(victim.name, f"{base}/rerun", wait=False)
        wait_until(lambda: "step 10/40" in victim.log_path.read_text() or future.ready(), 60)
        assert not future.ready()
        victim.kill()
    rerun = attempt(w0.name, f"{base}/rerun")
    assert rerun.pack.values_digest == reference.pack.values_digest
    assert rerun.pack.path == f"{base}/rerun" and rerun.base_digest == global_pack.values_digest
    assert rerun.state_source == "fresh"
    params = global_pack.parameter_count or 0
    assert rerun.sent_bytes < 4 * params  # an int8 pseudo-gradient: about a quarter
