"""Every protocol method as a Celery task named ``fleet.<method>`` (docs/protocol.md section 2).

Importing this package registers all 17 tasks. Each family module holds plain
functions ``fn(runtime, request, workload_ref) -> result`` wrapped by
:func:`fleet.tasks.base.protocol_task`.
"""

from fleet.tasks import control, data, diloco, merge, models, replica, train
from fleet.tasks.base import METHODS_FNS, TASKS

__all__ = [
    "METHODS_FNS",
    "TASKS",
    "control",
    "data",
    "diloco",
    "merge",
    "models",
    "replica",
    "train",
]
