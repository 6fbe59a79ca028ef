"""fleet: a Celery + Redis worker fleet for distributed PyTorch training.

``from fleet import Fleet`` is resolved lazily: importing :mod:`fleet` alone loads
neither torch nor Celery, so ``fleet worker --gpu N`` can pin the GPU first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleet.errors import FleetError

if TYPE_CHECKING:
    from fleet.client import Fleet, FleetFuture, ModelHandle
    from fleet.settings import FleetSettings
    from fleet.storage import PackRef

__version__ = "0.1.0"

_LAZY = {
    "Fleet": "fleet.client",
    "FleetFuture": "fleet.client",
    "ModelHandle": "fleet.client",
    "FleetSettings": "fleet.settings",
    "PackRef": "fleet.storage",
}

__all__ = [
    "Fleet",
    "FleetError",
    "FleetFuture",
    "FleetSettings",
    "ModelHandle",
    "PackRef",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fleet' has no attribute {name!r}")
