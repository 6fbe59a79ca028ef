"""The ``fleet`` command line, one module per command group.

:data:`main` (the console script ``fleet``, ``python -m fleet``) is the root group in
:mod:`fleet.cli.root`, with what every group shares (console, exit statuses, one-line
errors, ``--json``). Importing this package adds the commands to it:

- :mod:`fleet.cli.pack`: ``fleet pack inspect|verify|convert``
- :mod:`fleet.cli.worker`: ``fleet worker``, ``fleet workers``
- :mod:`fleet.cli.diloco`: ``fleet diloco``; its config flags (:mod:`fleet.cli.diloco_flags`)
  and its run (:mod:`fleet.cli.diloco_run`)
- :mod:`fleet.cli.jobs`: ``fleet jobs list|show|logs|cancel``
- :mod:`fleet.cli.dataset`: ``fleet dataset inspect|verify|write``
- :mod:`fleet.cli.gc`: ``fleet gc``
- :mod:`fleet.cli.cluster`: ``fleet up``, ``fleet demo``
- :mod:`fleet.cli.exporter`: ``fleet exporter``

Each command imports what it runs when it runs, so ``fleet --help`` and the orchestrator
commands need neither torch nor Celery. The commands are re-exported here by their
function names; the groups ``pack``, ``jobs`` and ``dataset`` are not, so that
``fleet.cli.pack`` (and the others) stay the modules.
"""

from __future__ import annotations

from fleet.cli.cluster import demo_cmd, up_cmd
from fleet.cli.dataset import dataset_inspect, dataset_verify, dataset_write
from fleet.cli.diloco import EXIT_CANCELLED, diloco_cmd
from fleet.cli.exporter import exporter_cmd
from fleet.cli.gc import gc_cmd
from fleet.cli.jobs import jobs_cancel, jobs_list, jobs_logs, jobs_show
from fleet.cli.pack import pack_convert, pack_inspect, pack_verify
from fleet.cli.root import EXIT_FAILED, EXIT_UNAVAILABLE, FleetGroup, console, json_option, main
from fleet.cli.worker import worker_cmd, workers_cmd

__all__ = [
    "EXIT_CANCELLED",
    "EXIT_FAILED",
    "EXIT_UNAVAILABLE",
    "FleetGroup",
    "console",
    "dataset_inspect",
    "dataset_verify",
    "dataset_write",
    "demo_cmd",
    "diloco_cmd",
    "exporter_cmd",
    "gc_cmd",
    "jobs_cancel",
    "jobs_list",
    "jobs_logs",
    "jobs_show",
    "json_option",
    "main",
    "pack_convert",
    "pack_inspect",
    "pack_verify",
    "up_cmd",
    "worker_cmd",
    "workers_cmd",
]
