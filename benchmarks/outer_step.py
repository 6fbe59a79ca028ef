"""The streamed outer step against raw file I/O and the in-memory merge, in one run.

    python benchmarks/outer_step.py [--sizes 25e6,100e6] [--replicas 2,4,8] [--repeats 2]
                                    [--s3]

Synthetic replica packs on /dev/shm (P float32 parameters each, N replicas, plus the
global pack and the momentum). For every (P, N), interleaved:

- stream: :func:`fleet.diloco.outer.stream_outer_step` (what the ``fleet.outer_step``
  task runs), 1 MiB of each pack at a time (the default), digests and finiteness
  checked while reading;
- raw: reading the same (N + 2) x P x 4 bytes with ``readinto`` into one reused buffer,
  plus writing 2 x P x 4 bytes and fsyncing, as plain file I/O;
- in-memory: the previous orchestrator-side merge (every replica read whole, then the
  average and the step on whole vectors, then both packs written);
- s3 (with ``--s3``): the replica packs in a bucket of a local SeaweedFS (``s3://``),
  fetched into a worker cache (verified by digest) and then stepped from local disk,
  as a worker with an object-store shared root applies a round's outer step; its
  throughput is against the local stream.

Each runs in a fresh subprocess, whose peak RSS increase (``resource.getrusage``, over
the process before the work) is reported. Targets: stream throughput >= 0.5x raw;
stream peak extra memory <= 512 MiB at every P and N.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fleet.diloco.outer import CHUNK_BYTES

WORKER = r"""
import json, os, resource, sys, time
from pathlib import Path
import torch
from fleet.codec import read_pack
from fleet.codec.pack import write_values_pack
from fleet.diloco.optim import outer_optimizer
from fleet.diloco.outer import PackInput, average, outer_step, stream_outer_step
from fleet.protocol import OuterOptimizerConfig
NESTEROV = outer_optimizer(OuterOptimizerConfig(name="nesterov"))

mode, d, n, chunk = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if mode == "s3":
    from fleet.storage.cache import WorkerCache
    from fleet.storage.object_store import ObjectStore
    import shutil
    shutil.rmtree(d / "cache", ignore_errors=True)  # cold: every repeat fetches the packs
    store = ObjectStore(sys.argv[5], json.loads(sys.argv[6]), WorkerCache(d / "cache", 1 << 40))
    store.fs  # the client made before the measurement, as in a worker
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = rss()
files = [d / "global", *(d / f"r{i}" for i in range(n)), d / "momentum"]
start = time.perf_counter()
if mode == "stream":
    stream_outer_step(PackInput(files[0]), [PackInput(f) for f in files[1:-1]], [1.0] * n,
                      {"momentum": PackInput(files[-1])}, NESTEROV, "WeightedMean",
                      d / "out-g", {"momentum": d / "out-m"}, chunk_bytes=chunk)
elif mode == "s3":
    # as a worker steps the global model: the pseudo-gradients fetched (verified) into its
    # cache, then streamed from local disk; it holds the global model and momentum already
    names = [f"r{i}" for i in range(n)]
    local = [store.local_pack(x) for x in names]
    stream_outer_step(PackInput(files[0]), [PackInput(x) for x in local], [1.0] * n,
                      {"momentum": PackInput(files[-1])}, NESTEROV, "WeightedMean",
                      d / "out-g", {"momentum": d / "out-m"}, chunk_bytes=chunk)
elif mode == "memory":
    manifest, theta = read_pack(files[0], verify=True)
    replicas = [read_pack(f, verify=True)[1] for f in files[1:-1]]
    momentum = read_pack(files[-1], verify=True)[1]
    new_theta, new_state = outer_step(
        theta,
        average(replicas, [1.0] * n),
        {"momentum": momentum},
        OuterOptimizerConfig(name="nesterov"),
    )
    write_values_pack(d / "out-g", new_theta, manifest)
    write_values_pack(d / "out-m", new_state["momentum"], manifest)
else:  # raw file I/O of the same bytes
    buf = bytearray(chunk)
    view = memoryview(buf)
    for f in files:
        with open(f / "values.f32le", "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    size = (files[0] / "values.f32le").stat().st_size
    for name in ("raw-g", "raw-m"):
        with open(d / name, "wb", buffering=0) as fh:
            left = size
            while left:
                left -= fh.write(view[: min(chunk, left)])
            os.fsync(fh.fileno())
print(json.dumps({"seconds": time.perf_counter() - start, "extra_rss": rss() - before}))
"""


def run(mode: str, d: Path, n: int, chunk: int, s3: list[str]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, mode, str(d), str(n), str(chunk), *s3],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_packs(d: Path, p: int, n: int) -> None:
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, torch\n"
            "from pathlib import Path\n"
            "from fleet.codec import write_pack\n"
            "from fleet.codec.pack import write_values_pack\n"
            "d, p, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])\n"
            "g = torch.Generator().manual_seed(0)\n"
            "like = write_pack(d / 'global', {'w': torch.randn(p, generator=g)}, 'bench')\n"
            "for name in [*(f'r{i}' for i in range(n)), 'momentum']:\n"
            "    write_values_pack(d / name, torch.randn(p, generator=g), like)\n",
            str(d),
            str(p),
            str(n),
        ],
        check=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="25e6,100e6", help="parameter counts P")
    parser.add_argument("--replicas", default="2,4,8", help="replica counts N")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk-bytes", type=int, default=CHUNK_BYTES)
    parser.add_argument("--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None)
    parser.add_argument("--s3", action="store_true", help="add the s3:// column (SeaweedFS)")
    args = parser.parse_args()
    server, s3_args = _s3_server(args.dir) if args.s3 else (None, [])
    try:
        _measure(args, s3_args)
    finally:
        if server is not None:
            server.stop()


def _s3_server(where: str | None) -> tuple[Any, list[str]]:
    """A local SeaweedFS (fleet/testing/seaweed.py) and the worker's s3 arguments."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fleet.testing.seaweed import SeaweedS3

    server = SeaweedS3(Path(tempfile.mkdtemp(prefix="fleet-bench-weed-", dir=where)))
    server.wait_ready()
    bucket = server.new_bucket()
    return server, [f"s3://{bucket}/bench", json.dumps(server.storage_options)]


def _upload(d: Path, n: int, s3: list[str]) -> None:
    from fleet.storage.object_store import ObjectStore

    store = ObjectStore(s3[0], json.loads(s3[1]), None)
    for name in ["global", *(f"r{i}" for i in range(n)), "momentum"]:
        store.upload(d / name, name)


def _measure(args: argparse.Namespace, s3: list[str]) -> None:
    mib = 1 << 20
    print(
        f"outer step over packs on {args.dir}; chunk {args.chunk_bytes // mib} MiB; "
        f"median of {args.repeats}; raw = readinto (N+2) packs + write/fsync 2"
    )
    print(
        f"{'P':>6} {'N':>3} {'stream s':>9} {'raw s':>7} {'stream/raw':>10} "
        f"{'memory s':>9} {'stream MiB':>11} {'memory MiB':>11}"
        + (f" {'s3 s':>7} {'s3/stream':>9} {'s3 MiB':>7}" if s3 else "")
    )
    worst_ratio, worst_mem = float("inf"), 0.0
    for p in (int(float(x)) for x in args.sizes.split(",")):
        for n in (int(x) for x in args.replicas.split(",")):
            d = Path(tempfile.mkdtemp(prefix="fleet-bench-outer-", dir=args.dir))
            try:
                make_packs(d, p, n)
                modes = ["stream", "raw", "memory", *(["s3"] if s3 else [])]
                if s3:
                    _upload(d, n, s3)
                results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
                for _ in range(args.repeats):
                    for mode in results:  # interleaved
                        results[mode].append(run(mode, d, n, args.chunk_bytes, s3))
            finally:
                shutil.rmtree(d, ignore_errors=True)
            sec = {m: statistics.median(r["seconds"] for r in rs) for m, rs in results.items()}
            mem = {m: max(r["extra_rss"] for r in rs) / mib for m, rs in results.items()}
            ratio = sec["raw"] / sec["stream"]
            worst_ratio, worst_mem = min(worst_ratio, ratio), max(worst_mem, mem["stream"])
            extra = ""
            if s3:
                extra = f" {sec['s3']:>7.3f} {sec['stream'] / sec['s3']:>8.2f}x {mem['s3']:>7.0f}"
            print(
                f"{p / 1e6:>5.0f}M {n:>3} {sec['stream']:>9.3f} {sec['raw']:>7.3f} "
                f"{ratio:>9.2f}x {sec['memory']:>9.3f} {mem['stream']:>11.0f} "
                f"{mem['memory']:>11.0f}" + extra
            )
    print(
        f"\nstream throughput / raw read+write: worst {worst_ratio:.2f}x (target >= 0.5: "
        f"{'ok' if worst_ratio >= 0.5 else 'MISSED'})"
    )
    print(
        f"stream peak extra memory: worst {worst_mem:.0f} MiB (target <= 512: "
        f"{'ok' if worst_mem <= 512 else 'MISSED'})"
    )
    os.sync()


if __name__ == "__main__":
    main()
