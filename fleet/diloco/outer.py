"""DiLoCo's outer step on flat parameter vectors.

Source: Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language
Models", arXiv:2311.08105, Algorithm 1. With ``theta`` the global parameters (flat
float32 ``[P]``) and ``theta_i`` replica ``i``'s after its inner steps:

    delta   = theta - sum_i w_i * theta_i          (pseudo-gradient, w normalised)
    m'      = mu * m + delta                         (momentum buffer, as torch SGD)
    update  = delta + mu * m'  (Nesterov)  or  m'   (heavy ball)
    theta'  = theta - lr * update

computed as ``theta' = avg + (1 - lr) * delta - lr * mu * m'`` (Nesterov) so that one
replica with ``lr = 1`` and ``mu = 0`` gives exactly the replica's parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fleet.diloco.config import OuterOptimizerConfig


def average(
    replicas: Sequence[torch.Tensor], weights: Sequence[float], policy: str = "WeightedMean"
) -> torch.Tensor:
    """Average of replica parameters (each float32 ``[P]``).

    ``WeightedMean`` / ``NormClippedWeightedMean``: ``sum(w_i * theta_i) / sum(w)``.
    ``TrimmedMean``: coordinate-wise mean after dropping the smallest and largest value
    (with 3 or more replicas; the plain mean otherwise); weights ignored.

    Raises:
        ValueError: no replicas, mismatched lengths, or weights that sum to <= 0.
    """
    if not replicas or len(replicas) != len(weights):
        raise ValueError(f"{len(replicas)} replicas with {len(weights)} weights")
    if policy == "TrimmedMean":
        stacked = torch.stack(list(replicas))
        if len(replicas) >= 3:
            stacked = stacked.sort(dim=0).values[1:-1]
        return stacked.mean(dim=0)
    total = float(sum(weights))
    if total <= 0.0:
        raise ValueError(f"replica weights sum to {total}")
    acc = torch.zeros_like(replicas[0])
    for theta_i, w in zip(replicas, weights, strict=True):
        acc.add_(theta_i, alpha=w / total)
    return acc


def outer_step(
    theta: torch.Tensor,
    avg: torch.Tensor,
    momentum: torch.Tensor | None,
    config: OuterOptimizerConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One outer optimizer step (see the module docstring).

    Args:
        theta: global parameters, float32 ``[P]``.
        avg: averaged replica parameters, float32 ``[P]``.
        momentum: momentum buffer ``[P]`` from the last round, or None (first round:
            the buffer starts as ``delta``, as in ``torch.optim.SGD``).

    Returns:
        ``(new_theta, new_momentum)``, both float32 ``[P]``.
    """
    delta = theta - avg
    mu = config.momentum
    new_momentum = delta.clone() if momentum is None else momentum.mul(mu).add_(delta)
    if config.nesterov or mu == 0.0:
        new_theta = avg + (1.0 - config.lr) * delta
        if mu:
            new_theta.add_(new_momentum, alpha=-config.lr * mu)
    else:
        new_theta = theta - config.lr * new_momentum
    return new_theta, new_momentum
