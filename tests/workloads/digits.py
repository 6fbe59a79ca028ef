"""The digits example workload with fault injection, for the tests.

Extra config: ``fail_in`` (a hook that raises), ``step_sleep_s`` (slow steps),
``slow_replica`` (only that DiLoCo replica is slow), ``ema_decay``.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from examples.digits import DigitsWorkload as _Digits


class DigitsWorkload(_Digits):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.fail_in = config.get("fail_in")
        self.step_sleep_s = float(config.get("step_sleep_s", 0.0))
        self.ema_decay = float(config.get("ema_decay", 0.5))

    def _maybe_fail(self, hook: str) -> None:
        if self.fail_in == hook:
            raise ValueError(f"injected failure in {hook}")

    def _step_delay(self, batch: dict[str, Any] | None) -> None:
        payload = (batch or {}).get("payload") or {}
        slow = self.config.get("slow_replica")
        if self.step_sleep_s and (slow is None or payload.get("replica") == slow):
            time.sleep(self.step_sleep_s)

    def init_model(self, device: str) -> dict[str, Any]:
        self._maybe_fail("init_model")
        return super().init_model(device)

    def train_window(self, state: dict[str, Any], batches: list[dict[str, Any]]) -> dict[str, Any]:
        self._maybe_fail("train_window")
        return super().train_window(state, batches)

    def evaluate(self, state: dict[str, Any], split: Any) -> dict[str, Any]:
        self._maybe_fail("evaluate")
        return super().evaluate(state, split)

    def merge_candidate_models(
        self, base: Any, candidates: list[dict[str, Any]], policy: Any
    ) -> Any:
        self._maybe_fail("merge_candidate_models")
        return super().merge_candidate_models(base, candidates, policy)

    def reconcile_canonical_model(self, local: Any, canonical: Any, strategy: Any) -> Any:
        if strategy == "Replace":
            return copy.deepcopy(local)
        return super().reconcile_canonical_model(local, canonical, strategy)

    def apply_patch(self, patch: dict[str, Any]) -> Any:
        if "lr" not in patch["values"]:
            return {"Rejected": "only 'lr' can be patched"}
        self.lr = float(patch["values"]["lr"])
        return "Applied"


class DigitsWithInnerLoop(DigitsWorkload):
    """Defines the protocol's run_inner_loop hook (and reports progress through fleet)."""

    def run_inner_loop(self, state: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        from fleet import progress

        losses = []
        for step in range(params["num_inner_steps"]):
            losses.append(self.train_window(state, [])["loss"])
            progress.report(step + 1, loss=losses[-1], examples=self.batch_size)
        return {"steps_completed": len(losses), "metrics": {"loss": losses[-1], "hook": True}}


def make_workload(config: dict[str, Any]) -> DigitsWorkload:
    return DigitsWorkload(config)


def make_inner_loop_workload(config: dict[str, Any]) -> DigitsWithInnerLoop:
    return DigitsWithInnerLoop(config)


def broken_factory(config: dict[str, Any]) -> Any:
    raise RuntimeError("factory exploded")
