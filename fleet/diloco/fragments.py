"""Streaming DiLoCo's fragments: which values of the model each round synchronises, and
how a replica takes the global values of a fragment back into its own parameters.

Source: Douillard et al., "Streaming DiLoCo with overlapping communication: Towards a
Distributed Free Lunch", arXiv:2501.18512, section 2 and Algorithm 1 (torchft's
``_StreamingDiLoCoFragment``, ``fragment_update_alpha``). The model's values are split
into ``P`` fragments; round ``r`` synchronises fragment ``r mod P`` only, so each
fragment is synchronised every ``P`` rounds, staggered, and a round sends ``1/P`` of
the model. Between its synchronisations a fragment's values stay the replica's own.
When a fragment's outer step has been applied, the replica mixes its global values
into its own with weight ``alpha`` on its own::

    theta_i[f] = alpha * theta_i[f] + (1 - alpha) * theta[f]      (alpha = 0: replaced)

Here a fragment is a contiguous range of the pack's flat values (layout order,
docs/protocol.md section 4), not a group of layers as in the paper: the outer step and
the mixing are elementwise, so any partition gives the same algorithm, and a range
needs no layout to be recorded and balances the fragments' bytes exactly. Ranges start
at multiples of ``align`` values, so the codec's blocks and the outer step's chunks
never straddle two fragments.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from fleet.codec.codecs import ALIGN_NUMEL, codec_for
from fleet.errors import FragmentSplitError
from fleet.protocol import FragmentSpec

if TYPE_CHECKING:  # the orchestrator plans fragments without torch
    import torch

    from fleet.codec.manifest import PackManifest
    from fleet.diloco.config import DiLoCoConfig

__all__ = [
    "check_fragments",
    "fragment_align",
    "fragment_of_round",
    "fragment_range",
    "fragment_ranges",
    "fragment_spec",
    "fragments_to_mix",
    "mix_fragments",
    "write_mixed_pack",
]


def fragment_spec(config: DiLoCoConfig, round_index: int) -> FragmentSpec | None:
    """The fragment round ``round_index`` of a run synchronises (None: not streaming)."""
    streaming = config.streaming
    if streaming is None:
        return None
    return FragmentSpec(
        index=fragment_of_round(round_index, streaming.fragments),
        count=streaming.fragments,
        mixing=streaming.mixing,
    )


def check_fragments(config: DiLoCoConfig, parameter_count: int) -> None:
    """Check before a run's first round that its model splits into its fragments.

    Raises:
        FragmentSplitError: a fragment would be empty.
    """
    if config.streaming is not None:
        codec = config.pseudo_gradient
        fragment_ranges(parameter_count, config.streaming.fragments, codec.codec, codec.block_size)


def fragment_ranges(
    parameter_count: int, fragments: int, codec: str, block_size: int
) -> list[tuple[int, int]]:
    """Every fragment's values ``[start, stop)``, in order (:func:`fragment_range`), cut
    on blocks of the pseudo-gradient codec ``codec`` at ``block_size``.

    Raises:
        FragmentSplitError: a fragment would be empty.
    """
    align = fragment_align(codec_for(codec, block_size).align)
    return [fragment_range(parameter_count, fragments, i, align) for i in range(fragments)]


def fragment_align(codec_align: int) -> int:
    """Fragment boundaries fall on multiples of this many values: whole codec blocks
    and outer-step chunks."""
    return max(ALIGN_NUMEL, codec_align)


def fragment_range(parameter_count: int, fragments: int, index: int, align: int) -> tuple[int, int]:
    """The values ``[start, stop)`` of fragment ``index`` of ``fragments``: equal shares of
    ``parameter_count`` with every boundary rounded down to a multiple of ``align``
    (the last fragment takes the rest).

    Raises:
        FragmentSplitError: a fragment would be empty (fewer than ``fragments * align``
            values).
        ValueError: ``index`` is not below ``fragments``.
    """
    if not 0 <= index < fragments:
        raise ValueError(f"fragment {index} of {fragments}")

    def bound(k: int) -> int:
        return (
            parameter_count if k == fragments else parameter_count * k // fragments // align * align
        )

    start, stop = bound(index), bound(index + 1)
    if stop <= start:
        raise FragmentSplitError(parameter_count, fragments, align)
    return start, stop


def fragment_of_round(round_index: int, fragments: int) -> int:
    """The fragment round ``round_index`` synchronises."""
    return round_index % fragments


def fragments_to_mix(since_round: int | None, round_index: int, fragments: int) -> set[int]:
    """The fragments whose global values a replica starting round ``round_index`` from its
    parameters after round ``since_round`` must mix in: those synchronised in rounds
    ``since_round .. round_index - 1`` (every fragment when it has none of its own)."""
    if since_round is None or round_index - since_round >= fragments:
        return set(range(fragments))
    return {fragment_of_round(k, fragments) for k in range(since_round, round_index)}


def mix_fragments(
    own: torch.Tensor,
    global_values: torch.Tensor,
    ranges: list[tuple[int, int]],
    alpha: float,
) -> torch.Tensor:
    """``own[a:b] = alpha * own[a:b] + (1 - alpha) * global_values[a:b]`` for each range,
    in place (alpha 0: a copy, bit for bit); returns ``own``.

    Args:
        own, global_values: flat float32 ``[P]``.
        alpha: the weight kept on the replica's own values, in ``[0, 1)``.
    """
    from fleet.codec.pack import mix_values_  # torch: not for the orchestrator

    for start, stop in ranges:
        mix_values_(own[start:stop], global_values[start:stop], alpha)
    return own


def write_mixed_pack(
    out: Path,
    own: Path,
    global_pack: Path,
    ranges: list[tuple[int, int]],
    alpha: float,
    *,
    global_digest: str | None = None,
    chunk_numel: int = 1 << 18,
) -> PackManifest:
    """Publish at ``out`` the replica's own parameters (the v1 pack ``own``) with the
    values of ``ranges`` mixed in from ``global_pack`` (:func:`mix_fragments`), read and
    written ``chunk_numel`` values at a time: memory stays a few chunks whatever the
    model's size. Both inputs' digests and finiteness are checked as they are read.

    Raises:
        LayoutMismatchError: ``own`` has another layout than ``global_pack``.
        DigestMismatchError: ``global_pack`` is not ``global_digest``, or an input's
            values do not match its manifest; nothing is published.
        CodecError: an input is corrupt otherwise.
    """
    import torch

    from fleet.codec.pack import PackReader, writing_pack

    with ExitStack() as stack:
        theta = stack.enter_context(
            PackReader(global_pack, values_digest=global_digest, check_finite=True)
        )
        like = theta.manifest
        mine = stack.enter_context(PackReader(own, layout_hash=like.layout_hash, check_finite=True))
        sink = stack.enter_context(writing_pack(out, like))
        count = like.parameter_count
        size = min(chunk_numel, max(count, 1))
        theta_block, own_block = torch.empty(size), torch.empty(size)
        at = 0
        while at < count:
            k = min(size, count - at)
            global_values = theta.read_into(theta_block[:k])
            values = mine.read_into(own_block[:k])
            here = [
                (max(start, at) - at, min(stop, at + k) - at)
                for start, stop in ranges
                if start < at + k and stop > at
            ]
            sink.write(mix_fragments(values, global_values, here, alpha))
            at += k
        theta.finish()
        mine.finish()
    assert sink.manifest is not None
    return sink.manifest
