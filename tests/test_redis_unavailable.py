"""Redis unreachable or refusing us: every CLI command says so in one line and exits 2;
the Python API raises BrokerUnavailableError; nothing waits for minutes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fleet.cli import main
from fleet.client import Fleet
from fleet.errors import BrokerUnavailableError
from fleet.local import free_port
from tests.harness import DIGITS, settings_for, wait_until

COMMANDS = [
    ["workers"],
    ["workers", "--all"],
    ["jobs", "list"],
    ["jobs", "show", "some-job"],
    ["jobs", "logs", "some-job"],
    ["jobs", "cancel", "some-job"],
    ["diloco", "--workload", DIGITS, "--rounds", "1"],
    ["diloco", "--resume", "some-job"],
    ["exporter", "--port", "0"],
]


@pytest.fixture(scope="module")
def dead_url() -> str:
    return f"redis://:s3cret@127.0.0.1:{free_port()}/0"


#: The Redis retry budget of these commands: they must not spend it (a tenth at most).
RETRY_S = 300.0


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_every_command_fails_in_one_line_with_exit_2(args, dead_url):
    runner = CliRunner(env={"FLEET_REDIS_URL": dead_url, "FLEET_REDIS_RETRY_S": str(RETRY_S)})
    started = time.monotonic()
    result = runner.invoke(main, args, terminal_width=300)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    port = dead_url.rsplit(":", 1)[1]
    assert "BrokerUnavailableError" in lines[0] and f"redis://:***@127.0.0.1:{port}" in lines[0]
    assert "s3cret" not in lines[0], "the password is never printed"
    assert "fleet up" in lines[0] and "FLEET_REDIS_URL" in lines[0], "says what to do"
    assert time.monotonic() - started < RETRY_S / 10, "fails at once, does not retry"


def test_the_python_api_raises_broker_unavailable(dead_url, tmp_path):
    settings = settings_for(dead_url, tmp_path, redis_retry_s=1.0)
    fleet = Fleet(settings)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailableError) as registry_call:
        fleet.workers()
    with pytest.raises(BrokerUnavailableError):
        fleet.hello(worker=None, timeout_s=5)  # the broker side (kombu) is typed too
    # within the budgets it was given (1 s of retries, a 5 s call), with room for a slow box
    assert time.monotonic() - started < 3 * (settings.redis_retry_s + 5)
    assert registry_call.value.url.startswith("redis://:***@")
    assert "refused" in registry_call.value.cause.lower()


def test_a_short_outage_is_ridden_out_with_one_log_line(tmp_path, caplog):
    """A command that fails while Redis is away is retried with backoff and succeeds once
    Redis answers again; the outage is logged once, not once per retry."""
    from fleet.local import RedisServer

    server = RedisServer(tmp_path / "r")
    settings = settings_for(server.url, tmp_path / "shared", redis_retry_s=30.0)
    fleet = Fleet(settings)
    assert fleet.workers() == []
    thread = threading.Thread(target=server.restart, kwargs={"down_s": 2.0})
    thread.start()
    wait_until(lambda: server.proc.poll() is not None, 10, "redis-server stopped")
    with caplog.at_level("WARNING", logger="fleet.redis"):
        assert fleet.workers() == []  # blocks through the outage, then answers
    thread.join()
    outage = [r for r in caplog.records if "unreachable" in r.getMessage()]
    back = [r for r in caplog.records if "is back after" in r.getMessage()]
    assert len(outage) == 1 and len(back) == 1, [r.getMessage() for r in caplog.records]
    fleet.close()
    server.stop()


def test_a_client_that_does_not_retry_leaves_no_outage_open(tmp_path, caplog):
    """A worker's abort check asks Redis once, without retrying, and says itself what it
    does when Redis is away. Its failure must not open an outage in the process's view
    of Redis that nothing will close (the multi-host link-down test once saw a pool
    child log "unreachable" three times and "back" twice): every outage logged is
    logged ended."""
    from fleet.connection import redis_client
    from fleet.local import RedisServer

    server = RedisServer(tmp_path / "r")
    try:
        settings = settings_for(server.url, tmp_path / "shared", redis_retry_s=30.0)
        once = redis_client(settings, retry_s=0)
        with caplog.at_level("WARNING", logger="fleet.redis"):
            assert once.ping()
            server.stop()
            with pytest.raises(BrokerUnavailableError):
                once.ping()  # the abort check, while Redis is away
            server.start()
            retrying = redis_client(settings)  # the process's other calls: none fails
            assert retrying.ping()
        retrying.close()
        once.close()
    finally:
        server.stop()
    said = [r.getMessage() for r in caplog.records]
    gone = [m for m in said if "is unreachable" in m]
    back = [m for m in said if "is back after" in m]
    assert len(gone) == len(back), said


def test_the_result_backend_retries_for_the_whole_budget():
    """Celery's result backend sleeps a random (full-jitter) pause before each retry; the
    retry count fleet configures makes those pauses last the Redis retry budget, so a
    60 s outage does not end a waiting orchestrator (it did, at random, with the count
    of a jitter-free backoff: 45 s on average)."""
    import random

    from celery.utils.time import get_exponential_backoff_interval

    from fleet.app import celery_config

    settings = settings_for("redis://127.0.0.1:1/0", Path("/tmp"), redis_retry_s=90.0)
    conf = celery_config(settings)
    random.seed(0)

    def one_outage_s() -> float:
        return sum(
            get_exponential_backoff_interval(
                conf["result_backend_base_sleep_between_retries_ms"],
                n,
                conf["result_backend_max_sleep_between_retries_ms"],
                True,
            )
            / 1000
            for n in range(1, conf["result_backend_max_retries"] + 1)
        )

    totals = sorted(one_outage_s() for _ in range(1000))
    assert 85.0 < sum(totals) / len(totals) < 95.0
    assert totals[10] > 70.0  # the 1st percentile still rides out a 60 s outage
