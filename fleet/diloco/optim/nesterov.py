"""SGD with Nesterov momentum on the pseudo-gradient: DiLoCo's outer optimizer
(Douillard et al. 2023, arXiv:2311.08105, Algorithm 1; lr 0.7, momentum 0.9).

With ``delta`` the pseudo-gradient and ``m`` the momentum (as ``torch.optim.SGD``)::

    m'     = mu * m + delta          (m' = delta in the first round)
    theta' = theta - lr * (delta + mu * m')

computed as ``average + (1 - lr) * delta - (lr * mu) * m'`` (``average = theta -
delta``), so that ``lr = 1`` and ``mu = 0`` give exactly the average.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from fleet.diloco.optim.base import OuterOptimizer, momentum_step

if TYPE_CHECKING:
    import torch


class Nesterov(OuterOptimizer):
    """``torch.optim.SGD(lr, momentum, nesterov=True)`` on the pseudo-gradient."""

    @property
    def buffers(self) -> tuple[str, ...]:
        return ("momentum",) if self.config.momentum else ()

    def step(
        self,
        theta: torch.Tensor,
        average: torch.Tensor,
        delta: torch.Tensor,
        state: Mapping[str, torch.Tensor | None],
        new_state: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        import torch

        mu, lr = self.config.momentum, self.config.lr
        if not mu:
            return average.add_(delta.mul_(1.0 - lr))
        new_m = momentum_step(delta, state, new_state, mu)
        new_theta = average.add_(delta.mul_(1.0 - lr))
        return new_theta.sub_(torch.mul(new_m, lr * mu, out=theta))


OPTIMIZER = Nesterov
