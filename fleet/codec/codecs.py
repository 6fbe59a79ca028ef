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

Blocks handed to :meth:`Codec.encode` hold a multiple of :attr:`Codec.align` values,
but for the last one. The registry imports no torch (an orchestrator validates codec
names without it); the codecs import it when they encode or decode.
"""

from __future__ import annotations

import math
import sys
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, cast

if TYPE_CHECKING:
    import torch

__all__ = [
    "BF16",
    "CODECS",
    "FP16",
    "FP32",
    "INT8",
    "SCALES_FILE",
    "VALUES_BIN",
    "Codec",
    "codec_for",
    "le_bytes",
]

VALUES_BIN = "values.bin"
SCALES_FILE = "scales.f32le"
_INT8_MAX = 127.0


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
    def decode_into(self, parts: list[bytes], out: torch.Tensor) -> torch.Tensor:
        """Decode ``parts`` (bytes of ``k`` values, per file) into float32 ``out[:k]``."""

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

    def decode_into(self, parts: list[bytes], out: torch.Tensor) -> torch.Tensor:
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

    def decode_into(self, parts: list[bytes], out: torch.Tensor) -> torch.Tensor:
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


#: Every codec, by name.
CODECS: dict[str, type[Codec]] = {c.name: c for c in (FP32, FP16, BF16, INT8)}


def codec_for(name: str, block_size: int = 256) -> Codec:
    """The codec called ``name``.

    Raises:
        ValueError: no such codec, or a block size that is not a power of two.
    """
    if name not in CODECS:
        raise ValueError(f"no codec {name!r} (known: {', '.join(sorted(CODECS))})")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    return CODECS[name](block_size)
