"""Telling a user when DiLoCo makes their model worse: the replicas' training loss
rising round after round, the mark of an outer optimizer that overshoots (momentum
compounding a pseudo-gradient that already holds H inner steps of progress; see
benchmarks/outer_defaults.py for a user's model where the paper's Nesterov setting
does this and averaging does not).
"""

from __future__ import annotations

from itertools import pairwise

from fleet.diloco.state import RoundRecord
from fleet.protocol import OUTER_DEFAULTS, OuterOptimizerConfig


def train_loss(record: RoundRecord) -> float | None:
    """The round's training loss: the mean over its merged replicas of each one's mean
    loss over its inner steps (None when no merged replica reports one)."""
    losses = [r.loss for r in record.merged if r.loss is not None]
    return sum(losses) / len(losses) if losses else None


class RisingTrainingLoss:
    """Fires once the training loss (:func:`train_loss`) rose ``rounds`` rounds in a row,
    and again only after it fell in between.

    With ``window`` > 1 (Streaming DiLoCo's P fragments: a round is 1/P of the model's
    synchronisation cycle, and its few inner steps make its loss noisy) the losses
    compared are the means of consecutive blocks of ``window`` rounds.

    Args:
        outer: the run's outer optimizer, named in the message.
        rounds: consecutive rises (of blocks, with ``window``) that fire it.
        window: rounds per block.
    """

    def __init__(self, outer: OuterOptimizerConfig, rounds: int = 2, window: int = 1) -> None:
        self.outer = outer
        self.rounds = rounds
        self.window = window
        self.losses: list[float] = []
        self.block: list[float] = []
        self.fired = False

    def observe(self, record: RoundRecord) -> str | None:
        """Take a committed round; the warning to log, if it fires now."""
        loss = train_loss(record)
        if loss is None:
            return None
        self.block.append(loss)
        if len(self.block) < self.window:
            return None
        self.losses.append(sum(self.block) / len(self.block))
        self.block = []
        recent = self.losses[-self.rounds - 1 :]
        rising = len(recent) == self.rounds + 1 and all(b > a for a, b in pairwise(recent))
        if not rising:
            self.fired = False
            return None
        if self.fired:
            return None
        self.fired = True
        trail = " -> ".join(f"{x:.4f}" for x in recent)
        o = self.outer
        averaging = (o.name, o.lr, o.momentum) == ("sgd", *OUTER_DEFAULTS["sgd"])
        if averaging:
            advice = "the outer step only averages: look at the inner learning rate and the data"
        else:
            advice = (
                f"the outer optimizer ({o.name}, lr {o.lr:g}, momentum {o.momentum:g}) may "
                "overshoot at this H; averaging (--outer-optimizer sgd --outer-lr 1 "
                "--outer-momentum 0, the default) does not"
            )
        unit = "rounds" if self.window == 1 else f"blocks of {self.window} rounds"
        return (
            f"the replicas' training loss rose {self.rounds} {unit} in a row "
            f"({trail}, to round {record.round}): {advice}"
        )
