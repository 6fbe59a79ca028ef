"""What an outer optimizer is to the streamed outer step (:mod:`fleet.diloco.outer`).

The outer step walks the global parameters chunk by chunk. For each chunk it hands the
optimizer ``theta`` (the global parameters), ``average`` (the merged replicas'
parameters) and ``delta = theta - average`` (the pseudo-gradient, Douillard et al.
2023, arXiv:2311.08105), plus one block per state buffer the optimizer names in
:attr:`OuterOptimizer.buffers`; the optimizer writes the new buffers and returns the new
parameters. Each buffer is kept as a pack of its own between rounds
(``runs/<job>/round-RRRR/<buffer>``).

Element-wise only: the step of an element may depend on that element's values alone,
so chunking cannot change the result. Use one IEEE operation at a time (a multiply, an
add), never a fused multiply-add, so the streamed step is bit-identical to a step on
whole vectors (the vectors' SIMD tails fall elsewhere than the chunks'). Import torch
inside :meth:`OuterOptimizer.step`: orchestrators build optimizers (to learn their
buffers) without importing it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING

from fleet.protocol import OuterOptimizerConfig

if TYPE_CHECKING:
    import torch


class OuterOptimizer(ABC):
    """An outer optimizer built from its config.

    Raises (constructor):
        ValueError: the config does not suit this optimizer.
    """

    def __init__(self, config: OuterOptimizerConfig) -> None:
        self.config = config

    @property
    def buffers(self) -> tuple[str, ...]:
        """The names of the state buffers it keeps (each float32 ``[P]``), e.g.
        ``("momentum",)``; none for stateless steps."""
        return ()

    @abstractmethod
    def step(
        self,
        theta: torch.Tensor,
        average: torch.Tensor,
        delta: torch.Tensor,
        state: Mapping[str, torch.Tensor | None],
        new_state: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        """One outer step on a chunk of ``k`` parameters.

        Args:
            theta: the global parameters, float32 ``[k]``.
            average: the merged replicas' parameters, float32 ``[k]``.
            delta: the pseudo-gradient ``theta - average``, float32 ``[k]``.
            state: each buffer's block after the last round, or None in the first.
            new_state: where each buffer's new block goes (float32 ``[k]``).

        Returns:
            The new parameters, float32 ``[k]``: any of the three inputs may be
            overwritten and returned (they are scratch to the caller).
        """


def momentum_step(
    delta: torch.Tensor,
    state: Mapping[str, torch.Tensor | None],
    new_state: Mapping[str, torch.Tensor],
    mu: float,
) -> torch.Tensor:
    """``m' = mu * m + delta`` into ``new_state["momentum"]`` (``m' = delta`` in the first
    round, as ``torch.optim.SGD``); returns ``m'`` (float32 ``[k]``)."""
    import torch

    m, new_m = state["momentum"], new_state["momentum"]
    if m is None:
        return new_m.copy_(delta)
    return torch.mul(m, mu, out=new_m).add_(delta)
