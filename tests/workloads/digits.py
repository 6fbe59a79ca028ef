"""A protocol workload for the tests: an MLP on scikit-learn's bundled digits data.

State is ``{"model": nn.Module, "optimizer": AdamW}``, as many real workloads hold.
Config: ``hidden`` (64), ``lr`` (1e-2), ``batch_size`` (64), ``seed`` (0),
``fail_in`` (hook name that raises, for error tests), ``step_sleep_s`` (slow steps,
for abort/deadline tests), ``slow_replica`` (only that DiLoCo replica is slow).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from sklearn.datasets import load_digits

from fleet.protocol import candidate_weight


def _splits(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_train, n_val = int(0.7 * len(x)), int(0.15 * len(x))
    return {
        "Train": (x[:n_train], y[:n_train]),
        "Validation": (x[n_train : n_train + n_val], y[n_train : n_train + n_val]),
        "Test": (x[n_train + n_val :], y[n_train + n_val :]),
    }


class DigitsWorkload:
    workload_name = "digits-mlp"

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.hidden = int(config.get("hidden", 64))
        self.lr = float(config.get("lr", 1e-2))
        self.batch_size = int(config.get("batch_size", 64))
        self.seed = int(config.get("seed", 0))
        self.fail_in = config.get("fail_in")
        self.step_sleep_s = float(config.get("step_sleep_s", 0.0))
        self.data = _splits(self.seed)
        self.cursor = 0

    def _maybe_fail(self, hook: str) -> None:
        if self.fail_in == hook:
            raise ValueError(f"injected failure in {hook}")

    def runtime_device(self) -> str:
        return "python-torch-cpu"

    def capability_probe(self) -> dict[str, Any]:
        state = self.init_model("cpu")
        start = time.perf_counter()
        for _ in range(5):
            self.train_window(state, [])
        per_s = 5 * self.batch_size / (time.perf_counter() - start)
        return {
            "preferred_backends": ["cpu"],
            "work_units_per_second": per_s,
            "target_window_seconds": 10,
        }

    def init_model(self, device: str) -> dict[str, Any]:
        self._maybe_fail("init_model")
        torch.manual_seed(self.seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, self.hidden), torch.nn.ReLU(), torch.nn.Linear(self.hidden, 10)
        ).to(device)
        return {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=self.lr)}

    def _batch(self, batch: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data["Train"]
        payload = (batch or {}).get("payload")
        if isinstance(payload, dict) and "num_replicas" in payload:  # DiLoCo: own shard
            x = x[payload["replica"] :: payload["num_replicas"]]
            y = y[payload["replica"] :: payload["num_replicas"]]
        if batch and batch.get("ordinals"):
            start = (batch["ordinals"][0] * self.batch_size) % len(x)
        else:
            start = (self.cursor * self.batch_size) % len(x)
            self.cursor += 1
        idx = torch.arange(start, start + self.batch_size) % len(x)
        return x[idx], y[idx]

    def train_window(self, state: dict[str, Any], batches: list[dict[str, Any]]) -> dict[str, Any]:
        self._maybe_fail("train_window")
        model, optimizer = state["model"], state["optimizer"]
        model.train()
        losses = []
        for batch in batches or [None]:
            payload = (batch or {}).get("payload") or {}
            slow = self.config.get("slow_replica")
            if self.step_sleep_s and (slow is None or payload.get("replica") == slow):
                time.sleep(self.step_sleep_s)
            x, y = self._batch(batch)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return {"loss": sum(losses) / len(losses), "examples": self.batch_size * len(losses)}

    def evaluate(self, state: dict[str, Any], split: Any) -> dict[str, Any]:
        self._maybe_fail("evaluate")
        name = split if isinstance(split, str) else "Validation"
        x, y = self.data[name]
        model = state["model"]
        model.eval()
        with torch.no_grad():
            logits = model(x)
        return {
            "loss": float(torch.nn.functional.cross_entropy(logits, y)),
            "accuracy": float((logits.argmax(1) == y).float().mean()),
            "examples": len(x),
        }

    def _blend(self, states: list[dict[str, Any]], weights: list[float]) -> dict[str, Any]:
        total = sum(weights)
        out = self.init_model("cpu")
        with torch.no_grad():
            target = out["model"].state_dict()
            for key, tensor in target.items():
                tensor.copy_(
                    sum(
                        w / total * s["model"].state_dict()[key]
                        for s, w in zip(states, weights, strict=True)
                    )
                )
        return out

    def merge_candidate_models(
        self, base: Any, candidates: list[dict[str, Any]], policy: Any
    ) -> Any:
        self._maybe_fail("merge_candidate_models")
        if not candidates:
            return None
        weights = [
            candidate_weight(policy, c["sample_weight"], c["quality_weight"]) for c in candidates
        ]
        return self._blend([c["model"] for c in candidates], weights)

    def apply_single_root_ema(self, base: Any, merged: Any, policy: Any) -> Any:
        decay = float(self.config.get("ema_decay", 0.5))
        return self._blend([base, merged], [decay, 1.0 - decay])

    def reconcile_canonical_model(self, local: Any, canonical: Any, strategy: Any) -> Any:
        if strategy == "Replace":
            return copy.deepcopy(local)
        w = float(strategy["RootEma"]["canonical_weight"])
        return self._blend([local, canonical], [1.0 - w, w])

    def apply_patch(self, patch: dict[str, Any]) -> Any:
        if "lr" not in patch["values"]:
            return {"Rejected": "only 'lr' can be patched"}
        self.lr = float(patch["values"]["lr"])
        return "Applied"

    def materialize_model_artifact(self, state: dict[str, Any]) -> bytes:
        return st_save({k: v.contiguous() for k, v in state["model"].state_dict().items()})

    def load_model_artifact(self, state: dict[str, Any], data: bytes) -> None:
        state["model"].load_state_dict(st_load(data))


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
