"""Multi-site weather on the namespace hosts (fleet/testing/hosts.py): a storage host whose
link goes down for 30 s in the middle of a round, and rounds whose every request to
Redis and S3 costs 0, 50 or 150 ms of round trip (the delay element,
fleet/testing/delay_proxy.py), with the store requests a round makes held to a bound
derived from the protocol.

One storage host (Redis and SeaweedFS's S3 gateway, both on it: StorageServices) and two
worker hosts with private tmpfs caches serve the whole module; the orchestrator is this
process, reaching the storage host over its own port on the switch (``ctl``), as an
operator's laptop would. Each test starts workers of its own, on a Redis database and a
bucket of its own."""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from fleet.local import WorkerProcess
from fleet.registry import Registry
from fleet.settings import FleetSettings
from fleet.storage import open_store
from fleet.storage.object_store import ObjectStore
from fleet.testing.hosts import Host, Network, StorageServices, skip_reason
from tests.harness import CHARLM, REPO, SMALL_CHARLM, run_in_thread, settings_for, wait_until

if TYPE_CHECKING:
    from fleet.diloco import DiLoCoConfig
    from fleet.diloco.state import RoundRecord
    from fleet.jobs import JobStore

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

#: How long the storage host's link stays down (issue 27: 30 s).
OUTAGE_S = 30.0
#: FLEET_STORE_RETRY_S and FLEET_REDIS_RETRY_S of the workers and the orchestrator: well
#: past the outage. (Measured: a store operation caught by the cut first fails ~15 s in,
#: at s3fs's read timeout, and its budget counts from there; its next run's own tries,
#: 3 of up to 5 s to connect, reach the end of this outage, so a budget of 5 s still
#: rides it out here, and 0, no retries of whole operations, fails round 1.)
RETRY_S = 120.0
#: The storage host's link during the link-down test: a WAN rate at which a round's
#: microshard fetch (4 x 3.8 MB across the two workers) takes ~3 s, so the cut falls
#: while a worker streams from the store. Unlimited, the fetch takes ~30 ms and the cut
#: falls while every worker waits on Redis: the store's retries would not be exercised.
LINK_MBIT = 40.0
#: Round-trip times to Redis and S3 for the request-count test, milliseconds.
RTTS_MS = (0.0, 50.0, 150.0)

# ----------------------------------------------------------------- store requests of a round
# What a round of the RTT test's job (2 replicas, int8 pseudo-gradients with error
# feedback: the defaults; a fixed lease of 2 microshards; no evaluation) asks of the
# store, per the protocol (docs/protocol.md 5.5 and 5.7; what each store operation costs
# is pinned by tests/test_store_requests.py). Every request is one round trip; a request
# retried (botocore's tries, or a whole operation run again) counts once per try.
REPLICAS = 2
LEASE_MICROSHARDS = 2
#: A pseudo-gradient pack's data files (int8 values.bin and its scales.f32le); a v1 pack
#: (a global model, a momentum buffer) has one (values.f32le).
PG_DATA_FILES = 2
#: Reading a pack: its manifest, then one ranged GET per data file, no HEAD.
READ_PG = 1 + PG_DATA_FILES
READ_V1 = 1 + 1
#: Publishing a pack: the old manifest deleted, the data files PUT, the manifest PUT.
PUBLISH_PG = 1 + PG_DATA_FILES + 1
PUBLISH_V1 = 1 + 1 + 1
#: A microshard (3.8 MB here): one GET (a read of unknown length asks for 16 MiB first).
FETCH_SHARD = 1
#: ReplicaOutcome.store_requests of one attempt, at most: (1) the round's global model:
#: in round 0 caught up from the initial checkpoint (READ_V1: the global pack; the outer
#: optimizer has no buffer yet), or nothing on the worker that exported it; in a later
#: round stepped from the model the worker holds by applying the last outer step, which
#: reads the other replicas' pseudo-gradients (its own stays on its disk), or nothing on
#: the worker that ran that outer step; (2) its lease's microshards; (3) its
#: pseudo-gradient published. 9 = max(2, 3) + 2 + 4. Not counted there: the GET of the
#: attempt's result marker (before the count starts: a redelivered request returns it)
#: and its PUT (after): 2 more per attempt.
ATTEMPT_REQUESTS = (
    max(READ_V1, (REPLICAS - 1) * READ_PG) + LEASE_MICROSHARDS * FETCH_SHARD + PUBLISH_PG
)
#: RoundRecord.outer_step_requests, at most: on a worker that holds the round's global
#: model (both do, having trained from it), the other replicas' pseudo-gradients. 3.
OUTER_STEP_REQUESTS = (REPLICAS - 1) * READ_PG
#: What the last round's outer step adds, per pack it publishes in full and waits for:
#: the new global model, and each buffer of the job's outer optimizer beside it
#: (Nesterov's momentum: 1; plain averaging: none). 3 a pack.
FINAL_CHECKPOINT_REQUESTS_PER_PACK = PUBLISH_V1


@dataclass
class Site:
    network: Network
    storage: Host
    workers: list[Host]
    services: StorageServices
    logs: Path

    def settings(self, db: int, *, through_proxy: bool, **overrides: object) -> FleetSettings:
        """Settings on Redis database ``db`` and a fresh bucket: Redis and S3 reached
        through the delay proxy, or directly."""
        services = self.services
        assert services.s3 is not None
        if through_proxy:
            redis_url, options = services.redis_url, services.storage_options
        else:
            redis_url = f"redis://{self.storage.ip}:{services.REDIS_PORT}/0"
            options = services.s3.storage_options
        values: dict[str, object] = {
            "storage_options": options,
            "workload_allowlist": ["fleet.examples.*"],
            "node": "orchestrator",
            "redis_retry_s": RETRY_S,
            "store_retry_s": RETRY_S,
        }
        values.update(overrides)
        return settings_for(
            f"{redis_url.rsplit('/', 1)[0]}/{db}",
            f"s3://{services.s3.new_bucket()}/root",  # type: ignore[arg-type]
            **values,
        )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, artifacts_dir: Path) -> Iterator[Site]:
    """The storage host (Redis, SeaweedFS, the delay proxy at 0 ms) and two worker hosts,
    for the module; every namespace, link and process is torn down after it."""
    base = tmp_path_factory.mktemp("outages")
    network = Network(base / "net")
    services = None
    try:
        storage = network.host("storage")
        workers = [network.host("w1"), network.host("w2")]
        services = StorageServices(storage, base, rtt_ms=0)
        yield Site(network, storage, workers, services, artifacts_dir / "multi-host-outages")
    finally:
        if services is not None:
            services.close()
        network.close()


@contextmanager
def _workers(site: Site, settings: FleetSettings, tag: str) -> Iterator[list[WorkerProcess]]:
    """A charlm worker on each worker host, its cache empty, alive before it yields."""
    procs = []
    try:
        for host in site.workers:
            update = {"node": host.name, "cache_dir": host.local_dir / f"cache-{tag}"}
            procs.append(
                WorkerProcess(
                    settings.model_copy(update=update),
                    0,
                    site.logs / tag / host.name,
                    workload=CHARLM,
                    config_json=json.dumps(SMALL_CHARLM),
                    pythonpath=[str(REPO)],
                    cwd=REPO,
                    command_prefix=host.prefix,
                )
            )
        registry = Registry.from_settings(settings)
        for proc in procs:
            proc.wait_alive(registry, timeout_s=120)
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def _job(rounds: int, inner_steps: int) -> DiLoCoConfig:
    from fleet.diloco import DiLoCoConfig
    from fleet.diloco.config import DatasetConfig

    return DiLoCoConfig(
        workload=CHARLM,
        config=SMALL_CHARLM,
        replicas=REPLICAS,
        rounds=rounds,
        inner_steps=inner_steps,
        eval_every=0,
        dataset=DatasetConfig(path="data/charlm", microshards_per_lease=LEASE_MICROSHARDS),
    )


def _stage_dataset(settings: FleetSettings, microshards: int) -> None:
    from fleet.examples.charlm import write_dataset

    with open_store(settings).output("data/charlm") as staged:
        write_dataset(staged, microshards, manifest=True)


def _logged(jobs: JobStore, job_id: str, text: str) -> bool:
    return any(text in line.line for line in jobs.logs(job_id))


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _outages(text: str, what: str) -> tuple[int, int]:
    """(outages started, outages ended) that ``text`` logs for ``what`` ("store", "Redis")."""
    gone = len(re.findall(rf"{what} (?:at )?\S+ is unreachable", text))
    back = len(re.findall(rf"{what} (?:at )?\S+ is back after", text))
    return gone, back


def _verify_final(settings: FleetSettings, state: object, cache: Path) -> None:
    """Stream the job's final global pack from the store, its digest checked."""
    from fleet.diloco.state import DriverState

    assert isinstance(state, DriverState)
    final = state.checkpoints[-1].global_pack
    assert final.values_digest == state.global_digest
    reader = open_store(settings.model_copy(update={"cache_dir": cache, "store_retry_s": 0}))
    assert isinstance(reader, ObjectStore)
    with reader.pack_reader(
        final.path, layout_hash=final.layout_hash, values_digest=final.values_digest
    ) as r:
        while r.remaining:
            r.read_into(torch.empty(1 << 16))
        r.finish()  # DigestMismatchError if any byte differs from what was committed


@pytest.mark.timeout(600)
def test_the_storage_hosts_link_down_for_30_s_mid_round_is_ridden_out(
    site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The storage host's link goes down for OUTAGE_S seconds while round 1's replicas
    fetch their microshards from it, then comes back. Redis lives on the storage host
    too, so this is a Redis outage and a store outage at once, for every worker and the
    orchestrator, of the kind a pulled cable or a partition makes: requests in flight
    hang (no refusal) until they time out. With FLEET_STORE_RETRY_S and
    FLEET_REDIS_RETRY_S above the outage, the job completes; each round commits exactly
    once (round records 0, 1, 2, in order); no attempt failed (a replica may still be
    cut at the round's adaptive deadline: that is what deadlines are for); the final
    global pack reads back from the store with its digest verified (every read of a pack
    is checked against its digest, so no half-written pack was merged); a worker's store
    found the store gone, and every process that logged an outage, of the store or of
    Redis, logged its end."""
    from fleet.client import Fleet
    from fleet.diloco import DiLoCoRun
    from fleet.jobs import JobStore

    caplog.set_level(logging.WARNING, logger="fleet")
    site.services.set_rtt(0)
    settings = site.settings(2, through_proxy=False, cache_dir=tmp_path / "orchestrator")
    for name in ("FLEET_STORE_RETRY_S", "FLEET_REDIS_RETRY_S"):  # what the workers get
        assert float(settings.to_env()[name]) > OUTAGE_S
    _stage_dataset(settings, 8)
    site.storage.limit(LINK_MBIT)
    tag = f"link-down-{time.time_ns()}"
    try:
        with _workers(site, settings, tag) as procs:
            fleet = Fleet(settings)
            try:
                job_id = f"link-down-{time.time_ns()}"
                run = DiLoCoRun.start(fleet, _job(rounds=3, inner_steps=30), job_id=job_id)
                thread, outcome = run_in_thread(run)
                jobs = JobStore.from_settings(settings)
                # the worker that did not run round 0's outer step applies it, logs
                # this, and goes on to fetch its lease's microshards from the store
                # (~3 s at LINK_MBIT, while the other worker fetches its own)
                wait_until(
                    lambda: _logged(jobs, job_id, "global model of round 1 stepped"),
                    180,
                    "round 1's replicas fetching their microshards",
                )
                site.storage.link(False)
                down_at, down_unix = time.monotonic(), time.time()
                try:
                    with pytest.raises(OSError):  # nothing answers: the cable is out
                        socket.create_connection(
                            (site.storage.ip, site.services.REDIS_PORT), timeout=2
                        ).close()
                    # the outage itself: its length is the scenario, not a synchronisation
                    wait_until(
                        lambda: time.monotonic() - down_at >= OUTAGE_S, OUTAGE_S + 5, "outage"
                    )
                finally:
                    site.storage.link(True)
                thread.join(timeout=400)
                assert not thread.is_alive(), "the job did not finish"
                assert "error" not in outcome, outcome.get("error")
                job = outcome["job"]
                assert job.status == "completed", job.error  # type: ignore[attr-defined]
                rounds = run.rounds()
                state = run.state()
            finally:
                fleet.close()
    finally:
        site.storage.link(True)
        site.storage.limit(None)
    assert [m.round for m in rounds] == [0, 1, 2]  # each round committed once, in order
    assert rounds[1].started_at < down_unix < rounds[1].closed_at, "the cut fell in round 1"
    assert not [r.error for m in rounds for r in m.replicas if r.error], "an attempt failed"
    assert all(m.merged for m in rounds)
    assert state is not None and state.next_round == 3
    _verify_final(settings, state, tmp_path / "verify-cache")
    # the store's retries rode it out: a worker's store found it gone mid-fetch, and every
    # worker process that logged an outage (of the store or of Redis) logged its end
    texts = {p.name: _text(p.log_path) for p in procs}
    orchestrator = "\n".join(r.getMessage() for r in caplog.records)
    store = {name: _outages(text, "store") for name, text in texts.items()}
    assert sum(gone for gone, _ in store.values()) >= 1, store
    for name, text in [*texts.items(), ("orchestrator", orchestrator)]:
        for what in ("store", "Redis"):
            gone, back = _outages(text, what)
            assert gone == back, (name, what, gone, back)
    redis = [_outages(text, "Redis")[0] for text in [*texts.values(), orchestrator]]
    assert sum(redis) >= 1, "nothing found Redis gone"
    print(
        f"\nlink down {OUTAGE_S:g} s: round walls "
        + ", ".join(f"{m.wall_s:.1f}" for m in rounds)
        + f" s; store outages logged {store}; attempts "
        + ", ".join(
            f"r{m.round}:{r.replica}/{r.attempt} {r.status}" for m in rounds for r in m.replicas
        )
    )


def _exchange_s(record: RoundRecord) -> float:
    """A round's wall time less its slowest merged replica's inner steps."""
    return record.wall_s - max(r.compute_s for r in record.merged)


@pytest.mark.timeout(900)
def test_a_rounds_store_requests_hold_to_the_bound_at_0_50_and_150_ms_rtt(
    site: Site, tmp_path: Path
) -> None:
    """The same 3-round job (2 replicas, 5 inner steps, 2 microshards a lease from a
    12-microshard dataset, so every lease is fetched cold) at 0, 50 and 150 ms RTT to
    Redis and S3, each on fresh workers with empty caches: every attempt's store requests
    are within ATTEMPT_REQUESTS and every outer step's within OUTER_STEP_REQUESTS (the
    last round's plus FINAL_CHECKPOINT_REQUESTS_PER_PACK for each pack of the final
    checkpoint), each replica ran once a round, and each round's requests (its
    attempts' and its outer step's) are the same at every RTT: a request retried or
    timed out at 150 ms would show as more (every try is counted). The rounds' requests
    and exchange seconds go to ``rtt-store-requests.json`` in the test artifacts."""
    from fleet.client import Fleet
    from fleet.diloco import DiLoCoRun
    from fleet.diloco.optim import outer_optimizer

    buffers = len(outer_optimizer(_job(rounds=3, inner_steps=5).outer).buffers)
    per_rtt: dict[float, list[RoundRecord]] = {}
    try:
        for index, rtt in enumerate(RTTS_MS):
            site.services.set_rtt(0)  # the workers start at 0 ms: their start is not measured
            settings = site.settings(
                3 + index, through_proxy=True, cache_dir=tmp_path / f"orchestrator-{index}"
            )
            _stage_dataset(settings, 12)
            tag = f"rtt-{rtt:g}-{time.time_ns()}"
            with _workers(site, settings, tag):
                site.services.set_rtt(rtt)
                fleet = Fleet(settings)
                try:
                    run = DiLoCoRun.start(fleet, _job(rounds=3, inner_steps=5), job_id=tag)
                    thread, outcome = run_in_thread(run)
                    thread.join(timeout=300)
                    assert not thread.is_alive(), f"the job at {rtt:g} ms did not finish"
                    assert "error" not in outcome, outcome.get("error")
                    job = outcome["job"]
                    assert job.status == "completed", job.error  # type: ignore[attr-defined]
                    per_rtt[rtt] = run.rounds()
                finally:
                    fleet.close()
    finally:
        site.services.set_rtt(0)
    table = {
        rtt: [
            {
                "round": m.round,
                "attempts": [r.store_requests for r in sorted(m.replicas, key=lambda r: r.replica)],
                "outer_step": m.outer_step_requests,
                "exchange_s": round(_exchange_s(m), 3),
                "wall_s": round(m.wall_s, 3),
            }
            for m in rounds
        ]
        for rtt, rounds in per_rtt.items()
    }
    site.logs.mkdir(parents=True, exist_ok=True)
    (site.logs / "rtt-store-requests.json").write_text(json.dumps(table, indent=1))
    print("\nrtt_ms round attempts outer_step exchange_s wall_s")
    for rtt, rows in table.items():
        for row in rows:
            print(f"{rtt:6g} {row['round']:5d} {row['attempts']!s:>8} {row['outer_step']:10d} "
                  f"{row['exchange_s']:10.2f} {row['wall_s']:6.2f}")  # fmt: skip
    for rtt, rounds in per_rtt.items():
        assert [m.round for m in rounds] == [0, 1, 2], rtt
        last = len(rounds) - 1
        for m in rounds:
            # each replica ran once: merged on its first attempt (nothing re-run or cut)
            assert sorted((r.replica, r.attempt, r.status) for r in m.replicas) == [
                (i, 0, "merged") for i in range(REPLICAS)
            ], (rtt, m.round)
            for r in m.replicas:
                assert r.store_requests <= ATTEMPT_REQUESTS, (rtt, m.round, r.replica)
            final = (1 + buffers) * FINAL_CHECKPOINT_REQUESTS_PER_PACK if m.round == last else 0
            bound = OUTER_STEP_REQUESTS + final
            assert m.outer_step_requests <= bound, (rtt, m.round, m.outer_step_requests)
    # the counts do not grow with the RTT: a round's requests are fixed by the protocol
    # (which worker runs which part moves requests between attempts and the outer step,
    # not their sum), so any difference is a retry
    totals = {
        rtt: [sum(r.store_requests for r in m.replicas) + m.outer_step_requests for m in rounds]
        for rtt, rounds in per_rtt.items()
    }
    assert all(t == totals[RTTS_MS[0]] for t in totals.values()), totals
