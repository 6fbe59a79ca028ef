"""The outer optimizers against torch.optim.SGD on the pseudo-gradient: Nesterov, heavy-ball
and plain SGD over several rounds, the buffers each keeps, the gain of a step in the
pseudo-gradient, and how a name (or a user's ``module:Class``) finds its optimizer."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from fleet.diloco.optim import OuterOptimizer, outer_optimizer
from fleet.diloco.outer import outer_step
from fleet.protocol import OuterOptimizerConfig

P = 1000


def _torch_rounds(
    theta: torch.Tensor, deltas: list[torch.Tensor], lr: float, mu: float, nesterov: bool
) -> torch.Tensor:
    """``theta`` after ``torch.optim.SGD`` steps with each delta as the gradient."""
    p = torch.nn.Parameter(theta.clone())
    opt = torch.optim.SGD([p], lr=lr, momentum=mu, nesterov=nesterov)
    for delta in deltas:
        p.grad = delta.clone()
        opt.step()
    return p.detach().clone()


def _torch_momentum(deltas: list[torch.Tensor], mu: float) -> torch.Tensor:
    p = torch.nn.Parameter(torch.zeros(P))
    opt = torch.optim.SGD([p], lr=0.1, momentum=mu)
    for delta in deltas:
        p.grad = delta.clone()
        opt.step()
    return opt.state[p]["momentum_buffer"].clone()


def _fleet_rounds(
    theta: torch.Tensor, deltas: list[torch.Tensor], config: OuterOptimizerConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    state: dict[str, torch.Tensor] | None = None
    for delta in deltas:
        theta, state = outer_step(theta, theta - delta, state, config)
    assert state is not None
    return theta, state


def _deltas(rounds: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    theta = torch.randn(P, generator=gen)
    return theta, [0.1 * torch.randn(P, generator=gen) for _ in range(rounds)]


@pytest.mark.parametrize(
    ("name", "lr", "mu", "nesterov"),
    [
        ("nesterov", 0.7, 0.9, True),
        ("nesterov", 0.35, 0.5, True),
        ("sgd", 0.3, 0.5, False),
        ("sgd", 0.8, 0.0, False),
        ("nesterov", 0.6, 0.0, False),  # no momentum: Nesterov is plain SGD
    ],
)
@pytest.mark.parametrize("rounds", [1, 4])
def test_each_optimizer_is_torch_sgd_on_the_pseudo_gradient(name, lr, mu, nesterov, rounds):
    theta, deltas = _deltas(rounds)
    got, state = _fleet_rounds(theta, deltas, OuterOptimizerConfig(name=name, lr=lr, momentum=mu))
    expected = _torch_rounds(theta, deltas, lr, mu, nesterov)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    if mu:
        assert set(state) == {"momentum"}
        assert torch.allclose(state["momentum"], _torch_momentum(deltas, mu), rtol=1e-5, atol=1e-6)
    else:
        assert state == {}


def test_the_step_leaves_its_inputs_unchanged():
    theta, (delta,) = _deltas(1)
    avg = theta - delta
    momentum = torch.ones(P)
    copies = theta.clone(), avg.clone(), momentum.clone()
    outer_step(theta, avg, {"momentum": momentum}, OuterOptimizerConfig(name="nesterov"))
    assert all(torch.equal(a, b) for a, b in zip((theta, avg, momentum), copies, strict=True))


@pytest.mark.parametrize("name", ["nesterov", "sgd"])
def test_lr_1_without_momentum_is_the_average_exactly(name):
    theta, (delta,) = _deltas(1)
    avg = theta - delta
    got, _ = outer_step(theta, avg, None, OuterOptimizerConfig(name=name, lr=1.0, momentum=0.0))
    assert torch.equal(got, avg)


@pytest.mark.parametrize("name", ["nesterov", "sgd"])
def test_a_momentum_buffer_only_with_momentum(name):
    assert outer_optimizer(OuterOptimizerConfig(name=name, momentum=0.5)).buffers == ("momentum",)
    assert outer_optimizer(OuterOptimizerConfig(name=name, momentum=0.0)).buffers == ()


def test_nesterov_named_alone_is_the_papers_setting():
    theta, deltas = _deltas(3)
    got, _ = _fleet_rounds(theta, deltas, OuterOptimizerConfig(name="nesterov"))
    assert torch.allclose(got, _torch_rounds(theta, deltas, 0.7, 0.9, True), rtol=1e-5, atol=1e-6)
    legacy_flag = OuterOptimizerConfig.model_validate({"nesterov": True})
    legacy, _ = _fleet_rounds(theta, deltas, legacy_flag)
    assert torch.equal(legacy, got)


def test_the_default_optimizer_averages_the_replicas():
    """Every round the new global model is the replicas' mean: theta minus the mean
    pseudo-gradient, with no buffer carried between rounds."""
    theta, deltas = _deltas(3)
    optimizer = outer_optimizer(OuterOptimizerConfig())
    assert optimizer.buffers == ()
    got, _ = _fleet_rounds(theta, deltas, OuterOptimizerConfig())
    assert torch.allclose(got, theta - sum(deltas), rtol=1e-6, atol=1e-6)


class HalfStep(OuterOptimizer):
    """A user's optimizer: theta - delta / 2, stateless."""

    def step(
        self,
        theta: torch.Tensor,
        average: torch.Tensor,
        delta: torch.Tensor,
        state: Mapping[str, torch.Tensor | None],
        new_state: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        return theta.sub_(delta.mul_(0.5))


NotAnOptimizer = dict


def test_a_users_module_class_spec_is_built_from_the_config():
    config = OuterOptimizerConfig(name=f"{__name__}:HalfStep", lr=0.5)
    optimizer = outer_optimizer(config)
    assert type(optimizer).__name__ == "HalfStep" and optimizer.config is config
    assert optimizer.buffers == ()
    theta = torch.tensor([1.0, 2.0])
    got, state = outer_step(theta, torch.tensor([0.0, 4.0]), None, config)
    assert got.tolist() == [0.5, 3.0] and state == {}


@pytest.mark.parametrize(
    "name",
    [
        "adamw",  # no such module in fleet.diloco.optim
        "base",  # a module without OPTIMIZER
        f"{__name__}:Missing",
        "fleet.no_such_module:Thing",
        f"{__name__}:NotAnOptimizer",  # a class, but not an OuterOptimizer
        f"{__name__}:P",  # not a class
    ],
)
def test_a_name_that_is_no_outer_optimizer_is_a_value_error_naming_it(name):
    config = OuterOptimizerConfig.model_construct(name=name, lr=0.7, momentum=0.9)  # unchecked
    with pytest.raises(ValueError, match=r"no outer optimizer|not an OuterOptimizer") as info:
        outer_optimizer(config)
    assert repr(name) in str(info.value)
