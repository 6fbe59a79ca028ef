"""Pseudo-gradient packs, format ``fleet-pseudo-gradient-v1`` (docs/protocol.md section
4.4): a replica's ``delta = global - local`` after its inner steps, encoded smaller than
its float32 parameters, for the outer step of DiLoCo (arXiv:2311.08105).

A pack directory holds ``manifest.json`` (written last), ``values.bin`` (the encoded
values, in layout order) and, for ``int8``, ``scales.f32le`` (one float32 scale per
block of ``block_size`` values). Codecs, with ``x`` a float32 value:

- ``fp16``: IEEE binary16 little-endian (2 bytes; relative error <= 2^-11 for
  2^-14 <= |x| < 65504, absolute error <= 2^-25 below: small deltas lose precision).
- ``bf16``: bfloat16 little-endian (2 bytes; relative error <= 2^-8, float32's range).
- ``int8``: blockwise absmax (as OpenDiLoCo/INTELLECT-1's int8 all-reduce):
  ``scale_b = max|x| / 127`` per block, ``q = round(x / scale_b)`` in ``[-127, 127]``;
  decoded ``q * scale_b`` (absolute error <= ``scale_b / 2``). 1 byte + 4/block_size.

- ``fp32``: IEEE binary32 little-endian (4 bytes, exact). A synchronous run's exact
  exchange sends no pseudo-gradient pack (the replica publishes its parameters as a v1
  pack and the outer step forms the pseudo-gradient itself, bit for bit as the 2023
  algorithm); an overlapped run (:mod:`fleet.diloco.pipeline`) sends ``fp32``
  pseudo-gradients, relative to each replica's own start point.

``values_digest`` is xxh3_64 over the bytes of
``values.bin`` then ``scales.f32le``; ``base_values_digest`` names the global pack the
delta is relative to.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, cast

import torch
import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet.codec.manifest import DIGEST_ALGORITHM, MANIFEST_FILE, PackManifest
from fleet.errors import (
    DigestMismatchError,
    ManifestError,
    NonFiniteValuesError,
    UnknownPackFormatError,
    ValuesLengthError,
)
from fleet.storage.local import publishing

if TYPE_CHECKING:
    from fleet.codec.pack import PackReader

PSEUDO_GRADIENT_FORMAT_V1 = "fleet-pseudo-gradient-v1"
VALUES_BIN = "values.bin"
SCALES_FILE = "scales.f32le"
#: Codecs of pseudo-gradient packs.
Codec = Literal["fp32", "fp16", "bf16", "int8"]
_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
#: Bytes per encoded value.
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
_RAW_DTYPE = {"fp32": torch.int32, "fp16": torch.int16, "bf16": torch.int16}
_INT8_MAX = 127.0


class PseudoGradientManifest(BaseModel):
    """``manifest.json`` of a pseudo-gradient pack."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format: Literal["fleet-pseudo-gradient-v1"]
    codec: Codec
    block_size: int | None = Field(default=None, ge=1)
    """Values per scale (``int8`` only)."""
    model_schema_hash: str
    layout_hash: str
    parameter_count: int = Field(ge=0, strict=True)
    values_file: str = VALUES_BIN
    scales_file: str | None = None
    values_digest: str
    base_values_digest: str | None = None
    """The digest of the global pack ``delta`` is relative to."""
    layout: list[dict[str, Any]] | None = None

    @property
    def values_nbytes(self) -> int:
        return self.parameter_count * ITEMSIZE[self.codec]

    @property
    def scales_nbytes(self) -> int:
        if self.codec != "int8" or self.block_size is None:
            return 0
        return 4 * math.ceil(self.parameter_count / self.block_size)

    @property
    def exchange_bytes(self) -> int:
        """Bytes a reader fetches: values and scales (the manifest aside)."""
        return self.values_nbytes + self.scales_nbytes


def is_pseudo_gradient(raw: object) -> bool:
    """True if a parsed ``manifest.json`` is a pseudo-gradient pack's."""
    return isinstance(raw, dict) and raw.get("format") == PSEUDO_GRADIENT_FORMAT_V1


def parse_pseudo_gradient_manifest(raw: object, where: str) -> PseudoGradientManifest:
    """Validate a parsed ``manifest.json``.

    Raises:
        UnknownPackFormatError: another format.
        ManifestError: a key missing or mistyped, or a file name that is not plain.
    """
    if not is_pseudo_gradient(raw):
        fmt = raw.get("format") if isinstance(raw, dict) else None
        raise UnknownPackFormatError(where, str(fmt), PSEUDO_GRADIENT_FORMAT_V1)
    try:
        manifest = PseudoGradientManifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ManifestError(where, ".".join(map(str, first["loc"])) or None, first["msg"]) from exc
    for name in (manifest.values_file, manifest.scales_file):
        if name is not None and (not name or "/" in name or name in (".", "..")):
            raise ManifestError(where, "values_file", f"{name!r} is not a plain file name")
    if manifest.codec == "int8" and (manifest.block_size is None or manifest.scales_file is None):
        raise ManifestError(where, "block_size", "int8 needs block_size and scales_file")
    return manifest


# --------------------------------------------------------------------------- codecs


def encode(
    block: torch.Tensor, codec: Codec, block_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode float32 ``[k]`` (``k`` a multiple of ``block_size``, or the last block):
    the values (int8, float16 or bfloat16 ``[k]``) and, for int8, float32 scales
    ``[ceil(k / block_size)]``."""
    if codec != "int8":
        return block.to(_DTYPES[codec]), None
    k = block.numel()
    blocks = math.ceil(k / block_size)
    padded = block
    if blocks * block_size != k:
        padded = torch.zeros(blocks * block_size, dtype=torch.float32)
        padded[:k] = block
    rows = padded.view(blocks, block_size)
    scales = rows.abs().amax(dim=1).div_(_INT8_MAX)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = rows.div(safe[:, None]).round_().clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q.view(-1)[:k], scales


def decode_into(
    values: torch.Tensor, scales: torch.Tensor | None, block_size: int, out: torch.Tensor
) -> torch.Tensor:
    """Decode ``values`` (and int8 ``scales``) into float32 ``out[:k]``; return it."""
    k = values.numel()
    target = out[:k]
    if scales is None:
        return target.copy_(values)
    blocks = scales.numel()
    full = min(k // block_size, blocks)
    if full:
        body = target[: full * block_size].view(full, block_size)
        body.copy_(values[: full * block_size].view(full, block_size))
        body.mul_(scales[:full, None])
    if full * block_size < k:
        tail = target[full * block_size :]
        tail.copy_(values[full * block_size :]).mul_(scales[full])
    return target


# --------------------------------------------------------------------------- write


class PseudoGradientSink:
    """Where :func:`writing_pseudo_gradient` takes float32 blocks of ``delta``: each block
    but the last a multiple of ``block_size`` values, in layout order."""

    def __init__(self, values: IO[bytes], scales: IO[bytes] | None, codec: Codec, block_size: int):
        self._values, self._scales = values, scales
        self.codec, self.block_size = codec, block_size
        self._hasher = xxhash.xxh3_64()
        self._scale_hasher = xxhash.xxh3_64()
        self.written = 0
        self.manifest: PseudoGradientManifest | None = None

    def write(self, block: torch.Tensor) -> torch.Tensor:
        """Encode and append ``block``; return its decoded values (what the outer step
        will read), float32 ``[k]``, for error feedback."""
        if self.codec == "int8" and self.written % self.block_size:
            raise ValueError("only the last block may be a partial int8 block")
        values, scales = encode(block, self.codec, self.block_size)
        data = _le_bytes(values)
        self._values.write(data)
        self._hasher.update(data)
        if scales is not None and self._scales is not None:
            scale_bytes = _le_bytes(scales)
            self._scales.write(scale_bytes)
            self._scale_hasher.update(scale_bytes)
        self.written += block.numel()
        return decode_into(values, scales, self.block_size, torch.empty_like(block))

    @property
    def digest(self) -> str:
        combined = xxhash.xxh3_64(self._hasher.digest() + self._scale_hasher.digest())
        return f"{DIGEST_ALGORITHM}:{combined.hexdigest()}"


def _le_bytes(tensor: torch.Tensor) -> memoryview:
    """The little-endian bytes of a CPU tensor (2-byte floats as their int16 bits)."""
    t = tensor.contiguous()
    if t.element_size() == 2:
        t = t.view(torch.int16)  # numpy has no bfloat16
    array = t.numpy()
    if sys.byteorder != "little" and t.element_size() > 1:
        array = array.byteswap()
    return memoryview(cast(Any, array)).cast("B")


@contextmanager
def writing_pseudo_gradient(
    path: Path,
    like: PackManifest,
    codec: Codec,
    *,
    block_size: int = 256,
    base_values_digest: str | None = None,
) -> Iterator[PseudoGradientSink]:
    """Write a pseudo-gradient pack with the layout of ``like`` block by block; published
    atomically when the block ends (``sink.manifest`` then holds its manifest).

    Raises:
        ValueError: fewer or more values than the layout has.
        StorageError: the file system failed; nothing is published then.
    """
    with publishing(path, mkdir=True, replace_dir=lambda p: (p / MANIFEST_FILE).is_file()) as tmp:
        scales_name = SCALES_FILE if codec == "int8" else None
        with open(tmp / VALUES_BIN, "wb") as values:
            scales = open(tmp / scales_name, "wb") if scales_name else None  # noqa: SIM115
            try:
                sink = PseudoGradientSink(values, scales, codec, block_size)
                yield sink
            finally:
                if scales is not None:
                    scales.close()
        if sink.written != like.parameter_count:
            raise ValueError(
                f"{sink.written} values written, the layout has {like.parameter_count}"
            )
        manifest = PseudoGradientManifest(
            format="fleet-pseudo-gradient-v1",
            codec=codec,
            block_size=block_size if codec == "int8" else None,
            model_schema_hash=like.model_schema_hash,
            layout_hash=like.layout_hash,
            parameter_count=like.parameter_count,
            scales_file=scales_name,
            values_digest=sink.digest,
            base_values_digest=base_values_digest,
            layout=like.layout,
        )
        text = json.dumps(manifest.model_dump(mode="json", exclude_none=True), indent=2)
        (tmp / MANIFEST_FILE).write_text(text, "utf-8")
    sink.manifest = manifest


# --------------------------------------------------------------------------- read


class PseudoGradientReader:
    """Reads a pseudo-gradient pack's decoded values in order, block by block, checking
    the digest and (if asked) finiteness as it reads; the same interface as
    :class:`~fleet.codec.pack.PackReader` (``manifest``, ``remaining``, ``read_into``,
    ``finish``). It closes the files it is given.

    Raises (:meth:`finish`):
        DigestMismatchError: the bytes do not hash to ``values_digest``.
        NonFiniteValuesError: ``check_finite`` and a decoded value is NaN or infinite.
    """

    def __init__(
        self,
        manifest: PseudoGradientManifest,
        values: IO[bytes],
        scales: IO[bytes] | None,
        where: str,
        *,
        check_finite: bool = True,
    ) -> None:
        self.manifest = manifest
        self.path = where
        self.remaining = manifest.parameter_count
        self._values, self._scales = values, scales
        self._check_finite = check_finite
        self._hasher, self._scale_hasher = xxhash.xxh3_64(), xxhash.xxh3_64()
        self._bad = 0
        self._itemsize = ITEMSIZE[manifest.codec]
        self.block_size = manifest.block_size or 1

    def _read(self, f: IO[bytes], nbytes: int, name: str, expected: int) -> bytes:
        parts, got = [], 0
        while got < nbytes:
            data = f.read(nbytes - got)
            if not data:
                raise ValuesLengthError(f"{self.path}/{name}", expected, got)
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def read_into(self, out: torch.Tensor) -> torch.Tensor:
        """Decode the next ``min(out.numel(), remaining)`` values into float32 ``out``
        (for int8, ``out.numel()`` a multiple of ``block_size``); return the filled part."""
        m = self.manifest
        n = min(out.numel(), self.remaining)
        data = self._read(self._values, n * self._itemsize, m.values_file, m.values_nbytes)
        self._hasher.update(data)
        scales = None
        if m.codec == "int8":
            assert self._scales is not None and m.scales_file is not None
            count = math.ceil(n / self.block_size)
            raw = self._read(self._scales, 4 * count, m.scales_file, m.scales_nbytes)
            self._scale_hasher.update(raw)
            scales = torch.frombuffer(bytearray(raw), dtype=torch.float32)
            values = torch.frombuffer(bytearray(data), dtype=torch.int8)
        else:
            raw_dtype = _RAW_DTYPE[m.codec]
            values = torch.frombuffer(bytearray(data), dtype=raw_dtype).view(_DTYPES[m.codec])
        block = decode_into(values, scales, self.block_size, out.view(-1))
        if self._check_finite and not math.isfinite(float(block.sum())):
            self._bad += int((~torch.isfinite(block)).sum())
        self.remaining -= n
        return block

    def finish(self) -> None:
        expected = self.manifest.values_digest
        combined = xxhash.xxh3_64(self._hasher.digest() + self._scale_hasher.digest())
        actual = f"{DIGEST_ALGORITHM}:{combined.hexdigest()}"
        if actual != expected:
            raise DigestMismatchError(f"{self.path}/{self.manifest.values_file}", expected, actual)
        if self._bad:
            raise NonFiniteValuesError(f"{self.path}/{self.manifest.values_file}", self._bad, -1)

    def close(self) -> None:
        self._values.close()
        if self._scales is not None:
            self._scales.close()

    def __enter__(self) -> PseudoGradientReader:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.close()
        if exc_type is None and self.remaining == 0:
            self.finish()


def open_reader(
    path: Path,
    *,
    check_finite: bool = False,
    layout_hash: str | None = None,
    values_digest: str | None = None,
) -> PackReader | PseudoGradientReader:
    """A reader of the local pack directory ``path``, v1 or pseudo-gradient (see
    :meth:`fleet.storage.Store.pack_reader` for packs on a store).

    Raises:
        CodecError: not a readable pack, or not the one the ref recorded.
    """
    from fleet.codec.pack import PackReader, check_expected

    try:
        raw = json.loads((path / MANIFEST_FILE).read_bytes())
    except (OSError, ValueError):
        raw = None
    if not is_pseudo_gradient(raw):
        return PackReader(
            path, check_finite=check_finite, layout_hash=layout_hash, values_digest=values_digest
        )
    manifest = parse_pseudo_gradient_manifest(raw, str(path / MANIFEST_FILE))
    check_expected(manifest, path, layout_hash=layout_hash, values_digest=values_digest)  # type: ignore[arg-type]
    values = open(path / manifest.values_file, "rb")  # noqa: SIM115
    scales = open(path / manifest.scales_file, "rb") if manifest.scales_file else None  # noqa: SIM115
    return PseudoGradientReader(manifest, values, scales, str(path), check_finite=check_finite)
