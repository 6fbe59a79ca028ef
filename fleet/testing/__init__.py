"""A testing kit for fleet's users and for fleet's own tests and benchmarks: a real
local fleet (private Redis, CPU workers, a SeaweedFS S3 server, hosts made of network
namespaces), waits on conditions, and a conformance check of a workload.

- :mod:`fleet.testing.plugin`: pytest fixtures (``pytest_plugins =
  ["fleet.testing.plugin"]``), as ``celery.contrib.pytest`` is for Celery.
- :func:`check_workload`: run a user's workload through short DiLoCo jobs on real
  workers and check what fleet relies on (it runs, finite packs, a deterministic
  re-run); :mod:`fleet.testing.conformance`.
- :class:`SeaweedS3` (:mod:`fleet.testing.seaweed`), :class:`Network`, :class:`Host`,
  :class:`StorageServices` (:mod:`fleet.testing.hosts`, with the delay element
  :mod:`fleet.testing.delay_proxy`): the servers and hosts fleet's multi-host tests and
  benchmarks run on.
- :func:`wait_until`: poll a condition with a timeout, never sleep to synchronise.

Names resolve lazily: importing :mod:`fleet.testing` starts nothing and imports no torch.

A user's test of their ``TorchWorkload``::

    # conftest.py
    pytest_plugins = ["fleet.testing.plugin"]

    # test_my_model.py
    from fleet.testing import check_workload

    def test_my_model_trains_on_the_fleet(fleet_client):
        report = check_workload(fleet_client, "mylab.train:make", {"lr": 1e-3})
        assert report.final_loss < report.initial_loss
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleet.local import RedisServer, WorkerProcess, running_workers
    from fleet.testing.conformance import ConformanceFailure, ConformanceReport, check_workload
    from fleet.testing.hosts import Host, Network, StorageServices, skip_reason
    from fleet.testing.seaweed import SeaweedS3
    from fleet.testing.waits import wait_until

_LAZY = {
    "RedisServer": "fleet.local",
    "WorkerProcess": "fleet.local",
    "running_workers": "fleet.local",
    "ConformanceFailure": "fleet.testing.conformance",
    "ConformanceReport": "fleet.testing.conformance",
    "check_workload": "fleet.testing.conformance",
    "Host": "fleet.testing.hosts",
    "Network": "fleet.testing.hosts",
    "StorageServices": "fleet.testing.hosts",
    "skip_reason": "fleet.testing.hosts",
    "SeaweedS3": "fleet.testing.seaweed",
    "wait_until": "fleet.testing.waits",
}

__all__ = [
    "ConformanceFailure",
    "ConformanceReport",
    "Host",
    "Network",
    "RedisServer",
    "SeaweedS3",
    "StorageServices",
    "WorkerProcess",
    "check_workload",
    "running_workers",
    "skip_reason",
    "wait_until",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fleet.testing' has no attribute {name!r}")
