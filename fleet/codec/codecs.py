"""The value codecs of fleet's delta packs (docs/protocol.md section 4.4): how a block of
float32 values (a DiLoCo pseudo-gradient) is written in fewer bytes and read back.

A codec is an object, named in a registry (:data:`CODECS`, :func:`codec_for`), as the
outer optimizers are (:mod:`fleet.diloco.optim`). Each one writes the files it names
(:meth:`Codec.files`: ``values.bin`` and, for the scaled codecs, ``scales.f32le``),
encodes a block of float32 values into their bytes (:meth:`Codec.encode`) and decodes
them (:meth:`Codec.decode_into`). Every file is little-endian. With ``x`` a float32
value:

- ``fp32``: IEEE binary32 (4 bytes, exact).
- ``fp16``: IEEE binary16 (2 bytes; relative error <= 2^-11 for 2^-14 <= |x| < 65504,
  absolute error <= 2^-25 below: small values lose precision; 65504 and above overflow
  to infinity, which readers refuse as non-finite).
- ``bf16``: bfloat16 (2 bytes; relative error <= 2^-8, float32's range).
- ``int8``: blockwise absmax, as OpenDiLoCo's and INTELLECT-1's int8 all-reduce
  (arXiv:2407.07852, arXiv:2412.01152): ``scale_b = max|x| / 127`` per block of
  ``block_size`` values, ``q = round(x / scale_b)`` in ``[-127, 127]``; decoded
  ``q * scale_b`` (absolute error <= ``scale_b / 2``). 1 byte + ``4 / block_size``.
- ``topk``: sparse, as SparseLoCo (Sarfi et al. 2025, arXiv:2508.15706; Templar's
  Covenant-72B): per block of ``C = block_size`` values only the ``top_k`` largest
  ``|x|`` (default ``C / 16``, 6.25 %; a short last block of ``n`` values keeps
  ``ceil(n * top_k / C)``), each as its index in the block (``log2(C)`` bits,
  bit-packed) and 2 bits: its sign and whether it is among the larger half of the
  kept magnitudes; the block's two float32 scales are the mean ``|x|`` of each half.
  Decoded ``±scale`` at the kept indices, 0 elsewhere: the error is the unsent values
  in full plus the kept ones' distance to their half's mean, which error feedback
  carries into the next round (:mod:`fleet.diloco.exchange`). At ``C = 256``: 28
  bytes per block, 0.109 bytes a value; at ``C = 4096``: 456 bytes, 0.111.

Blocks handed to :meth:`Codec.encode` hold a multiple of :attr:`Codec.align` values,
but for the last one. The registry imports no torch (an orchestrator validates codec
names without it); the codecs import it when they encode or decode.
"""

from __future__ import annotations

import math
import sys
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, cast

from fleet.errors import CodecError, NonFiniteValuesError, ValuesLengthError

if TYPE_CHECKING:
    import torch

__all__ = [
    "BF16",
    "CODECS",
    "FP16",
    "FP32",
    "INT8",
    "SCALES_FILE",
    "TOPK",
    "TOPK_DENSITY",
    "VALUES_BIN",
    "Codec",
    "codec_for",
    "le_bytes",
]

#: Streamed values (the outer step's chunks, Streaming DiLoCo's fragment boundaries)
#: start at multiples of this many, SIMD-aligned offsets as the whole vector's.
ALIGN_NUMEL = 1024
VALUES_BIN = "values.bin"
SCALES_FILE = "scales.f32le"
_INT8_MAX = 127.0
#: ``topk`` keeps one value in this many by default (6.25 %): over 20 rounds of charlm
#: SparseLoCo's 1.56 % and 3.1 % lost 4-9 % of fp32's eval loss, this 1-3 % (with
#: error feedback and the outer lr times the replica count; docs/benchmarks.md).
#: Readers take ``top_k`` from the manifest: changing it changes no pack written.
TOPK_DENSITY = 16


def le_bytes(tensor: torch.Tensor) -> memoryview:
    """The little-endian bytes of a CPU tensor (2-byte floats as their int16 bits)."""
    import torch

    t = tensor.contiguous()
    if t.element_size() == 2:
        t = t.view(torch.int16)  # numpy has no bfloat16
    array = t.numpy()
    if sys.byteorder != "little" and t.element_size() > 1:
        array = array.byteswap()
    return memoryview(cast(Any, array)).cast("B")


class Codec(ABC):
    """How a delta pack's values are encoded (see the module docstring).

    Args:
        block_size: values per scale, for the scaled codecs (a power of two).
    """

    #: The name written in manifests and given on the command line.
    name: ClassVar[str]
    #: Bytes per encoded value (scales aside).
    itemsize: ClassVar[int]

    def __init__(self, block_size: int = 256) -> None:
        self.block_size = block_size

    @property
    def align(self) -> int:
        """Blocks given to :meth:`encode` hold a multiple of this many values (but the last)."""
        return 1

    def files(self, parameter_count: int) -> list[tuple[str, int]]:
        """``(file name, bytes)`` of each file a pack of ``parameter_count`` values holds."""
        return [(VALUES_BIN, parameter_count * self.itemsize)]

    def manifest_fields(self) -> dict[str, Any]:
        """What a manifest records besides ``codec`` to decode the values."""
        return {}

    def encoded_bytes(self, parameter_count: int) -> int:
        """Bytes of the files a pack of ``parameter_count`` values holds."""
        return sum(n for _, n in self.files(parameter_count))

    @abstractmethod
    def encode(self, block: torch.Tensor) -> list[memoryview]:
        """The bytes of float32 ``block`` ``[k]`` for each of :meth:`files`, in order."""

    @abstractmethod
    def decode_into(
        self, parts: list[bytes], out: torch.Tensor, *, where: str = ""
    ) -> torch.Tensor:
        """Decode ``parts`` (bytes of ``k`` values, per file) into float32 ``out[:k]``.

        ``where`` (the pack's directory) names the files in errors. A codec whose bytes
        do not give ``k`` (``topk``: a short last block) decodes ``k = out.numel()``.

        Raises:
            CodecError: bytes no encoder writes (``topk`` checks its own; the others'
                bytes all decode, and the reader checks their digest and finiteness).
        """

    def round_trip(self, block: torch.Tensor) -> torch.Tensor:
        """What a reader decodes of ``block``: float32 ``[k]`` (a new tensor)."""
        import torch

        parts = [bytes(p) for p in self.encode(block)]
        return self.decode_into(parts, torch.empty_like(block))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _Cast(Codec):
    """A codec that casts each value to a float type of ``itemsize`` bytes (torch's
    ``dtype``, read from memory as the integer type ``raw`` of its size)."""

    dtype: ClassVar[str]
    raw: ClassVar[str]

    def encode(self, block: torch.Tensor) -> list[memoryview]:
        import torch

        return [le_bytes(block.to(getattr(torch, self.dtype)))]

    def decode_into(
        self, parts: list[bytes], out: torch.Tensor, *, where: str = ""
    ) -> torch.Tensor:
        import torch

        data = parts[0]
        k = len(data) // self.itemsize
        raw = torch.frombuffer(bytearray(data), dtype=getattr(torch, self.raw))
        return out.view(-1)[:k].copy_(raw.view(getattr(torch, self.dtype)))


class FP32(_Cast):
    name = "fp32"
    itemsize = 4
    dtype = "float32"
    raw = "int32"


class FP16(_Cast):
    name = "fp16"
    itemsize = 2
    dtype = "float16"
    raw = "int16"


class BF16(_Cast):
    name = "bf16"
    itemsize = 2
    dtype = "bfloat16"
    raw = "int16"


class INT8(Codec):
    """Blockwise absmax int8 with a float32 scale per ``block_size`` values."""

    name = "int8"
    itemsize = 1

    @property
    def align(self) -> int:
        return self.block_size

    def files(self, parameter_count: int) -> list[tuple[str, int]]:
        scales = 4 * math.ceil(parameter_count / self.block_size)
        return [(VALUES_BIN, parameter_count), (SCALES_FILE, scales)]

    def manifest_fields(self) -> dict[str, Any]:
        return {"block_size": self.block_size, "scales_file": SCALES_FILE}

    def encode(self, block: torch.Tensor) -> list[memoryview]:
        import torch

        k = block.numel()
        blocks = math.ceil(k / self.block_size)
        padded = block
        if blocks * self.block_size != k:
            padded = torch.zeros(blocks * self.block_size, dtype=torch.float32)
            padded[:k] = block
        rows = padded.view(blocks, self.block_size)
        scales = rows.abs().amax(dim=1).div_(_INT8_MAX)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = rows.div(safe[:, None]).round_().clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
        return [le_bytes(q.view(-1)[:k]), le_bytes(scales)]

    def decode_into(
        self, parts: list[bytes], out: torch.Tensor, *, where: str = ""
    ) -> torch.Tensor:
        import torch

        values = torch.frombuffer(bytearray(parts[0]), dtype=torch.int8)
        scales = torch.frombuffer(bytearray(parts[1]), dtype=torch.float32)
        k = values.numel()
        target = out.view(-1)[:k]
        full = min(k // self.block_size, scales.numel())
        if full:
            n = full * self.block_size
            body = target[:n].view(full, self.block_size)
            body.copy_(values[:n].view(full, self.block_size))
            body.mul_(scales[:full, None])
        if full * self.block_size < k:
            target[full * self.block_size :].copy_(values[full * self.block_size :]).mul_(
                scales[full]
            )
        return target

    def __repr__(self) -> str:
        return f"INT8(block_size={self.block_size})"


def _pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[m, ceil(k * bits / 8)]``: the low ``bits`` bits of each of the int64
    ``codes`` ``[m, k]``, row by row, least significant bit first (the last byte's
    unused high bits zero)."""
    import torch

    m, k = codes.shape
    nbytes = -(-k * bits // 8)
    flat = torch.zeros(m, nbytes * 8, dtype=torch.uint8)
    if bits:
        shifts = torch.arange(bits, dtype=torch.int64)
        flat[:, : k * bits] = ((codes[:, :, None] >> shifts) & 1).view(m, k * bits)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int64)
    return (flat.view(m, nbytes, 8).to(torch.int64) * weights).sum(2).to(torch.uint8)


def _unpack_bits(data: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """int64 ``[m, k]``: the ``k`` codes of ``bits`` bits that :func:`_pack_bits` wrote
    in uint8 ``data`` ``[m, ceil(k * bits / 8)]``."""
    import torch

    m = data.shape[0]
    if not bits:
        return torch.zeros(m, k, dtype=torch.int64)
    flat = (data[:, :, None].to(torch.int64) >> torch.arange(8, dtype=torch.int64)) & 1
    grouped = flat.view(m, -1)[:, : k * bits].view(m, k, bits)
    return (grouped << torch.arange(bits, dtype=torch.int64)).sum(2)


class TOPK(Codec):
    """Top-k per block with 2-bit values, for error feedback to make up the rest
    (SparseLoCo, Sarfi et al. 2025, arXiv:2508.15706).

    A block is ``C = block_size`` values (a power of two); a full one keeps ``top_k``
    of them, a short last block of ``n`` values ``ceil(n * top_k / C)``. For a block
    that keeps ``k``, ``values.bin`` holds (``b = log2(C)``):

    - its ``k`` indices in the block, strictly ascending, ``b`` bits each, packed least
      significant bit first into ``ceil(k * b / 8)`` bytes;
    - then the ``k`` values' 2-bit codes, in the same order, packed 4 to a byte from
      the low bits (``ceil(k / 4)`` bytes): bit 0 the sign (1: negative), bit 1 the
      level (1: among the ``k - k // 2`` largest ``|x|`` kept, 0: the ``k // 2``
      others);

    and ``scales.f32le`` two float32 per block, ``[low, high]``: the mean ``|x|`` of
    each level's values (``low`` 0 when ``k`` is 1). Decoded: ``±low`` or ``±high`` at
    the kept indices, 0 at the others.

    Args:
        block_size: values per block ``C`` (a power of two).
        top_k: values kept per full block, 1 to ``C`` (None: ``max(1, C // 16)``,
            :data:`TOPK_DENSITY`).
    """

    name = "topk"
    itemsize = 0  # no fixed size: see files()

    def __init__(self, block_size: int = 256, top_k: int | None = None) -> None:
        super().__init__(block_size)
        self.top_k = max(1, block_size // TOPK_DENSITY) if top_k is None else top_k
        if not 1 <= self.top_k <= block_size:
            raise ValueError(f"top_k must be 1 to block_size {block_size}, got {self.top_k}")
        #: Bits of an index in a block.
        self.index_bits = block_size.bit_length() - 1

    @property
    def align(self) -> int:
        return self.block_size

    def kept(self, n: int) -> int:
        """Values kept of a block of ``n`` values (``1 <= n <= block_size``)."""
        return -(-n * self.top_k // self.block_size)

    def _record_bytes(self, k: int) -> int:
        """Bytes of ``values.bin`` for a block that keeps ``k`` values."""
        return -(-k * self.index_bits // 8) + -(-k // 4)

    def files(self, parameter_count: int) -> list[tuple[str, int]]:
        full, tail = divmod(parameter_count, self.block_size)
        values = full * self._record_bytes(self.top_k)
        if tail:
            values += self._record_bytes(self.kept(tail))
        return [(VALUES_BIN, values), (SCALES_FILE, 8 * (full + bool(tail)))]

    def manifest_fields(self) -> dict[str, Any]:
        return {"block_size": self.block_size, "top_k": self.top_k, "scales_file": SCALES_FILE}

    def _encode_rows(self, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``[m, record bytes]`` and float32 ``[m, 2]`` scales of float32 ``rows``
        ``[m, n]``, ``k`` values kept per row."""
        import torch

        m = rows.shape[0]
        magnitude, index = torch.topk(rows.abs(), k, dim=1)  # largest first
        high = k - k // 2
        scales = torch.zeros(m, 2, dtype=torch.float32)
        scales[:, 1] = magnitude[:, :high].mean(dim=1)
        if k > high:
            scales[:, 0] = magnitude[:, high:].mean(dim=1)
        rank_level = (torch.arange(k) < high).to(torch.int64).expand(m, k)
        index, order = index.sort(dim=1)
        negative = rows.gather(1, index) < 0
        codes = negative.to(torch.int64) | (rank_level.gather(1, order) << 1)
        record = torch.cat([_pack_bits(index, self.index_bits), _pack_bits(codes, 2)], dim=1)
        return record, scales

    def encode(self, block: torch.Tensor) -> list[memoryview]:
        import torch

        n = block.numel()
        full, tail = divmod(n, self.block_size)
        records, scales = [], []
        if full:
            rows = block[: full * self.block_size].view(full, self.block_size)
            record, scale = self._encode_rows(rows, self.top_k)
            records.append(record.view(-1))
            scales.append(scale.view(-1))
        if tail:
            record, scale = self._encode_rows(
                block[full * self.block_size :].view(1, tail), self.kept(tail)
            )
            records.append(record.view(-1))
            scales.append(scale.view(-1))
        if not records:
            return [memoryview(b""), memoryview(b"")]
        return [le_bytes(torch.cat(records)), le_bytes(torch.cat(scales))]

    def _decode_rows(
        self, records: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor, k: int, where: str
    ) -> None:
        """Scatter the ``k`` values per row of uint8 ``records`` ``[m, record bytes]``
        (float32 ``scales`` ``[m, 2]``) into the zeroed float32 ``rows`` ``[m, n]``."""
        import torch

        split = -(-k * self.index_bits // 8)
        index = _unpack_bits(records[:, :split], self.index_bits, k)
        codes = _unpack_bits(records[:, split:], 2, k)
        n = rows.shape[1]
        if k > 1 and not bool((index[:, 1:] > index[:, :-1]).all()):
            raise CodecError(
                f"topk indices not strictly ascending in a block of {where}", path=where
            )
        if int(index[:, -1].max()) >= n:
            raise CodecError(
                f"topk index {int(index[:, -1].max())} in a block of {n} values in {where}",
                path=where,
            )
        magnitude = scales.gather(1, codes >> 1)
        rows.scatter_(1, index, torch.where((codes & 1).bool(), -magnitude, magnitude))

    def decode_into(
        self, parts: list[bytes], out: torch.Tensor, *, where: str = ""
    ) -> torch.Tensor:
        """Decode ``out.numel()`` values (see :meth:`Codec.decode_into`).

        Raises:
            ValuesLengthError: a part is not the bytes :meth:`files` gives.
            NonFiniteValuesError: a scale is NaN or infinite.
            CodecError: an index beyond its block, or indices not strictly ascending.
        """
        import torch

        target = out.view(-1)
        n = target.numel()
        paths = [f"{where}/{name}" if where else name for name, _ in self.files(n)]
        for part, path, (_, expected) in zip(parts, paths, self.files(n), strict=True):
            if len(part) != expected:
                raise ValuesLengthError(path, expected, len(part))
        target.zero_()
        if not n:
            return target
        scales = torch.frombuffer(bytearray(parts[1]), dtype=torch.float32).view(-1, 2)
        bad = int((~torch.isfinite(scales)).sum())
        if bad:
            raise NonFiniteValuesError(paths[1], bad, -1)
        data = torch.frombuffer(bytearray(parts[0]), dtype=torch.uint8)
        full, tail = divmod(n, self.block_size)
        body = full * self._record_bytes(self.top_k)
        if full:
            rows = target[: full * self.block_size].view(full, self.block_size)
            records = data[:body].view(full, -1)
            self._decode_rows(records, scales[:full], rows, self.top_k, paths[0])
        if tail:
            rows = target[full * self.block_size :].view(1, tail)
            records = data[body:].view(1, -1)
            self._decode_rows(records, scales[full:], rows, self.kept(tail), paths[0])
        return target

    def __repr__(self) -> str:
        return f"TOPK(block_size={self.block_size}, top_k={self.top_k})"


#: Every codec, by name.
CODECS: dict[str, type[Codec]] = {c.name: c for c in (FP32, FP16, BF16, INT8, TOPK)}


def codec_for(name: str, block_size: int = 256, *, top_k: int | None = None) -> Codec:
    """The codec called ``name`` (``top_k``: values ``topk`` keeps per block; None, its
    default).

    Raises:
        ValueError: no such codec, a block size that is not a power of two, or a
            ``top_k`` outside 1 to ``block_size`` (or given to another codec).
    """
    if name not in CODECS:
        raise ValueError(f"no codec {name!r} (known: {', '.join(sorted(CODECS))})")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if name == TOPK.name:
        return TOPK(block_size, top_k)
    if top_k is not None:
        raise ValueError(f"top_k is for the topk codec, not {name}")
    return CODECS[name](block_size)
