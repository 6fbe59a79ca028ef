"""Requests per store operation on an object-store shared root, counted by the store.

    python benchmarks/store_requests.py [--parameters 1000000] [--json PATH]

A private SeaweedFS (fleet/testing/seaweed.py) serves an ``s3://`` root; each operation a DiLoCo
round makes of the store runs once on a fresh :class:`~fleet.storage.object_store.ObjectStore`
(an empty worker cache), and the table shows the requests it sent
(``store.counters.requests``: every HTTP request, each try of a retried one) and their
kinds (botocore's operation names). Every request costs a round trip: at 100 ms RTT,
10 sequential requests are a second.

Operations (a pack of ``--parameters`` float32 values):

- publish a pack: what a worker does with the replica pack it wrote
  (``Store.output`` + ``write_pack``: data object first, manifest last);
- publish a file: an optimizer state (``Store.output`` of a file);
- fetch a pack into the cache, with its PackRef (a worker reading the global pack);
- stream a pack (the outer step: ``Store.pack_reader``, 1 MiB ranged reads);
- fetch a file into the cache (``Store.local_file``: an optimizer state);
- read / write a result marker (``read_bytes`` / ``write_bytes``);
- GC a round directory, as the ``collect_garbage`` task does it
  (``exists`` for each path it was given, then ``remove`` of all of them): a round's 2
  replica packs with their result markers and optimizer states, its global pack, and
  2 paths that do not exist (residuals a run without error feedback never wrote).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from fleet.codec import write_pack  # noqa: E402
from fleet.settings import FleetSettings  # noqa: E402
from fleet.storage import open_store  # noqa: E402
from fleet.storage.object_store import ObjectStore  # noqa: E402
from fleet.testing.seaweed import SeaweedS3  # noqa: E402

ROUND = "runs/job/round-0003"


def _store(s3: SeaweedS3, root: str, cache: Path) -> ObjectStore:
    settings = FleetSettings(shared_root=root, storage_options=s3.storage_options, cache_dir=cache)
    store = open_store(settings)
    assert isinstance(store, ObjectStore)
    return store


def _counted(store: ObjectStore, fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """Run ``fn``; the requests it made (the store's counter) and their kinds."""
    kinds: Counter[str] = Counter()

    def seen(event_name: str, **_: Any) -> None:
        kinds[event_name.rsplit(".", 1)[-1]] += 1

    store.fs.session.register("before-send.s3", seen)  # kinds only: the count is the store's
    before = store.counters.requests
    try:
        fn()
    finally:
        store.fs.session.unregister("before-send.s3", seen)
    return store.counters.requests - before, dict(kinds)


def measure(s3: SeaweedS3, parameters: int, work: Path) -> list[dict[str, Any]]:
    """The request counts of each operation (see the module docstring)."""
    root = f"s3://{s3.new_bucket()}/root"
    state = {"w": torch.randn(parameters)}
    rows: list[dict[str, Any]] = []
    n = 0

    def row(name: str, fn: Callable[[ObjectStore], object]) -> None:
        nonlocal n
        n += 1
        store = _store(s3, root, work / f"cache-{n}")
        requests, kinds = _counted(store, lambda: fn(store))
        rows.append({"operation": name, "requests": requests, "kinds": kinds})

    def publish(store: ObjectStore, rel: str) -> None:
        with store.output(rel) as local:
            write_pack(local, state, "schema")

    def publish_file(store: ObjectStore, rel: str) -> None:
        with store.output(rel) as local:
            local.write_bytes(b"o" * 4096)

    row("publish a pack", lambda st: publish(st, f"{ROUND}/replica-0-a0"))
    setup = _store(s3, root, work / "cache-setup")
    publish(setup, f"{ROUND}/replica-1-a0")
    publish(setup, f"{ROUND}/global")
    ref = setup.pack_ref(f"{ROUND}/global")
    row("publish a file (optimizer state)", lambda st: publish_file(st, f"{ROUND}/opt-0-a0.pt"))
    publish_file(setup, f"{ROUND}/opt-1-a0.pt")
    row("fetch a pack into the cache (PackRef)", lambda st: st.local_pack(ref.path, ref))
    row("fetch a pack into the cache (path)", lambda st: st.local_pack(ref.path))

    def stream(store: ObjectStore) -> None:  # as the outer step reads: 1 MiB at a time
        chunk = torch.empty(1 << 18)
        with store.pack_reader(
            ref.path, block_size=1 << 20, values_digest=ref.values_digest
        ) as reader:
            while reader.remaining:
                reader.read_into(chunk)
            reader.finish()

    row("stream a pack (outer step, 1 MiB reads)", stream)
    row("fetch a file into the cache", lambda st: st.local_file(f"{ROUND}/opt-1-a0.pt"))
    marker = f"{ROUND}/replica-0-a0.result.json"
    row("write a result marker", lambda st: st.write_bytes(marker, b'{"request": "x"}'))
    setup.write_bytes(f"{ROUND}/replica-1-a0.result.json", b"{}")
    row("read a result marker", lambda st: st.read_bytes(marker))
    row("exists (a pack directory)", lambda st: st.exists(ref.path))
    row("exists (missing)", lambda st: st.exists(f"{ROUND}/ef-0-a0"))
    garbage = [
        *(f"{ROUND}/{name}-{i}-a0" for name in ("replica", "ef") for i in (0, 1)),
        *(f"{ROUND}/replica-{i}-a0.result.json" for i in (0, 1)),
        *(f"{ROUND}/opt-{i}-a0.pt" for i in (0, 1)),
        f"{ROUND}/global",
    ]

    def gc(store: ObjectStore) -> None:  # as the collect_garbage task does it
        present = [rel for rel in garbage if store.exists(rel)]
        assert len(present) == 7, present
        store.remove(garbage)

    def round_dir() -> None:  # what the GC finds there: 10 objects
        publish(setup, f"{ROUND}/global")
        for i in (0, 1):
            publish(setup, f"{ROUND}/replica-{i}-a0")
            publish_file(setup, f"{ROUND}/opt-{i}-a0.pt")
            setup.write_bytes(f"{ROUND}/replica-{i}-a0.result.json", b"{}")
        assert len(setup.walk(ROUND)) == 10

    round_dir()
    row(f"GC a round directory ({len(garbage)} paths, 7 present)", gc)
    assert not setup.walk(ROUND), "the GC left files behind"
    if hasattr(setup, "existing"):  # the batched check (Store.existing)
        round_dir()

        def gc_batched(store: ObjectStore) -> None:
            present = store.existing(garbage)
            assert len(present) == 7, present
            store.remove(garbage)

        row("  the same, existence checked with Store.existing", gc_batched)
        assert not setup.walk(ROUND), "the GC left files behind"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parameters", type=int, default=1_000_000)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-requests-"))
    s3 = SeaweedS3(work / "weed")
    try:
        s3.wait_ready()
        rows = measure(s3, args.parameters, work)
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"| operation ({args.parameters / 1e6:g}M-parameter pack) | requests | kinds |")
    print("|---|---|---|")
    for r in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["kinds"].items()))
        print(f"| {r['operation']} | {r['requests']} | {kinds} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
