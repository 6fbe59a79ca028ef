"""Plain SGD on the pseudo-gradient, with heavy-ball momentum when ``momentum > 0``
(``torch.optim.SGD(lr, momentum)``). With ``lr = 1`` and ``momentum = 0`` the outer
step is model averaging (FedAvg, McMahan et al. 2017, arXiv:1602.05629), exactly::

    m'     = mu * m + delta          (m' = delta in the first round; no buffer if mu = 0)
    theta' = theta - lr * m'         (mu > 0)
    theta' = average + (1 - lr) * delta   (mu = 0: theta - lr * delta)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from fleet.diloco.optim.base import OuterOptimizer, momentum_step

if TYPE_CHECKING:
    import torch


class SGD(OuterOptimizer):
    """SGD (heavy-ball momentum if ``momentum > 0``) on the pseudo-gradient."""

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
        return theta.sub_(torch.mul(new_m, lr, out=delta))


OPTIMIZER = SGD
