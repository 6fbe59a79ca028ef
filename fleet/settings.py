"""FleetSettings: every knob of fleet, read from ``FLEET_*`` environment variables.

Construct in code (``FleetSettings(redis_url=...)``) or from the environment
(``FleetSettings.from_env()``). Redis URLs may carry a password and an ACL user
(``redis://user:password@host:6379/0``) and may use TLS (``rediss://``).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fleet``, or ``~/.cache/fleet``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fleet"


def _hostname() -> str:
    """This machine's short host name (the default node name)."""
    return socket.gethostname().split(".")[0]


class FleetSettings(BaseSettings):
    """Configuration of a fleet client, worker or orchestrator (env prefix ``FLEET_``)."""

    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Broker, result backend and registry. ``redis://[user:password@]host:port/db`` or
    ``rediss://`` for TLS."""

    result_backend_url: str | None = None
    """Result backend, if not ``redis_url``."""

    redis_tls_cert_reqs: Literal["required", "optional", "none"] = "required"
    """For ``rediss://``: how the server certificate is checked."""

    redis_tls_ca_certs: Path | None = None
    """For ``rediss://``: CA bundle to verify the server with (system CAs if unset)."""

    shared_root: str = ".fleet/shared"
    """Where packs, optimizer states, datasets, artifacts and reports live; PackRefs are
    relative to it. A local path (a directory every worker mounts, e.g. over NFS) or an
    fsspec URL (``s3://bucket/prefix``; needs the ``s3`` extra), which workers read
    through their cache (:mod:`fleet.storage`)."""

    storage_options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the fsspec file system of a URL shared root, passed as they
    are (s3fs: ``endpoint_url``, ``key``, ``secret``, ``client_kwargs``, ...). Env: a JSON
    object. s3fs also reads the ``AWS_*`` variables."""

    cache_dir: Path = Field(default_factory=_default_cache_dir)
    """A worker's local cache of what it reads from a URL shared root (packs, leased
    microshards, optimizer states). Default: ``$XDG_CACHE_HOME/fleet`` (``~/.cache/fleet``).
    Unused with a local-path shared root (files are read where they lie)."""

    cache_max_bytes: int = Field(default=20 << 30, gt=0)
    """Soft bound on the cache's size in bytes; least recently used entries go first."""

    data_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    """Directories absolute microshard paths in BatchRefs must lie in (a worker's own
    disk, e.g. ``/data``). Empty: any absolute path is read as given (protocol: an
    absolute shard path is a file on this worker). Env: comma-separated."""

    workload_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["fleet.examples.*"]
    )
    """fnmatch globs on the factory spec ``module:attr`` (or its module) a worker may
    instantiate. Env: comma-separated."""

    node: str = Field(default_factory=_hostname)
    """This machine's name in queue and worker names (``fleet.<node>.gpu<N>``)."""

    pool_queue: str = "fleet.gpu"
    """Queue every worker also consumes: calls not bound to a handle go here."""

    heartbeat_interval_s: float = 2.0
    """Seconds between a worker's registry heartbeats."""

    heartbeat_ttl_s: float = 10.0
    """Seconds after the last heartbeat at which a worker counts as lost."""

    visibility_timeout_s: int = 12 * 3600
    """Redis broker visibility timeout. A message not acked within it is redelivered
    to another worker. Tasks ack late (after they finish), so this must exceed the
    longest task: 12 h covers a 2-hour inner loop many times over. Work lost to a dead
    worker is re-driven by the orchestrator from heartbeats, not by redelivery."""

    task_time_limit_s: int = 6 * 3600
    """Hard limit per task (the child process is killed). Below the visibility timeout."""

    task_soft_time_limit_s: int = 6 * 3600 - 300
    """Soft limit per task (raises in the task so it can clean up)."""

    call_timeout_s: float = 3600.0
    """Default seconds a blocking client call waits for its result."""

    result_expires_s: int = 24 * 3600
    """Seconds the results of long tasks (inner loops, training windows) are kept in
    Redis (clients delete a result once they read it)."""

    call_result_expires_s: int = 3600
    """Seconds the result of any other call is kept in Redis (its caller waits for it and
    deletes it once read; this bounds results nobody reads)."""

    job_lease_ttl_s: float = Field(default=30.0, gt=0.0)
    """Seconds a job's owner lease lasts without a heartbeat (renewed every third of
    it): after an orchestrator dies, its job shows as ``orphaned`` and can be resumed
    this long after its last heartbeat."""

    redis_retry_s: float = Field(default=90.0, ge=0.0)
    """Seconds fleet's Redis clients (registry, jobs, the orchestrator) and Celery's
    connections keep retrying through a Redis outage (exponential backoff, one log
    line per outage) before they give up with ``BrokerUnavailableError``."""

    store_retry_s: float = Field(default=90.0, ge=0.0)
    """Seconds an operation on an object-store shared root (``s3://...``) keeps retrying
    through an outage of the store (connection errors, timeouts, 5xx replies, SlowDown;
    exponential backoff, one log line when an outage starts and one when it ends) before
    it fails with ``StorageUnavailableError``, counted from its first failed try. Each
    request is first tried a few times by the store's client (botocore's standard retry
    mode; a try that hangs fails at its timeout, 5 s to connect, 15 s to read); then the
    whole operation is run again, so a pack is re-uploaded from its first object and
    re-read from its manifest, its digest checked again. 0: no retries beyond the
    client's."""

    @field_validator("node", mode="before")
    @classmethod
    def _node_or_hostname(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():  # FLEET_NODE= (compose's default)
            return _hostname()
        return value

    @field_validator("shared_root", mode="before")
    @classmethod
    def _root_as_text(cls, value: object) -> object:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("workload_allowlist", mode="before")
    @classmethod
    def _split_allowlist(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @classmethod
    def from_env(cls) -> FleetSettings:
        """Settings from ``FLEET_*`` environment variables (defaults for the rest)."""
        return cls()

    def redis_tls(self) -> dict[str, Any] | None:
        """TLS options for ``rediss://`` (redis-py / kombu names), or None for ``redis://``."""
        if not self.redis_url.startswith("rediss://"):
            return None
        reqs = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
        options: dict[str, Any] = {"ssl_cert_reqs": reqs[self.redis_tls_cert_reqs]}
        if self.redis_tls_ca_certs:
            options["ssl_ca_certs"] = str(self.redis_tls_ca_certs)
        return options

    def to_env(self) -> dict[str, str]:
        """Every setting as the ``FLEET_*`` environment variable that reads it back
        (lists comma-separated; unset optional settings are left out)."""
        env: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, list):
                value = ",".join(str(v) for v in value)
            elif isinstance(value, dict):
                value = json.dumps(value)
            env[f"FLEET_{name.upper()}"] = str(value)
        return env

    @property
    def shared_root_is_url(self) -> bool:
        """True if the shared root is an fsspec URL (``s3://...``), not a local path."""
        from fleet.storage import is_url

        return is_url(self.shared_root)

    @property
    def backend_url(self) -> str:
        """URL of the Celery result backend."""
        return self.result_backend_url or self.redis_url
