"""Every protocol method end to end: client -> Redis broker -> real Celery workers."""

from __future__ import annotations

import json
import time

import pytest
import torch
from celery import group

from fleet.codec import read_pack, write_pack
from fleet.errors import (
    HandleNotFound,
    RemoteTaskError,
    RequestValidationError,
    UnknownMethodError,
)
from tests.harness import DIGITS, wait_until
from tests.workloads.digits import DEFAULT_LR

SCHEMA = "digits-mlp-v1"
HOOKED = "tests.workloads.digits:make_inner_loop_workload"


def _flat(fleet, handle, name):
    ref = fleet.export_parameter_pack(handle, f"check/{name}", SCHEMA)
    return read_pack(fleet.shared.resolve(ref.path))[1]


def test_hello_on_each_worker_and_the_pool(fleet, two_workers):
    for w in two_workers:
        hello = fleet.hello(worker=w.name)
        assert hello.protocol_version == 2
        assert hello.workload_name == "digits-mlp"
        assert hello.worker == w.name
        assert {"parameter_pack_export", "parameter_pack_import", "exact_step_budget"} <= set(
            hello.capabilities
        )
    assert fleet.hello().worker in {w.name for w in two_workers}


def test_workers_are_listed_with_queue_and_pid(fleet, two_workers):
    infos = {i.name: i for i in fleet.workers()}
    for w in two_workers:
        assert infos[w.name].queue == w.queue
        assert infos[w.name].status == "alive"
        assert infos[w.name].device_name == "cpu"
        assert infos[w.name].gpu_index is None


def test_capability_probe_is_measured_and_recorded(fleet, two_workers):
    w = two_workers[0]
    probe = fleet.capability_probe(worker=w.name)
    assert probe.runtime_device == "python-torch-cpu"
    assert probe.capability.work_units_per_second > 0
    assert (
        fleet.registry.worker(w.name).capability["work_units_per_second"]
        == probe.capability.work_units_per_second
    )


def test_train_evaluate_and_inner_loop_lower_the_loss(fleet, two_workers):
    handle = fleet.init_model("cpu", worker=two_workers[0].name)
    before = fleet.evaluate(handle, "Validation")
    metrics = fleet.train_window(handle, [])
    assert isinstance(metrics["loss"], float) and metrics["examples"] == 64
    result = fleet.run_inner_loop(
        handle, [], 60, "packs/inner-a", SCHEMA, inner_optimizer_state_path="opt/inner-a.pt"
    )
    assert result.steps_completed == 60
    assert result.pack is not None and result.pack.path == "packs/inner-a"
    assert result.inner_optimizer_state_path == "opt/inner-a.pt"
    assert result.inner_optimizer_state_encoding == "fleet-torch-workload-state-v1"
    assert fleet.shared.resolve("opt/inner-a.pt").is_file()
    after = fleet.evaluate(handle, "Validation")
    assert after["loss"] < before["loss"] - 0.5
    assert after["accuracy"] > 0.8
    record = fleet.handle_record(handle)
    assert record.generation >= 2 and record.last_pack == result.pack
    fleet.release_model(handle)


def test_inner_loop_hook_of_the_workload_is_used(fleet, two_workers):
    handle = fleet.init_model("cpu", worker=two_workers[1].name, workload=HOOKED)
    result = fleet.run_inner_loop(handle, [], 5, "packs/hooked", SCHEMA, require_exact_steps=True)
    assert result.metrics["hook"] is True and result.steps_completed == 5
    manifest, values = read_pack(fleet.shared.resolve("packs/hooked"), verify=True)
    assert manifest.model_schema_hash == SCHEMA and values.numel() == 4810


def test_routing_lands_on_the_owner(fleet, two_workers):
    for w in two_workers:
        handle = fleet.init_model("cpu", worker=w.name)
        assert handle.worker == w.name and handle.queue == w.queue
        futures = [fleet.train_window(handle, [], wait=False) for _ in range(4)]
        for f in futures:
            f.result()
            assert f.worker == w.name
        fleet.release_model(handle)


def test_export_on_one_worker_import_on_the_other(fleet, two_workers):
    a = fleet.init_model("cpu", worker=two_workers[0].name)
    fleet.run_inner_loop(a, [], 10, "packs/xfer-src", SCHEMA)
    ref = fleet.export_parameter_pack(a, "packs/xfer", SCHEMA)
    assert ref.layout_hash.startswith("torch-layout-") and ref.values_digest.startswith("xxh3_64:")
    b = fleet.import_parameter_pack(ref, worker=two_workers[1].name)
    assert b.worker == two_workers[1].name
    assert fleet.evaluate(a, "Test") == fleet.evaluate(b, "Test")
    assert fleet.handle_record(b).last_pack == ref


def test_parameter_pack_plan(fleet, two_workers):
    plan = fleet.parameter_pack_plan("cpu")
    assert plan.uses_custom_parameter_pack_hooks is False
    assert plan.included_keys == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert plan.parameter_count == 64 * 64 + 64 + 64 * 10 + 10
    filtered = fleet.parameter_pack_plan("cpu", state_dict_filter={"include_globs": ["*.weight"]})
    assert filtered.included_keys == ["0.weight", "2.weight"]
    assert filtered.excluded_float_keys == ["0.bias", "2.bias"]


def test_merge_across_workers_via_packs(fleet, two_workers):
    w0, w1 = two_workers
    a = fleet.init_model("cpu", worker=w0.name, workload=DIGITS, config={"seed": 1})
    b = fleet.init_model("cpu", worker=w1.name, workload=DIGITS, config={"seed": 2})
    fleet.train_window(b, [])
    flat_a, flat_b = _flat(fleet, a, "merge-a"), _flat(fleet, b, "merge-b")
    assert not torch.equal(flat_a, flat_b)
    merged = fleet.merge_candidate_models(
        a,
        [
            {
                "peer_id": "p0",
                "head_id": "h0",
                "artifact_id": "x0",
                "model_id": a.model_id,
                "sample_weight": 3.0,
                "quality_weight": 1.0,
            },
            b,  # on the other worker: exported and passed as a PackRef
        ],
        "WeightedMean",
    )
    assert merged is not None and merged.worker == w0.name
    expected = (3.0 * flat_a + 1.0 * flat_b) / 4.0
    assert torch.allclose(_flat(fleet, merged, "merged"), expected, atol=1e-6)
    assert fleet.merge_candidate_models(a, [], "WeightedMean") is None


def test_ema_and_reconcile_across_workers(fleet, two_workers):
    w0, w1 = two_workers
    base = fleet.init_model("cpu", worker=w1.name, workload=DIGITS, config={"seed": 3})
    merged = fleet.init_model("cpu", worker=w0.name, workload=DIGITS, config={"seed": 4})
    flat_base, flat_merged = _flat(fleet, base, "ema-base"), _flat(fleet, merged, "ema-merged")
    out = fleet.apply_single_root_ema(base, merged, "Ema")
    assert out.model_id == merged.model_id
    assert torch.allclose(
        _flat(fleet, merged, "ema-out"), 0.5 * flat_base + 0.5 * flat_merged, atol=1e-6
    )
    generation = fleet.handle_record(merged).generation

    local = fleet.init_model("cpu", worker=w1.name, workload=DIGITS, config={"seed": 5})
    flat_local = _flat(fleet, local, "rec-local")
    flat_canonical = _flat(fleet, merged, "rec-canonical")
    fleet.reconcile_canonical_model(local, merged, {"RootEma": {"canonical_weight": 0.25}})
    assert torch.allclose(
        _flat(fleet, merged, "rec-out"), 0.75 * flat_local + 0.25 * flat_canonical, atol=1e-6
    )
    assert fleet.handle_record(merged).generation > generation
    fleet.reconcile_canonical_model(local, merged, "Replace")
    assert torch.equal(_flat(fleet, merged, "rec-replaced"), flat_local)


def test_artifacts_round_trip(fleet, two_workers):
    a = fleet.init_model("cpu", worker=two_workers[0].name)
    fleet.run_inner_loop(a, [], 5, "packs/art-src", SCHEMA)
    fleet.materialize_model_artifact(a, "artifacts/a.safetensors")
    assert fleet.shared.resolve("artifacts/a.safetensors").stat().st_size > 4 * 4810
    b = fleet.init_model("cpu", worker=two_workers[1].name)
    fleet.load_model_artifact(b, "artifacts/a.safetensors")
    assert fleet.evaluate(a, "Test") == fleet.evaluate(b, "Test")


def _patch(values: dict[str, object]) -> dict[str, object]:
    return {
        "patch_id": f"p-{time.time_ns()}",
        "class": "Hot",
        "summary": "change the learning rate",
        "values": values,
        "required_client_capabilities": [],
    }


@pytest.fixture
def default_lr_restored(fleet, two_workers):
    """apply_patch changes the session workers' cached default digits workload for every
    later test: put its learning rate back afterwards, whatever the test did."""
    try:
        yield DEFAULT_LR
    finally:
        restored = fleet.apply_patch(_patch({"lr": DEFAULT_LR}))
        assert restored == {w.name: "Applied" for w in two_workers}, restored


def _first_step_size(fleet, worker) -> float:
    """The largest weight change of one AdamW step of a model the worker's default
    workload makes now: Adam's first step moves each weight by about ``lr`` (``lr *
    g / |g|``, and the decoupled weight decay ``lr * 0.01 * w`` on top)."""
    handle = fleet.init_model("cpu", worker=worker.name)
    before = _flat(fleet, handle, f"lr-before-{worker.slot}")
    fleet.train_window(handle, [])
    after = _flat(fleet, handle, f"lr-after-{worker.slot}")
    fleet.release_model(handle)
    return float((after - before).abs().max())


def test_apply_patch_reaches_every_worker(fleet, two_workers, default_lr_restored):
    for w in two_workers:  # the workload's own learning rate, measured the same way
        assert _first_step_size(fleet, w) == pytest.approx(default_lr_restored, rel=0.02)
    outcomes = fleet.apply_patch(_patch({"lr": 0.001}))
    assert outcomes == {w.name: "Applied" for w in two_workers}
    for w in two_workers:  # every worker's new models train with the patched rate
        assert _first_step_size(fleet, w) == pytest.approx(0.001, rel=0.02)
    rejected = fleet.apply_patch(_patch({"momentum": 0.9}))
    assert all(o == {"Rejected": "only 'lr' can be patched"} for o in rejected.values())
    assert set(rejected) == {w.name for w in two_workers}
    for w in two_workers:  # a rejected patch changes nothing
        assert _first_step_size(fleet, w) == pytest.approx(0.001, rel=0.02)


def test_release_then_calls_fail_with_handle_not_found(fleet, two_workers):
    handle = fleet.init_model("cpu", worker=two_workers[0].name)
    fleet.release_model(handle)
    assert fleet.handle_record(handle) is None
    with pytest.raises(HandleNotFound):
        fleet.evaluate(handle, "Test")


def test_worker_answers_handle_not_found_with_its_record(fleet, two_workers):
    w0, w1 = two_workers
    held_by_w1 = fleet.init_model("cpu", worker=w1.name)
    with pytest.raises(RemoteTaskError) as info:  # sent to the wrong worker on purpose
        fleet.call("evaluate", {"model_id": held_by_w1.model_id, "split": "Test"}, worker=w0.name)
    err = info.value
    assert err.error_type == "HandleNotFound" and err.worker == w0.name
    assert err.data["model_id"] == held_by_w1.model_id
    assert err.data["record"]["owner"] == w1.name
    with pytest.raises(RemoteTaskError) as unknown:
        fleet.call("evaluate", {"model_id": "m-unknown", "split": "Test"}, worker=w0.name)
    assert unknown.value.data["record"] is None


def test_malformed_requests_are_refused_and_the_worker_keeps_serving(fleet, two_workers):
    w = two_workers[0]
    with pytest.raises(RemoteTaskError) as info:
        fleet.call("train_window", {"model_id": 5}, worker=w.name)
    err = info.value
    assert err.error_type == "RequestValidationError" and err.data["method"] == "train_window"
    locs = {tuple(e["loc"]) for e in err.data["errors"]}
    assert ("model_id",) in locs and ("batches",) in locs
    with pytest.raises(RemoteTaskError, match="expected a JSON object"):
        fleet.call("init_model", ["not", "an", "object"], worker=w.name)  # type: ignore[arg-type]
    with pytest.raises(RemoteTaskError, match="Extra inputs are not permitted"):
        fleet.call("init_model", {"device": "cpu", "devcie": "cuda"}, worker=w.name)
    with pytest.raises(RemoteTaskError) as policy:
        fleet.call(
            "merge_candidate_models",
            {"base_model_id": "m", "candidates": [], "policy": "Average"},
            worker=w.name,
        )
    assert policy.value.error_type == "RequestValidationError"
    assert fleet.hello(worker=w.name).worker == w.name


def test_unknown_method_is_a_typed_error(fleet, two_workers):
    """Refused by name by the client, before anything is sent; a raw message for it that
    reaches a worker anyway is dead-lettered and fails its caller at once (with Celery's
    NotRegistered)."""
    with pytest.raises(UnknownMethodError) as called:
        fleet.call("train_everything")
    assert called.value.method == "train_everything"
    assert "train_everything" in str(called.value)
    with pytest.raises(UnknownMethodError) as signature:
        fleet.s.train_everything()
    assert signature.value.method == "train_everything"
    w = two_workers[0]
    before = fleet.registry.dead_letter_count()
    raw = fleet.app.send_task("fleet.train_everything", kwargs={"params": {}}, queue=w.queue)
    raw.get(timeout=20, propagate=False)
    assert raw.state == "FAILURE"
    error = fleet.remote_error_of("train_everything", raw)
    assert error.error_type == "NotRegistered" and "fleet.train_everything" in str(error)
    assert fleet.registry.dead_letter_count() == before + 1
    [entry] = fleet.registry.dead_letters(1)
    assert entry["task_id"] == raw.id and entry["reason"].startswith("unknown task")
    assert fleet.hello(worker=w.name).worker == w.name


def test_a_pickle_message_is_refused(fleet, two_workers):
    """Refused before it runs: the caller gets a typed error (tests/test_poison_messages.py
    covers every kind of poison message)."""
    w = two_workers[0]
    log_size = w.log_path.stat().st_size
    result = fleet.app.send_task(
        "fleet.hello", kwargs={"params": {}}, queue=w.queue, serializer="pickle"
    )
    result.get(timeout=20, propagate=False)
    assert result.state == "FAILURE", "a pickled message must never run"
    assert fleet.remote_error_of("hello", result).error_type == "RejectedMessageError"
    log = w.log_path.read_bytes()[log_size:].decode(errors="replace")
    assert "ContentDisallowed" in log or "Refusing to deserialize" in log
    assert fleet.hello(worker=w.name).worker == w.name


@pytest.mark.parametrize(
    ("spec", "error_type"),
    [
        ("os:system", "NotAllowlistedError"),
        ("tests.workloads.digits", "BadFactorySpecError"),
        ("tests.workloads.digits:make:workload", "BadFactorySpecError"),
        ("tests.workloads.digits:broken_factory", "FactoryLoadError"),
        ("tests.workloads.nope:make", "FactoryLoadError"),
        ("tests.workloads.digits:no_such_attr", "FactoryLoadError"),
    ],
)
def test_bad_workloads_are_refused(fleet, spec, error_type):
    with pytest.raises(RemoteTaskError) as info:
        fleet.init_model("cpu", workload=spec)
    assert info.value.error_type == error_type
    assert info.value.data["spec"] == spec


def test_a_hook_that_raises_gives_its_traceback(fleet, two_workers):
    handle = fleet.init_model(
        "cpu", worker=two_workers[1].name, workload=DIGITS, config={"fail_in": "evaluate"}
    )
    with pytest.raises(RemoteTaskError) as info:
        fleet.evaluate(handle, "Test")
    err = info.value
    assert err.error_type == "HookFailedError" and err.method == "evaluate"
    assert err.worker == two_workers[1].name
    assert err.data["hook"] == "evaluate" and err.data["error_type"] == "ValueError"
    assert "injected failure in evaluate" in err.data["hook_traceback"]
    assert "Traceback" in err.remote_traceback
    assert fleet.train_window(handle, [])["examples"] == 64  # still serving, handle intact


def test_paths_outside_the_shared_root_are_refused(fleet, two_workers):
    handle = fleet.init_model("cpu", worker=two_workers[0].name)
    for path in ["../escape", "/etc/fleet-escape", "packs/../../escape"]:
        with pytest.raises(RemoteTaskError) as info:
            fleet.export_parameter_pack(handle, path, SCHEMA)
        assert info.value.error_type == "PathOutsideRootError"
    outside = fleet.shared.root.parent / "outside"
    outside.mkdir(exist_ok=True)
    (fleet.shared.root / "link-out").symlink_to(outside)
    with pytest.raises(RemoteTaskError) as link:
        fleet.export_parameter_pack(handle, "link-out/pack", SCHEMA)
    assert link.value.error_type == "PathOutsideRootError"
    assert list(outside.iterdir()) == []


def test_importing_a_bad_pack_is_a_typed_error(fleet, two_workers):
    root = fleet.shared.root
    write_pack(root / "packs/wrong-layout", {"w": torch.zeros(3)}, SCHEMA)
    with pytest.raises(RemoteTaskError) as mismatch:
        fleet.import_parameter_pack("packs/wrong-layout")
    assert mismatch.value.error_type == "LayoutMismatchError"
    assert mismatch.value.data["pack_layout_hash"] != mismatch.value.data["model_layout_hash"]
    handle = fleet.init_model("cpu")
    ref = fleet.export_parameter_pack(handle, "packs/truncated", SCHEMA)
    values = fleet.shared.resolve(ref.path) / "values.f32le"
    values.write_bytes(values.read_bytes()[:-8])
    with pytest.raises(RemoteTaskError) as truncated:
        fleet.import_parameter_pack(ref)
    assert truncated.value.error_type == "ValuesLengthError"
    with pytest.raises(RemoteTaskError) as missing:
        fleet.import_parameter_pack("packs/does-not-exist")
    assert missing.value.error_type == "NotAPackError"


def test_signatures_compose_into_a_group(fleet, two_workers):
    job = group(fleet.s.hello(worker=w.name) for w in two_workers)
    results = job.apply_async().get(timeout=60)
    assert sorted(r["worker"] for r in results) == sorted(w.name for w in two_workers)


def test_progress_abort_and_ping_while_training(fleet, two_workers):
    w = two_workers[1]
    handle = fleet.init_model("cpu", worker=w.name, workload=DIGITS, config={"step_sleep_s": 0.05})
    future = fleet.run_inner_loop(handle, [], 10_000, "packs/aborted", SCHEMA, wait=False)
    wait_until(lambda: future.progress() is not None, 30, "the inner loop's first progress")
    seen = future.progress()
    assert seen is not None and seen["step"] >= 1 and seen["total_steps"] == 10_000
    assert seen["examples_per_s"] > 0 and isinstance(seen["loss"], float)
    replies = fleet.app.control.ping(destination=[w.name], timeout=10.0)
    assert replies and w.name in replies[0], "a training worker must answer inspect ping"
    # progress is published every PUBLISH_INTERVAL_S: wait for a fresh report, then cancel
    wait_until(lambda: future.progress()["step"] > seen["step"], 30, "a newer progress report")
    at_cancel = future.progress()["step"]
    future.cancel()
    with pytest.raises(RemoteTaskError) as info:
        future.result(timeout_s=60)
    assert info.value.error_type == "TaskAborted"
    # abort lands within a step or two of the watch's next look at the flag. Counted in
    # steps of 50 ms: the progress report lags by up to 0.5 s (fleet.progress's
    # PUBLISH_INTERVAL_S) and the flag is polled every 0.2 s (ABORT_POLL_S), 14 steps;
    # ten times that leaves room for a loaded machine
    assert at_cancel <= info.value.data["steps_completed"] < at_cancel + 10 * 14
    assert fleet.evaluate(handle, "Test")["examples"] > 0  # worker and handle still fine


def test_deadline_stops_between_steps(fleet, two_workers):
    handle = fleet.init_model("cpu", workload=DIGITS, config={"step_sleep_s": 0.05})
    result = fleet.run_inner_loop(
        handle, [], 10_000, "packs/deadline", SCHEMA, deadline_unix_s=time.time() + 5.0
    )
    assert 1 <= result.steps_completed < 10_000
    assert fleet.shared.resolve("packs/deadline/manifest.json").is_file()
    with pytest.raises(RemoteTaskError) as info:
        fleet.run_inner_loop(
            handle,
            [],
            10_000,
            "packs/deadline-exact",
            SCHEMA,
            require_exact_steps=True,
            deadline_unix_s=time.time() + 0.5,
        )
    assert info.value.error_type == "DeadlineExceeded"


def test_batches_are_json_batch_refs(fleet, two_workers):
    handle = fleet.init_model("cpu")
    batch = {
        "kind": "micro_epoch",
        "lease_id": "l1",
        "microshard_ids": ["s0"],
        "ordinals": [3],
        "bytes_len": 0,
        "pipeline_kind": "digits",
        "payload": {"note": "any JSON"},
    }
    assert fleet.train_window(handle, [batch, batch])["examples"] == 128
    # the typed client refuses a bad BatchRef before sending anything ...
    with pytest.raises(RequestValidationError) as local:
        fleet.train_window(handle, [{"kind": "mystery"}])
    assert not isinstance(local.value, RemoteTaskError)
    assert local.value.method == "train_window" and local.value.errors[0]["loc"][0] == "batches"
    # ... and the worker refuses it too when it is sent raw
    with pytest.raises(RemoteTaskError) as info:
        fleet.call(
            "train_window",
            {"model_id": handle.model_id, "batches": [{"kind": "mystery"}]},
            worker=handle.worker,
        )
    assert info.value.error_type == "RequestValidationError"


SHARDS = "fleet.testing.shard_workload:make"


def test_a_remote_fleet_error_comes_back_as_its_own_class(fleet, two_workers):
    from fleet.errors import CodecError, LayoutMismatchError

    write_pack(fleet.shared.root / "packs/other-layout", {"w": torch.zeros(7)}, SCHEMA)
    try:
        fleet.import_parameter_pack("packs/other-layout", worker=two_workers[1].name)
    except LayoutMismatchError as exc:  # the worker's own class, on the caller's side
        assert isinstance(exc, CodecError) and isinstance(exc, RemoteTaskError)
        assert exc.worker == two_workers[1].name and exc.method == "import_parameter_pack"
        assert exc.pack_layout_hash != exc.model_layout_hash
        assert exc.path.endswith("packs/other-layout")
        assert "Traceback" in exc.remote_traceback and exc.task_id
    else:
        raise AssertionError("LayoutMismatchError expected")


def test_default_artifacts_for_a_workload_without_artifact_hooks(fleet, two_workers):
    from safetensors import safe_open

    from fleet.errors import ArtifactError

    a = fleet.init_model("cpu", worker=two_workers[0].name, workload=SHARDS)
    b = fleet.init_model("cpu", worker=two_workers[1].name, workload=SHARDS, config={"hidden": 32})
    fleet.train_window(a, [])  # no batches: nothing happens, but the call is served
    ref = fleet.export_parameter_pack(a, "packs/shards-a", "shards-v1")
    fleet.materialize_model_artifact(a, "artifacts/shards-a.safetensors")
    with safe_open(fleet.shared.resolve("artifacts/shards-a.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    fleet.load_model_artifact(b, "artifacts/shards-a.safetensors")
    got = fleet.export_parameter_pack(b, "packs/shards-b", "shards-v1")
    assert got.values_digest == ref.values_digest  # the same weights, bit for bit
    wide = fleet.init_model(
        "cpu", worker=two_workers[1].name, workload=SHARDS, config={"hidden": 8}
    )
    before = fleet.export_parameter_pack(wide, "packs/shards-wide", "shards-v1").values_digest
    with pytest.raises(ArtifactError) as info:
        fleet.load_model_artifact(wide, "artifacts/shards-a.safetensors")
    assert "0.weight" in info.value.mismatched
    after = fleet.export_parameter_pack(wide, "packs/shards-wide", "shards-v1").values_digest
    assert after == before, "a refused artifact leaves the model unchanged"


def test_shutdown_takes_a_worker_info(fleet_settings, artifacts_dir, fleet):
    from tests.harness import running_workers

    with running_workers(fleet_settings, [9], artifacts_dir / "logs") as (worker,):
        [info] = [w for w in fleet.workers() if w.name == worker.name]
        assert fleet.shutdown(info) is True
        worker.proc.wait(30)
        assert worker.proc.returncode == 0 and fleet.registry.worker(worker.name) is None


def test_import_by_path_checks_the_digest_and_finite_values(fleet, two_workers):
    """A pack whose values changed after publication is refused whether it is named by
    PackRef or by path; a pack without a digest is still refused for a NaN."""
    handle = fleet.init_model("cpu")
    ref = fleet.export_parameter_pack(handle, "packs/tampered", SCHEMA)
    values = fleet.shared.root / ref.path / "values.f32le"
    data = bytearray(values.read_bytes())
    data[8:12] = torch.tensor([float("nan")]).numpy().tobytes()
    values.write_bytes(bytes(data))
    for named in (ref, "packs/tampered"):
        with pytest.raises(RemoteTaskError) as info:
            fleet.import_parameter_pack(named)
        assert info.value.error_type == "DigestMismatchError"
        with pytest.raises(RemoteTaskError) as loaded:
            fleet.load_parameter_pack(handle, named)
        assert loaded.value.error_type == "DigestMismatchError"
    # a pack that records no digest: its NaN is still refused (models load finite values)
    plain = fleet.export_parameter_pack(handle, "packs/undigested", SCHEMA)
    pack_dir = fleet.shared.root / plain.path
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    manifest.pop("values_digest")
    (pack_dir / "manifest.json").write_text(json.dumps(manifest))
    (pack_dir / "values.f32le").write_bytes(bytes(data))
    with pytest.raises(RemoteTaskError) as nonfinite:
        fleet.import_parameter_pack("packs/undigested")
    assert nonfinite.value.error_type == "NonFiniteValuesError"
    fleet.release_model(handle)


def _shard_batch(paths: list[str]) -> dict[str, object]:
    return {
        "kind": "cached_microshard_group",
        "shard_paths": paths,
        "microshard_ids": [f"s{i}" for i in range(len(paths))],
        "ordinals": list(range(len(paths))),
        "bytes_len": 0,
    }


def _read_paths(log_dir) -> list[str]:
    """The shard paths the shards workload's hooks read (its ``read_log``)."""
    return [
        path
        for file in sorted(log_dir.glob("*.jsonl"))
        for line in file.read_text().splitlines()
        for path in json.loads(line)["paths"]
    ]


def test_absolute_shard_paths_are_files_on_the_worker(
    fleet_settings, fleet, two_workers, tmp_path, artifacts_dir
):
    """protocol section 5.5: an absolute shard path is a file on the worker's own disk
    (burn_p2p's cache, or /data on every node) and reaches the hook as it is; relative
    paths resolve under the shared root. FLEET_DATA_ROOTS restricts absolute paths."""
    from fleet.local import WorkerProcess
    from fleet.registry import Registry
    from fleet.testing.shard_workload import write_shards
    from tests.harness import REPO

    own_disk = tmp_path / "data" / "mnist"  # outside the shared root
    files = write_shards(own_disk, 2)
    handle = fleet.init_model("cpu", workload=SHARDS)
    metrics = fleet.train_window(handle, [_shard_batch([str(f) for f in files])])
    assert metrics["loss"] > 0
    relative = "datasets/abs-test"
    write_shards(fleet.shared.root / relative, 1)
    assert fleet.train_window(handle, [_shard_batch([f"{relative}/00000.bin"])])["loss"] > 0
    with pytest.raises(RemoteTaskError) as escape:
        fleet.train_window(handle, [_shard_batch(["../outside/00000.bin"])])
    assert escape.value.error_type == "DatasetPathError"
    # a worker whose FLEET_DATA_ROOTS is tmp/data: a shard under it is read, one outside
    # it is refused by name, also when its path only looks as if it were under the root
    elsewhere = write_shards(tmp_path / "elsewhere", 1)[0]
    (tmp_path / "data" / "link").symlink_to(tmp_path / "elsewhere")
    reads = tmp_path / "reads"
    reads.mkdir()
    strict = fleet_settings.model_copy(
        update={"data_roots": [tmp_path / "data"], "pool_queue": "fleet.dataroots-test"}
    )
    worker = WorkerProcess(
        strict, 7, artifacts_dir / "logs", workload=SHARDS, pythonpath=[str(REPO)], cwd=REPO
    )
    try:
        worker.wait_alive(Registry.from_settings(strict))
        other = fleet.init_model(
            "cpu", worker=worker.name, workload=SHARDS, config={"read_log": str(reads)}
        )
        before = _flat(fleet, other, "dataroots-before")
        inside = str(files[0])
        assert fleet.train_window(other, [_shard_batch([inside])])["loss"] > 0
        assert _read_paths(reads) == [inside], "the shard under the root was read"
        trained = _flat(fleet, other, "dataroots-trained")
        assert not torch.equal(trained, before)
        for outside in (
            str(elsewhere),
            f"{tmp_path}/data/../elsewhere/00000.bin",  # lexically under the root
            f"{tmp_path}/data/link/00000.bin",  # a symlink under the root to outside
        ):
            with pytest.raises(RemoteTaskError) as refused:
                fleet.train_window(other, [_shard_batch([outside])])
            assert refused.value.error_type == "DatasetPathError", outside
            assert "FLEET_DATA_ROOTS" in str(refused.value)
            assert refused.value.data["shard_path"] == outside
            assert refused.value.data["data_roots"] == [str(tmp_path / "data")]
        assert _read_paths(reads) == [inside], "a refused shard never reaches the hook"
        assert torch.equal(_flat(fleet, other, "dataroots-after"), trained)
        fleet.release_model(other)
    finally:
        worker.stop()
    fleet.release_model(handle)
