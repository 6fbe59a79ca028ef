"""Messages a worker cannot run never stop it: poison messages go to a dead-letter list.

kombu's Redis transport decodes every message it pops and lets a decoding error escape
into the worker's event loop, which stops the worker ("Unrecoverable error"); Celery's
consumer drops a message of a refused content type (pickle, YAML) without a result, so
its caller waits the full call timeout. fleet replaces both behaviours:

- :class:`Transport` (``broker_transport``): a channel that decodes what it pops itself;
  anything that is not a kombu message envelope (not JSON, or JSON without one) is
  pushed to the Redis list ``fleet:deadletter`` with the reason and consumed;
- :class:`Consumer` (``worker_consumer``): a message Celery refuses (refused content
  type, undecodable body, not a task message, unknown task) is dead-lettered too, and
  when it names a task id, that task fails with :class:`~fleet.errors.RejectedMessageError`
  so its caller learns at once.

The dead-letter list keeps the newest :data:`DEADLETTER_MAX` entries,
``{at, queue, reason, content_type, task_id, raw}``; ``fleet exporter`` counts it.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Any

from celery.utils.collections import AttributeDict
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Empty
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from fleet import keys
from fleet.errors import RejectedMessageError

#: Seconds between two reconnection tries of a worker's consumer, at most.
RECONNECT_INTERVAL_MAX_S = 2.0

log = logging.getLogger("fleet.broker")

#: Entries kept in ``fleet:deadletter``.
DEADLETTER_MAX = 10_000
#: Bytes of a refused message kept in its entry.
RAW_BYTES = 4096


def dead_letter_entry(
    *, queue: str | None, reason: str, content_type: str | None, task_id: str | None, raw: Any
) -> str:
    """The JSON entry of a refused message."""
    if isinstance(raw, bytes | bytearray):
        raw = bytes(raw[:RAW_BYTES]).decode("utf-8", errors="replace")
    elif not isinstance(raw, str):
        raw = repr(raw)[:RAW_BYTES]
    entry = {
        "at": time.time(),
        "queue": queue,
        "reason": reason,
        "content_type": content_type,
        "task_id": task_id,
        "raw": raw[:RAW_BYTES],
    }
    return json.dumps(entry)


def push_dead_letter(client: Any, entry: str) -> None:
    """Add an entry to ``fleet:deadletter`` (keeping the newest :data:`DEADLETTER_MAX`)."""
    with client.pipeline(transaction=False) as pipe:
        pipe.lpush(keys.DEADLETTER, entry)
        pipe.ltrim(keys.DEADLETTER, 0, DEADLETTER_MAX - 1)
        pipe.execute()


class Channel(kombu_redis.Channel):
    """kombu's Redis channel, but a popped item that is not a message envelope is
    dead-lettered instead of stopping the consumer."""

    def _envelope(self, queue: str, item: bytes) -> dict[str, Any] | None:
        """The decoded envelope of ``item``, or None once it was dead-lettered."""
        try:
            payload = loads(bytes_to_str(item))
            self.Message(payload, channel=self)  # the envelope kombu needs, or an error
            return payload  # type: ignore[no-any-return]
        except Exception as exc:
            reason = f"not a message envelope: {type(exc).__name__}: {exc}"
            log.error(
                "queue %s: refused a message (%s); moved to %s", queue, reason, keys.DEADLETTER
            )
            entry = dead_letter_entry(
                queue=queue, reason=reason, content_type=None, task_id=None, raw=item
            )
            push_dead_letter(self.client, entry)
            return None

    def _brpop_read(self, **options: Any) -> bool:
        # kombu's own, with the decoding of the popped item guarded (kombu 5.x).
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            payload = self._envelope(dest, item)
            if payload is not None:
                self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # as kombu resets it
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def _get(self, queue: str, timeout: Any = None) -> dict[str, Any]:
        with self.conn_or_acquire() as client:
            for pri in self.priority_steps:
                item = client.rpop(self._q_for_pri(queue, pri))
                if item:
                    self._maybe_update_queues_expire(client, queue)
                    payload = self._envelope(queue, item)
                    if payload is not None:
                        return payload
            self._maybe_update_queues_expire(client, queue)
            raise Empty()


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel


class Consumer(CeleryConsumer):
    """Celery's consumer, but a message it refuses is dead-lettered, and its task (when
    the message names one) fails with :class:`RejectedMessageError`; and it reconnects
    to the broker every :data:`RECONNECT_INTERVAL_MAX_S` at most (kombu's default
    backoff grows to 30 s, so a worker would stay deaf up to 30 s after Redis is back)."""

    def ensure_connected(self, conn: Any) -> Any:
        ensure = conn.ensure_connection
        conn.ensure_connection = functools.partial(
            ensure,
            interval_start=0.5,
            interval_step=0.5,
            interval_max=RECONNECT_INTERVAL_MAX_S,
        )
        try:
            return super().ensure_connected(conn)
        finally:
            del conn.ensure_connection  # kombu's own method again

    def _refuse(self, message: Any, reason: str) -> None:
        headers = getattr(message, "headers", None) or {}
        info = getattr(message, "delivery_info", None) or {}
        task_id = headers.get("id") if isinstance(headers, dict) else None
        queue = info.get("routing_key") if isinstance(info, dict) else None
        content_type = getattr(message, "content_type", None)
        log.error(
            "queue %s: refused message %s (%s); moved to %s",
            queue,
            task_id,
            reason,
            keys.DEADLETTER,
        )
        entry = dead_letter_entry(
            queue=queue,
            reason=reason,
            content_type=content_type,
            task_id=task_id,
            raw=getattr(message, "body", None),
        )
        try:
            push_dead_letter(self.app.backend.client, entry)
        except Exception as exc:  # Redis away: the refusal is still logged above
            log.warning("could not dead-letter message %s: %s", task_id, exc)
        if task_id:
            error = RejectedMessageError(
                reason, content_type=content_type, queue=queue, task_id=task_id
            )
            error.args = (error.message, error.to_dict()["data"])
            request = AttributeDict(
                name=headers.get("task"),
                chord=None,
                root_id=headers.get("root_id"),
                correlation_id=message.properties.get("correlation_id"),
                reply_to=message.properties.get("reply_to"),
                errbacks=None,
            )
            try:
                self.app.backend.mark_as_failure(task_id, error, request=request)
            except Exception as exc:
                log.warning("could not fail task %s: %s", task_id, exc)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._refuse(message, f"cannot decode the body: {type(exc).__name__}: {exc}")
        message.ack()

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._refuse(message, f"{type(exc).__name__}: {exc}")
        message.reject_log_error(log, self.connection_errors)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._refuse(message, "not a task message")
        message.reject_log_error(log, self.connection_errors)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        entry = dead_letter_entry(
            queue=(message.delivery_info or {}).get("routing_key"),
            reason=f"unknown task: {exc}",
            content_type=message.content_type,
            task_id=(message.headers or {}).get("id"),
            raw=message.body,
        )
        try:
            push_dead_letter(self.app.backend.client, entry)
        except Exception as error:
            log.warning("could not dead-letter an unknown task: %s", error)
        super().on_unknown_task(body, message, exc)
