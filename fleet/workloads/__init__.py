"""Building blocks for workloads (docs/protocol.md section 1).

- :class:`TorchWorkload`: every protocol hook from a PyTorch model, optimizer, loss and
  data sources; what a PyTorch user writes to run on fleet.
- :class:`MergeHooks`: the three merge hooks for ``{"model": module, ...}`` states, for
  workloads written against the protocol by hand.

Names resolve lazily: importing this package imports torch only when one is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleet.workloads.merge_hooks import MergeHooks, blend_into
    from fleet.workloads.torch_workload import ShardPaths, TorchWorkload

_LAZY = {
    "MergeHooks": "fleet.workloads.merge_hooks",
    "blend_into": "fleet.workloads.merge_hooks",
    "ShardPaths": "fleet.workloads.torch_workload",
    "TorchWorkload": "fleet.workloads.torch_workload",
}

__all__ = ["MergeHooks", "ShardPaths", "TorchWorkload", "blend_into"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fleet.workloads' has no attribute {name!r}")
