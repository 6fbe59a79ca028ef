"""An overlapped DiLoCo replica's start point, computed on its worker (Kale et al. 2025,
"Eager Updates For Overlapped Communication and Computation in DiLoCo",
arXiv:2502.12996; docs/protocol.md section 5.2).

In an overlapped run the outer step of round ``r`` runs while round ``r + 1``'s inner
steps do, so a replica cannot start round ``r + 1`` from the global model
``theta(r + 1) = step(theta(r), delta(r); m(r))``. The outer step of round ``r - 1``
published the *prediction* ``P = step(theta(r), 0; m(r))``: where the global model
goes before round ``r``'s pseudo-gradients are known (the momentum's share of the
step). The *eager update* adds the replica's own fresh pseudo-gradient, its weight
``w`` in the average, at once; the other replicas' shares reach it through the global
model one round later. For an outer step linear in the pseudo-gradient (``theta' = f -
g * delta``: SGD, Nesterov) that is::

    start_i(r + 1) = step(theta(r), w * delta_i(r); m(r)) = P - g * w * delta_i(r)

(the naive one-step-delayed start, ``P`` alone, is worse: the paper). The replica's
pseudo-gradient is relative to its own start point; the outer step rebases it onto the
global model (``delta + theta - start``: :func:`fleet.diloco.outer.stream_outer_step`),
so the global model is the synchronous algorithm's ``theta - average`` of the replicas'
parameters wherever they started, and a start point that missed costs only the
distance it missed by. ``delta_i(r)`` above is the replica's pseudo-gradient as it
published it (relative to its own last start: a second-order difference). Streamed:
memory O(chunk), every input's digest and finiteness checked while read.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fleet.codec.manifest import PackManifest
from fleet.codec.pack import PackReader, writing_pack
from fleet.codec.pseudo_gradient import PseudoGradientReader
from fleet.errors import LayoutMismatchError
from fleet.protocol import EagerStart

if TYPE_CHECKING:
    from fleet.storage import PackRef, Store

#: Values per step (a multiple of every power-of-two int8 block size up to 2^16).
CHUNK_NUMEL = 1 << 18


def eager_start_point(
    store: Store, start: EagerStart, out: Path, *, chunk_numel: int = CHUNK_NUMEL
) -> PackManifest:
    """Write ``prediction - scale * fresh`` as a v1 pack at ``out`` (a local directory);
    return its manifest. Inputs are read from ``store`` (``fresh`` a pseudo-gradient
    pack of any codec, decoded to float32).

    Raises:
        LayoutMismatchError: the prediction is not a v1 pack, or the inputs' layouts
            differ.
        CodecError: an input is corrupt (the error names it); nothing is published.
    """

    with ExitStack() as stack:

        def reader(ref: PackRef) -> PackReader | PseudoGradientReader:
            opened = store.pack_reader(
                ref.path,
                block_size=max(4 * chunk_numel, 1 << 20),
                check_finite=True,
                layout_hash=ref.layout_hash,
                values_digest=ref.values_digest,
            )
            stack.callback(opened.close)
            return opened

        base = reader(start.prediction)
        like = base.manifest
        if not isinstance(like, PackManifest):
            raise LayoutMismatchError(start.prediction.path, "pseudo-gradient", "a v1 pack")
        fresh = None
        if start.fresh is not None:
            fresh = reader(start.fresh)
            if fresh.manifest.layout_hash != like.layout_hash:
                raise LayoutMismatchError(
                    start.fresh.path, fresh.manifest.layout_hash, like.layout_hash
                )
        size = min(chunk_numel, max(like.parameter_count, 1))
        block, scratch = torch.empty(size), torch.empty(size)
        sink = stack.enter_context(writing_pack(out, like))
        while base.remaining:
            theta = base.read_into(block)
            if fresh is not None:
                theta.sub_(fresh.read_into(scratch).mul_(start.scale))
            sink.write(theta)
        for r in (base, fresh):
            if r is not None:
                r.finish()
    assert sink.manifest is not None
    return sink.manifest
