"""fleet's Celery result backend: Redis, with results sized and kept as fleet needs.

- Stored results leave out the task's arguments: with ``result_extended`` Celery keeps
  a task's args and kwargs in its result (48 KB for an inner loop with its BatchRefs);
  the worker, queue and task name stay.
- Expiry by task kind: the result of a call whose caller waits for it lives
  ``FLEET_CALL_RESULT_EXPIRES_S`` (the client deletes it as soon as it is read, so this
  only bounds results nobody reads); the result of a long task (inner loops, training
  windows) ``FLEET_RESULT_EXPIRES_S``. A DiLoCo job keeps what it needs in its own
  records, never in Celery results.
"""

from __future__ import annotations

import threading
from typing import Any

from celery.backends.redis import RedisBackend as CeleryRedisBackend

from fleet.protocol import METHODS

#: Task names whose results live long (the long protocol methods).
LONG_TASKS = frozenset(spec.task_name for spec in METHODS.values() if spec.long)


class RedisBackend(CeleryRedisBackend):
    """Celery's Redis result backend with fleet's result size and expiry (module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        conf = self.app.conf
        self.call_expires = int(conf.get("fleet_call_result_expires_s") or self.expires or 0)
        self._storing = threading.local()

    def _get_result_meta(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        meta: dict[str, Any] = super()._get_result_meta(*args, **kwargs)
        meta.pop("args", None)
        meta.pop("kwargs", None)
        return meta

    def _store_result(
        self,
        task_id: Any,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        name = getattr(request, "task", None) or getattr(request, "name", None)
        self._storing.expires = self.expires if name in LONG_TASKS else self.call_expires
        try:
            return super()._store_result(task_id, result, state, traceback, request, **kwargs)
        finally:
            self._storing.expires = None

    def set(self, key: Any, value: Any, expires: Any = None, **retry_policy: Any) -> Any:
        chosen = getattr(self._storing, "expires", None)
        if expires is None and chosen:
            expires = chosen
        return super().set(key, value, expires=expires, **retry_policy)
