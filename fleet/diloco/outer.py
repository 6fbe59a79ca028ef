"""DiLoCo's outer step on flat parameter vectors, in memory and streamed over packs.

Source: Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language
Models", arXiv:2311.08105, Algorithm 1. With ``theta`` the global parameters (flat
float32 ``[P]``) and ``theta_i`` replica ``i``'s after its inner steps:

    delta   = theta - sum_i w_i * theta_i          (pseudo-gradient, w normalised)
    m'      = mu * m + delta                         (momentum buffer, as torch SGD)
    update  = delta + mu * m'  (Nesterov)  or  m'   (heavy ball)
    theta'  = theta - lr * update

computed as ``theta' = avg + (1 - lr) * delta - (lr * mu) * m'`` (Nesterov), so that
one replica with ``lr = 1`` and ``mu = 0`` gives exactly the replica's parameters.

Every operation is one elementwise IEEE operation (a multiply, or an add), never a
fused multiply-add: the result of an element then does not depend on how a vector is
split into chunks or SIMD lanes, so :func:`stream_outer_step` (chunk by chunk over
packs) is bit-identical to :func:`average` + :func:`outer_step` on whole vectors.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fleet.codec.manifest import PackManifest
from fleet.codec.pack import PackReader, writing_pack
from fleet.errors import LayoutMismatchError
from fleet.protocol import OuterOptimizer

if TYPE_CHECKING:
    from fleet.storage import Store

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


def _step_into(
    theta: torch.Tensor,
    avg: torch.Tensor,
    momentum: torch.Tensor | None,
    config: OuterOptimizer,
    scratch: torch.Tensor,
    new_momentum: torch.Tensor,
) -> torch.Tensor:
    """The outer step written into buffers: ``new_momentum`` receives m' and the returned
    tensor (``avg`` or ``theta``, reused) theta'. ``scratch`` is clobbered."""
    mu, lr = config.momentum, config.lr
    delta = torch.sub(theta, avg, out=scratch)
    if momentum is None:
        new_momentum.copy_(delta)
    else:
        torch.mul(momentum, mu, out=new_momentum).add_(delta)
    if config.nesterov or mu == 0.0:
        new_theta = avg.add_(delta.mul_(1.0 - lr))
        if mu:
            new_theta.sub_(torch.mul(new_momentum, lr * mu, out=scratch))
        return new_theta
    return theta.sub_(torch.mul(new_momentum, lr, out=scratch))


def outer_step(
    theta: torch.Tensor,
    avg: torch.Tensor,
    momentum: torch.Tensor | None,
    config: OuterOptimizer,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One outer optimizer step (see the module docstring); the inputs are not changed.

    Args:
        theta: global parameters, float32 ``[P]``.
        avg: averaged replica parameters, float32 ``[P]``.
        momentum: momentum buffer ``[P]`` from the last round, or None (first round:
            the buffer starts as ``delta``, as in ``torch.optim.SGD``).

    Returns:
        ``(new_theta, new_momentum)``, both float32 ``[P]``.
    """
    new_momentum = torch.empty_like(theta)
    new_theta = _step_into(
        theta.clone(), avg.clone(), momentum, config, torch.empty_like(theta), new_momentum
    )
    return new_theta, new_momentum


@dataclass(frozen=True)
class OuterStepOutput:
    """What :func:`stream_outer_step` published: both manifests, the bytes it read and
    wrote, and the seconds it took."""

    global_manifest: PackManifest
    momentum_manifest: PackManifest
    bytes_read: int
    bytes_written: int
    seconds: float


@dataclass(frozen=True)
class PackInput:
    """A pack read by the outer step, with what its reference recorded (checked)."""

    path: Path | str
    """A local pack directory, or a path on ``store`` when the outer step is given one."""
    layout_hash: str | None = None
    values_digest: str | None = None


def inputs_digest(*parts: object) -> str:
    """A digest of an outer step's inputs (recorded in its output manifests, so a re-run
    with the same inputs can return the published packs)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def stream_outer_step(
    global_pack: PackInput,
    replicas: Sequence[PackInput],
    weights: Sequence[float],
    momentum: PackInput | None,
    config: OuterOptimizer,
    policy: str,
    out_global: Path,
    out_momentum: Path,
    *,
    chunk_bytes: int = CHUNK_BYTES,
    inputs_key: str | None = None,
    store: Store | None = None,
) -> OuterStepOutput:
    """The outer step over packs, streamed: every input is read ``chunk_bytes`` at a time
    (its digest and, for replicas, finiteness checked as it is read), the step is
    applied to the chunk, and the new global and momentum packs are written and hashed
    as they go, then published atomically. A reader thread fills the next row of
    blocks while the current one is computed, so extra memory is about ``(2N + 6) *
    chunk_bytes`` for N replicas, whatever the parameter count P. The result is
    bit-identical to :func:`average` + :func:`outer_step` on whole vectors.

    With ``store``, the inputs' paths are on it and are read from it in ranged requests
    of ``chunk_bytes`` (an object store: memory stays O(chunk)); the outputs are local
    paths (:meth:`fleet.storage.Store.output`).

    Raises:
        LayoutMismatchError: an input's layout differs from the global pack's.
        DigestMismatchError, NonFiniteValuesError, ValuesLengthError, NotAPackError: an
            input is corrupt (the error names its path); nothing is published.
        ValueError: no replicas, or weights that sum to <= 0.
    """
    if not replicas or len(replicas) != len(weights):
        raise ValueError(f"{len(replicas)} replicas with {len(weights)} weights")
    if policy != "TrimmedMean":
        _weights(weights)  # refuse weights that cannot be normalised before reading
    started = time.perf_counter()
    n = max(1, chunk_bytes // 4)
    extra = {"inputs_digest": inputs_key} if inputs_key else None
    with ExitStack() as stack:
        # The arithmetic runs on one torch thread: the blocks are cache-sized, and the
        # reader thread prefetching the next row uses the other core (benchmarks/
        # outer_step.py measured torch's intra-op threads slowing this down).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        stack.callback(torch.set_num_threads, threads)

        # Global pack, replicas, momentum: each checked against its ref (layout hash,
        # digest, finite values) while read, and against the global pack's layout.
        inputs = [global_pack, *replicas, *([momentum] if momentum is not None else [])]
        readers: list[PackReader] = []
        for ref in inputs:
            checks: dict[str, Any] = {
                "check_finite": True,
                "layout_hash": ref.layout_hash,
                "values_digest": ref.values_digest,
            }
            reader = stack.enter_context(
                PackReader(ref.path, **checks)
                if store is None
                else store.pack_reader(
                    str(ref.path), block_size=max(chunk_bytes, 1 << 20), **checks
                )
            )
            if readers and reader.manifest.layout_hash != readers[0].manifest.layout_hash:
                raise LayoutMismatchError(
                    str(ref.path), reader.manifest.layout_hash, readers[0].manifest.layout_hash
                )
            readers.append(reader)
        theta_reader, like = readers[0], readers[0].manifest
        size = min(n, max(like.parameter_count, 1))
        rows = [[torch.empty(size, dtype=torch.float32) for _ in readers] for _ in range(2)]
        scratch = torch.empty(size, dtype=torch.float32)
        new_mom = torch.empty(size, dtype=torch.float32)
        global_sink = stack.enter_context(writing_pack(out_global, like, extra=extra))
        momentum_sink = stack.enter_context(writing_pack(out_momentum, like, extra=extra))

        def read_row(row: list[torch.Tensor]) -> list[torch.Tensor]:
            return [reader.read_into(block) for reader, block in zip(readers, row, strict=True)]

        # Double buffering: a thread reads (and hashes, and checks) the next row of blocks
        # while this one computes and writes the current row; file reads, xxhash and
        # torch all release the GIL.
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        pending = pool.submit(read_row, rows[0])
        count = 0
        while True:
            row = pending.result()
            if not row[0].numel():
                break
            count += 1
            if theta_reader.remaining:
                pending = pool.submit(read_row, rows[count % 2])
            else:
                pending = pool.submit(lambda: [torch.empty(0)])
            t, parts = row[0], row[1 : 1 + len(replicas)]
            m = row[-1] if momentum is not None else None
            k = t.numel()
            avg = _average_into(parts, weights, policy)
            new_theta = _step_into(t, avg, m, config, scratch[:k], new_mom[:k])
            global_sink.write(new_theta)
            momentum_sink.write(new_mom[:k])
        for reader in readers:
            reader.finish()
    assert global_sink.manifest is not None and momentum_sink.manifest is not None
    return OuterStepOutput(
        global_manifest=global_sink.manifest,
        momentum_manifest=momentum_sink.manifest,
        bytes_read=len(inputs) * like.values_nbytes,
        bytes_written=2 * like.values_nbytes,
        seconds=time.perf_counter() - started,
    )
