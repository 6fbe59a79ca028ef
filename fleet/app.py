"""The Celery app: Redis broker and result backend, JSON only, acks and time limits for
long training tasks (docs/design.md decisions 1, 5, 7).

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
  task's worker, queue, arguments (from events) and PROGRESS state.
- Bounded results (:mod:`fleet.backend`): stored results leave out the arguments, and
  expire by task kind; the client deletes a result once it has read it.
- Poison messages never stop a worker: fleet's broker transport and consumer
  (:mod:`fleet.broker`) move a message that is not JSON, not a task, or of a refused
  content type to ``fleet:deadletter`` and fail its task with a typed error.
- ``task_reject_on_worker_lost`` stays off: a task whose worker died is not fed to the
  next worker (it may be what killed it); the orchestrator re-drives lost work itself,
  and a redelivered task whose output is already published returns it.
- Redis outages are weather: publishing a task and every result-backend operation
  retry with backoff for ``FLEET_REDIS_RETRY_S`` (the budget fleet's own Redis clients
  use, :mod:`fleet.connection`), and a worker's consumer reconnects for ever. A
  running task is not cancelled when the broker connection drops
  (``worker_cancel_long_running_tasks_on_connection_loss`` off): an inner loop keeps
  training through an outage and publishes its result when Redis is back.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from fleet.connection import (
    BACKOFF_BASE_S,
    BACKOFF_CAP_S,
    kombu_retry_policy,
    quiet_retry_logs,
    result_backend_retries_for,
)
from fleet.settings import FleetSettings

TASK_MODULES = ["fleet.tasks"]


def celery_config(settings: FleetSettings) -> dict[str, Any]:
    """The Celery configuration fleet runs with (see the module docstring)."""
    retry = kombu_retry_policy(settings.redis_retry_s)
    config: dict[str, Any] = {
        "broker_url": settings.redis_url,
        "result_backend": f"fleet.backend:RedisBackend+{settings.backend_url}",
        "fleet_call_result_expires_s": settings.call_result_expires_s,
        "broker_transport": "fleet.broker:Transport",
        "worker_consumer": "fleet.broker:Consumer",
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": False,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "result_backend_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            "retry_policy": retry,
        },
        "task_publish_retry": True,
        "task_publish_retry_policy": retry,
        "result_backend_always_retry": True,
        "result_backend_max_retries": result_backend_retries_for(settings.redis_retry_s),
        "result_backend_base_sleep_between_retries_ms": int(BACKOFF_BASE_S * 1000),
        "result_backend_max_sleep_between_retries_ms": int(BACKOFF_CAP_S * 1000),
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
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
    quiet_retry_logs()
    app = Celery("fleet", include=TASK_MODULES, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


#: The app for ``celery -A fleet.app`` (Flower, ``celery inspect``), configured from env.
app = create_app()
