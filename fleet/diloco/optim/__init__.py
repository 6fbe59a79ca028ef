"""Outer optimizers: one module per optimizer, named by ``OuterOptimizerConfig.name``.

``outer_optimizer(config)`` imports ``fleet.diloco.optim.<name>`` (or a ``module:Class``
spec of the user's) and builds its ``OPTIMIZER`` class from the config. Adding one is
one file: a subclass of :class:`~fleet.diloco.optim.base.OuterOptimizer` and
``OPTIMIZER = ThatClass`` at the bottom.
"""

from __future__ import annotations

import importlib

from fleet.diloco.optim.base import OuterOptimizer
from fleet.protocol import OuterOptimizerConfig

__all__ = ["OuterOptimizer", "outer_optimizer"]


def outer_optimizer(config: OuterOptimizerConfig) -> OuterOptimizer:
    """The outer optimizer ``config`` names, built from it.

    Raises:
        ValueError: no such optimizer, or the config does not suit it.
    """
    name = config.name
    module_name, _, attr = name.partition(":")
    if not attr:
        module_name, attr = f"{__name__}.{name}", "OPTIMIZER"
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"no outer optimizer {name!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, OuterOptimizer)):
        raise ValueError(f"{name!r} is not an OuterOptimizer subclass")
    return cls(config)
