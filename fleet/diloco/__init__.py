"""DiLoCo on the fleet (Douillard et al. 2023, arXiv:2311.08105; DESIGN.md decision 6)."""

from fleet.diloco.config import DiLoCoConfig, OuterOptimizerConfig, QuorumConfig
from fleet.diloco.driver import DiLoCoRun, DriverState, JobCancelled, RoundFailed
from fleet.diloco.outer import average, outer_step

__all__ = [
    "DiLoCoConfig",
    "DiLoCoRun",
    "DriverState",
    "JobCancelled",
    "OuterOptimizerConfig",
    "QuorumConfig",
    "RoundFailed",
    "average",
    "outer_step",
]
