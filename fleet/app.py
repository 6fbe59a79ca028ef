"""The Celery app: Redis broker and result backend, JSON only, acks and time limits for
long training tasks (DESIGN.md decisions 1, 5, 7).

Why these settings:

- JSON only, both ways (``task_serializer``, ``result_serializer``, ``accept_content``,
  ``result_accept_content``): a worker never unpickles a message; anything else is
  refused before it reaches a task.
- ``task_acks_late`` + ``worker_prefetch_multiplier=1`` + concurrency 1: a worker
  reserves one message at a time and acks it after the task finishes, so a message
  is never lost in a prefetch buffer of a busy worker.
- ``visibility_timeout`` (``FLEET_VISIBILITY_TIMEOUT_S``, 12 h): Redis redelivers an
  unacked message only after this long. With late acks it must exceed the longest
  task, or a 2-hour inner loop would be handed to a second worker while it runs.
  Work lost to a dead worker is re-driven sooner by the orchestrator, which watches
  heartbeats; the broker's redelivery is only the last resort.
- ``task_time_limit`` (6 h) < visibility timeout; long tasks also stop cooperatively
  between steps (deadline, abort) well before it.
- ``task_track_started``, task events and ``result_extended``: Flower shows each
  task's worker, queue, arguments and PROGRESS state.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from fleet.settings import FleetSettings

TASK_MODULES = ["fleet.tasks"]


def celery_config(settings: FleetSettings) -> dict[str, Any]:
    """The Celery configuration fleet runs with (see the module docstring)."""
    config: dict[str, Any] = {
        "broker_url": settings.redis_url,
        "result_backend": settings.backend_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": False,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "task_time_limit": settings.task_time_limit_s,
        "task_soft_time_limit": settings.task_soft_time_limit_s,
        "task_default_queue": settings.pool_queue,
        "task_track_started": True,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "result_extended": True,
        "result_expires": settings.result_expires_s,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "enable_utc": True,
    }
    tls = settings.redis_tls()
    if tls is not None:
        config["broker_use_ssl"] = tls
        if settings.backend_url.startswith("rediss://"):
            config["redis_backend_use_ssl"] = tls
    return config


def create_app(settings: FleetSettings | None = None) -> Celery:
    """A Celery app configured for fleet. Tasks register when ``fleet.tasks`` is
    imported (the worker does; a client only sends by name)."""
    settings = settings or FleetSettings.from_env()
    app = Celery("fleet", include=TASK_MODULES, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


#: The app for ``celery -A fleet.app`` (Flower, ``celery inspect``), configured from env.
app = create_app()
