"""Microshard datasets and leases: both layouts read as they are, every bad input typed,
and DiLoCo runs of a workload written like burn_p2p's MNIST demo (data only from the
shard_paths of its BatchRefs, no optimizer file) that consume every shard exactly once
per epoch, across faults."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from fleet import keys
from fleet.cli import main
from fleet.data.dataset import read_dataset, verify_dataset
from fleet.data.leases import DataCursor, give_back, lease_sizes, plan_leases
from fleet.diloco import DiLoCoConfig, DiLoCoRun, QuorumConfig
from fleet.diloco.config import DatasetConfig, StreamingConfig
from fleet.diloco.state import RoundRecord
from fleet.errors import (
    DatasetFormatError,
    DatasetPathError,
    ShardHashMismatchError,
    ShardMissingError,
    ShardSizeMismatchError,
)
from fleet.jobs import JobStore
from fleet.local import worker_env
from fleet.storage import LocalStore
from fleet.testing.shard_workload import write_shards
from tests.harness import REPO, inner_loops_started, run_in_thread, running_workers, wait_until

SHARDS = "fleet.testing.shard_workload:make"


# --------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("manifest", [True, False], ids=["fetch-manifest", "directory"])
def test_both_layouts_are_read_as_they_are(tmp_path, manifest):
    shared = LocalStore(tmp_path)
    files = write_shards(tmp_path / "data", 5, manifest=manifest)
    index = read_dataset(shared, "data")
    assert index.layout == ("burn-p2p-fetch-manifest" if manifest else "directory")
    assert [m.ordinal for m in index.microshards] == [0, 1, 2, 3, 4]
    assert [m.path for m in index.microshards] == [f"data/{f.name}" for f in files]
    assert [m.bytes_len for m in index.microshards] == [f.stat().st_size for f in files]
    if manifest:
        assert index.view_id == "digits-view" and index.microshards[0].content_hash.startswith(
            "1220"
        )
        assert verify_dataset(shared, index) == 5
    else:  # names as ids; the view id follows the listing
        assert index.microshards[0].microshard_id == "00000.bin" and index.view_id.startswith(
            "dir-"
        )
        assert read_dataset(shared, "data", glob="0000[12].bin").microshards[1].ordinal == 1


def test_every_bad_dataset_is_a_typed_error(tmp_path):
    shared = LocalStore(tmp_path / "root")
    root = shared.root
    root.mkdir()
    with pytest.raises(DatasetFormatError, match="no such directory"):
        read_dataset(shared, "absent")
    (root / "empty").mkdir()
    with pytest.raises(DatasetFormatError, match="no microshards"):
        read_dataset(shared, "empty")
    with pytest.raises(DatasetPathError):
        read_dataset(shared, "../outside")
    write_shards(root / "d", 4, manifest=True)
    manifest = json.loads((root / "d" / "fetch-manifest.json").read_text())

    def edit(change) -> None:
        data = json.loads(json.dumps(manifest))
        change(data)
        (root / "d" / "fetch-manifest.json").write_text(json.dumps(data))

    edit(lambda m: m["entries"][2].update(locator="missing.bin"))
    with pytest.raises(ShardMissingError) as missing:
        read_dataset(shared, "d")
    assert missing.value.microshard_id == "d-00002"
    edit(lambda m: m["entries"][1].update(bytes_len=m["entries"][1]["bytes_len"] + 1))
    with pytest.raises(ShardSizeMismatchError) as size:
        read_dataset(shared, "d")
    assert size.value.microshard_id == "d-00001"
    edit(lambda m: m["entries"][0].update(locator="../../escape.bin"))
    with pytest.raises(DatasetPathError) as escape:
        read_dataset(shared, "d")
    assert escape.value.shard_path == "../../escape.bin"
    (root / "d" / "fetch-manifest.json").write_text("{not json")
    with pytest.raises(DatasetFormatError, match=r"fetch-manifest\.json is not valid"):
        read_dataset(shared, "d")
    edit(lambda m: None)
    shard = root / "d" / "00003.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardHashMismatchError) as bad_hash:
        verify_dataset(shared, read_dataset(shared, "d"))
    assert bad_hash.value.microshard_id == "d-00003"


def test_the_dataset_commands(tmp_path):
    runner = CliRunner(env={"FLEET_SHARED_ROOT": str(tmp_path)})
    wrote = runner.invoke(
        main, ["dataset", "write", "digits", str(tmp_path / "digits"), "--microshards", "8"]
    )
    assert wrote.exit_code == 0, wrote.output
    shown = runner.invoke(main, ["dataset", "inspect", "digits"], terminal_width=200)
    assert (
        shown.exit_code == 0
        and "digits-8" in shown.output
        and "burn-p2p-fetch-manifest" in shown.output
    )
    assert runner.invoke(main, ["dataset", "verify", str(tmp_path / "digits")]).exit_code == 0
    shard = tmp_path / "digits" / "00004.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    bad = runner.invoke(main, ["dataset", "verify", "digits"], terminal_width=300)
    assert (
        bad.exit_code == 1
        and "ShardHashMismatchError" in bad.output
        and "digits-00004" in bad.output
    )


# --------------------------------------------------------------------------- leases


def test_leases_are_disjoint_and_cover_each_epoch_once_across_give_backs():
    ids = [f"s{i}" for i in range(7)]
    cursor, consumed = DataCursor(seed=3), Counter()
    for round_index in range(12):
        leases, after = plan_leases(cursor, ids, [2, 1])
        taken = [(s.epoch, s.index) for lease in leases for s in lease.shards]
        assert len(taken) == len(set(taken)), "disjoint within the round"
        dropped = [leases[1]] if round_index % 4 == 1 else []
        cursor = give_back(after, dropped)
        for lease in leases:
            if lease not in dropped:
                consumed.update((s.epoch, s.index) for s in lease.shards)
    complete = [e for e in range(cursor.epoch) if all((e, i) in consumed for i in range(7))]
    assert complete and all(consumed[(e, i)] == 1 for e in complete for i in range(7))
    assert max(consumed.values()) == 1, "no shard consumed twice in an epoch"


def test_lease_sizes_follow_the_workers_speed():
    assert lease_sizes(2, per_lease=None, per_round=8, speeds=[300.0, 100.0]) == [6, 2]
    assert lease_sizes(3, per_lease=None, per_round=2, speeds=[1.0, 1.0, 1.0]) == [1, 1, 1]
    assert lease_sizes(2, per_lease=None, per_round=5, speeds=[None, None]) == [3, 2]
    assert lease_sizes(2, per_lease=4, per_round=99, speeds=[]) == [4, 4]


# --------------------------------------------------------------------------- runs on the fleet


@pytest.fixture
def dataset(fleet_settings, tmp_path_factory):
    """A 12-microshard dataset with burn_p2p's fetch-manifest, under the shared root."""
    name = f"datasets/digits-{time.time_ns()}"
    write_shards(Path(fleet_settings.shared_root) / name, 12, manifest=True)
    return name


def _reads(log_dir: Path) -> list[str]:
    out = []
    for file in log_dir.glob("*.jsonl"):
        for line in file.read_text().splitlines():
            out += json.loads(line)["paths"]
    return out


def _merged_shards(records: list[RoundRecord]) -> Counter[tuple[int, str]]:
    """(epoch, microshard id) of every shard in the leases of the merged replicas."""
    return Counter(
        (s.epoch, s.microshard_id) for m in records for r in m.merged for s in r.lease.shards
    )


def _assert_each_shard_once_per_epoch(records: list[RoundRecord], n_shards: int) -> int:
    merged = _merged_shards(records)
    assert max(merged.values()) == 1, "a shard was consumed twice in one epoch"
    epochs = {e for e, _ in merged}
    complete = [e for e in epochs if sum(1 for k in merged if k[0] == e) == n_shards]
    for epoch in sorted(epochs)[:-1]:
        assert epoch in complete, f"epoch {epoch} skipped a shard"
    for m in records:
        in_round = [
            s.microshard_id for r in m.replicas if r.status == "merged" for s in r.lease.shards
        ]
        assert len(in_round) == len(set(in_round)), "leases overlap within a round"
    return len(complete)


@pytest.mark.parametrize("kind", ["cached_microshard_group", "micro_epoch"])
def test_a_burn_p2p_style_workload_trains_on_its_leases(
    fleet, two_workers, dataset, tmp_path, kind
):
    reads = tmp_path / "reads"
    reads.mkdir()
    cfg = DiLoCoConfig(
        workload=SHARDS,
        config={"read_log": str(reads)},
        replicas=2,
        rounds=6,
        inner_steps=8,
        dataset=DatasetConfig(
            path=dataset, batch_kind=kind, microshards_per_lease=2, microshards_per_batch=2
        ),
    )
    run = DiLoCoRun.start(fleet, cfg)
    job = run.run()
    assert job.status == "completed", job.error
    records = run.rounds()
    assert _assert_each_shard_once_per_epoch(records, 12) == 2  # 6 rounds x 2 x 2 shards
    # the workload read exactly the leased shards, as absolute paths on the worker
    leased = Counter(
        f"{dataset}/{s.microshard_id.rsplit('-', 1)[1]}.bin"
        for m in records
        for r in m.merged
        for s in r.lease.shards
    )
    root = str(fleet.shared.root)
    read = Counter(p.removeprefix(root + "/") for p in _reads(reads))
    assert set(read) == set(leased) and all(p.startswith("/") for p in _reads(reads))
    # no optimizer file: each replica's state on its worker is its residual alone, and
    # from round 1 on it starts from what its worker kept
    assert all(r.state_source == "fresh" for r in records[0].merged)
    assert all(r.state_source == "held" for m in records[1:] for r in m.merged)
    losses = [m.eval.loss for m in records]
    assert losses[-1] < losses[0]


def test_fleet_diloco_on_a_dataset_from_the_cli(fleet_settings, two_workers, dataset):
    """The issue's command: a shard-reading workload, a dataset, 2 replicas, 4 rounds."""
    out = subprocess.run(
        [sys.executable, "-m", "fleet", "diloco", "--workload", SHARDS, "--dataset", dataset,
         "--replicas", "2", "--rounds", "4", "--inner-steps", "10"],
        env=worker_env(fleet_settings, [str(REPO)]), cwd=REPO, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = out.stdout.split("job ", 1)[1].split()[0]
    store = JobStore.from_settings(fleet_settings)
    from fleet.diloco.state import rounds_of

    records = rounds_of(store, job_id)
    losses = [m.eval.loss for m in records]
    assert len(records) == 4 and losses[-1] < losses[0], losses
    _assert_each_shard_once_per_epoch(records, 12)
    shown = CliRunner(env=worker_env(fleet_settings)).invoke(
        main, ["jobs", "show", job_id], terminal_width=250
    )
    assert shown.exit_code == 0 and "leases" in shown.output and "digits-view" not in shown.output
    first = records[0].merged[0]
    assert first.worker in shown.output and first.lease.shards[0].microshard_id in shown.output


@contextmanager
def capabilities_restored(fleet, workers):
    """The registry keeps a probe's estimate for later runs: put each worker's back as it
    was (or remove it) afterwards, whatever happened meanwhile."""
    saved = {w.name: fleet.registry.worker(w.name).capability for w in workers}
    try:
        yield
    finally:
        for name, capability in saved.items():
            if capability is None:
                fleet.registry.redis.hdel(keys.worker(name), "capability")
            else:
                fleet.registry.update_worker(name, capability=capability)


def test_lease_sizes_follow_measured_speed_on_the_fleet(fleet, two_workers, dataset):
    fast, slow = two_workers
    with capabilities_restored(fleet, two_workers):
        for worker, speed in ((fast, 300.0), (slow, 100.0)):
            fleet.capability_probe(
                worker=worker.name, workload=SHARDS, config={"fake_speed": speed}
            )
        cfg = DiLoCoConfig(
            workload=SHARDS,
            replicas=2,
            rounds=2,
            inner_steps=4,
            eval_every=0,
            workers=[fast.name, slow.name],
            dataset=DatasetConfig(path=dataset, microshards_per_round=8),
        )
        run = DiLoCoRun.start(fleet, cfg)
        assert run.run().status == "completed"
        for m in run.rounds():
            sizes = {r.worker: len(r.lease.shards) for r in m.merged}
            assert sizes == {fast.name: 6, slow.name: 2}


def test_a_quorum_dropped_replica_gives_its_shards_back(fleet, two_workers, dataset):
    cfg = DiLoCoConfig(
        workload=SHARDS,
        config={"step_sleep_s": 0.1, "slow_replica": 1},
        replicas=2,
        rounds=8,
        inner_steps=10,
        eval_every=0,
        quorum=QuorumConfig(min_replicas=1),
        dataset=DatasetConfig(path=dataset, microshards_per_lease=2, batch_kind="micro_epoch"),
    )
    run = DiLoCoRun.start(fleet, cfg)
    assert run.run().status == "completed"
    records = run.rounds()
    aborted = [(m.round, r.lease) for m in records for r in m.replicas if r.status == "aborted"]
    assert aborted, "one replica of each round is dropped by the quorum"
    merged = _merged_shards(records)
    for round_index, lease in aborted[:-1]:  # given back: merged in a later round
        later = _merged_shards([m for m in records if m.round > round_index])
        for shard in lease.shards:
            assert later[(shard.epoch, shard.microshard_id)] == 1
    assert max(merged.values()) == 1
    _assert_each_shard_once_per_epoch(records, 12)


@pytest.mark.parametrize(
    ("fragments", "delay_steps"),
    [(1, 0), (2, 0), (2, 5)],
    ids=["synchronous", "streaming", "pipelined"],
)
def test_a_killed_replica_is_re_run_on_the_same_shards(
    fleet_settings, artifacts_dir, fleet, two_workers, dataset, tmp_path, fragments, delay_steps
):
    """Also with Streaming DiLoCo (two fragments), and with its rounds pipelined (round
    1 launched beside round 0's outer step): the re-run of the killed fragment's replica
    gets the same lease, and no shard is leased twice in an epoch."""
    reads = tmp_path / "reads"
    reads.mkdir()
    with running_workers(fleet_settings, [12], artifacts_dir / "logs") as (victim,):
        cfg = DiLoCoConfig(
            workload=SHARDS,
            config={"step_sleep_s": 0.1, "read_log": str(reads)},
            replicas=2,
            rounds=2,
            inner_steps=20,
            eval_every=0,
            workers=[victim.name, two_workers[0].name],
            dataset=DatasetConfig(path=dataset, microshards_per_lease=3),
            streaming=StreamingConfig(fragments=fragments, delay_steps=delay_steps)
            if fragments > 1
            else None,
        )
        run = DiLoCoRun.start(fleet, cfg)
        thread, outcome = run_in_thread(run)
        wait_until(
            lambda: (
                any(h.owner == victim.name for h in fleet.registry.handles())
                and inner_loops_started(run.jobs, run.job_id, victim.name) > 0
            )
        )
        # kill it once its pool child (the registered pid) has read part of its lease
        child_log = reads / f"{fleet.registry.worker(victim.name).pid}.jsonl"
        wait_until(lambda: child_log.is_file() and child_log.read_text().strip(), 60)
        victim.kill()
        thread.join(timeout=120)
        assert outcome["job"].status == "completed"
        first = run.rounds()[0]
        lost = next(r for r in first.replicas if r.status == "lost")
        rerun = next(r for r in first.merged if r.replica == lost.replica)
        assert rerun.worker != victim.name and rerun.attempt > lost.attempt
        assert rerun.lease == lost.lease, "the re-run gets the same lease"
        # and reads it: one process read the whole lease (the re-run), another read part of
        # it and nothing else (the killed attempt)
        paths = {f"{dataset}/{s.microshard_id.rsplit('-', 1)[1]}.bin" for s in lost.lease.shards}
        root = str(fleet.shared.root) + "/"
        readers = [
            {
                p.removeprefix(root)
                for line in f.read_text().splitlines()
                for p in json.loads(line)["paths"]
            }
            for f in reads.glob("*.jsonl")
        ]
        assert any(paths <= read for read in readers)
        assert any(read and read < paths for read in readers)
        _assert_each_shard_once_per_epoch(run.rounds(), 12)


@pytest.mark.parametrize(
    "flags",
    [[], ["--fragments", "2", "--fragment-delay-steps", "3"]],
    ids=["synchronous", "pipelined"],
)
def test_resume_neither_repeats_nor_skips_a_shard(
    fleet_settings, fleet, two_workers, dataset, flags
):
    """SIGKILL the orchestrator while a round is in flight (pipelined: a round's
    attempts may be running beside the previous round's outer step); resume: rounds
    0..8 committed once each, in order, and every microshard leased once per epoch."""
    committed = 2
    job_id = f"lease-resume-{time.time_ns()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet", "diloco", "--workload", SHARDS, "--dataset", dataset,
         "--config-json", '{"step_sleep_s": 0.02}', "--replicas", "2", "--rounds", "9",
         "--inner-steps", "10", "--eval-every", "0", "--microshards-per-lease", "2",
         *flags, "--job-id", job_id],
        env=worker_env(fleet_settings, [str(REPO)]), cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    store = JobStore.from_settings(fleet_settings)
    wait_until(lambda: len(store.metrics(job_id)) >= committed, timeout_s=120)
    # kill it while a round is in flight
    wait_until(lambda: store.driver_state(job_id)[1] is not None, timeout_s=60)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    wait_until(lambda: store.get(job_id).shown_status == "orphaned", timeout_s=30)
    job = DiLoCoRun.resume(fleet, job_id).run()
    assert job.status == "completed"
    from fleet.diloco.state import rounds_of

    records = rounds_of(store, job_id)
    assert [m.round for m in records] == list(range(9))
    assert _assert_each_shard_once_per_epoch(records, 12) == 3  # 9 rounds x 4 shards = 36


def test_no_optimizer_file_and_the_exact_step_budget(fleet, two_workers, dataset):
    short = DiLoCoConfig(
        workload=SHARDS,
        config={"short_by": 2},
        replicas=1,
        rounds=1,
        inner_steps=10,
        max_attempts=2,
        dataset=DatasetConfig(path=dataset, microshards_per_lease=1),
    )
    run = DiLoCoRun.start(fleet, short)
    with pytest.raises(Exception) as info:
        run.run()
    assert type(info.value).__name__ == "RoundFailed" and "StepBudgetError" in str(info.value)
    job = run.jobs.get(run.job_id)
    assert job.status == "failed" and "StepBudgetError" in job.error
    lenient = short.model_copy(update={"require_exact_steps": False})
    assert DiLoCoRun.start(fleet, lenient).run().status == "completed"


def test_a_corrupt_shard_stops_the_run_before_any_step(
    fleet_settings, fleet, two_workers, tmp_path
):
    name = f"datasets/corrupt-{time.time_ns()}"
    root = Path(fleet_settings.shared_root) / name
    write_shards(root, 4, manifest=True)
    data = bytearray((root / "00002.bin").read_bytes())
    data[-3] ^= 0x01
    (root / "00002.bin").write_bytes(bytes(data))
    reads = tmp_path / "reads"
    reads.mkdir()
    cfg = DiLoCoConfig(
        workload=SHARDS,
        config={"read_log": str(reads)},
        replicas=2,
        rounds=3,
        inner_steps=4,
        dataset=DatasetConfig(path=name, microshards_per_lease=2),
    )
    run = DiLoCoRun.start(fleet, cfg)
    with pytest.raises(ShardHashMismatchError) as info:
        run.run()
    assert info.value.microshard_id == f"{root.name}-00002"
    assert run.jobs.get(run.job_id).status == "failed"
    assert not any("00002.bin" in p for p in _reads(reads)), "never read by the workload"


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda root: None, DatasetFormatError),  # no such directory
        (lambda root: root.mkdir(parents=True), DatasetFormatError),  # empty
        (
            lambda root: (write_shards(root, 3, manifest=True), (root / "00001.bin").unlink()),
            ShardMissingError,
        ),
        (
            lambda root: (
                write_shards(root, 3, manifest=True),
                (root / "00000.bin").write_bytes(b"short"),
            ),
            ShardSizeMismatchError,
        ),
    ],
    ids=["absent", "empty", "missing-shard", "size-mismatch"],
)
def test_a_bad_dataset_fails_the_run_before_anything_starts(
    fleet_settings, fleet, two_workers, make, error
):
    name = f"datasets/bad-{time.time_ns()}"
    make(Path(fleet_settings.shared_root) / name)
    cfg = DiLoCoConfig(
        workload=SHARDS, replicas=2, rounds=2, inner_steps=2, dataset=DatasetConfig(path=name)
    )
    run = DiLoCoRun.start(fleet, cfg)
    with pytest.raises(error):
        run.run()
    assert run.jobs.get(run.job_id).status == "failed"
    assert run.state() is None and run.rounds() == []  # no initial model, no replica ran
    assert not fleet.shared.resolve(run.layout.run_dir).exists()
    outside = DiLoCoRun.start(
        fleet, cfg.model_copy(update={"dataset": DatasetConfig(path="../outside")})
    )
    with pytest.raises(DatasetPathError):
        outside.run()
