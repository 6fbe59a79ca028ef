"""Pseudo-gradient packs, format ``fleet-pseudo-gradient-v1`` (docs/protocol.md section
4.4): a DiLoCo replica's ``delta = global - local`` after its inner steps (plus its
error-feedback residual), encoded by a :class:`~fleet.codec.codecs.Codec` (int8 by
default) for the outer step (Douillard et al. 2023, arXiv:2311.08105).

A pack directory holds ``manifest.json`` (written last) and the files its codec names
(``values.bin``, and ``scales.f32le`` for int8 and topk), in layout order. ``values_digest`` is
``xxh3_64`` over the per-file xxh3_64 digests, each as 8 big-endian bytes, in the
codec's file order (:func:`combine_digests`; an absent scales file counts as the digest
of no bytes, so older fp32/fp16/bf16 packs keep their digests); ``base_values_digest``
names the global model the delta is relative to, and the outer step refuses a pack
whose base is not the global it steps from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any, Literal

import torch
import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleet.codec.codecs import CODECS, SCALES_FILE, VALUES_BIN, Codec, codec_for
from fleet.codec.manifest import DIGEST_ALGORITHM, MANIFEST_FILE, PackManifest
from fleet.errors import (
    DigestMismatchError,
    ManifestError,
    NonFiniteValuesError,
    UnknownPackFormatError,
    ValuesLengthError,
    storage_error,
)
from fleet.files import publishing

PSEUDO_GRADIENT_FORMAT_V1: Literal["fleet-pseudo-gradient-v1"] = "fleet-pseudo-gradient-v1"
_EMPTY = xxhash.xxh3_64().digest()


class PseudoGradientManifest(BaseModel):
    """``manifest.json`` of a pseudo-gradient pack."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format: Literal["fleet-pseudo-gradient-v1"]
    codec: str
    """A name in :data:`~fleet.codec.codecs.CODECS`."""
    block_size: int | None = Field(default=None, ge=1)
    """Values per scale (int8), per block (topk)."""
    top_k: int | None = Field(default=None, ge=1)
    """Values kept per full block (topk)."""
    model_schema_hash: str
    layout_hash: str
    parameter_count: int = Field(ge=0, strict=True)
    values_file: str = VALUES_BIN
    scales_file: str | None = None
    values_digest: str
    base_values_digest: str | None = None
    """The digest of the global model ``delta`` is relative to."""
    layout: list[dict[str, Any]] | None = None
    value_range: tuple[int, int] | None = None
    """The values of the layout this pack holds, ``[start, stop)`` in layout order (a
    Streaming DiLoCo fragment, docs/protocol.md section 4.4); None: all of them.
    ``parameter_count`` is then ``stop - start``."""

    @field_validator("codec")
    @classmethod
    def _known_codec(cls, value: str) -> str:
        if value not in CODECS:
            raise ValueError(f"unknown codec {value!r} (known: {', '.join(sorted(CODECS))})")
        return value

    @property
    def codec_object(self) -> Codec:
        """The codec that reads this pack's values."""
        top_k = self.top_k if self.codec == "topk" else None
        return codec_for(self.codec, self.block_size or 256, top_k=top_k)

    def files(self) -> list[tuple[str, int]]:
        """``(file name, bytes)`` of each data file, in digest order."""
        return self.codec_object.files(self.parameter_count)

    @property
    def exchange_bytes(self) -> int:
        """Bytes of the data files (what a reader fetches, the manifest aside)."""
        return sum(n for _, n in self.files())


def combine_digests(per_file: list[bytes]) -> str:
    """A pack's ``values_digest`` from its files' xxh3_64 digests (8 bytes each, in the
    codec's file order; a codec with one file is combined with the empty digest)."""
    parts = list(per_file) + [_EMPTY] * max(0, 2 - len(per_file))
    return f"{DIGEST_ALGORITHM}:{xxhash.xxh3_64(b''.join(parts)).hexdigest()}"


def is_pseudo_gradient(raw: object) -> bool:
    """True if a parsed ``manifest.json`` is a pseudo-gradient pack's."""
    return isinstance(raw, dict) and raw.get("format") == PSEUDO_GRADIENT_FORMAT_V1


def parse_pseudo_gradient_manifest(raw: object, where: str) -> PseudoGradientManifest:
    """Validate a parsed ``manifest.json``.

    Raises:
        UnknownPackFormatError: another format.
        ManifestError: a key missing or mistyped, an unknown codec, a file name that is
            not plain, or a block size or ``top_k`` the codec refuses.
    """
    if not is_pseudo_gradient(raw):
        fmt = raw.get("format") if isinstance(raw, dict) else None
        raise UnknownPackFormatError(where, str(fmt), PSEUDO_GRADIENT_FORMAT_V1)
    try:
        manifest = PseudoGradientManifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ManifestError(where, ".".join(map(str, first["loc"])) or None, first["msg"]) from exc
    names = [n for n in (manifest.values_file, manifest.scales_file) if n is not None]
    for name in names:
        if not name or "/" in name or name in (".", ".."):
            raise ManifestError(where, "values_file", f"{name!r} is not a plain file name")
    if manifest.value_range is not None:
        start, stop = manifest.value_range
        if not 0 <= start < stop or stop - start != manifest.parameter_count:
            raise ManifestError(
                where,
                "value_range",
                f"[{start}, {stop}) is not parameter_count {manifest.parameter_count} values",
            )
    if manifest.codec == "int8" and (manifest.block_size is None or manifest.scales_file is None):
        raise ManifestError(where, "block_size", "int8 needs block_size and scales_file")
    if manifest.codec == "topk" and None in (
        manifest.block_size,
        manifest.top_k,
        manifest.scales_file,
    ):
        raise ManifestError(where, "block_size", "topk needs block_size, top_k and scales_file")
    try:
        wanted = [name for name, _ in manifest.files()]
    except ValueError as exc:  # a block size that is not a power of two, top_k > block_size
        key = "top_k" if "top_k" in str(exc) else "block_size"
        raise ManifestError(where, key, str(exc)) from exc
    if names != wanted:
        raise ManifestError(
            where, "values_file", f"the {manifest.codec} codec writes {wanted}, not {names}"
        )
    return manifest


# --------------------------------------------------------------------------- write


class PseudoGradientSink:
    """Where :func:`writing_pseudo_gradient` takes float32 blocks of ``delta``: each block
    but the last a multiple of the codec's :attr:`~fleet.codec.codecs.Codec.align`
    values, in layout order."""

    def __init__(self, files: Sequence[IO[bytes]], codec: Codec, where: str = "") -> None:
        self._files = files
        self._where = where
        self.codec = codec
        self._hashers = [xxhash.xxh3_64() for _ in files]
        self.written = 0
        self.manifest: PseudoGradientManifest | None = None

    def write(self, block: torch.Tensor) -> torch.Tensor:
        """Encode and append ``block``; return its decoded values (what the outer step
        will read), float32 ``[k]``, for error feedback."""
        if self.written % self.codec.align:
            raise ValueError(f"only the last block may hold other than {self.codec.align}k values")
        parts = self.codec.encode(block)
        for f, hasher, data in zip(self._files, self._hashers, parts, strict=True):
            try:
                f.write(data)
            except OSError as exc:  # typed here: an enclosing writer must not claim it
                raise storage_error(exc, self._where) from exc
            hasher.update(data)
        self.written += block.numel()
        return self.codec.decode_into([bytes(p) for p in parts], torch.empty_like(block))

    @property
    def digest(self) -> str:
        return combine_digests([h.digest() for h in self._hashers])


@contextmanager
def writing_pseudo_gradient(
    path: Path,
    like: PackManifest,
    codec: Codec,
    *,
    base_values_digest: str | None = None,
    value_range: tuple[int, int] | None = None,
) -> Iterator[PseudoGradientSink]:
    """Write a pseudo-gradient pack with the layout of ``like`` block by block; published
    atomically when the block ends (``sink.manifest`` then holds its manifest). With
    ``value_range`` ``(start, stop)`` it holds only those values of the layout (a
    fragment), and ``stop - start`` are written.

    Raises:
        ValueError: fewer or more values than the layout (or the range) has, or a range
            outside the layout.
        StorageError: the file system failed; nothing is published then.
    """
    with publishing(path, mkdir=True, replace_dir=lambda p: (p / MANIFEST_FILE).is_file()) as tmp:
        count = like.parameter_count
        if value_range is not None:
            if not 0 <= value_range[0] < value_range[1] <= like.parameter_count:
                raise ValueError(f"value range {value_range} outside [0, {count})")
            count = value_range[1] - value_range[0]
        names = [name for name, _ in codec.files(count)]
        with ExitStack() as files:
            opened = [files.enter_context(open(tmp / name, "wb")) for name in names]
            sink = PseudoGradientSink(opened, codec, str(path))
            yield sink
        if sink.written != count:
            raise ValueError(f"{sink.written} values written, the pack holds {count}")
        manifest = PseudoGradientManifest(
            format=PSEUDO_GRADIENT_FORMAT_V1,
            codec=codec.name,
            model_schema_hash=like.model_schema_hash,
            layout_hash=like.layout_hash,
            parameter_count=count,
            values_digest=sink.digest,
            base_values_digest=base_values_digest,
            layout=like.layout,
            value_range=value_range,
            **codec.manifest_fields(),
        )
        text = json.dumps(manifest.model_dump(mode="json", exclude_none=True), indent=2)
        (tmp / MANIFEST_FILE).write_text(text, "utf-8")
    sink.manifest = manifest


# --------------------------------------------------------------------------- read


class PseudoGradientReader:
    """Reads a pseudo-gradient pack's decoded values in order, block by block, checking
    the digest and (if asked) finiteness as it reads; the same interface as
    :class:`~fleet.codec.pack.PackReader` (``manifest``, ``remaining``, ``read_into``,
    ``finish``). It closes the files it is given (one per :meth:`~PseudoGradientManifest.
    files` entry, in order).

    Raises (:meth:`read_into`):
        ValuesLengthError: a file ends early.
        CodecError: bytes the codec refuses (topk: an index beyond its block, a
            non-finite scale), before the digest is checked.

    Raises (:meth:`finish`):
        DigestMismatchError: the bytes do not hash to ``values_digest``.
        NonFiniteValuesError: ``check_finite`` and a decoded value is NaN or infinite.
    """

    def __init__(
        self,
        manifest: PseudoGradientManifest,
        files: Sequence[IO[bytes]],
        where: str,
        *,
        check_finite: bool = True,
    ) -> None:
        self.manifest = manifest
        self.codec = manifest.codec_object
        self.path = where
        self.remaining = manifest.parameter_count
        self._files = files
        self._specs = manifest.files()
        self._check_finite = check_finite
        self._hashers = [xxhash.xxh3_64() for _ in files]
        self._bad = 0
        self._offset = 0
        self.block_size = self.codec.align

    def _read(self, f: IO[bytes], nbytes: int, name: str, expected: int) -> bytes:
        parts, got = [], 0
        while got < nbytes:
            data = f.read(nbytes - got)
            if not data:
                raise ValuesLengthError(f"{self.path}/{name}", expected, got)
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def _part_bytes(self, index: int, n: int) -> int:
        """Bytes of file ``index`` that hold the next ``n`` values (reads start at a
        multiple of the codec's alignment)."""
        before = self.codec.files(self._offset)[index][1]
        return self.codec.files(self._offset + n)[index][1] - before

    def read_into(self, out: torch.Tensor) -> torch.Tensor:
        """Decode the next ``min(out.numel(), remaining)`` values into float32 ``out``
        (``out.numel()`` a multiple of the codec's alignment); return the filled part."""
        n = min(out.numel(), self.remaining)
        parts = []
        for index, (f, hasher, (name, expected)) in enumerate(
            zip(self._files, self._hashers, self._specs, strict=True)
        ):
            data = self._read(f, self._part_bytes(index, n), name, expected)
            hasher.update(data)
            parts.append(data)
        block = self.codec.decode_into(parts, out.view(-1)[:n], where=self.path)
        if self._check_finite and not math.isfinite(float(block.sum())):
            self._bad += int((~torch.isfinite(block)).sum())
        self.remaining -= n
        self._offset += n
        return block

    def finish(self) -> None:
        expected = self.manifest.values_digest
        actual = combine_digests([h.digest() for h in self._hashers])
        if actual != expected:
            raise DigestMismatchError(f"{self.path}/{self.manifest.values_file}", expected, actual)
        if self._bad:
            raise NonFiniteValuesError(f"{self.path}/{self.manifest.values_file}", self._bad, -1)

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> PseudoGradientReader:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.close()
        if exc_type is None and self.remaining == 0:
            self.finish()


__all__ = [
    "PSEUDO_GRADIENT_FORMAT_V1",
    "SCALES_FILE",
    "VALUES_BIN",
    "PseudoGradientManifest",
    "PseudoGradientReader",
    "PseudoGradientSink",
    "combine_digests",
    "is_pseudo_gradient",
    "parse_pseudo_gradient_manifest",
    "writing_pseudo_gradient",
]
