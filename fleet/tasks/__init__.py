"""Every protocol method as a Celery task named ``fleet.<method>`` (PROTOCOL.md section 2).

Importing this package registers all 17 tasks. Each family module holds plain
functions ``fn(runtime, request, workload_ref) -> result`` wrapped by
:func:`fleet.tasks.base.protocol_task`.
"""

from fleet.tasks import control, merge, models, replica, train
from fleet.tasks.base import METHODS, TASKS

__all__ = ["METHODS", "TASKS", "control", "merge", "models", "replica", "train"]
