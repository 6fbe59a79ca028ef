"""DiLoCo on the fleet (Douillard et al. 2023, arXiv:2311.08105; docs/design.md decision 6).

Names resolve lazily, so an orchestrator importing :class:`DiLoCoRun` never imports
torch (the outer step's math, :mod:`fleet.diloco.outer`, runs on the workers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleet.diloco.config import (
        DatasetConfig,
        DiLoCoConfig,
        OuterOptimizerConfig,
        QuorumConfig,
    )
    from fleet.diloco.driver import DiLoCoRun
    from fleet.diloco.outer import average, outer_step, stream_outer_step
    from fleet.diloco.state import DriverState, RoundRecord

_LAZY = {
    "DatasetConfig": "fleet.diloco.config",
    "DiLoCoConfig": "fleet.diloco.config",
    "OuterOptimizerConfig": "fleet.diloco.config",
    "QuorumConfig": "fleet.diloco.config",
    "DiLoCoRun": "fleet.diloco.driver",
    "DriverState": "fleet.diloco.state",
    "RoundRecord": "fleet.diloco.state",
    "average": "fleet.diloco.outer",
    "outer_step": "fleet.diloco.outer",
    "stream_outer_step": "fleet.diloco.outer",
}

__all__ = [
    "DatasetConfig",
    "DiLoCoConfig",
    "DiLoCoRun",
    "DriverState",
    "OuterOptimizerConfig",
    "QuorumConfig",
    "RoundRecord",
    "average",
    "outer_step",
    "stream_outer_step",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fleet.diloco' has no attribute {name!r}")
