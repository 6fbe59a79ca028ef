"""The default outer step on a model fleet has never seen (benchmarks/user_mlp.py: an
MLP with AdamW and a DataLoader, nothing else): a user who changes nothing sees the
eval loss fall every round, and an outer optimizer that overshoots is named in the
job's log. The table behind the default is benchmarks/outer_defaults.py's."""

from __future__ import annotations

from itertools import pairwise

from fleet.diloco import DiLoCoConfig, DiLoCoRun, OuterOptimizerConfig
from fleet.diloco.divergence import RisingTrainingLoss
from fleet.diloco.state import ReplicaOutcome, RoundRecord
from fleet.jobs import JobStore
from fleet.protocol import OuterStepSpec

USER_MLP = "benchmarks.user_mlp:make"
SMALL = {"hidden": 256}


def _run(fleet, outer: OuterOptimizerConfig | None, rounds: int) -> DiLoCoRun:
    config = DiLoCoConfig(
        workload=USER_MLP,
        config=SMALL,
        replicas=2,
        rounds=rounds,
        inner_steps=20,
        eval_every=1,
        **({"outer": outer} if outer is not None else {}),
    )
    run = DiLoCoRun.start(fleet, config)
    assert run.run().status == "completed"
    return run


def _warnings(fleet, job_id: str) -> list[str]:
    lines = JobStore(fleet.registry).logs(job_id)
    return [line.line for line in lines if line.level == "WARNING"]


def test_a_user_who_changes_nothing_sees_the_loss_fall_every_round(fleet):
    run = _run(fleet, None, rounds=5)
    state = run.state()
    assert state is not None and state.initial_eval is not None
    assert run.config.outer == OuterOptimizerConfig(name="sgd", lr=1.0, momentum=0.0)
    losses = [state.initial_eval.loss] + [r.eval.loss for r in run.rounds() if r.eval]
    assert len(losses) == 6 and all(b < a for a, b in pairwise(losses)), losses
    assert not [w for w in _warnings(fleet, run.job_id) if "rose" in w]


def test_an_outer_optimizer_that_overshoots_is_named_in_the_log(fleet):
    """Nesterov at an outer lr far past the paper's: the training loss climbs, and the
    job's log says so once, naming the optimizer and the safe default."""
    run = _run(fleet, OuterOptimizerConfig(name="nesterov", lr=3.0), rounds=5)
    rose = [w for w in _warnings(fleet, run.job_id) if "training loss rose" in w]
    assert len(rose) == 1, rose
    assert "nesterov, lr 3, momentum 0.9" in rose[0] and "--outer-optimizer sgd" in rose[0]


def _record(index: int, loss: float | None) -> RoundRecord:
    outcome = ReplicaOutcome(
        replica=0, attempt=0, worker="w", status="merged", started_at=0.0, finished_at=1.0,
        loss=loss,
    )  # fmt: skip
    return RoundRecord(
        round=index, started_at=0.0, closed_at=1.0, wall_s=1.0, outer_step_s=0.1,
        step=OuterStepSpec.model_construct(round=index), replicas=[outcome],
    )  # fmt: skip


def test_the_warning_fires_once_per_climb_and_not_on_a_single_rise():
    watch = RisingTrainingLoss(OuterOptimizerConfig(name="nesterov"), rounds=2)
    fired = [watch.observe(_record(i, x)) for i, x in enumerate([3.0, 2.5, 2.6, 2.4, 2.5])]
    assert fired == [None] * 5  # one rise at a time is noise
    fired = [watch.observe(_record(5 + i, x)) for i, x in enumerate([2.6, 2.7, 2.8, 2.0])]
    assert fired[0] is not None and "(2.4000 -> 2.5000 -> 2.6000, to round 5)" in fired[0]
    assert fired[1:] == [None, None, None]  # once per climb
    assert watch.observe(_record(9, None)) is None  # no loss reported: nothing to say
    fired = [watch.observe(_record(10 + i, x)) for i, x in enumerate([2.1, 2.2])]
    assert fired[1] is not None and "2.0000 -> 2.1000 -> 2.2000" in fired[1]
    averaging = RisingTrainingLoss(OuterOptimizerConfig(), rounds=2)
    said = [averaging.observe(_record(i, x)) for i, x in enumerate([1.0, 1.1, 1.2])][-1]
    assert said is not None and "inner learning rate" in said


def test_with_fragments_the_warning_compares_blocks_of_rounds():
    """Streaming DiLoCo with 2 fragments: a rise from round to round inside noisy short
    rounds says nothing; the means of blocks of 2 rounds rising twice do."""
    watch = RisingTrainingLoss(OuterOptimizerConfig(), rounds=2, window=2)
    noisy = [2.0, 2.1, 1.9, 2.0, 1.8, 1.9]  # rises every other round; the blocks fall
    assert [watch.observe(_record(i, x)) for i, x in enumerate(noisy)] == [None] * 6
    climbing = [1.9, 2.0, 2.0, 2.1]  # blocks: 1.85 -> 1.95 -> 2.05
    fired = [watch.observe(_record(6 + i, x)) for i, x in enumerate(climbing)]
    assert fired[:3] == [None] * 3
    assert fired[3] is not None and "rose 2 blocks of 2 rounds in a row" in fired[3]
    assert "(1.8500 -> 1.9500 -> 2.0500, to round 9)" in fired[3]
