"""An object store that goes away (a real SeaweedFS, killed and started again on the
same data): store operations retry through the outage for ``FLEET_STORE_RETRY_S``
(docs/design.md decision 9 for Redis; :mod:`fleet.storage.object_store` for the store),
each process logging one line when it starts and one when it ends, and fail typed
(``StorageUnavailableError``, naming the store) past it; a DiLoCo job rides out the
store being killed mid-round."""

from __future__ import annotations

import json
import logging
import pickle
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from fleet.codec import read_pack, write_pack
from fleet.errors import StorageError, StorageUnavailableError, remote_error
from fleet.settings import FleetSettings
from fleet.storage import open_store
from fleet.storage.object_store import ObjectStore
from fleet.testing.seaweed import SeaweedS3
from tests.harness import (
    CHARLM,
    REPO,
    SMALL_CHARLM,
    WorkerProcess,
    inner_loops_started,
    run_in_thread,
    settings_for,
    wait_until,
)

#: How long the DiLoCo test keeps the store down. The issue asks for 60 s; 6 s keeps the
#: test short on 2 cores and is still longer than any one request's own retries
#: (botocore's 3 tries), so only the whole-operation retry can ride it out.
OUTAGE_S = 6.0


@pytest.fixture(scope="module")
def weed(tmp_path_factory) -> Iterator[SeaweedS3]:
    """A SeaweedFS of this module's own: its tests stop it."""
    server = SeaweedS3(tmp_path_factory.mktemp("weed-outage"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def up(weed) -> Iterator[SeaweedS3]:
    """The module's SeaweedFS, up when the test starts and when it ends."""
    if not weed.running:
        weed.start()
    weed.wait_ready()
    yield weed
    if not weed.running:
        weed.start()
        weed.wait_ready()


def _store(s3: SeaweedS3, root: str, cache: Path, retry_s: float) -> ObjectStore:
    settings = FleetSettings(
        shared_root=root,
        storage_options=s3.storage_options,
        cache_dir=cache,
        store_retry_s=retry_s,
    )
    store = open_store(settings)
    assert isinstance(store, ObjectStore)
    return store


def _state(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(50_000, generator=torch.Generator().manual_seed(seed))}


def _kill(s3: SeaweedS3) -> None:
    """Kill the server; return once nothing answers on its S3 port."""
    s3.kill()
    assert not s3.running
    with pytest.raises(OSError):
        socket.create_connection((s3.ip, s3.port), timeout=2).close()


def _outage_lines(records: list[logging.LogRecord], url: str) -> tuple[int, int]:
    """(outage started, outage ended) lines logged for the store at ``url``."""
    mine = [r.getMessage() for r in records if r.name == "fleet.storage" and url in r.getMessage()]
    return sum("is unreachable" in m for m in mine), sum("is back after" in m for m in mine)


def test_a_read_and_a_write_started_while_the_store_is_down_finish_once_it_is_back(
    up, tmp_path, caplog
):
    """A pack fetch and a pack publish start while SeaweedFS is down; once it is back
    (within FLEET_STORE_RETRY_S) both finish: the fetched pack verified against its
    digest, the published one readable with the values written. The process logged
    each outage once, and its end once."""
    caplog.set_level(logging.WARNING, logger="fleet.storage")
    root = f"s3://{up.new_bucket()}/root"
    writer = _store(up, root, tmp_path / "writer", retry_s=120)
    with writer.output("exchange/old") as local:
        write_pack(local, _state(0), "schema")
    ref = writer.pack_ref("exchange/old")
    reader = _store(up, root, tmp_path / "reader", retry_s=120)
    _kill(up)

    outcome: dict[str, object] = {}

    def read() -> None:
        outcome["read"] = reader.local_pack(ref.path, ref)

    def write() -> None:
        with writer.output("exchange/new") as local:
            write_pack(local, _state(1), "schema")
        outcome["wrote"] = True

    sent = {"reader": reader.counters.requests, "writer": writer.counters.requests}
    threads = [threading.Thread(target=_recording(f, outcome), daemon=True) for f in (read, write)]
    for t in threads:
        t.start()
    # both operations reached the store (their requests went out, unanswered) and wait
    wait_until(
        lambda: (
            reader.counters.requests > sent["reader"]
            and writer.counters.requests > sent["writer"]
            and _outage_lines(caplog.records, root)[0] == 1
        ),
        60,
        "the read and the write tried the store while it was down",
    )
    assert all(t.is_alive() for t in threads) and not outcome
    up.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "an operation never finished"
    assert "error" not in outcome, outcome.get("error")
    manifest, values = read_pack(Path(str(outcome["read"])), verify=True)
    assert manifest.values_digest == ref.values_digest
    assert torch.equal(values, _state(0)["w"])
    fresh = _store(up, root, tmp_path / "fresh", retry_s=0)
    with fresh.pack_reader("exchange/new") as r:  # streamed from the store, digest checked
        out = torch.empty(r.manifest.parameter_count)
        r.read_into(out)
        r.finish()
    assert torch.equal(out, _state(1)["w"])
    # one line when it went and one when it came back; a SeaweedFS still electing its
    # master may refuse once more after answering (seen: a second, short outage)
    gone, back = _outage_lines(caplog.records, root)
    assert 1 <= gone == back <= 2, (gone, back)


def _recording(fn: Callable[[], None], outcome: dict[str, object]) -> Callable[[], None]:
    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # the test asserts on it
            outcome["error"] = exc

    return run


def test_a_store_down_past_its_retry_budget_fails_typed_naming_the_store(up, tmp_path, caplog):
    """With FLEET_STORE_RETRY_S short, a store that stays down fails each operation with
    StorageUnavailableError (a StorageError) naming the store and the budget, after
    retrying for that long; it crosses the wire (a task's error) and pickles (the pool)
    as itself; and the DiLoCo orchestrator re-runs an attempt that fails with it (it is
    not one of the errors that fail a run)."""
    from fleet.diloco.context import FATAL

    caplog.set_level(logging.WARNING, logger="fleet.storage")
    root = f"s3://{up.new_bucket()}/root"
    store = _store(up, root, tmp_path / "cache", retry_s=1.5)
    with store.output("exchange/p") as local:
        write_pack(local, _state(0), "schema")
    ref = store.pack_ref("exchange/p")
    fresh = _store(up, root, tmp_path / "fresh", retry_s=1.5)
    _kill(up)
    operations: dict[str, Callable[[], object]] = {
        "read": lambda: store.read_bytes("exchange/p/manifest.json"),
        "fetch pack": lambda: fresh.local_pack(ref.path, ref),
        "write": lambda: store.write_bytes("exchange/marker.json", b"{}"),
        "remove": lambda: store.remove(["exchange/p"]),
    }
    for name, operation in operations.items():
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError) as raised:
            operation()
        waited_s = time.monotonic() - started
        error = raised.value
        assert isinstance(error, StorageError)
        assert (error.url, error.retry_s) == (root, 1.5)
        assert error.operation.startswith(name) and "ConnectionRefusedError" in error.cause
        assert root in str(error) and "FLEET_STORE_RETRY_S" in str(error)
        assert waited_s >= error.retry_s, f"{name} gave up before its budget"
        wire = json.loads(json.dumps(error.to_dict()))
        assert wire["type"] == "StorageUnavailableError" and wire["data"]["url"] == root
        remote = remote_error(
            method="fleet.run_inner_loop", worker="w", task_id="t", error_type=wire["type"],
            error=wire["message"], data=wire["data"], remote_traceback=None,
        )  # fmt: skip
        assert isinstance(remote, StorageUnavailableError) and remote.url == root
        assert pickle.loads(pickle.dumps(error)).to_dict() == error.to_dict()
    assert not issubclass(StorageUnavailableError, FATAL)
    assert _outage_lines(caplog.records, root) == (1, 0)  # one line for the whole outage


def test_what_is_retried_is_what_a_store_away_for_now_answers():
    """The failures the store retries (:func:`~fleet.storage.object_store.transient`), as
    s3fs raises them from botocore's errors: a connection refused or timed out, a 5xx
    reply, throttling (``SlowDown`` on a 503, AWS's ``Throttling`` on a 400); and those
    it does not: a missing key, a refused credential, a bad range."""
    from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError
    from s3fs.errors import translate_boto_error

    from fleet.storage.object_store import transient

    def reply(code: str, status: int) -> BaseException:
        error = ClientError(
            {
                "Error": {"Code": code, "Message": code},
                "ResponseMetadata": {"HTTPStatusCode": status},
            },
            "GetObject",
        )
        return translate_boto_error(error)  # what s3fs raises: an OSError from it

    retried = [
        EndpointConnectionError(endpoint_url="http://store:8333"),
        ConnectTimeoutError(endpoint_url="http://store:8333"),
        ConnectionResetError(104, "reset by peer"),
        reply("SlowDown", 503),
        reply("InternalError", 500),
        reply("BadGateway", 502),
        reply("Throttling", 400),
        reply("TooManyRequests", 429),
    ]
    refused = [
        reply("NoSuchKey", 404),
        reply("AccessDenied", 403),
        reply("InvalidRange", 416),
        reply("InvalidArgument", 400),
        FileNotFoundError("gone"),
        ValueError("bad"),
    ]
    assert [transient(e) for e in retried] == [True] * len(retried)
    assert [transient(e) for e in refused] == [False] * len(refused)


def test_a_diloco_job_rides_out_the_store_killed_mid_round(
    up, redis_server, tmp_path, artifacts_dir, caplog
):
    """SeaweedFS is killed while round 1 trains, kept down for OUTAGE_S seconds (a
    worker found it gone meanwhile), then started again on the same data (it takes a few
    seconds more to answer): the job completes, no attempt failed (the workers waited for
    the store inside their attempts), each round commits exactly once, and the final
    global pack reads back from the store with its digest verified (every read of a pack
    is checked against its digest, so no half-written pack was merged)."""
    from fleet.client import Fleet
    from fleet.diloco import DiLoCoRun
    from fleet.examples.charlm import write_dataset
    from fleet.jobs import JobStore
    from fleet.registry import Registry
    from tests.test_object_store import charlm_job

    caplog.set_level(logging.WARNING, logger="fleet.storage")
    root = f"s3://{up.new_bucket()}/root"
    redis_url = redis_server.url.rsplit("/", 1)[0] + "/10"  # a registry of its own
    settings = settings_for(
        redis_url,
        root,  # type: ignore[arg-type]
        storage_options=up.storage_options,
        workload_allowlist=["fleet.examples.*"],
        pool_queue="fleet.outage",
        node="outage",
        cache_dir=tmp_path / "orchestrator-cache",
    )
    with open_store(settings).output("data/charlm") as staged:
        write_dataset(staged, 8, manifest=True)
    logs = artifacts_dir / "logs" / "store-outage"
    workers = [
        WorkerProcess(
            settings.model_copy(update={"cache_dir": tmp_path / f"cache-{i}"}),
            i,
            logs,
            workload=CHARLM,
            config_json=json.dumps(SMALL_CHARLM),
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
        job_id = f"outage-{time.time_ns()}"
        run = DiLoCoRun.start(fleet, charlm_job("data/charlm"), job_id=job_id)
        thread, outcome = run_in_thread(run)
        jobs = JobStore.from_settings(settings)
        wait_until(lambda: inner_loops_started(jobs, job_id) >= 3, 180, "round 1 training")
        _kill(up)
        killed_at = time.monotonic()

        def found_gone() -> bool:
            return any("is unreachable" in _text(w.log_path) for w in workers)

        wait_until(found_gone, 120, "a worker found the store gone")
        # the outage itself: its length is the scenario, not a synchronisation
        wait_until(lambda: time.monotonic() - killed_at >= OUTAGE_S, OUTAGE_S + 5, "outage")
        up.start()
        thread.join(timeout=600)
        assert not thread.is_alive(), "the job did not finish"
        assert "error" not in outcome, outcome.get("error")
        job = outcome["job"]
        assert job.status == "completed", job.error  # type: ignore[attr-defined]
        rounds = run.rounds()
        state = run.state()
    finally:
        fleet.close()
        for w in workers:
            w.stop()
    assert [m.round for m in rounds] == [0, 1, 2]  # each round committed once
    # the workers rode the outage out inside their attempts: none failed on the store
    # (a replica may still be dropped at the round's adaptive deadline: that is what
    # deadlines are for)
    assert not [r.error for m in rounds for r in m.replicas if r.error], "an attempt failed"
    assert all(m.merged for m in rounds)
    assert state is not None and state.next_round == 3
    checkpoint = state.checkpoints[-1]  # the job ends by publishing its model in full
    assert checkpoint.round == 3
    final = checkpoint.global_pack
    assert final.values_digest == state.global_digest
    reader = _store(up, root, tmp_path / "verify-cache", retry_s=0)
    with reader.pack_reader(
        final.path, layout_hash=final.layout_hash, values_digest=final.values_digest
    ) as r:
        while r.remaining:
            r.read_into(torch.empty(1 << 16))
        r.finish()  # DigestMismatchError if any byte differs from what was committed
    # every worker process that found the store gone logged its return
    texts = [_text(w.log_path) for w in workers]
    gone = sum(t.count("is unreachable") for t in texts)
    back = sum(t.count("is back after") for t in texts)
    assert gone >= 1 and back == gone, (gone, back)


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
