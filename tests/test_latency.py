"""The delay element of the namespace hosts (fleet/testing/hosts.py,
fleet/testing/delay_proxy.py): a worker host reaches Redis and S3 on the storage host
through a proxy that adds a round-trip time, measured from the worker host against the
direct path, with the link's bandwidth limit (tbf) still in force beside it."""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Iterator

import pytest
import redis
import s3fs

from fleet.testing.hosts import Host, Network, StorageServices, skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

#: Timed on a worker host: the median seconds of N requests after a first one (the
#: connection made and warm), printed one per line.
_PING = """
import sys, time, statistics, redis
r = redis.Redis.from_url(sys.argv[1], socket_timeout=60)
key, n = sys.argv[2], int(sys.argv[3])
(r.get if key else r.ping)(*([key] if key else []))
for _ in range(n):
    t = time.perf_counter()
    (r.get if key else r.ping)(*([key] if key else []))
    print(time.perf_counter() - t)
"""

_GET = """
import sys, time, json, s3fs
fs = s3fs.S3FileSystem(skip_instance_cache=True, **json.loads(sys.argv[1]))
path, n = sys.argv[2], int(sys.argv[3])
fs.cat_file(path, max_concurrency=1)
for _ in range(n):
    t = time.perf_counter()
    fs.cat_file(path, max_concurrency=1)
    print(time.perf_counter() - t)
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[tuple[StorageServices, Host]]:
    """A storage host whose Redis and S3 sit behind the delay proxy, and a worker host."""
    base = tmp_path_factory.mktemp("latency")
    network = Network(base / "net")
    services = None
    try:
        storage = network.host("storage")
        worker = network.host("w1")
        services = StorageServices(storage, base, rtt_ms=0)
        yield services, worker
    finally:
        if services is not None:
            services.close()
        network.close()


def _median_s(host: Host, script: str, *args: str) -> float:
    out = host.run(sys.executable, "-c", script, *args)
    return statistics.median(float(line) for line in out.split())


def test_redis_and_s3_through_the_proxy_take_its_round_trip_time(site):
    """At 100 ms RTT a Redis PING and an S3 GET from a worker host take at least 0.9 x
    100 ms through the proxy, and the direct path far less."""
    services, worker = site
    assert services.s3 is not None
    direct_redis = f"redis://{services.host.ip}:{services.REDIS_PORT}/0"
    bucket = services.s3.new_bucket()
    s3fs.S3FileSystem(skip_instance_cache=True, **services.s3.storage_options).pipe_file(
        f"{bucket}/small", b"x" * 100
    )
    through_options = json.dumps(services.storage_options)
    direct_options = json.dumps(services.s3.storage_options)
    rtt_s = 0.100
    services.set_rtt(rtt_s * 1000)
    try:
        ping = _median_s(worker, _PING, services.redis_url, "", "10")
        ping_direct = _median_s(worker, _PING, direct_redis, "", "10")
        get = _median_s(worker, _GET, through_options, f"{bucket}/small", "5")
        get_direct = _median_s(worker, _GET, direct_options, f"{bucket}/small", "5")
    finally:
        services.set_rtt(0)
    print(f"PING {ping * 1e3:.1f} ms (direct {ping_direct * 1e3:.2f} ms), "
          f"GET {get * 1e3:.1f} ms (direct {get_direct * 1e3:.2f} ms)")  # fmt: skip
    assert ping >= 0.9 * rtt_s and get >= 0.9 * rtt_s
    assert ping_direct <= ping / 10 and get_direct <= get / 10
    # back at 0 ms, the proxy adds (almost) nothing
    assert _median_s(worker, _PING, services.redis_url, "", "10") <= ping / 10


def test_the_links_bandwidth_limit_still_holds_behind_the_proxy(site):
    """A 2.5 MB Redis value read through the proxy over a 20 Mbit/s link takes at least
    0.9 x its transfer time at that rate (the tbf on the storage host's link limits what
    the proxy sends), and far more than over the unlimited link."""
    services, worker = site
    key, nbytes, mbit = "big", 2_500_000, 20.0
    redis.Redis.from_url(services.redis_url).set(key, b"v" * nbytes)
    services.set_rtt(20)
    try:
        fast = _median_s(worker, _PING, services.redis_url, key, "3")
        services.host.limit(mbit)
        try:
            slow = _median_s(worker, _PING, services.redis_url, key, "3")
        finally:
            services.host.limit(None)
    finally:
        services.set_rtt(0)
    transfer_s = nbytes * 8 / (mbit * 1e6)
    print(f"2.5 MB GET at 20 ms RTT: {slow:.2f} s at {mbit:g} Mbit/s, {fast:.3f} s unlimited")
    assert slow >= 0.9 * transfer_s
    assert fast <= slow / 3
