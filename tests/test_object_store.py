"""The object-store shared root (``FLEET_SHARED_ROOT=s3://...``) against a real
S3-compatible server (SeaweedFS): publish order, digests on every read, the worker
cache, a killed upload, datasets and ``fleet gc`` on the store, and a DiLoCo job whose
workers share nothing but Redis and the bucket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fleet.cli import main
from fleet.codec import read_pack, write_pack
from fleet.errors import (
    DigestMismatchError,
    NotAPackError,
    PathOutsideRootError,
    ShardHashMismatchError,
)
from fleet.settings import FleetSettings
from fleet.storage import open_store
from fleet.storage.cache import WorkerCache
from fleet.storage.object_store import ObjectStore
from tests.harness import CHARLM, REPO, SMALL_CHARLM, WorkerProcess, settings_for, wait_until


def _store(s3_server, root: str, cache_dir: Path) -> ObjectStore:
    settings = FleetSettings(
        shared_root=root, storage_options=s3_server.storage_options, cache_dir=cache_dir
    )
    store = open_store(settings)
    assert isinstance(store, ObjectStore)
    return store


def _state(n: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g), "b": torch.randn(7, generator=g)}


def test_a_pack_is_published_manifest_last_and_read_once_per_host(s3_server, s3_root, tmp_path):
    writer = _store(s3_server, s3_root, tmp_path / "cache-a")
    with writer.output("runs/j/round-0/global") as local:
        write_pack(local, _state(), "schema")
    ref = writer.pack_ref("runs/j/round-0/global")
    # another host: its own cache, the first read fetches and verifies, the second is local
    reader = _store(s3_server, s3_root, tmp_path / "cache-b")
    assert reader.cache is not None
    first = reader.local_pack(ref.path, ref)
    assert str(first).startswith(str(tmp_path / "cache-b"))
    again = reader.local_pack(ref.path, ref)
    assert again == first and reader.cache.hits == 1
    manifest, values = read_pack(first, verify=True)
    assert manifest.values_digest == ref.values_digest
    assert torch.equal(values[7:], _state()["w"])  # layout order: b, then w
    # streamed (the outer step's way): ranged reads, the digest checked as it goes
    with reader.pack_reader(ref.path, values_digest=ref.values_digest, block_size=1024) as r:
        out = torch.empty(r.manifest.parameter_count)
        r.read_into(out)
    assert torch.equal(out, values)
    # what the writer wrote is in its own cache already (its next round reads it locally)
    assert writer.local_pack(ref.path, ref).parent == tmp_path / "cache-a" / "packs"
    with pytest.raises(PathOutsideRootError):
        reader.local_pack("../elsewhere/pack")


def test_a_pack_changed_on_the_store_is_refused_by_every_read(s3_server, s3_root, tmp_path):
    store = _store(s3_server, s3_root, tmp_path / "cache")
    with store.output("exchange/p") as local:
        write_pack(local, _state(), "schema")
    ref = store.pack_ref("exchange/p")
    values = bytearray(store.read_bytes("exchange/p/values.f32le"))
    values[40:44] = torch.tensor([float("nan")]).numpy().tobytes()
    store.fs.pipe_file(store.key("exchange/p/values.f32le"), bytes(values))
    fresh = _store(s3_server, s3_root, tmp_path / "fresh-cache")
    with pytest.raises(DigestMismatchError):
        fresh.local_pack("exchange/p", ref)
    assert fresh.cache is not None and fresh.cache.entries() == []  # nothing cached
    with pytest.raises(DigestMismatchError):  # by path too (no PackRef)
        fresh.local_pack("exchange/p")
    with pytest.raises(DigestMismatchError), fresh.pack_reader("exchange/p") as r:
        r.read_into(torch.empty(r.manifest.parameter_count))


_UPLOAD = """
import json, sys, torch
from fleet.settings import FleetSettings
from fleet.storage import open_store
from fleet.codec import write_pack
options = json.loads(sys.argv[2])
settings = FleetSettings(shared_root=sys.argv[1], storage_options=options, cache_dir=sys.argv[3])
store = open_store(settings)
with store.output("tmp/exchange/m-1/pack") as local:
    write_pack(local, {"w": torch.zeros(64 << 20)}, "schema")
print("uploaded", flush=True)
"""


def test_an_upload_cut_short_leaves_no_readable_pack_and_gc_cleans_up(
    s3_server, s3_root, tmp_path, fleet_settings
):
    from fleet.gc import collect
    from fleet.jobs import JobStore

    store = _store(s3_server, s3_root, tmp_path / "cache")
    bucket = s3_root.split("/")[2]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _UPLOAD,
            s3_root,
            json.dumps(s3_server.storage_options),
            str(tmp_path / "writer-cache"),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
    )

    def uploading() -> bool:  # 256 MB: a multipart upload
        assert proc.poll() is None, "the upload finished before it could be cut short"
        return bool(store.fs.list_multipart_uploads(bucket))

    wait_until(uploading, 120, "the multipart upload started", interval_s=0.02)
    os.kill(proc.pid, signal.SIGKILL)  # the worker dies mid-upload
    proc.wait()
    with pytest.raises(NotAPackError):
        store.read_manifest("tmp/exchange/m-1/pack")
    # values that made it without their manifest: still not a pack
    store.write_bytes("tmp/exchange/m-2/pack/values.f32le", b"\0" * 64)
    with pytest.raises(NotAPackError):
        store.pack_ref("tmp/exchange/m-2/pack")
    jobs = JobStore.from_settings(fleet_settings)
    found = collect(store, jobs, min_age_s=0.0)
    assert ("tmp/exchange/m-2/pack", 64) in found.delete
    assert found.aborted_uploads >= 1
    assert store.fs.list_multipart_uploads(bucket) == []
    assert not store.exists("tmp/exchange/m-2/pack/values.f32le")


def test_the_worker_cache_evicts_the_least_recently_used(tmp_path):
    cache = WorkerCache(tmp_path / "cache", max_bytes=250, in_use_s=0.0)
    for i, name in enumerate(["a", "b", "c"]):
        with cache.staging() as tmp:
            (tmp / "f").write_bytes(b"x" * 100)
            entry = cache.admit("files", name, tmp / "f")
        os.utime(entry, (1000 + i, 1000 + i))
    # admitting c went over 250 bytes: a, the oldest, went
    assert sorted(p.name for _, _, p in cache.entries()) == ["b", "c"]
    assert cache.get("files", "b") is not None  # touched: now the newest
    with cache.staging() as tmp:
        (tmp / "f").write_bytes(b"x" * 100)
        cache.admit("files", "d", tmp / "f")
    assert sorted(p.name for _, _, p in cache.entries()) == ["b", "d"]
    assert cache.size_bytes() == 200


def test_datasets_on_the_store_from_the_cli(s3_server, s3_root, tmp_path):
    env = {
        "FLEET_SHARED_ROOT": s3_root,
        "FLEET_STORAGE_OPTIONS": json.dumps(s3_server.storage_options),
        "FLEET_CACHE_DIR": str(tmp_path / "cache"),
    }
    runner = CliRunner(env=env)
    wrote = runner.invoke(main, ["dataset", "write", "charlm", "data/charlm", "--microshards", "6"])
    assert wrote.exit_code == 0, wrote.output
    assert f"{s3_root}/data/charlm" in wrote.output
    shown = runner.invoke(main, ["dataset", "inspect", "data/charlm", "--json"])
    assert shown.exit_code == 0, shown.output
    index = json.loads(shown.output)
    assert index["layout"] == "burn-p2p-fetch-manifest" and len(index["microshards"]) == 6
    ok = runner.invoke(main, ["dataset", "verify", "data/charlm"])
    assert ok.exit_code == 0 and "6 content hashes checked" in ok.output, ok.output
    store = _store(s3_server, s3_root, tmp_path / "cache-2")
    shard = index["microshards"][2]
    local = store.local_shard(
        shard["path"], shard["content_hash"], dataset="data/charlm", shard_id="x"
    )
    assert local.name == Path(shard["path"]).name and local.stat().st_size == shard["bytes_len"]
    data = bytearray(store.read_bytes(shard["path"]))
    data[0] ^= 0xFF
    store.write_bytes(shard["path"], bytes(data))
    bad = runner.invoke(main, ["dataset", "verify", "data/charlm"])
    assert bad.exit_code != 0 and "ShardHashMismatchError" in bad.output, bad.output
    fresh = _store(s3_server, s3_root, tmp_path / "cache-3")
    with pytest.raises(ShardHashMismatchError):
        fresh.local_shard(shard["path"], shard["content_hash"], dataset="d", shard_id="x")


# --------------------------------------------------------------------------- DiLoCo on s3


def charlm_job(dataset: str | None):
    from fleet.diloco import DiLoCoConfig
    from fleet.diloco.config import DatasetConfig

    return DiLoCoConfig(
        workload=CHARLM,
        config=SMALL_CHARLM,
        replicas=2,
        rounds=3,
        inner_steps=30,
        eval_every=1,
        dataset=DatasetConfig(path=dataset, microshards_per_lease=2) if dataset else None,
    )


def run_charlm(settings: FleetSettings, job_id: str, dataset: str | None):
    """A charlm DiLoCo job to completion: (eval losses, final values digest)."""
    from fleet.client import Fleet
    from fleet.diloco import DiLoCoRun

    fleet = Fleet(settings)
    try:
        run = DiLoCoRun.start(fleet, charlm_job(dataset), job_id=job_id)
        job = run.run()
        assert job.status == "completed", job.error
        state = run.state()
        assert state is not None
        losses = [r.eval.loss for r in run.rounds() if r.eval is not None]
        return losses, state.global_digest
    finally:
        fleet.close()


def test_diloco_on_an_s3_root_matches_a_local_root(
    s3_server, s3_root, redis_server, tmp_path, artifacts_dir
):
    """The same charlm job on its microshard dataset, with workers whose caches are
    private, on an s3:// root and on a local root: the same eval losses and the same
    final pack, bit for bit (CPU training is deterministic)."""
    from fleet.examples.charlm import write_dataset

    outcomes = []
    for kind in ("s3", "local"):
        root = s3_root if kind == "s3" else str(tmp_path / "local-root")
        common = {
            "workload_allowlist": ["fleet.examples.*"],
            "storage_options": s3_server.storage_options,
            "pool_queue": f"fleet.s3test-{kind}",
            "node": f"s3test-{kind}",
        }
        # a Redis database of its own: the session's digits workers are not in its registry
        redis_url = redis_server.url.rsplit("/", 1)[0] + "/7"
        settings = settings_for(redis_url, root, **common)  # type: ignore[arg-type]
        with open_store(settings).output("data/charlm") as staged:
            write_dataset(staged, 8, manifest=True)
        workers = [
            WorkerProcess(
                settings.model_copy(update={"cache_dir": tmp_path / f"{kind}-cache-{i}"}),
                i,
                artifacts_dir / "logs" / f"s3test-{kind}",
                workload=CHARLM,
                config_json=json.dumps(SMALL_CHARLM),
                pythonpath=[str(REPO)],
                cwd=REPO,
            )
            for i in range(2)
        ]
        try:
            from fleet.registry import Registry

            registry = Registry.from_settings(settings)
            for w in workers:
                w.wait_alive(registry)
            outcomes.append(run_charlm(settings, f"s3test-{kind}-{time.time_ns()}", "data/charlm"))
        finally:
            for w in workers:
                w.stop()
        if kind == "s3":  # each worker read through its own cache, nothing else
            caches = [tmp_path / f"s3-cache-{i}" for i in range(2)]
            assert all(any((c / "packs").iterdir()) for c in caches)
            assert all(any((c / "shards").iterdir()) for c in caches)
    (s3_losses, s3_digest), (local_losses, local_digest) = outcomes
    assert len(s3_losses) == 3 and s3_losses == local_losses
    assert s3_digest == local_digest


def test_a_burn_p2p_style_workload_on_an_s3_root(s3_server, s3_root, redis_server, tmp_path):
    """A workload unlike ours (no optimizer file, no artifact hooks, data read only from
    its BatchRefs' shard_paths) under DiLoCo on an s3:// root: its hooks get local paths
    of verified cached shards, nothing is uploaded for the optimizer state it never
    writes, and every round merges."""
    from fleet.client import Fleet
    from fleet.diloco import DiLoCoConfig, DiLoCoRun
    from fleet.diloco.config import DatasetConfig
    from fleet.registry import Registry
    from fleet.testing.shard_workload import write_shards

    shards = "fleet.testing.shard_workload:make"
    redis_url = redis_server.url.rsplit("/", 1)[0] + "/9"
    settings = settings_for(
        redis_url,
        s3_root,  # type: ignore[arg-type]
        storage_options=s3_server.storage_options,
        pool_queue="fleet.s3-shards",
        node="s3shards",
    )
    with open_store(settings).output("data/digits") as staged:
        write_shards(staged, 8, manifest=True)
    reads = tmp_path / "reads"
    reads.mkdir()
    workers = [
        WorkerProcess(
            settings.model_copy(update={"cache_dir": tmp_path / f"cache-{i}"}),
            i,
            tmp_path / "logs",
            workload=shards,
            pythonpath=[str(REPO)],
            cwd=REPO,
        )
        for i in range(2)
    ]
    fleet = Fleet(settings)
    try:
        registry = Registry.from_settings(settings)
        for w in workers:
            w.wait_alive(registry)
        cfg = DiLoCoConfig(
            workload=shards,
            config={"read_log": str(reads)},
            replicas=2,
            rounds=3,
            inner_steps=8,
            dataset=DatasetConfig(path="data/digits", microshards_per_lease=2),
        )
        run = DiLoCoRun.start(fleet, cfg)
        job = run.run()
        assert job.status == "completed", job.error
        rounds = run.rounds()
    finally:
        fleet.close()
        for w in workers:
            w.stop()
    assert all(r.status == "merged" for m in rounds for r in m.replicas)
    # it keeps no optimizer file: from round 1 its replicas start from the residual their
    # worker kept; the outer step's worker holds the new global model, the other steps to it
    assert all(r.state_source == "held" for m in rounds[1:] for r in m.replicas)
    for m in rounds[1:]:
        assert sorted(r.global_source for r in m.replicas) == ["held", "stepped"]
    read = [p for f in reads.glob("*.jsonl") for line in f.read_text().splitlines()
            for p in json.loads(line)["paths"]]  # fmt: skip
    assert read and all(p.startswith(str(tmp_path / "cache-")) for p in read), read[:3]
    store = open_store(settings)
    assert not any("optimizer" in e.path for e in store.walk("runs"))
