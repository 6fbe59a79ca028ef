"""Parameter-pack codec throughput, as ratios to the raw file limits, measured in one run.

    python benchmarks/codec.py [--mb 100] [--repeats 5] [--dir /dev/shm]

A float32 state dict of about ``--mb`` MB (24 weight matrices and their biases) is
written and read on tmpfs, so disk writeback does not decide. Every method runs
``--repeats`` times, interleaved round-robin, and the median is reported:

- raw write: the same bytes written to a new file (one ``write`` + ``fsync``);
- raw readinto: ``readinto`` of those bytes into a preallocated buffer, and into a
  freshly allocated one (first-touch page faults included, as any new tensor pays);
- fleet write_pack (digest on / off), read_pack, load_pack_into;
- safetensors save_file / load_file, torch.save / torch.load of the same state;
- a per-element ``struct`` implementation of the same format (on a ``--struct-mb``
  slice; it is ~100x slower, its MB/s is a rate and compares directly).

Targets (issue 2): write_pack >= 0.7 x raw write (>= 0.5 x with the digest on),
read_pack and load_pack_into >= 0.5 x raw readinto, >= 50 x struct both ways.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fleet.codec import load_pack_into, read_pack, write_pack


def make_state(total_mb: float) -> dict[str, torch.Tensor]:
    """24 square float32 matrices plus biases, ``total_mb`` MB (1e6 bytes) in all."""
    n_layers = 24
    side = int((total_mb * 1e6 / 4 / n_layers) ** 0.5)
    gen = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for i in range(n_layers):
        state[f"layers.{i:02d}.weight"] = torch.randn(side, side, generator=gen)
        state[f"layers.{i:02d}.bias"] = torch.randn(side, generator=gen)
    return state


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * 4 for t in state.values())


# --------------------------------------------------------------------------- methods


def raw_write(path: Path, data: memoryview) -> None:
    with open(path, "wb", buffering=0) as f:
        f.write(data)
        os.fsync(f.fileno())


def raw_readinto(path: Path, buffer: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        f.readinto(buffer)


def raw_readinto_fresh(path: Path, size: int) -> None:
    """``readinto`` a newly allocated buffer: pays the same page faults as ``read_pack``."""
    buffer = torch.empty(size // 4, dtype=torch.float32)
    with open(path, "rb", buffering=0) as f:
        f.readinto(memoryview(buffer.numpy()).cast("B"))


def struct_write(path: Path, state: dict[str, torch.Tensor]) -> None:
    """The straightforward implementation: one ``struct.pack`` per element."""
    with open(path, "wb") as f:
        for key in sorted(state):
            for value in state[key].reshape(-1).tolist():
                f.write(struct.pack("<f", value))


def struct_read(path: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    with open(path, "rb") as f:
        for key in sorted(like):
            n = like[key].numel()
            values = [struct.unpack("<f", f.read(4))[0] for _ in range(n)]
            out[key] = torch.tensor(values, dtype=torch.float32).view(like[key].shape)
    return out


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=100.0, help="state size in MB (1e6 bytes)")
    parser.add_argument(
        "--struct-mb", type=float, default=2.0, help="slice size for the struct baseline"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = parser.parse_args()

    torch.set_num_threads(1)
    state = make_state(args.mb)
    size = nbytes(state)
    small = make_state(args.struct_mb)
    small_size = nbytes(small)
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-codec-", dir=args.dir))
    try:
        flat = torch.cat([state[k].reshape(-1) for k in sorted(state)])
        flat_bytes = memoryview(flat.numpy()).cast("B")
        read_buffer = memoryview(torch.empty_like(flat).numpy()).cast("B")
        out_buffer = torch.empty_like(flat)
        target = {k: torch.zeros_like(v) for k, v in state.items()}
        # inputs for the read side, written once
        write_pack(work / "pack", state, "bench")
        raw_write(work / "raw.bin", flat_bytes)
        save_file(state, str(work / "ref.safetensors"))
        torch.save(state, work / "ref.pt")
        struct_write(work / "struct-ref.bin", small)

        def fresh(name: str) -> Path:
            path = work / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(
                missing_ok=True
            )
            return path

        methods: dict[str, tuple[int, Callable[[], object]]] = {
            "raw write": (size, lambda: raw_write(fresh("raw-out.bin"), flat_bytes)),
            "write_pack (digest)": (size, lambda: write_pack(fresh("p1"), state, "bench")),
            "write_pack (no digest)": (
                size,
                lambda: write_pack(fresh("p2"), state, "bench", digest=False),
            ),
            "safetensors save_file": (size, lambda: save_file(state, str(fresh("o.safetensors")))),
            "torch.save": (size, lambda: torch.save(state, fresh("o.pt"))),
            "raw readinto": (size, lambda: raw_readinto(work / "raw.bin", read_buffer)),
            "raw readinto (fresh buffer)": (
                size,
                lambda: raw_readinto_fresh(work / "raw.bin", size),
            ),
            "read_pack (out=)": (size, lambda: read_pack(work / "pack", out=out_buffer)),
            "read_pack": (size, lambda: read_pack(work / "pack")),
            "load_pack_into": (size, lambda: load_pack_into(work / "pack", target)),
            "read_pack (verify)": (size, lambda: read_pack(work / "pack", verify=True)),
            "safetensors load_file": (size, lambda: load_file(str(work / "ref.safetensors"))),
            "torch.load": (size, lambda: torch.load(work / "ref.pt", weights_only=True)),
        }
        times: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, (_, fn) in methods.items():
                times[name].append(timed(fn))
        # the struct baseline is ~100x slower: once each way, on the small slice
        struct_write_s = timed(lambda: struct_write(fresh("struct.bin"), small))
        struct_read_s = timed(lambda: struct_read(work / "struct-ref.bin", small))
        assert all(torch.equal(target[k], state[k]) for k in state), (
            "load_pack_into restored wrong values"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mbps = {name: methods[name][0] / 1e6 / statistics.median(ts) for name, ts in times.items()}
    mbps["struct per-element write"] = small_size / 1e6 / struct_write_s
    mbps["struct per-element read"] = small_size / 1e6 / struct_read_s

    print(
        f"state: {len(state)} tensors, {size / 1e6:.1f} MB float32 on {work.parent} "
        f"(median of {args.repeats}, interleaved; struct on {small_size / 1e6:.1f} MB, once)"
    )
    print(f"{'method':<28}{'MB/s':>10}")
    for name, value in mbps.items():
        print(f"{name:<28}{value:>10.1f}")

    ratios = [
        (
            "write_pack (no digest) / raw write",
            mbps["write_pack (no digest)"] / mbps["raw write"],
            0.7,
        ),
        ("write_pack (digest) / raw write", mbps["write_pack (digest)"] / mbps["raw write"], 0.5),
        ("read_pack (out=) / raw readinto", mbps["read_pack (out=)"] / mbps["raw readinto"], 0.5),
        (
            "read_pack / raw readinto (fresh buffer)",
            mbps["read_pack"] / mbps["raw readinto (fresh buffer)"],
            0.5,
        ),
        ("load_pack_into / raw readinto", mbps["load_pack_into"] / mbps["raw readinto"], 0.5),
        (
            "write_pack (digest) / struct write",
            mbps["write_pack (digest)"] / mbps["struct per-element write"],
            50,
        ),
        (
            "load_pack_into / struct read",
            mbps["load_pack_into"] / mbps["struct per-element read"],
            50,
        ),
        (
            "write_pack (digest) / safetensors save",
            mbps["write_pack (digest)"] / mbps["safetensors save_file"],
            None,
        ),
        (
            "load_pack_into / safetensors load",
            mbps["load_pack_into"] / mbps["safetensors load_file"],
            None,
        ),
        (
            "write_pack (digest) / torch.save",
            mbps["write_pack (digest)"] / mbps["torch.save"],
            None,
        ),
        ("load_pack_into / torch.load", mbps["load_pack_into"] / mbps["torch.load"], None),
    ]
    print("(safetensors load_file maps the file lazily: its MB/s counts no bytes touched)")
    print(f"\n{'ratio':<42}{'value':>9}  target")
    for name, value, want in ratios:
        verdict = "" if want is None else f">= {want:<5} {'ok' if value >= want else 'MISSED'}"
        print(f"{name:<42}{value:>9.2f}  {verdict}")


if __name__ == "__main__":
    main()
