"""The protocol's three merge hooks for workloads whose model state is ``{"model": module,
...}`` (docs/protocol.md section 1): a weighted blend of state dicts, by the candidate
weights of section 3."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fleet.protocol import candidate_weight


def blend_into(
    target: torch.nn.Module, sources: Sequence[torch.nn.Module], weights: Sequence[float]
) -> None:
    """Set every floating tensor of ``target``'s state dict to ``sum(w_i * source_i) / sum(w)``
    (non-floating buffers are copied from the first source). ``target`` may be one of the
    ``sources`` (an in-place EMA); a tensor it holds under several keys (tied weights:
    GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) is blended once.

    Raises:
        ValueError: weights sum to <= 0.
    """
    total = float(sum(weights))
    if total <= 0.0:
        raise ValueError(f"merge weights sum to {total}")
    states = [s.state_dict() for s in sources]
    written: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
    with torch.no_grad():
        for key, tensor in target.state_dict().items():
            where = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
            if where in written:  # an alias of a tensor already blended (and maybe a source)
                continue
            written.add(where)
            if not tensor.is_floating_point():
                tensor.copy_(states[0][key])
                continue
            acc = torch.zeros_like(tensor, dtype=torch.float32)
            for state, w in zip(states, weights, strict=True):
                acc.add_(state[key].float(), alpha=w / total)
            tensor.copy_(acc)


class MergeHooks:
    """The protocol's merge hooks for states ``{"model": module, "optimizer": ...}``.

    Subclasses provide ``init_model(device)``; ``ema_decay`` weights the base in
    ``apply_single_root_ema``.
    """

    ema_decay: float = 0.5
    init_model: Callable[[str], dict[str, Any]]

    def _new_like(self, state: dict[str, Any]) -> dict[str, Any]:
        device = str(next(state["model"].parameters()).device)
        return self.init_model(device)

    def merge_candidate_models(
        self, base: Any, candidates: list[dict[str, Any]], policy: Any
    ) -> Any:
        """Weighted mean of the candidates (weights by docs/protocol.md section 3); None if none."""
        if not candidates:
            return None
        out = self._new_like(base)
        weights = [
            candidate_weight(policy, c["sample_weight"], c["quality_weight"]) for c in candidates
        ]
        blend_into(out["model"], [c["model"]["model"] for c in candidates], weights)
        return out

    def apply_single_root_ema(self, base: Any, merged: Any, policy: Any) -> Any:
        """``ema_decay * base + (1 - ema_decay) * merged``, in place on ``merged``."""
        blend_into(
            merged["model"],
            [base["model"], merged["model"]],
            [self.ema_decay, 1.0 - self.ema_decay],
        )
        return merged

    def reconcile_canonical_model(self, local: Any, canonical: Any, strategy: Any) -> Any:
        """``Replace``: the local weights; ``RootEma(w)``: ``(1-w)*local + w*canonical``."""
        if strategy == "Replace":
            weights = [1.0, 0.0]
        else:
            w = float(strategy["RootEma"]["canonical_weight"])
            weights = [1.0 - w, w]
        blend_into(canonical["model"], [local["model"], canonical["model"]], weights)
        return canonical
