"""DiLoCo: the outer step against hand-computed Nesterov, real runs on real workers,
quorum, a worker killed mid-round, cancel. (An orchestrator killed and resumed:
tests/test_faults.py.)"""

from __future__ import annotations

import time

import pytest
import torch

from fleet.codec import read_pack
from fleet.codec.readers import open_reader
from fleet.data.batches import synthetic_batches
from fleet.diloco import (
    DiLoCoConfig,
    DiLoCoRun,
    OuterOptimizerConfig,
    QuorumConfig,
    average,
    outer_step,
)
from fleet.diloco.config import PseudoGradientConfig
from fleet.diloco.state import RoundRecord
from fleet.jobs import JobStore
from tests.harness import DIGITS, inner_loops_started, run_in_thread, running_workers, wait_until

# --------------------------------------------------------------------------- outer step


def test_outer_step_is_a_hand_computed_nesterov_step():
    theta = torch.tensor([1.0, -2.0, 0.5, 4.0])
    replicas = [torch.tensor([0.8, -1.0, 0.5, 3.0]), torch.tensor([0.6, -1.6, 1.5, 3.0])]
    weights = [3.0, 1.0]
    cfg = OuterOptimizerConfig(name="nesterov")
    avg = average(replicas, weights)
    assert torch.allclose(avg, torch.tensor([0.75, -1.15, 0.75, 3.0]))
    # round 1: buffer starts as delta
    delta = theta - avg  # [0.25, -0.85, -0.25, 1.0]
    theta1, state1 = outer_step(theta, avg, None, cfg)
    m1 = state1["momentum"]
    assert torch.allclose(m1, delta)
    assert torch.allclose(theta1, theta - 0.7 * (delta + 0.9 * delta))
    # round 2 with the momentum kept
    avg2 = torch.tensor([0.7, -1.0, 1.0, 2.5])
    delta2 = theta1 - avg2
    theta2, state2 = outer_step(theta1, avg2, {"momentum": m1}, cfg)
    assert torch.allclose(state2["momentum"], 0.9 * m1 + delta2)
    assert torch.allclose(theta2, theta1 - 0.7 * (delta2 + 0.9 * (0.9 * m1 + delta2)), atol=1e-6)
    # and it is torch's SGD(nesterov) on the pseudo-gradient
    p = torch.nn.Parameter(theta.clone())
    sgd = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    for target in (avg, avg2):
        p.grad = p.detach() - target
        sgd.step()
    assert torch.allclose(p.detach(), theta2, atol=1e-6)


def test_the_optimizer_objects_give_the_bits_of_the_2023_formula():
    """Nesterov through fleet.diloco.optim is bit for bit the formula fleet computed
    before optimizers were objects (avg + (1 - lr) delta - lr mu m'), checked against
    torch.optim.SGD above; plain SGD with lr 1 and no momentum is exactly the average."""
    torch.manual_seed(0)
    theta, avg, m = (torch.randn(100_003) for _ in range(3))
    lr, mu = 0.7, 0.9
    delta = theta - avg
    new_m = m * mu + delta
    expected = (avg + delta * (1.0 - lr)) - new_m * (lr * mu)
    got, state = outer_step(theta, avg, {"momentum": m}, OuterOptimizerConfig(name="nesterov"))
    assert torch.equal(got, expected) and torch.equal(state["momentum"], new_m)
    heavy, _ = outer_step(
        theta, avg, {"momentum": m}, OuterOptimizerConfig(name="sgd", lr=0.5, momentum=0.5)
    )
    assert torch.equal(heavy, theta - (m * 0.5 + delta) * 0.5)
    averaged, none = outer_step(
        theta, avg, None, OuterOptimizerConfig(name="sgd", lr=1.0, momentum=0.0)
    )
    assert torch.equal(averaged, avg) and none == {}, "model averaging keeps no buffer"
    assert OuterOptimizerConfig.model_validate({"nesterov": False}).name == "sgd"
    with pytest.raises(ValueError, match="no outer optimizer"):
        OuterOptimizerConfig(name="adamw")


def test_heavy_ball_and_plain_averaging():
    theta, avg = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    new, state = outer_step(
        theta,
        avg,
        {"momentum": torch.tensor([1.0, 1.0])},
        OuterOptimizerConfig(name="sgd", lr=0.5, momentum=0.5),
    )
    assert torch.allclose(state["momentum"], torch.tensor([1.5, 1.5])) and torch.allclose(
        new, torch.tensor([0.25, 1.25])
    )
    exact, _ = outer_step(theta, avg, None, OuterOptimizerConfig(name="sgd", lr=1.0, momentum=0.0))
    assert torch.equal(exact, avg)
    trimmed = average(
        [torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([100.0])], [1, 1, 1], "TrimmedMean"
    )
    assert torch.equal(trimmed, torch.tensor([1.0]))
    with pytest.raises(ValueError):
        average([torch.zeros(2)], [0.0])


def test_config_rejects_what_diloco_cannot_do():
    with pytest.raises(ValueError, match="merge_policy"):
        DiLoCoConfig(workload=DIGITS, merge_policy="Ema")
    with pytest.raises(ValueError, match="min_replicas"):
        DiLoCoConfig(workload=DIGITS, replicas=2, quorum=QuorumConfig(min_replicas=3))


# --------------------------------------------------------------------------- real runs


def _decoded(path) -> torch.Tensor:
    with open_reader(path, check_finite=True) as reader:
        out = torch.empty(reader.manifest.parameter_count)
        reader.read_into(out)
    return out


def test_three_rounds_eval_loss_falls_and_the_merge_is_exact(fleet, two_workers):
    """Three rounds of Nesterov over fp32 pseudo-gradients: the final global model (the
    only one published in full besides the initial one) is the hand-computed outer
    steps over the replicas' published pseudo-gradients, read as each round commits."""
    root = fleet.shared
    deltas: dict[int, list[tuple[torch.Tensor, float]]] = {}

    def keep_deltas(record: RoundRecord) -> None:
        deltas[record.round] = [
            (_decoded(root.resolve(w.pack.path)), w.weight) for w in record.step.replicas
        ]

    cfg = DiLoCoConfig(
        workload=DIGITS,
        replicas=2,
        rounds=3,
        inner_steps=15,
        outer=OuterOptimizerConfig(name="nesterov"),
        pseudo_gradient=PseudoGradientConfig(codec="fp32"),
    )
    run = DiLoCoRun.start(fleet, cfg, on_round=keep_deltas)
    job = run.run()
    assert job.status == "completed" and sorted(deltas) == [0, 1, 2]
    theta = read_pack(root.resolve(f"runs/{job.job_id}/checkpoint-0000/global"))[1]
    momentum = None
    for r in range(3):
        total = sum(w for _, w in deltas[r])
        delta = sum(d * (w / total) for d, w in deltas[r])
        momentum = delta if momentum is None else 0.9 * momentum + delta
        theta = theta - 0.7 * (delta + 0.9 * momentum)
    final = read_pack(root.resolve(job.artifacts["final_pack"]))[1]
    assert torch.allclose(final, theta, atol=1e-6)
    assert job.artifacts["final_pack"] == f"runs/{job.job_id}/checkpoint-0003/global"
    assert list(job.status_times) == ["new", "running", "completed"]
    rounds = run.rounds()
    assert [m.round for m in rounds] == [0, 1, 2]
    losses = [m.eval.loss for m in rounds]
    assert losses[0] > losses[1] > losses[2], losses
    assert rounds[-1].eval.metrics["accuracy"] > 0.85
    workers = {w.name for w in two_workers}
    for m in rounds:
        assert [r.replica for r in m.merged] == [0, 1]
        assert {r.worker for r in m.merged} == workers  # spread over both
        assert all(r.steps_completed == 15 and r.compute_s > 0 for r in m.merged)
        assert m.outer_step_worker in workers and m.outer_step_s > 0  # on a worker
        assert m.global_digest and m.step.state_digests["momentum"]
        assert m.eval.worker == m.outer_step_worker  # where the new global model is
    # logs: orchestrator and both workers, in order, with task ids
    logs = JobStore(fleet.registry).logs(job.job_id)
    assert {line.worker for line in logs} >= {"orchestrator", *(w.name for w in two_workers)}
    assert any("step 15/15" in line.line for line in logs)
    assert any("outer_step started" in line.line for line in logs)
    ids = [tuple(map(int, line.id.split("-"))) for line in logs]
    assert ids == sorted(ids)
    # the workers hold no leftover replica handles of the job
    state = run.state()
    held = {h.model_id for h in fleet.registry.handles()}
    assert not {h.model_id for h in state.handles if h} & held


def test_one_replica_with_lr_1_and_no_momentum_is_plain_local_training(fleet, two_workers):
    from tests.workloads.digits import DigitsWorkload

    rounds, h = 2, 10
    cfg = DiLoCoConfig(
        workload=DIGITS,
        replicas=1,
        rounds=rounds,
        inner_steps=h,
        eval_every=0,
        outer=OuterOptimizerConfig(name="sgd", lr=1.0, momentum=0.0),
        pseudo_gradient=PseudoGradientConfig(codec="fp32"),
    )
    job = DiLoCoRun.start(fleet, cfg).run()
    final = read_pack(fleet.shared.resolve(job.artifacts["final_pack"]))[1]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        workload = DigitsWorkload({})
        state = workload.init_model("cpu")
        for r in range(rounds):
            for batch in synthetic_batches(job.job_id, cfg, r, 0):
                workload.train_window(state, [batch])
    finally:
        torch.set_num_threads(threads)
    local = torch.cat(
        [state["model"].state_dict()[k].reshape(-1) for k in sorted(state["model"].state_dict())]
    )
    # the global model is theta - (theta - trained): the trained parameters up to a
    # float32 rounding of the pseudo-gradient (a few ulps, which AdamW's second round
    # carries on: 2e-6 at most, measured)
    assert torch.allclose(final, local, rtol=0, atol=1e-5)
    assert not torch.allclose(
        final,
        read_pack(fleet.shared.resolve(f"runs/{job.job_id}/checkpoint-0000/global"))[1],
        rtol=0,
        atol=1e-3,
    )  # it trained


def test_a_run_stopped_by_its_wall_budget_ends_on_an_evaluated_model(fleet, two_workers):
    """eval_every 1000 of 1000 rounds: only the round that spends ``max_wall_s`` is
    evaluated, besides the initial model, so the run's last record carries its loss."""
    cfg = DiLoCoConfig(
        workload=DIGITS,
        config={"step_sleep_s": 0.1},
        replicas=1,
        rounds=1000,
        inner_steps=4,
        eval_every=1000,
        max_wall_s=8.0,  # from the initial model's creation: several rounds of ~0.5 s
    )
    run = DiLoCoRun.start(fleet, cfg)
    assert run.run().status == "completed"
    rounds = run.rounds()
    assert 2 <= len(rounds) < 1000
    assert [m.eval is not None for m in rounds] == [False] * (len(rounds) - 1) + [True]
    assert rounds[-1].eval is not None and rounds[-1].eval.loss is not None


def test_quorum_closes_a_round_without_the_straggler(fleet, two_workers):
    cfg = DiLoCoConfig(
        workload=DIGITS,
        config={"step_sleep_s": 0.5, "slow_replica": 1},
        replicas=2,
        rounds=2,
        inner_steps=10,
        eval_every=0,
        quorum=QuorumConfig(round_deadline_s=2.0),
    )
    straggler_round_s = cfg.inner_steps * 0.5  # what waiting for it would take
    run = DiLoCoRun.start(fleet, cfg)
    job = run.run()
    assert job.status == "completed"
    for m in run.rounds():
        status = {r.replica: r.status for r in m.replicas}
        assert status == {0: "merged", 1: "aborted"}
        # the round closed at its deadline, not when the straggler would have finished
        assert m.wall_s < straggler_round_s
        slow = next(r for r in m.replicas if r.replica == 1)
        assert (slow.steps_completed or 0) < cfg.inner_steps
    # the straggler stopped at a step boundary and its worker serves again at once
    assert fleet.hello(worker=two_workers[1].name, timeout_s=5)


def test_min_replicas_quorum(fleet, two_workers):
    cfg = DiLoCoConfig(
        workload=DIGITS,
        config={"step_sleep_s": 0.3, "slow_replica": 0},
        replicas=2,
        rounds=1,
        inner_steps=10,
        eval_every=0,
        quorum=QuorumConfig(min_replicas=1),
    )
    run = DiLoCoRun.start(fleet, cfg)
    assert run.run().status == "completed"
    status = {r.replica: r.status for r in run.rounds()[0].replicas}
    assert status == {0: "aborted", 1: "merged"}


def test_a_worker_killed_mid_round_is_replaced(fleet_settings, artifacts_dir, fleet, two_workers):
    with running_workers(fleet_settings, [8], artifacts_dir / "logs") as (victim,):
        cfg = DiLoCoConfig(
            workload=DIGITS,
            config={"step_sleep_s": 0.05},
            replicas=2,
            rounds=3,
            inner_steps=20,
            eval_every=0,
            workers=[victim.name, two_workers[0].name],
        )
        run = DiLoCoRun.start(fleet, cfg)
        thread, outcome = run_in_thread(run)
        # wait until a replica of round 0 is training on the victim, then kill it
        wait_until(
            lambda: (
                any(h.owner == victim.name for h in fleet.registry.handles())
                and inner_loops_started(run.jobs, run.job_id, victim.name) > 0
            ),
            timeout_s=60,
        )
        victim.kill()
        thread.join(timeout=120)
        assert not thread.is_alive()
        job = outcome["job"]
        assert job.status == "completed"
        rounds = run.rounds()
        assert [m.round for m in rounds] == [0, 1, 2]
        first = rounds[0].replicas
        assert any(r.status == "lost" and r.worker == victim.name for r in first)
        assert [r.replica for r in rounds[0].merged] == [0, 1]
        assert all(r.worker != victim.name for r in rounds[0].merged)
        assert all(r.steps_completed == 20 for m in rounds for r in m.merged)


def test_cancel_stops_the_run_within_a_step(fleet, two_workers):
    cfg = DiLoCoConfig(
        workload=DIGITS,
        config={"step_sleep_s": 0.2},
        replicas=2,
        rounds=5,
        inner_steps=200,
        eval_every=0,
    )
    run = DiLoCoRun.start(fleet, cfg)
    thread, outcome = run_in_thread(run)
    wait_until(lambda: inner_loops_started(run.jobs, run.job_id) >= 2)
    cancelled_at = time.monotonic()
    assert run.jobs.cancel(run.job_id).status == "cancelled"
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert outcome["job"].status == "cancelled"
    # both workers stopped their replica between two steps and answer at once
    for w in two_workers:
        fleet.hello(worker=w.name, timeout_s=5)
    # within a step, not a round: a round here is 200 steps of 0.2 s
    assert time.monotonic() - cancelled_at < cfg.inner_steps * 0.2 / 4
    logs = run.jobs.logs(run.job_id)
    assert sum("replica_round failed: TaskAborted" in line.line for line in logs) == 2
    assert run.rounds() == []
