"""The requests an object-store shared root sends (a real SeaweedFS): what each store
operation of a DiLoCo round costs in requests, each a round trip to the store, and
that cutting them (no HEAD before a GET whose size a manifest gives, one listing per
directory) kept every check: a data object of another length than its manifest says is
still refused, and a removal takes what is under a path and nothing beside it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fleet.codec import write_pack
from fleet.errors import ShardMissingError, ValuesLengthError
from fleet.settings import FleetSettings
from fleet.storage import open_store
from fleet.storage.object_store import ObjectStore, _RangedReader
from fleet.testing.waits import wait_until

ROUND = "runs/j/round-0003"


def _store(s3_server, root: str, cache_dir: Path) -> ObjectStore:
    settings = FleetSettings(
        shared_root=root, storage_options=s3_server.storage_options, cache_dir=cache_dir
    )
    store = open_store(settings)
    assert isinstance(store, ObjectStore)
    return store


def _requests(store: ObjectStore, fn: Callable[[], object]) -> int:
    before = store.counters.requests
    fn()
    return store.counters.requests - before


def _publish(store: ObjectStore, rel: str, n: int = 1_000_000) -> None:
    with store.output(rel) as local:
        write_pack(local, {"w": torch.arange(n, dtype=torch.float32)}, "schema")


def test_the_store_counts_the_requests_the_server_answered(s3_server, s3_root, tmp_path):
    """``counters.requests`` against the server's own count of the requests it answered
    for the bucket (SeaweedFS's Prometheus counter), over every kind of operation."""
    bucket = s3_root.split("/")[2]
    store = _store(s3_server, s3_root, tmp_path / "cache")
    before = s3_server.requests(bucket)
    _publish(store, f"{ROUND}/global", 1000)
    store.write_bytes(f"{ROUND}/marker.json", b"{}")
    with store.output(f"{ROUND}/opt.pt") as local:
        local.write_bytes(b"o" * 100)
    reader = _store(s3_server, s3_root, tmp_path / "cache-2")
    reader.local_pack(f"{ROUND}/global")
    reader.local_file(f"{ROUND}/opt.pt")
    reader.read_bytes(f"{ROUND}/marker.json")
    assert reader.exists(f"{ROUND}/global") and not reader.exists(f"{ROUND}/nothing")
    reader.listdir(ROUND)
    reader.walk(ROUND)
    reader.remove([ROUND])
    counted = store.counters.requests + reader.counters.requests
    assert counted > 10
    # SeaweedFS counts a request after its handler returns (``track`` in
    # weed/s3api/stats.go), so a response can reach the client before it is counted (CI
    # once read 15 of 16 at once): wait for the count to catch up, then compare
    wait_until(lambda: s3_server.requests(bucket) - before >= counted, 10, "the server's count")
    assert counted == s3_server.requests(bucket) - before


def test_each_operation_of_a_round_sends_only_the_requests_it_needs(s3_server, s3_root, tmp_path):
    """Requests per operation (``benchmarks/store_requests.py`` prints them with the
    counts before they were cut): a pack fetched or streamed costs its manifest's GET and
    its values' GETs, no HEAD; a file published, one PUT; a round directory's garbage,
    one listing to find it and one request to delete it."""
    writer = _store(s3_server, s3_root, tmp_path / "cache-w")
    rel = f"{ROUND}/global"
    # the old manifest deleted, the values, then the manifest
    assert _requests(writer, lambda: _publish(writer, rel)) == 3
    ref = writer.pack_ref(rel)

    reader = _store(s3_server, s3_root, tmp_path / "cache-r")
    assert _requests(reader, lambda: reader.local_pack(rel, ref)) == 2
    assert _requests(reader, lambda: reader.local_pack(rel, ref)) == 0  # cached, verified

    streamer = _store(s3_server, s3_root, tmp_path / "cache-s")  # not in its cache

    def stream() -> None:  # as the outer step reads: 1 MiB at a time, 1 MiB ahead
        chunk = torch.empty(1 << 18)
        with streamer.pack_reader(rel, block_size=1 << 20, values_digest=ref.values_digest) as r:
            while r.remaining:
                r.read_into(chunk)
            r.finish()

    # 4 MB of values: 2 ranged GETs of 2 MiB, and the manifest's
    assert _requests(streamer, stream) == 3

    def publish_file() -> None:
        with writer.output(f"{ROUND}/opt-0-a0.pt") as local:
            local.write_bytes(b"o" * 4096)

    assert _requests(writer, publish_file) == 1  # its ETag from the PUT's reply: no HEAD
    assert _requests(writer, lambda: writer.local_file(f"{ROUND}/opt-0-a0.pt")) == 1  # HEAD
    assert _requests(writer, lambda: writer.write_bytes(f"{ROUND}/m.json", b"{}")) == 1
    assert _requests(reader, lambda: reader.read_bytes(f"{ROUND}/m.json")) == 1
    assert _requests(reader, lambda: reader.exists(rel)) == 1
    assert _requests(reader, lambda: reader.exists(f"{ROUND}/ef-0-a0")) == 1

    _publish(writer, f"{ROUND}/replica-0-a0", 1000)
    garbage = [f"{ROUND}/{name}" for name in ("global", "replica-0-a0", "opt-0-a0.pt", "m.json")]
    garbage += [f"{ROUND}/ef-0-a0", f"{ROUND}/ef-1-a0"]  # never written

    freed = sum(e.size for e in writer.walk(ROUND))
    assert _requests(reader, lambda: reader.existing(garbage) == garbage[:4]) == 1
    assert _requests(reader, lambda: reader.remove(garbage)) == 2  # a listing, a delete
    assert writer.walk(ROUND) == [] and freed > 8000


def test_a_values_object_of_another_length_is_refused_without_a_head(s3_server, s3_root, tmp_path):
    """The values are read in ranged GETs of the length the manifest gives, the last one
    a byte longer: an object longer, shorter or missing is refused as before (when a HEAD
    checked its size first), whether fetched into the cache or streamed."""
    store = _store(s3_server, s3_root, tmp_path / "cache")
    rel = "exchange/p"
    _publish(store, rel, 1000)
    ref = store.pack_ref(rel)
    key = store.key(f"{rel}/values.f32le")
    values = store.read_bytes(f"{rel}/values.f32le")
    for n, changed in enumerate([values + b"\0", values[:-4], None]):
        if changed is None:
            store.fs.rm_file(key)
        else:
            store.fs.pipe_file(key, changed)
        actual = 0 if changed is None else len(changed)
        fresh = _store(s3_server, s3_root, tmp_path / f"fresh-{n}")
        with pytest.raises(ValuesLengthError) as fetched:
            fresh.local_pack(rel, ref)
        assert (fetched.value.expected_bytes, fetched.value.actual_bytes) == (4000, actual)
        with pytest.raises(ValuesLengthError), fresh.pack_reader(rel, block_size=1000) as r:
            r.read_into(torch.empty(r.manifest.parameter_count))
            r.finish()


def test_ranged_reads_end_where_the_object_or_its_manifest_says(s3_server, s3_root, tmp_path):
    """Reads whose read-ahead ends exactly at the object's end (the next range starts
    past it: the store refuses it, and that is the end), and a known length that the
    read-ahead reaches exactly (the byte beyond it is asked for all the same)."""
    store = _store(s3_server, s3_root, tmp_path / "cache")
    store.write_bytes("f", bytes(range(10)))
    with _RangedReader(store, "f", block_size=5) as r:  # length unknown
        assert [r.read(5), r.read(5), r.read(5)] == [bytes(range(5)), bytes(range(5, 10)), b""]
    with _RangedReader(store, "f", block_size=5, nbytes=10) as r:
        assert r.read() == bytes(range(10))
    with pytest.raises(ValuesLengthError) as longer, _RangedReader(store, "f", 5, nbytes=5) as r:
        r.read(5)
    assert longer.value.actual_bytes == 10
    with _RangedReader(store, "f", block_size=5, nbytes=12) as r:  # shorter: reads short
        assert r.read(12) == bytes(range(10))
    with pytest.raises(FileNotFoundError), _RangedReader(store, "missing", 5) as r:
        r.read(1)
    with pytest.raises(ShardMissingError):
        store.local_shard("missing", "1220" + "0" * 64, dataset="d", shard_id="s")


def test_existing_and_remove_take_what_is_under_a_path_and_nothing_beside_it(
    s3_server, s3_root, tmp_path
):
    """One listing finds several paths of a directory; names that merely start like a
    path (``p-2``, ``p.json``) are neither found nor removed with it."""
    store = _store(s3_server, s3_root, tmp_path / "cache")
    for rel in ["d/p/manifest.json", "d/p/values", "d/p-2/x", "d/p.json", "d/q", "e/p/x"]:
        store.write_bytes(rel, b"12345")
    assert store.existing(["d/p", "d/p-", "d/q", "d/r", "e/p", "d/p/values"]) == [
        "d/p",
        "d/q",
        "e/p",
        "d/p/values",
    ]
    assert store.remove(["d/p", "e/p/x", "d/none"]) == 15
    assert [e.path for e in store.walk("")] == ["d/p-2/x", "d/p.json", "d/q"]
    assert not store.exists("d/p")  # an emptied directory does not exist
    listed = [(e.name, e.is_dir) for e in store.listdir("d")]
    # SeaweedFS keeps the emptied directory p (its filer has directories; S3 has none)
    assert [x for x in listed if x != ("p", True)] == [
        ("p-2", True),
        ("p.json", False),
        ("q", False),
    ]
