"""Evaluation off the critical path (fleet.diloco.evaluation): with a worker to spare,
round r's global model is evaluated there while round r+1 trains, its result recorded
against round r; without one, or with ``--eval-blocking``, before round r+1 starts. A
run ends on an evaluated model either way, and every due round has its evaluation.
The evaluation is made costly (``eval_sleep_s``) so that the order is observable, and
the rounds costlier still (``step_sleep_s``), so that the spare worker is free again by
the time the next round's model is due (else that round's evaluation runs blocking)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from itertools import pairwise

import pytest

from fleet.client import Fleet
from fleet.diloco import DiLoCoConfig, DiLoCoRun
from fleet.diloco.state import RoundRecord
from fleet.jobs import JobStore
from fleet.local import WorkerProcess, running_workers
from fleet.registry import WorkerInfo
from fleet.testing.waits import wait_until
from tests.harness import DIGITS

EVAL_S = 1.0
STEP_S = 0.7  # x 5 inner steps: a round outlasts an evaluation, even under load


@pytest.fixture(scope="module")
def third_worker(fleet_settings, two_workers, artifacts_dir) -> Iterator[WorkerProcess]:
    """A third worker, its workload built (a cold first evaluation would outlast round 0,
    and round 0's would then run blocking)."""
    with running_workers(fleet_settings, [2], artifacts_dir / "logs-eval") as workers:
        client = Fleet(fleet_settings)
        try:
            probe = client.capability_probe(
                worker=workers[0].name, workload=DIGITS, config={}, wait=False
            )
            probe.result(timeout_s=120)
        finally:
            client.close()
        yield workers[0]


def _run(fleet, **overrides) -> tuple[DiLoCoRun, list[RoundRecord]]:
    config = DiLoCoConfig(
        workload=DIGITS,
        config={"eval_sleep_s": EVAL_S, "step_sleep_s": STEP_S},
        replicas=2,
        rounds=4,
        inner_steps=5,
        eval_every=1,
        **overrides,
    )
    seen: list[int] = []
    run = DiLoCoRun.start(fleet, config, on_round=lambda r: seen.append(r.round))
    assert run.run().status == "completed"
    assert seen == [0, 1, 2, 3]  # on_round in order, each once
    return run, run.rounds()


def test_a_spare_worker_evaluates_while_the_next_round_trains(fleet, third_worker):
    """Three workers, two replicas: the one running no replica evaluates (in a suite,
    another module's worker may be the spare one: which one is not asserted)."""
    run, rounds = _run(fleet)
    state = run.state()
    assert state is not None and state.initial_eval is not None
    trainers = {r.worker for r in rounds[0].replicas}
    assert state.initial_eval.worker not in trainers  # round 0 trained meanwhile
    assert state.initial_eval.at > rounds[0].started_at
    for done, following in pairwise(rounds):
        assert done.eval is not None
        assert done.eval.worker not in {r.worker for r in done.replicas}
        assert done.eval.worker != done.outer_step_worker
        # the next round started before this round's evaluation landed
        assert following.started_at < done.eval.at
        assert done.wall_s < done.eval_s + (done.closed_at - done.started_at)
    last = rounds[-1]  # the run ends on an evaluated model, evaluated before it ended
    assert last.eval is not None and last.eval.worker == last.outer_step_worker
    assert last.eval.at <= last.started_at + last.wall_s
    # what landed is recorded against its round in Redis, for any reader of the job
    landed = JobStore(fleet.registry).evaluations(run.job_id)
    assert sorted(landed) == [-1, 0, 1, 2]


def test_a_named_eval_worker_runs_no_replica(fleet, two_workers, third_worker):
    eval_worker = two_workers[0].name
    _, rounds = _run(fleet, eval_worker=eval_worker)
    for record in rounds:
        assert eval_worker not in {r.worker for r in record.replicas}
        assert record.eval is not None
    assert all(r.eval is not None and r.eval.worker == eval_worker for r in rounds[:-1])


def test_blocking_evaluations_finish_before_the_next_round(fleet, third_worker):
    run, rounds = _run(fleet, eval_overlap=False)
    for done, following in pairwise(rounds):
        assert done.eval is not None and done.eval.at <= following.started_at
        assert done.eval_s >= EVAL_S and done.wall_s >= done.eval_s
    assert JobStore(fleet.registry).evaluations(run.job_id) == {}


def test_what_an_evaluation_in_flight_reads_outlives_the_commits_beside_it(
    fleet_settings, third_worker, two_workers
):
    """The spare worker is frozen (SIGSTOP) with the initial model's evaluation in its
    queue while three rounds commit, each publishing a checkpoint that supersedes the
    one before (``keep_checkpoints`` 1); its heartbeat goes on (the test renews it), and
    this orchestrator's heartbeat TTL, the time it gives a worker to take an evaluation
    up, outlasts the freeze. Thawed, the worker still finds checkpoint 0: the commits'
    deletions waited for the evaluation in flight."""
    patient = Fleet(fleet_settings.model_copy(update={"heartbeat_ttl_s": 120.0}))
    config = DiLoCoConfig(
        workload=DIGITS,
        config={},
        replicas=2,
        rounds=4,
        inner_steps=3,
        eval_every=1,
        checkpoint_every=1,
        keep_checkpoints=1,
        workers=[w.name for w in two_workers],
    )
    run = DiLoCoRun.start(patient, config)
    jobs = JobStore(patient.registry)
    frozen = patient.registry.worker(third_worker.name)
    assert frozen is not None
    os.killpg(third_worker.proc.pid, signal.SIGSTOP)
    thawed = threading.Event()

    def three_rounds_committed() -> bool:  # and superseded checkpoint 0
        patient.registry.heartbeat(frozen.name, frozen.pid)  # in the frozen worker's stead
        return len(jobs.metrics(run.job_id)) >= 3

    def heartbeat_then_thaw() -> None:
        try:
            wait_until(three_rounds_committed, 120, "three rounds", interval_s=0.2)
        finally:
            os.killpg(third_worker.proc.pid, signal.SIGCONT)
            thawed.set()

    threading.Thread(target=heartbeat_then_thaw, daemon=True).start()
    try:
        assert run.run().status == "completed"
    finally:
        os.killpg(third_worker.proc.pid, signal.SIGCONT)
        patient.close()
    assert thawed.is_set()
    state = run.state()
    assert state is not None and state.initial_eval is not None
    assert state.initial_eval.worker == third_worker.name
    assert state.checkpoints[0].round == 4  # checkpoint 0 was superseded, and deleted last
    assert all(r.eval is not None for r in run.rounds())


def test_an_evaluation_whose_worker_is_lost_is_given_up_at_the_next_commit(
    fleet, fleet_settings, third_worker, two_workers
):
    """The spare worker is frozen (SIGSTOP: its heartbeat stops) with the initial model's
    evaluation in its queue. The run does not carry it to its end: at the first commit
    after the worker is lost, the evaluation is given up and run where the model is
    held, and the rounds after it commit beside no evaluation in flight."""
    config = DiLoCoConfig(
        workload=DIGITS,
        config={"step_sleep_s": STEP_S},
        replicas=2,
        rounds=4,
        inner_steps=3,
        eval_every=1,
        workers=[w.name for w in two_workers],
    )
    run = DiLoCoRun.start(fleet, config)
    os.killpg(third_worker.proc.pid, signal.SIGSTOP)
    try:
        assert run.run().status == "completed"
    finally:
        os.killpg(third_worker.proc.pid, signal.SIGCONT)
    lines = [x.line for x in JobStore(fleet.registry).logs(run.job_id)]
    said = f"round -1's evaluation on {third_worker.name} failed (its worker was lost)"
    given_up = next((i for i, line in enumerate(lines) if line.startswith(said)), None)
    assert given_up is not None, lines
    last_closed = next(i for i, line in enumerate(lines) if line.startswith("round 3 closed"))
    assert given_up < last_closed, lines  # during the run, not at its end
    state = run.state()
    assert state is not None and state.initial_eval is not None
    assert state.initial_eval.worker in {w.name for w in two_workers}
    assert all(r.eval is not None for r in run.rounds())
    wait_until(  # thawed, it is back for the tests after this one
        lambda: third_worker.name in {w.name for w in fleet.workers()},
        fleet_settings.heartbeat_ttl_s + 30,
        "the thawed worker heartbeats again",
    )


def test_an_evaluation_no_worker_takes_up_is_run_where_the_model_is_held(fleet, fleet_settings):
    """The evaluation worker is stuck: registered and heartbeating (a worker's heartbeat
    goes on while its task slot hangs, or serves another job), its queue never read. The
    run does not wait out its call timeout on it: once the run waits for it, the
    evaluation it never took up is asked to abort and run on the pool, and the log says
    why."""
    ghost = WorkerInfo(
        name="stuck-eval@testnode",
        queue="fleet.testnode.stuck-eval",
        node="testnode",
        pid=os.getpid(),
        started_at=time.time(),
    )
    fleet.registry.register_worker(ghost)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(fleet_settings.heartbeat_interval_s):
            fleet.registry.heartbeat(ghost.name, ghost.pid)

    beating = threading.Thread(target=heartbeat, daemon=True)
    beating.start()
    try:
        config = DiLoCoConfig(
            workload=DIGITS,
            config={},
            replicas=2,
            rounds=2,
            inner_steps=3,
            eval_every=1,
            eval_worker=ghost.name,
            replica_call_timeout_s=60,
        )
        run = DiLoCoRun.start(fleet, config)
        assert run.run().status == "completed"
        queued = [json.loads(m)["headers"] for m in fleet.registry.redis.lrange(ghost.queue, 0, -1)]
        sent = [h["id"] for h in queued if h["task"] == "fleet.evaluate_global"]
    finally:
        stop.set()
        beating.join()
        fleet.registry.deregister_worker(ghost.name)
        fleet.registry.redis.delete(ghost.queue)
    state = run.state()
    assert state is not None and state.initial_eval is not None
    assert state.initial_eval.worker != ghost.name  # a real worker, from the pool
    assert all(r.eval is not None for r in run.rounds())
    warnings = [x.line for x in JobStore(fleet.registry).logs(run.job_id) if x.level == "WARNING"]
    said = f"round -1's evaluation on {ghost.name} failed (not taken up within"
    assert [w for w in warnings if w.startswith(said)], warnings
    assert len(sent) == 1 and fleet.registry.abort_requested(sent[0])  # it stops unstarted
