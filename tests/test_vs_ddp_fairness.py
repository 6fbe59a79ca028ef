"""Issue 26's fair comparison of DiLoCo with DDP: charlm's learning-rate warm-up (off by
default, bit for bit), its timed evaluations, and vs_ddp.py's gap with its error."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from fleet.examples.charlm import CharLMWorkload
from tests.harness import SMALL_CHARLM


def _train(config: dict, steps: int) -> tuple[dict, list[float]]:
    w = CharLMWorkload(config)
    state = w.init_model("cpu")
    lrs = []
    for k in range(steps):
        w.train_window(state, [{"ordinals": [k], "payload": {"replica": 0, "num_replicas": 1}}])
        lrs.append(state["optimizer"].param_groups[0]["lr"])
    return state, lrs


def test_no_warmup_is_todays_training_bit_for_bit():
    base, _ = _train(SMALL_CHARLM, 3)
    zero, lrs = _train({**SMALL_CHARLM, "warmup_steps": 0}, 3)
    for a, b in zip(base["model"].parameters(), zero["model"].parameters(), strict=True):
        assert torch.equal(a, b)
    assert lrs == [CharLMWorkload(SMALL_CHARLM).lr] * 3


def test_warmup_ramps_the_lr_linearly_by_the_optimizers_step_count():
    config = {**SMALL_CHARLM, "lr": 0.004, "warmup_steps": 4}
    _, lrs = _train(config, 6)
    assert lrs == pytest.approx([0.001, 0.002, 0.003, 0.004, 0.004, 0.004])
    assert lrs[-1] == 0.004  # exactly the configured lr after the ramp


def test_eval_timing_only_when_asked():
    w = CharLMWorkload(SMALL_CHARLM)
    state = w.init_model("cpu")
    assert "eval_s" not in w.evaluate(state, "Validation")
    timed = CharLMWorkload({**SMALL_CHARLM, "eval_timing": True})
    metrics = timed.evaluate(timed.init_model("cpu"), "Validation")
    assert metrics["eval_s"] > 0


def test_gap_and_its_propagated_standard_error():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from vs_ddp import gap

    pct, se = gap(2.1466, 0.0053, 2.0600, 0.0054)
    assert pct == pytest.approx(4.204, abs=1e-3)
    assert se == pytest.approx(100 * math.hypot(0.0053, 2.1466 / 2.06 * 0.0054) / 2.06)
