"""DiLoCo's outer step on flat parameter vectors, in memory and streamed over packs.

Source: Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language
Models", arXiv:2311.08105, Algorithm 1. With ``theta`` the global parameters (flat
float32 ``[P]``) and replica ``i``'s contribution either its parameters ``theta_i``
(a v1 pack: the exact ``fp32`` exchange) or its pseudo-gradient ``delta_i = theta -
theta_i`` (a pseudo-gradient pack, :mod:`fleet.codec.pseudo_gradient`)::

    average = sum_i w_i * theta_i             delta = theta - average      (parameters)
    delta   = sum_i w_i * delta_i             average = theta - delta      (pseudo-gradients)
    theta'  = outer optimizer step (theta, average, delta, buffers)

with ``w`` normalised (or a coordinate-wise trimmed mean). The outer optimizer is an
object (:mod:`fleet.diloco.optim`: Nesterov, SGD, ...) that names its state buffers.

Every operation is one elementwise IEEE operation (a multiply, or an add), never a
fused multiply-add: the result of an element then does not depend on how a vector is
split into chunks or SIMD lanes, so :func:`stream_outer_step` (chunk by chunk over
packs) is bit-identical to :func:`average` + :func:`outer_step` on whole vectors.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

from fleet.codec.codecs import ALIGN_NUMEL
from fleet.codec.manifest import PackManifest
from fleet.codec.pack import PackReader, writing_pack
from fleet.codec.pseudo_gradient import PseudoGradientReader
from fleet.codec.readers import open_reader
from fleet.diloco.optim import OuterOptimizer, outer_optimizer
from fleet.errors import BaseMismatchError, LayoutMismatchError
from fleet.protocol import OuterOptimizerConfig

#: Default bytes of each pack held at once by :func:`stream_outer_step` (1 MiB: blocks
#: that stay in cache while the step runs over them; measured by benchmarks/outer_step.py).
CHUNK_BYTES = 1 << 20


def _weights(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0.0:
        raise ValueError(f"replica weights sum to {total}")
    return [float(w) / total for w in weights]


def _average_into(
    blocks: Sequence[torch.Tensor], weights: Sequence[float], policy: str
) -> torch.Tensor:
    """The average of ``blocks`` written into ``blocks[0]`` (the others are clobbered)."""
    if policy == "TrimmedMean":
        rows = list(blocks)
        if len(rows) >= 3:
            ordered = torch.stack(rows).sort(dim=0).values
            rows = list(ordered[1:-1])
            blocks[0].copy_(rows[0])
        for row in rows[1:]:
            blocks[0].add_(row)
        return blocks[0].div_(len(rows))
    normalised = _weights(weights)
    blocks[0].mul_(normalised[0])
    for block, w in zip(blocks[1:], normalised[1:], strict=True):
        blocks[0].add_(block.mul_(w))
    return blocks[0]


def average(
    replicas: Sequence[torch.Tensor], weights: Sequence[float], policy: str = "WeightedMean"
) -> torch.Tensor:
    """Average of replica parameters (each float32 ``[P]``); the inputs are not changed.

    ``WeightedMean`` / ``NormClippedWeightedMean``: ``sum(w_i * theta_i) / sum(w)``.
    ``TrimmedMean``: coordinate-wise mean after dropping the smallest and largest value
    (with 3 or more replicas; the plain mean otherwise); weights ignored.

    Raises:
        ValueError: no replicas, mismatched lengths, or weights that sum to <= 0.
    """
    if not replicas or len(replicas) != len(weights):
        raise ValueError(f"{len(replicas)} replicas with {len(weights)} weights")
    return _average_into([r.clone() for r in replicas], weights, policy)


def outer_step(
    theta: torch.Tensor,
    avg: torch.Tensor,
    state: Mapping[str, torch.Tensor] | None,
    config: OuterOptimizerConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One outer optimizer step on whole vectors (see the module docstring); the inputs
    are not changed.

    Args:
        theta: global parameters, float32 ``[P]``.
        avg: averaged replica parameters, float32 ``[P]``.
        state: the optimizer's buffers after the last round (each ``[P]``), or None in
            the first round (a momentum buffer starts as ``delta``, as in torch SGD).

    Returns:
        ``(new_theta, new_state)``, all float32 ``[P]``.
    """
    optimizer = outer_optimizer(config)
    new_state = {name: torch.empty_like(theta) for name in optimizer.buffers}
    old = {name: (state or {}).get(name) for name in optimizer.buffers}
    delta = torch.sub(theta, avg)
    new_theta = optimizer.step(theta.clone(), avg.clone(), delta, old, new_state)
    return new_theta, new_state


@dataclass(frozen=True)
class OuterStepOutput:
    """What :func:`stream_outer_step` published: the manifests of the new global pack and
    of each optimizer buffer, the bytes it read (``exchange_bytes`` of them the
    replicas') and wrote, and the seconds it took."""

    global_manifest: PackManifest
    state_manifests: dict[str, PackManifest]
    bytes_read: int
    bytes_written: int
    exchange_bytes: int
    seconds: float


@dataclass(frozen=True)
class PackInput:
    """A local pack read by the outer step, with what its reference recorded (checked)."""

    path: Path
    layout_hash: str | None = None
    values_digest: str | None = None


def _open(ref: PackInput) -> PackReader | PseudoGradientReader:
    return open_reader(
        Path(ref.path),
        check_finite=True,
        layout_hash=ref.layout_hash,
        values_digest=ref.values_digest,
    )


def _nbytes(reader: PackReader | PseudoGradientReader) -> int:
    manifest = reader.manifest
    if isinstance(manifest, PackManifest):
        return manifest.values_nbytes
    return manifest.exchange_bytes


def _value_range(
    refs: Sequence[PackInput],
    readers: Sequence[PackReader | PseudoGradientReader],
    parameter_count: int,
) -> tuple[int, int]:
    """The values ``[start, stop)`` every replica pack holds (one Streaming DiLoCo
    fragment, or all of them).

    Raises:
        LayoutMismatchError: the replicas hold different ranges, or one outside the layout.
    """
    ranges = [getattr(r.manifest, "value_range", None) or (0, parameter_count) for r in readers]
    for ref, got in zip(refs, ranges, strict=True):
        if tuple(got) != tuple(ranges[0]) or not 0 <= got[0] < got[1] <= parameter_count:
            raise LayoutMismatchError(
                str(ref.path),
                f"values {list(got)}",
                f"values {list(ranges[0])} of {parameter_count}",
            )
    return int(ranges[0][0]), int(ranges[0][1])


def stream_outer_step(
    global_pack: PackInput,
    replicas: Sequence[PackInput],
    weights: Sequence[float],
    state: Mapping[str, PackInput],
    optimizer: OuterOptimizer,
    policy: str,
    out_global: Path,
    out_state: Mapping[str, Path],
    *,
    chunk_bytes: int = CHUNK_BYTES,
    single_thread: bool = True,
) -> OuterStepOutput:
    """The outer step over local packs, streamed: every input is read ``chunk_bytes`` at
    a time (its digest and finiteness checked as it is read), the step is applied to
    the chunk, and the new global pack and optimizer buffers are written and hashed as
    they go, then published atomically. Replica inputs are pseudo-gradient packs
    (decoded as read; each must name ``global_pack`` as its base) or v1 packs of
    parameters, in any mix. A reader thread fills the next row of blocks while the
    current one is computed, so extra memory is about ``(2 (N + B) + 6) *
    chunk_bytes`` for N replicas and B buffers, whatever the parameter count P. The
    result is bit-identical to :func:`average` + :func:`outer_step` on whole vectors.

    Replica packs that hold one range of the values (a Streaming DiLoCo fragment,
    ``value_range`` in their manifests) step only those; every other value of the
    global pack and of the buffers is copied (a buffer not kept yet starts at zero
    there, which the step treats as torch's first-step momentum ``m = delta``).

    Args:
        state: the optimizer's buffers after the last round, by name (empty in the
            first round).
        out_state: where each of ``optimizer.buffers`` is written.
        single_thread: run the arithmetic on one torch thread (restored after).

    Raises:
        LayoutMismatchError: an input's layout differs from the global pack's, or the
            replicas hold different ranges of it.
        BaseMismatchError: a pseudo-gradient was taken from another global model than
            ``global_pack`` (its ``base_values_digest``); nothing is published.
        DigestMismatchError, NonFiniteValuesError, ValuesLengthError, NotAPackError: an
            input is corrupt (the error names its path); nothing is published.
        ValueError: no replicas, weights that sum to <= 0, or buffers that are not the
            optimizer's.
    """
    if not replicas or len(replicas) != len(weights):
        raise ValueError(f"{len(replicas)} replicas with {len(weights)} weights")
    if policy != "TrimmedMean":
        _weights(weights)  # refuse weights that cannot be normalised before reading
    names = optimizer.buffers
    if set(state) - set(names) or set(out_state) != set(names):
        raise ValueError(
            f"buffers {sorted(state)} in, {sorted(out_state)} out; the optimizer keeps {names}"
        )
    started = time.perf_counter()
    with ExitStack() as stack:
        # The arithmetic runs on one torch thread: the blocks are cache-sized, and the
        # reader thread prefetching the next row uses the other core (benchmarks/
        # outer_step.py measured torch's intra-op threads slowing this down).
        if single_thread:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            stack.callback(torch.set_num_threads, threads)

        # Global pack, replicas, buffers: each checked against its ref (layout hash,
        # digest, finite values) while read, and against the global pack's layout.
        buffer_names = [name for name in names if name in state]
        inputs = [global_pack, *replicas, *(state[name] for name in buffer_names)]
        readers: list[PackReader | PseudoGradientReader] = []
        for ref in inputs:
            reader = _open(ref)
            stack.callback(reader.close)
            if readers and reader.manifest.layout_hash != readers[0].manifest.layout_hash:
                raise LayoutMismatchError(
                    str(ref.path), reader.manifest.layout_hash, readers[0].manifest.layout_hash
                )
            readers.append(reader)
        like = readers[0].manifest
        if not isinstance(like, PackManifest):
            raise LayoutMismatchError(str(global_pack.path), "pseudo-gradient", "a v1 pack")
        for ref, reader in zip(replicas, readers[1 : 1 + len(replicas)], strict=True):
            base = getattr(reader.manifest, "base_values_digest", None)
            if base is not None and like.values_digest is not None and base != like.values_digest:
                raise BaseMismatchError(str(ref.path), like.values_digest, base)
        is_delta = [isinstance(r, PseudoGradientReader) for r in readers[1 : 1 + len(replicas)]]
        start, stop = _value_range(replicas, readers[1 : 1 + len(replicas)], like.parameter_count)
        align = max(
            [ALIGN_NUMEL] + [r.block_size for r in readers if isinstance(r, PseudoGradientReader)]
        )
        n = max(align, (chunk_bytes // 4) // align * align)
        size = min(n, max(like.parameter_count, 1))
        rows = [[torch.empty(size, dtype=torch.float32) for _ in readers] for _ in range(2)]
        scratch = torch.empty(size, dtype=torch.float32)
        zeros = torch.zeros(size, dtype=torch.float32)
        new_blocks = {name: torch.empty(size, dtype=torch.float32) for name in names}
        global_sink = stack.enter_context(writing_pack(out_global, like))
        sinks = {name: stack.enter_context(writing_pack(out_state[name], like)) for name in names}
        # (values, stepped): chunks of n values; outside the replicas' range (another
        # Streaming DiLoCo fragment's values) the global values and buffers are copied
        plan = [
            (min(n, last - at), stepped)
            for first, last, stepped in (
                (0, start, False),
                (start, stop, True),
                (stop, like.parameter_count, False),
            )
            for at in range(first, last, n)
        ]
        replica_readers = range(1, 1 + len(replicas))

        def read_row(row: list[torch.Tensor], k: int, stepped: bool) -> list[torch.Tensor]:
            return [
                reader.read_into(block[:k]) if stepped or i not in replica_readers else block[:0]
                for i, (reader, block) in enumerate(zip(readers, row, strict=True))
            ]

        # Double buffering: a thread reads (and hashes, and checks) the next row of blocks
        # while this one computes and writes the current row; file reads, xxhash and
        # torch all release the GIL.
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        pending = pool.submit(read_row, rows[0], *plan[0]) if plan else None
        for count, (k, stepped) in enumerate(plan, start=1):
            assert pending is not None
            row = pending.result()
            if count < len(plan):
                pending = pool.submit(read_row, rows[count % 2], *plan[count])
            t, parts = row[0], row[1 : 1 + len(replicas)]
            old = dict.fromkeys(names)
            tail = 1 + len(replicas) + len(buffer_names)
            old.update(zip(buffer_names, row[1 + len(replicas) : tail], strict=True))
            if not stepped:
                global_sink.write(t)
                for name, sink in sinks.items():
                    kept = old[name]
                    sink.write(kept if kept is not None else zeros[:k])
                continue
            new = {name: block[:k] for name, block in new_blocks.items()}
            if any(is_delta):
                for part, delta_given in zip(parts, is_delta, strict=True):
                    if not delta_given:
                        torch.sub(t, part, out=part)  # parameters -> pseudo-gradient
                delta = _average_into(parts, weights, policy)
                avg = torch.sub(t, delta, out=scratch[:k])
            else:
                avg = _average_into(parts, weights, policy)
                delta = torch.sub(t, avg, out=scratch[:k])
            new_theta = optimizer.step(t, avg, delta, old, new)
            global_sink.write(new_theta)
            for name, sink in sinks.items():
                sink.write(new[name])
        for reader in readers:
            reader.finish()
    assert global_sink.manifest is not None
    state_manifests = {name: sink.manifest for name, sink in sinks.items()}
    assert all(m is not None for m in state_manifests.values())
    return OuterStepOutput(
        global_manifest=global_sink.manifest,
        state_manifests=cast(dict[str, PackManifest], state_manifests),
        bytes_read=sum(_nbytes(r) for r in readers),
        bytes_written=(1 + len(names)) * like.values_nbytes,
        exchange_bytes=sum(_nbytes(r) for r in readers[1 : 1 + len(replicas)]),
        seconds=time.perf_counter() - started,
    )
