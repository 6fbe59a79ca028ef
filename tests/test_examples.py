"""The example workloads: deterministic corpus, and every protocol hook through a real worker."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from fleet.client import Fleet
from fleet.codec import read_pack
from fleet.examples.charlm import corpus_files, load_corpus, split_of
from tests.harness import SMALL_CHARLM, running_workers, settings_for

#: The Hugging Face example at test size: GPT-2 blocks from a config, charlm's keys.
SMALL_HF = SMALL_CHARLM


def test_charlm_corpus_is_real_deterministic_and_split_by_file():
    files = corpus_files()
    assert len(files) > 500 and files == corpus_files()
    full = load_corpus(None)
    assert len(full["Train"]) > 10_000_000, "tens of MB of real Python source"
    assert len(full["Validation"]) > 100_000 and len(full["Test"]) > 100_000
    assert (
        hashlib.sha256(full["Validation"].numpy().tobytes()).hexdigest()
        == hashlib.sha256(load_corpus.__wrapped__(None)["Validation"].numpy().tobytes()).hexdigest()
    )
    assert split_of("json/decoder.py") == split_of("json/decoder.py")
    assert b"def " in full["Train"][:200_000].numpy().tobytes()
    small = load_corpus(1_000_000)
    assert len(small["Train"]) == 1_000_000 and torch.equal(small["Validation"], full["Validation"])


def test_charlm_replicas_get_disjoint_shards():
    from fleet.examples.charlm import CharLMWorkload

    w = CharLMWorkload(SMALL_CHARLM)
    data = w.corpus["Train"]
    half = len(data) // 2
    for replica in (0, 1):
        batch = {"ordinals": [3], "payload": {"replica": replica, "num_replicas": 2}}
        x, _ = w._train_batch(batch)
        row = bytes(x[0].to(torch.uint8).tolist())
        shard = bytes(data[replica * half : (replica + 1) * half].tolist())
        assert row in shard
    assert torch.equal(w._train_batch({"ordinals": [7]})[0], w._train_batch({"ordinals": [7]})[0])


@pytest.fixture(scope="module")
def example_worker(redis_server, tmp_path_factory, artifacts_dir):
    settings = settings_for(
        redis_server.url,
        tmp_path_factory.mktemp("examples-shared"),
        workload_allowlist=["fleet.examples.*"],
        pool_queue="fleet.examples-test",
    )
    with running_workers(settings, [40], artifacts_dir / "logs", workload=None) as (worker,):
        yield settings, worker


@pytest.mark.parametrize(
    ("spec", "config"),
    [
        ("fleet.examples.charlm:make", SMALL_CHARLM),
        ("fleet.examples.digits:make", {}),
        ("fleet.examples.hf_lm:make", SMALL_HF),
    ],
)
def test_protocol_conformance_through_a_real_worker(example_worker, spec, config):
    settings, worker = example_worker
    fleet = Fleet(settings)
    kw = {"workload": spec, "config": config}
    hello = fleet.hello(worker=worker.name, **kw)
    assert hello.protocol_version == 2
    assert hello.workload_name in ("charlm", "digits-mlp", "hf-gpt2-bytes")
    probe = fleet.capability_probe(worker=worker.name, **kw)
    assert probe.runtime_device == "python-torch-cpu" and probe.capability.work_units_per_second > 0
    plan = fleet.parameter_pack_plan("cpu", **kw)
    assert plan.parameter_count > 0 and not plan.uses_custom_parameter_pack_hooks
    a = fleet.init_model("cpu", worker=worker.name, **kw)
    before = fleet.evaluate(a, "Validation")
    for key in ("loss", "examples"):
        assert key in before
    for _ in range(3):
        metrics = fleet.train_window(a, [])
    assert metrics["loss"] > 0
    result = fleet.run_inner_loop(
        a,
        [],
        20,
        f"conf/{hello.workload_name}/a",
        "conf",
        inner_optimizer_state_path=f"conf/{hello.workload_name}/opt.pt",
    )
    assert result.steps_completed == 20
    after = fleet.evaluate(a, "Validation")
    assert after["loss"] < before["loss"]
    ref = fleet.export_parameter_pack(a, f"conf/{hello.workload_name}/export", "conf")
    assert ref.parameter_count == plan.parameter_count
    b = fleet.import_parameter_pack(ref, worker=worker.name, **kw)
    assert fleet.evaluate(b, "Test") == fleet.evaluate(a, "Test")

    def flat(handle, name: str) -> torch.Tensor:
        out = fleet.export_parameter_pack(handle, f"conf/{hello.workload_name}/{name}", "conf")
        return read_pack(fleet.shared.resolve(out.path))[1]

    # the merge hooks on two different models, checked by the values they produce
    fleet.train_window(b, [])
    flat_a, flat_b = flat(a, "a"), flat(b, "b")
    assert not torch.allclose(flat_a, flat_b, atol=1e-4), "b trained on: another model"
    weighted = {
        "peer_id": "p0",
        "head_id": "h0",
        "artifact_id": "x0",
        "model_id": a.model_id,
        "sample_weight": 3.0,
        "quality_weight": 1.0,
    }
    merged = fleet.merge_candidate_models(a, [weighted, b], "WeightedMean")
    flat_merged = flat(merged, "merged")
    assert torch.allclose(flat_merged, (3.0 * flat_a + flat_b) / 4.0, atol=1e-6)
    # Ema: 0.5 * base + 0.5 * merged, in place on the merged model
    assert fleet.apply_single_root_ema(a, merged, "Ema").model_id == merged.model_id
    assert torch.allclose(flat(merged, "ema"), 0.5 * flat_a + 0.5 * flat_merged, atol=1e-6)
    # RootEma(w): (1 - w) * local + w * canonical, in place on the canonical model
    canonical = {"RootEma": {"canonical_weight": 0.25}}
    assert fleet.reconcile_canonical_model(a, b, canonical).model_id == b.model_id
    assert torch.allclose(flat(b, "reconciled"), 0.75 * flat_a + 0.25 * flat_b, atol=1e-6)
    fleet.reconcile_canonical_model(a, b, "Replace")
    assert torch.equal(flat(b, "replaced"), flat_a)
    assert fleet.apply_patch(
        {
            "patch_id": "p",
            "class": "Hot",
            "summary": "",
            "values": {"x": 1},
            "required_client_capabilities": [],
        },
        **kw,
    )[worker.name] == {"Rejected": f"workload {hello.workload_name} has no apply_patch hook"}
    for h in (a, b, merged):
        fleet.release_model(h)
    fleet.close()


def test_the_hugging_face_example_trains_under_diloco_on_the_charlm_dataset(example_worker):
    """fleet.examples.hf_lm: a transformers GPT-2 (from a config, nothing downloaded) on
    leases of the charlm microshard dataset, 2 rounds on the fleet; the loss falls."""
    from fleet.diloco import DatasetConfig, DiLoCoConfig, DiLoCoRun
    from fleet.examples.charlm import write_dataset

    settings, worker = example_worker
    fleet = Fleet(settings)
    write_dataset(Path(settings.shared_root) / "datasets/hf-charlm", 8, manifest=True)
    config = DiLoCoConfig(
        workload="fleet.examples.hf_lm:make",
        config=SMALL_HF,
        replicas=1,
        rounds=2,
        inner_steps=15,
        dataset=DatasetConfig(path="datasets/hf-charlm", microshards_per_batch=2),
        workers=[
            worker.name
        ],  # this module's worker: others in the session's Redis may not build it
    )
    run = DiLoCoRun.start(fleet, config)
    job = run.run()
    assert job.status == "completed"
    initial = run.state().initial_eval.loss
    losses = [r.eval.loss for r in run.rounds()]
    assert len(losses) == 2 and losses[-1] < initial, (initial, losses)
    assert run.rounds()[0].merged[0].lease is not None
    fleet.close()


def test_diloco_goes_around_a_worker_whose_allowlist_refuses_the_workload(
    example_worker, artifacts_dir
):
    """A fleet whose workers allow different workloads: the replica placed on a worker
    that refuses the digits TorchWorkload (NotAllowlistedError on import) is started on
    one that allows it, every round; the job completes, each replica its own data share
    (synthetic BatchRefs, no dataset). Once, this crashed the job with a TypeError."""
    from fleet.diloco import DiLoCoConfig, DiLoCoRun
    from fleet.jobs import JobStore

    settings, worker = example_worker
    strict = settings_for(
        settings.redis_url, settings.shared_root, pool_queue="fleet.strict-test",
        workload_allowlist=["tests.workloads.*"],
    )  # fmt: skip
    with running_workers(strict, [43], artifacts_dir / "logs", workload=None):
        fleet = Fleet(settings)
        config = DiLoCoConfig(
            workload="fleet.examples.digits:make", replicas=2, rounds=3, inner_steps=10,
            workers=[worker.name],
        )  # fmt: skip
        run = DiLoCoRun.start(fleet, config)
        assert run.run().status == "completed"
    losses = [r.eval.loss for r in run.rounds()]
    assert losses[-1] < run.state().initial_eval.loss and len(losses) == 3
    assert all([m.worker for m in r.merged] == [worker.name] * 2 for r in run.rounds())
    logs = [line.line for line in JobStore(fleet.registry).logs(run.job_id)]
    # the refusing worker, or another of the session's that refuses it too
    assert any("cannot start on" in line and "NotAllowlistedError" in line for line in logs)
    fleet.close()
