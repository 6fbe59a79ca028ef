"""What a DiLoCo replica publishes after its inner steps: its pseudo-gradient, encoded
(:mod:`fleet.codec.pseudo_gradient`), with error feedback.

With ``theta`` the round's global parameters, ``theta_i`` the replica's after its
inner steps and ``r`` the residual it carried from its last round (zero at first)::

    c  = (theta - theta_i) + r      what the replica means to send
    c^ = decode(encode(c))          what the outer step will read
    r' = c - c^                     kept by the replica for the next round

so the sum of what was sent tracks the sum of the true pseudo-gradients: the error
does not accumulate (Karimireddy et al. 2019, "Error Feedback Fixes SignSGD and other
Gradient Compression Schemes", arXiv:1901.09847; as in Streaming DiLoCo,
arXiv:2501.18512, and INTELLECT-1's int8 exchange). Streamed: memory O(chunk), every
input's digest checked while read.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from fleet.codec.codecs import Codec
from fleet.codec.manifest import PackManifest
from fleet.codec.pack import PackReader, writing_pack
from fleet.codec.pseudo_gradient import PseudoGradientManifest, writing_pseudo_gradient
from fleet.errors import LayoutMismatchError

#: Values encoded per step (a multiple of every power-of-two block size up to 2^16).
CHUNK_NUMEL = 1 << 18


@dataclass(frozen=True)
class Published:
    """The pseudo-gradient pack's manifest and the residual's (None without error feedback)."""

    pseudo_gradient: PseudoGradientManifest
    residual: PackManifest | None


def publish_pseudo_gradient(
    base: Path,
    trained: Path,
    out: Path,
    codec: Codec,
    *,
    residual: Path | None = None,
    out_residual: Path | None = None,
    base_digest: str | None = None,
    value_range: tuple[int, int] | None = None,
    chunk_numel: int = CHUNK_NUMEL,
) -> Published:
    """Encode ``base - trained`` (+ ``residual``) as a pseudo-gradient pack at ``out``
    and, with ``out_residual``, publish the new residual there (a v1 pack).

    With ``value_range`` ``(start, stop)`` (a Streaming DiLoCo fragment,
    :mod:`fleet.diloco.fragments`) only those values are encoded and sent; the
    residual keeps every value, the others carried unchanged (zero without one).

    Args:
        base: the round's global pack (local directory), its digest checked against
            ``base_digest``.
        trained: the replica's parameters after its inner steps (a local v1 pack).
        residual: the residual carried from the last round (a v1 pack), or None (zero).
        value_range: the values to send, ``[start, stop)``, ``start`` a multiple of the
            codec's alignment; None: all.
        chunk_numel: values per step; a multiple of the codec's alignment.

    Raises:
        LayoutMismatchError: the packs' layouts differ.
        CodecError: an input is corrupt; nothing is published.
    """
    if chunk_numel % codec.align:
        raise ValueError(f"chunk_numel {chunk_numel} is not a multiple of {codec.align}")
    with ExitStack() as stack:
        base_reader = stack.enter_context(
            PackReader(base, values_digest=base_digest, check_finite=True)
        )
        like = base_reader.manifest
        readers = [base_reader, stack.enter_context(PackReader(trained, check_finite=True))]
        if residual is not None:
            readers.append(stack.enter_context(PackReader(residual, check_finite=True)))
        for reader in readers[1:]:
            if reader.manifest.layout_hash != like.layout_hash:
                raise LayoutMismatchError(
                    str(reader.path), reader.manifest.layout_hash, like.layout_hash
                )
        count = like.parameter_count
        start, stop = value_range if value_range is not None else (0, count)
        if start % codec.align:
            raise ValueError(f"value range {value_range} does not start on a codec block")
        size = min(chunk_numel, max(count, 1))
        blocks = [torch.empty(size, dtype=torch.float32) for _ in readers]
        zeros = torch.zeros(size, dtype=torch.float32)
        sink = stack.enter_context(
            writing_pseudo_gradient(
                out, like, codec, base_values_digest=like.values_digest, value_range=value_range
            )
        )
        residual_sink = (
            stack.enter_context(writing_pack(out_residual, like))
            if out_residual is not None
            else None
        )
        for first, last, sent_here in (
            (0, start, False),
            (start, stop, True),
            (stop, count, False),
        ):
            left = last - first
            while left:
                k = min(size, left)
                theta, local, *carried = (
                    r.read_into(b[:k]) for r, b in zip(readers, blocks, strict=True)
                )
                left -= k
                if not sent_here:  # another fragment's values: its residual waits
                    if residual_sink is not None:
                        residual_sink.write(carried[0] if carried else zeros[:k])
                    continue
                intended = theta.sub_(local)
                if carried:
                    intended.add_(carried[0])
                sent = sink.write(intended)
                if residual_sink is not None:
                    residual_sink.write(intended.sub_(sent))
        for reader in readers:
            reader.finish()
    assert sink.manifest is not None
    return Published(sink.manifest, residual_sink.manifest if residual_sink else None)
