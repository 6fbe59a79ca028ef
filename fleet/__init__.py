"""fleet: a Celery + Redis worker fleet for distributed PyTorch training."""

from fleet.errors import FleetError

__version__ = "0.1.0"

__all__ = ["FleetError", "__version__"]
