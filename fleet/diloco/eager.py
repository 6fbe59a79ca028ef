"""An overlapped DiLoCo replica's start point, computed on its worker (Kale et al. 2025,
"Eager Updates For Overlapped Communication and Computation in DiLoCo",
arXiv:2502.12996; docs/protocol.md section 5.2).

In an overlapped run the outer step of round ``r - 1`` runs while round ``r``'s inner
steps do, so a replica cannot start round ``r`` from the global model ``theta(r)``.
The outer step of round ``r - 2`` published a *prediction* of it, the step applied once
more with its pseudo-gradient ``delta(r - 2)`` (the one-step-delayed estimate). The
replica corrects the prediction with its own fresh pseudo-gradient ``delta_i(r - 1)``
in place of its stale share ``w * delta_i(r - 2)``; for an outer step linear in the
pseudo-gradient (``theta' = f - g * delta``: SGD, Nesterov) that is::

    start_i(r) = prediction(r) - g * w * (delta_i(r - 1) - delta_i(r - 2))

(the ``eager`` update of the paper: each replica's own share of the outer gradient is
fresh, the others' one round late). Streamed: memory O(chunk), every input's digest
and finiteness checked while read.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fleet.codec.manifest import PackManifest
from fleet.codec.pack import PackReader, writing_pack
from fleet.errors import LayoutMismatchError
from fleet.protocol import EagerStart

if TYPE_CHECKING:
    from fleet.storage import PackRef, Store

#: Values per step (a multiple of every power-of-two int8 block size up to 2^16).
CHUNK_NUMEL = 1 << 18


def eager_start_point(
    store: Store, start: EagerStart, out: Path, *, chunk_numel: int = CHUNK_NUMEL
) -> PackManifest:
    """Write ``prediction - scale * (fresh - stale)`` as a v1 pack at ``out`` (a local
    directory); return its manifest. Inputs are read from ``store`` (``fresh`` and
    ``stale`` are pseudo-gradient packs of any codec, decoded to float32).

    Raises:
        LayoutMismatchError: the prediction is not a v1 pack, or the inputs' layouts
            differ.
        CodecError: an input is corrupt (the error names it); nothing is published.
    """

    def reader(ref: PackRef) -> PackReader:
        opened = store.pack_reader(
            ref.path,
            block_size=max(4 * chunk_numel, 1 << 20),
            check_finite=True,
            layout_hash=ref.layout_hash,
            values_digest=ref.values_digest,
        )
        return opened  # type: ignore[return-value]

    with ExitStack() as stack:
        base = stack.enter_context(reader(start.prediction))
        like = base.manifest
        if not isinstance(like, PackManifest):
            raise LayoutMismatchError(start.prediction.path, "pseudo-gradient", "a v1 pack")
        corrections = [
            stack.enter_context(reader(ref))
            for ref in (start.fresh, start.stale)
            if ref is not None
        ]
        for other in corrections:
            if other.manifest.layout_hash != like.layout_hash:
                raise LayoutMismatchError(
                    str(other.path), other.manifest.layout_hash, like.layout_hash
                )
        size = min(chunk_numel, max(like.parameter_count, 1))
        blocks = [torch.empty(size, dtype=torch.float32) for _ in range(1 + len(corrections))]
        sink = stack.enter_context(writing_pack(out, like))
        while base.remaining:
            theta = base.read_into(blocks[0])
            if corrections:
                fresh = corrections[0].read_into(blocks[1])
                if len(corrections) > 1:
                    fresh.sub_(corrections[1].read_into(blocks[2]))
                theta.sub_(fresh.mul_(start.scale))
            sink.write(theta)
        for r in (base, *corrections):
            r.finish()
    assert sink.manifest is not None
    return sink.manifest
