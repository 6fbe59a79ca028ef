"""TorchWorkload: a plain PyTorch model, optimizer, loss and DataLoaders on fleet.

In-process tests of the adapter's contract (data cycling, seeds, scheduler state,
accumulation, devices, typed errors), then the user's path end to end: a ~25-line
wrapped model trained by ``fleet diloco`` on a dataset directory through real workers,
with TensorBoard, MLflow and JSONL trackers read back with their own readers."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fleet.errors import WorkloadDataError
from fleet.local import worker_env
from fleet.workloads import ShardPaths, TorchWorkload
from fleet.workloads.torch_workload import WORKLOAD_STATE_ENCODING, to_device
from tests.harness import REPO, settings_for, wait_until
from tests.workloads.plain_torch import make as make_plain
from tests.workloads.plain_torch import write_shards

PLAIN = "tests.workloads.plain_torch:make"


def _toy(**kwargs) -> tuple[TorchWorkload, list[ShardPaths]]:
    """A linear model on random data; records every ShardPaths train_data was given."""
    x, y = torch.randn(64, 4, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 3
    asked: list[ShardPaths] = []

    def train_data(shards: ShardPaths) -> DataLoader:
        asked.append(shards)
        return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)

    workload = TorchWorkload(
        model=lambda: torch.nn.Linear(4, 3),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        train_data=train_data,
        eval_data=lambda split: DataLoader(TensorDataset(x, y), batch_size=16),
        **kwargs,
    )
    return workload, asked


def _flat(state) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in state["model"].parameters()])


def _loop(workload, state, tmp_path, steps=12, **extra):
    params = {
        "num_inner_steps": steps,
        "batches": [{"kind": "micro_epoch", "payload": {"replica": 1, "num_replicas": 2}}],
        "inner_optimizer_state_path": str(tmp_path / "opt.pt"),
        "input_parameter_pack": {"values_digest": "xxh3_64:0123456789abcdef"},
        "require_exact_steps": True,
        **extra,
    }
    return workload.run_inner_loop(state, params)


def test_a_re_run_is_bit_identical_and_draws_from_its_replica_share(tmp_path):
    """Two fresh workload objects (as two workers would hold), the same request: the
    same weights bit for bit, and the same optimizer state file contents."""
    results = []
    for attempt in range(2):
        workload, asked = _toy()
        state = workload.init_model("cpu")
        torch.rand(attempt + 3)  # disturb the global RNG: the loop must not depend on it
        out = _loop(workload, state, tmp_path / str(attempt))
        results.append(_flat(state))
        assert out["steps_completed"] == 12
        assert out["inner_optimizer_state_encoding"] == WORKLOAD_STATE_ENCODING
        assert (asked[0].replica, asked[0].num_replicas, list(asked[0])) == (1, 2, [])
    assert torch.equal(results[0], results[1])
    workload, _ = _toy()
    state = workload.init_model("cpu")
    _loop(workload, state, tmp_path / "other", input_parameter_pack={"values_digest": "x"})
    assert not torch.equal(_flat(state), results[0]), "another round's input, other draws"


def test_scheduler_and_optimizer_state_carry_across_rounds(tmp_path):
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)  # noqa: E731
    workload, _ = _toy(scheduler=sched)
    state = workload.init_model("cpu")
    _loop(workload, state, tmp_path, steps=6)
    fresh = workload.init_model("cpu")  # the next round: a new model state, the same file
    _loop(workload, fresh, tmp_path, steps=6)
    assert fresh["scheduler"].last_epoch == 12
    assert fresh["optimizer"].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)
    assert fresh["optimizer"].state, "momentum buffers restored"
    saved = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert set(saved) == {"optimizer", "scheduler"} and saved["scheduler"]["last_epoch"] == 12


def test_accumulation_clipping_and_bf16_autocast_on_cpu(tmp_path):
    draws = collections.Counter()
    activations: list[torch.dtype] = []
    workload, _ = _toy(grad_accumulation_steps=3, clip_grad_norm=0.5, autocast="bfloat16")
    original = workload.loss_fn

    def counting(model, batch):
        draws["n"] += 1
        activations.append(model(batch[0]).dtype)
        return original(model, batch)

    workload.loss_fn = counting
    state = workload.init_model("cpu")
    out = workload.train_window(state, [{}, {}])
    assert draws["n"] == 6 and out["examples"] == 48  # 2 steps x 3 batches x 8 examples
    # the forward pass ran in bfloat16 (autocast), the weights stay float32
    assert activations == [torch.bfloat16] * 6
    assert torch.isfinite(_flat(state)).all() and _flat(state).dtype == torch.float32
    metrics = workload.evaluate(state, "Validation")
    assert set(metrics) == {"loss", "examples", "batches"} and metrics["examples"] == 64
    assert activations[6:] == [torch.bfloat16] * 4, "evaluate runs under autocast too"
    plain, _ = _toy()
    plain.loss_fn = counting
    activations.clear()
    plain.train_window(plain.init_model("cpu"), [{}])
    assert activations == [torch.float32], "no autocast unless asked"


def _step_size(clip: float | None) -> float:
    """The L2 norm of one plain-SGD step (lr 1) over 3 accumulated batches of a loss whose
    gradient norm is in the hundreds."""
    x, y = torch.randn(24, 4, generator=torch.Generator().manual_seed(2)), torch.arange(24) % 3
    workload = TorchWorkload(
        model=lambda: torch.nn.Linear(4, 3),
        optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
        loss=lambda m, b: 1000.0 * F.cross_entropy(m(b[0]), b[1]),
        train_data=lambda shards: DataLoader(TensorDataset(x, y), batch_size=8),
        eval_data=lambda split: DataLoader(TensorDataset(x, y), batch_size=8),
        clip_grad_norm=clip,
        grad_accumulation_steps=3,
    )
    state = workload.init_model("cpu")
    before = _flat(state).clone()
    workload.train_window(state, [{}])
    return float((_flat(state) - before).norm())


def test_gradient_clipping_bounds_each_step():
    """clip_grad_norm clips the accumulated gradient before the step: an SGD step of lr 1
    then moves the weights by exactly the clip norm (and by far more without it)."""
    assert _step_size(None) > 100 * 0.5
    assert _step_size(0.5) == pytest.approx(0.5, rel=1e-4)
    assert _step_size(2.0) == pytest.approx(2.0, rel=1e-4)


def test_evaluate_weights_batches_by_examples_and_adds_metrics():
    x, y = torch.randn(10, 4), torch.arange(10) % 3
    workload = TorchWorkload(
        model=lambda: torch.nn.Linear(4, 3),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        train_data=lambda s: [],
        eval_data=lambda split: DataLoader(TensorDataset(x, y), batch_size=4),  # 4, 4, 2
        metrics=lambda m, b: {"accuracy": (m(b[0]).argmax(1) == b[1]).float().mean()},
    )
    state = workload.init_model("cpu")
    with torch.no_grad():
        whole = F.cross_entropy(state["model"](x), y).item()
        accuracy = (state["model"](x).argmax(1) == y).float().mean().item()
    metrics = workload.evaluate(state, {"Custom": "Validation"})
    assert metrics["loss"] == pytest.approx(whole, rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(accuracy)
    assert (metrics["examples"], metrics["batches"]) == (10, 3)
    with pytest.raises(WorkloadDataError, match="train_data: no batches"):
        workload.train_window(state, [])


def test_to_device_moves_nested_batches():
    Pair = collections.namedtuple("Pair", "a b")
    batch = {"x": torch.ones(2), "rest": [Pair(torch.zeros(1), 3), (torch.ones(1), "s")]}
    moved = to_device(batch, torch.device("meta"))
    assert moved["x"].device.type == "meta" and isinstance(moved["rest"][0], Pair)
    assert moved["rest"][0].a.device.type == "meta" and moved["rest"][0].b == 3
    assert moved["rest"][1][1] == "s" and isinstance(moved["rest"][1], tuple)


def test_shard_paths_come_from_either_batch_kind():
    group = {"kind": "cached_microshard_group", "shard_paths": ["/d/a", "/d/b"]}
    epoch = {"kind": "micro_epoch", "payload": {"shard_paths": ["/d/c"], "replica": 2}}
    assert ShardPaths.of(group) == ["/d/a", "/d/b"]
    assert ShardPaths.of(epoch) == ["/d/c"] and ShardPaths.of(epoch).replica == 2
    assert ShardPaths.of(None) == [] and ShardPaths.of(None).num_replicas == 1


def test_the_plain_model_is_about_25_lines():
    source = (REPO / "tests" / "workloads" / "plain_torch.py").read_text()
    wrapped = source.split("class Net")[1].split("def write_shards")[0]
    code = [line for line in wrapped.splitlines() if line.strip()]
    assert len(code) <= 26, len(code)


# --------------------------------------------------------------------------- on the fleet


@pytest.fixture(scope="module")
def plain_dataset(fleet_settings) -> tuple[str, Path]:
    rel = f"datasets/plain-{time.time_ns()}"
    out = Path(fleet_settings.shared_root) / rel
    write_shards(out, shards=8)
    return rel, out


def test_a_plain_model_trains_under_fleet_diloco_with_trackers(
    fleet_settings, two_workers, plain_dataset, tmp_path
):
    """The issue's "done when": the wrapped model, a dataset directory, a --config file
    with flags on top, and three trackers whose files read back one point per round."""
    rel, data_dir = plain_dataset
    run_toml = tmp_path / "run.toml"
    run_toml.write_text(
        f'workload = "{PLAIN}"\nreplicas = 2\nrounds = 2\ninner_steps = 8\n'
        f'[config]\ndata_dir = "{data_dir}"\n'
        f'[dataset]\npath = "{rel}"\nglob = "shard-*.pt"\nmicroshards_per_batch = 2\n'
    )
    tb, ml, jl = tmp_path / "tb", tmp_path / "mlruns", tmp_path / "rounds.jsonl"
    cmd = [sys.executable, "-m", "fleet", "diloco", "--config", str(run_toml), "--rounds", "3"]
    cmd += [
        "--tracker",
        f"tensorboard:{tb}",
        "--tracker",
        f"mlflow:{ml}",
        "--tracker",
        f"jsonl:{jl}",
    ]
    out = subprocess.run(
        cmd, env=worker_env(fleet_settings, [str(REPO)]), cwd=tmp_path, capture_output=True,
        text=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = out.stdout.split("job ", 1)[1].split()[0]
    assert "round 2 closed: 2/2 replicas merged" in out.stderr, "INFO lines on stderr"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb / job_id))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("eval/loss")]
    assert [step for step, _ in losses] == [1, 2, 3], "one eval-loss point per round"
    assert losses[-1][1] < losses[0][1]
    for tag in ("train/loss", "train/examples_per_s", "round/wall_s", "replicas/merged"):
        assert len(events.Scalars(tag)) == 3, tag

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ml / 'mlflow.db'}")
    [run] = client.search_runs(
        [client.get_experiment_by_name("fleet").experiment_id],
        filter_string=f"tags.`fleet.job_id` = '{job_id}'",
    )
    history = client.get_metric_history(run.info.run_id, "eval/loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert run.data.params["rounds"] == "3" and run.data.params["dataset.glob"] == "shard-*.pt"

    lines = [json.loads(line) for line in jl.read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2] and lines[0]["job_id"] == job_id
    assert [line["eval/loss"] for line in lines] == pytest.approx([v for _, v in losses])


def test_a_torch_workload_re_run_on_another_worker_gives_the_same_pack(
    fleet, two_workers, plain_dataset
):
    """The same inner loop (input pack, BatchRefs, steps) on each of two workers: the same
    values digest, so a replica re-run elsewhere after a crash reproduces its pack."""
    rel, data_dir = plain_dataset
    kw = {"workload": PLAIN, "config": {"data_dir": str(data_dir)}}
    first = fleet.init_model(worker=two_workers[0].name, **kw)
    start = fleet.export_parameter_pack(first, f"{rel}-runs/start", "plain")
    batches = [
        {
            "kind": "cached_microshard_group",
            "shard_paths": [f"{rel}/shard-00{i}.pt"],
            "microshard_ids": [f"shard-00{i}"],
            "ordinals": [i],
            "bytes_len": (data_dir / f"shard-00{i}.pt").stat().st_size,
        }
        for i in (1, 2)
    ]
    digests = []
    for worker in two_workers:
        handle = fleet.init_model(worker=worker.name, **kw)
        result = fleet.run_inner_loop(
            handle, batches, 10, f"{rel}-runs/{worker.slot}", "plain",
            inner_optimizer_state_path=f"{rel}-runs/opt-{worker.slot}.pt",
            input_parameter_pack=start,
        )  # fmt: skip
        assert result.inner_optimizer_state_encoding == WORKLOAD_STATE_ENCODING
        assert fleet.registry.handle(handle.model_id).device == "cpu", "'auto' on a CPU worker"
        digests.append(result.pack.values_digest)
        fleet.release_model(handle)
    assert digests[0] == digests[1] and digests[0] != start.values_digest
    fleet.release_model(first)


def test_the_plain_workload_in_process_learns(plain_dataset):
    _, data_dir = plain_dataset
    workload = make_plain({"data_dir": str(data_dir)})
    state = workload.init_model("cpu")
    before = workload.evaluate(state, "Validation")["loss"]
    paths = ShardPaths(sorted(str(p) for p in data_dir.glob("shard-*.pt")))
    for _ in range(30):
        workload.train_window(state, [{"kind": "cached_microshard_group", "shard_paths": paths}])
    assert workload.evaluate(state, "Validation")["loss"] < 0.7 * before


def test_all_gpus_keeps_the_schedulers_cuda_visible_devices(fleet_settings, artifacts_dir):
    """`fleet worker --all-gpus` under CUDA_VISIBLE_DEVICES=2,3 (a scheduler's grant)
    starts workers for GPUs 2 and 3, each pinned to its own, and stops both on SIGTERM."""
    import signal

    from fleet.registry import Registry

    settings = settings_for(fleet_settings.redis_url, fleet_settings.shared_root, node="gpunode")
    env = worker_env(settings, [str(REPO)]) | {"CUDA_VISIBLE_DEVICES": "2,3"}
    log = (artifacts_dir / "logs" / "all-gpus.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet", "worker", "--all-gpus", "--torch-threads", "1"],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    registry = Registry.from_settings(settings)
    try:

        def names() -> dict[str, str | None]:
            return {
                w.name: w.cuda_visible_devices
                for w in registry.workers()
                if w.name.endswith("@gpunode")
            }

        wait_until(lambda: len(names()) >= 2, 90, "two GPU workers registered")
        assert names() == {"fleet-gpu2@gpunode": "2", "fleet-gpu3@gpunode": "3"}
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        log.close()
    assert code == 0
    assert not [w for w in registry.workers() if w.name.endswith("@gpunode")]
    registry.redis.close()


def test_visible_gpus_reads_cuda_visible_devices(monkeypatch):
    from fleet.worker import VisibleGpu, visible_gpus

    for value, expected in [
        ("2,3", [VisibleGpu(2, "2"), VisibleGpu(3, "3")]),
        ("GPU-8f1c,GPU-77aa", [VisibleGpu(0, "GPU-8f1c"), VisibleGpu(1, "GPU-77aa")]),
        ("1,-1,0", [VisibleGpu(1, "1")]),
        ("", []),
    ]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
        assert visible_gpus() == expected, value
