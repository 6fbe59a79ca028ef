"""Redis connections of fleet's own clients (registry, jobs): retries, outages, errors.

Redis is the broker, the result backend and the registry, so a short outage (a
restart, a failover) must be weather, not a crash. Every fleet Redis client retries
a failed command with redis-py's :class:`~redis.retry.Retry` and
:class:`~redis.backoff.ExponentialBackoff` for up to ``FLEET_REDIS_RETRY_S`` seconds,
logs one line when an outage starts and one when it ends (not one per retry), and
raises :class:`~fleet.errors.BrokerUnavailableError` (with the URL, password removed,
and the cause) once the budget is spent. Wrong credentials and TLS failures are not
retried: they fail at once with the same typed error. Celery's own connections
(broker, result backend) get the matching settings in :mod:`fleet.app`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.retry import Retry

from fleet.errors import BrokerUnavailableError
from fleet.settings import FleetSettings

log = logging.getLogger("fleet.redis")

T = TypeVar("T")

#: First and largest pause between two retries, seconds.
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 2.0
#: Seconds to wait for a TCP connection, and for a reply, before a try counts as failed.
CONNECT_TIMEOUT_S = 5.0
SOCKET_TIMEOUT_S = 30.0


def redacted_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (the user name is kept)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))


def retries_for(budget_s: float) -> int:
    """How many retries :data:`BACKOFF_BASE_S` / :data:`BACKOFF_CAP_S` exponential backoff
    needs for its pauses to add up to ``budget_s`` seconds (0 for no budget)."""
    if budget_s <= 0:
        return 0
    backoff = ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S)
    waited, retries = 0.0, 0
    while waited < budget_s:
        retries += 1
        waited += backoff.compute(retries)
    return retries


def result_backend_retries_for(budget_s: float) -> int:
    """How many retries Celery's result backend needs to keep retrying for about
    ``budget_s`` seconds.

    Before its retry ``n`` the backend sleeps a random time (full jitter) between 0 and
    ``min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**n)``, so the count is chosen for the mean
    pauses (half of each bound) to add up to ``budget_s``: about twice the retries of
    :func:`retries_for`. The total of ~90 such pauses varies by a few seconds; with the
    jitter-free count it averaged half the budget, and a 60 s outage could outlast it.
    """
    waited, retries = 0.0, 0
    while waited < budget_s:
        retries += 1
        waited += min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**retries) / 2
    return retries


def kombu_retry_policy(budget_s: float) -> dict[str, float | int]:
    """A kombu/Celery ``retry_policy`` (publishing, the result backend) whose pauses
    (0, 0.5, 1.0, 1.5, then 2 s each) add up to ``budget_s`` seconds."""
    waited, retries = 0.0, 0
    while waited < budget_s:
        waited += min(0.5 * retries, BACKOFF_CAP_S)
        retries += 1
    return {
        "max_retries": retries,
        "interval_start": 0.0,
        "interval_step": 0.5,
        "interval_max": BACKOFF_CAP_S,
    }


def cause_of(exc: BaseException) -> str:
    """A one-line cause for a Redis failure (``ConnectionRefusedError: ...``)."""
    inner = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, AuthenticationError | ResponseError) or "auth" in text.lower():
        return f"authentication failed: {text}"
    if inner is not None and "SSL" in type(inner).__name__:
        return f"TLS handshake failed: {inner}"
    return text


class _Outage:
    """A process's view of Redis availability: logs the start and the end of an outage."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.since: float | None = None
        self.ended_at = float("-inf")
        """``time.monotonic()`` when the last outage ended."""
        self._lock = threading.Lock()

    def failed(self, exc: BaseException, budget_s: float) -> None:
        with self._lock:
            if self.since is None:
                self.since = time.monotonic()
                retrying = f"; retrying for up to {budget_s:.0f} s" if budget_s > 0 else ""
                log.warning("Redis at %s is unreachable (%s)%s", self.url, cause_of(exc), retrying)

    def recovered(self) -> None:
        if self.since is None:
            return
        with self._lock:
            if self.since is not None:
                self.ended_at = time.monotonic()
                log.warning(
                    "Redis at %s is back after %.1f s", self.url, self.ended_at - self.since
                )
                self.since = None


_OUTAGES: dict[str, _Outage] = {}
_OUTAGES_LOCK = threading.Lock()


def _outage_of(url: str) -> _Outage:
    """The process's one view of Redis at ``url``, shared by all its clients, so an outage
    is logged once per process, not once per client."""
    with _OUTAGES_LOCK:
        return _OUTAGES.setdefault(url, _Outage(url))


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, AuthenticationError):
        return False
    inner = exc.__cause__ or exc.__context__
    return not (inner is not None and "SSL" in type(inner).__name__)


class OutageRetry(Retry):
    """redis-py's :class:`Retry` with exponential backoff for ``budget_s`` seconds, one
    log line at the start and one at the end of an outage (when ``budget_s`` > 0), and
    :class:`BrokerUnavailableError` when the budget is spent (or at once for credentials
    and TLS failures)."""

    def __init__(self, url: str, budget_s: float) -> None:
        super().__init__(
            ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S),
            retries_for(budget_s),
            supported_errors=(redis.ConnectionError, redis.TimeoutError, TimeoutError),
        )
        self.budget_s = budget_s
        self.outage = _outage_of(redacted_url(url))

    def __deepcopy__(self, memo: dict[int, Any]) -> OutageRetry:
        # redis-py copies the retry into every connection; they share one outage view
        # (and ExponentialBackoff keeps no state), so one line is logged per outage.
        return self

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        failed = False

        def on_failure(error: Exception, failures: int) -> None:
            nonlocal failed
            if _retryable(error) and self.budget_s > 0:
                # a client that does not retry (budget 0: an abort check, a CLI ping)
                # raises to its caller, which says what it does instead; it opens no
                # outage, since nothing of its own would see Redis back and log the end
                failed = True
                self.outage.failed(error, self.budget_s)
            if with_failure_count:
                fail(error, failures)
            else:
                fail(error)

        def retryable(error: Exception) -> bool:
            return _retryable(error) and (is_retryable is None or is_retryable(error))

        try:
            result = super().call_with_retry(
                do, on_failure, is_retryable=retryable, with_failure_count=True
            )
        except (redis.ConnectionError, redis.TimeoutError, TimeoutError) as exc:
            raise BrokerUnavailableError(self.outage.url, cause_of(exc)) from exc
        if failed:  # only a call that got through after failing proves Redis is back (a
            # first try can "succeed" without the network: connect() on an open socket)
            self.outage.recovered()
        return result


def seconds_since_outage(client: redis.Redis) -> float:
    """Seconds since ``client`` (one of :func:`redis_client`) last found Redis back after
    an outage, or since the Redis server (re)started, whichever is less (``inf`` if
    neither is known). Liveness keys that expired within this window are no evidence
    that their workers died: they had no Redis to heartbeat to."""
    retry = client.get_retry()
    since = float("inf")
    if isinstance(retry, OutageRetry):
        since = time.monotonic() - retry.outage.ended_at
    try:
        uptime_s = float(client.info("server")["uptime_in_seconds"])
    except (redis.ResponseError, KeyError, ValueError, TypeError):
        uptime_s = float("inf")
    return min(since, uptime_s)


def redis_client(settings: FleetSettings, *, retry_s: float | None = None) -> redis.Redis:
    """A Redis client for ``settings.redis_url`` (password, ACL user and ``rediss://``
    TLS taken from the URL and the TLS settings), decoding replies to str, retrying
    through outages of up to ``retry_s`` seconds (default ``settings.redis_retry_s``).

    Its commands raise :class:`BrokerUnavailableError` once Redis stays unreachable
    past the budget, or at once for wrong credentials and TLS failures.
    """
    budget = settings.redis_retry_s if retry_s is None else retry_s
    kwargs: dict[str, Any] = {
        "decode_responses": True,
        "health_check_interval": 30,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "retry": OutageRetry(settings.redis_url, budget),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }
    kwargs.update(settings.redis_tls() or {})
    return redis.Redis.from_url(settings.redis_url, **kwargs)


def check_redis(settings: FleetSettings) -> None:
    """Ping Redis once, without retrying.

    Raises:
        BrokerUnavailableError: unreachable, wrong credentials, or TLS failure.
    """
    client = redis_client(settings, retry_s=0)
    try:
        client.ping()
    except BrokerUnavailableError:
        raise
    except redis.RedisError as exc:
        raise BrokerUnavailableError(redacted_url(settings.redis_url), cause_of(exc)) from exc
    finally:
        client.close()


class RetryLinesFilter(logging.Filter):
    """For Celery's loggers, which log one line per retry (``Connection to Redis lost:
    Retry (12/20)``, ``consumer: Cannot connect to ...``, ``Failed operation
    _store_result. Retrying 37 more times.`` with a traceback): the first retry line of
    an outage passes, without its traceback; the others are dropped until the outage
    ends (the consumer logs ``Connected to``) or ``quiet_s`` seconds pass without one.
    Other records pass."""

    MARKERS = ("Connection to Redis lost", "Cannot connect to", "Failed operation")
    END = "Connected to"

    def __init__(self, quiet_s: float = 120.0) -> None:
        super().__init__()
        self.quiet_s = quiet_s
        self._last = float("-inf")
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        with self._lock:
            if text.startswith(self.END):
                self._last = float("-inf")
                return True
            if not any(marker in text for marker in self.MARKERS):
                return True
            now = time.monotonic()
            first = now - self._last >= self.quiet_s
            self._last = now
        if first:
            record.msg = f"{record.msg} (repeats are not logged until the outage ends)"
            record.exc_info = record.exc_text = None
        return first


#: Celery's loggers whose messages repeat for every retry of an outage, and the one
#: that says the consumer is connected again.
RETRY_LOGGERS = (
    "celery.backends.base",
    "celery.backends.redis",
    "celery.worker.consumer.consumer",
    "celery.worker.consumer.connection",
)

_RETRY_FILTER = RetryLinesFilter()


def quiet_retry_logs() -> None:
    """Install one shared :class:`RetryLinesFilter` on Celery's retrying loggers, once."""
    for name in RETRY_LOGGERS:
        logger = logging.getLogger(name)
        if _RETRY_FILTER not in logger.filters:
            logger.addFilter(_RETRY_FILTER)
