"""Parameter packs, format v1: write, read, load (docs/protocol.md section 4).

A pack is a directory with ``values.f32le`` (every included floating tensor as
float32, little-endian, C order, concatenated in layout order, no header) and
``manifest.json``. fleet adds two manifest keys that other readers ignore:

- ``values_digest``: ``"xxh3_64:<16 hex>"``, a content digest of ``values.f32le``;
- ``layout``: the layout entries ``[{name, shape, dtype, numel}]``, so a pack can be
  inspected or converted without the model at hand.

Writes stream tensor by tensor (extra memory: one conversion chunk, not a model copy)
and publish atomically: temp directory in the same parent, fsync, rename. Loads read
straight into the target tensors' memory where dtype and device allow, otherwise
through one reusable float32 staging buffer.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from io import FileIO
from pathlib import Path
from typing import Any, cast

import torch
import xxhash

from fleet.codec.filter import FilterLike, as_filter
from fleet.codec.layout import Layout, layout_and_tensors
from fleet.codec.manifest import (
    DIGEST_ALGORITHM,
    MANIFEST_FILE,
    PACK_FORMAT_V1,
    VALUES_FILE,
    PackManifest,
    PathLike,
    _values_file,
    read_manifest,
)
from fleet.errors import (
    CodecError,
    DigestMismatchError,
    LayoutMismatchError,
    ManifestError,
    NonFiniteValuesError,
    ValuesLengthError,
    storage_error,
)
from fleet.files import publishing

#: Elements converted per chunk when a tensor is not already float32 on the CPU
#: (4 MiB of float32). Bounds the writer's extra memory.
CONVERT_CHUNK_NUMEL = 1 << 20

_LITTLE_ENDIAN = sys.byteorder == "little"


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, sharing its memory (no copy)."""
    return memoryview(cast(Any, tensor.numpy())).cast("B")


# --------------------------------------------------------------------------- write


def _float32_chunks(tensor: torch.Tensor, staging: torch.Tensor) -> Iterator[memoryview]:
    """Bytes of ``tensor`` as float32 little-endian C order, in chunks.

    A contiguous float32 CPU tensor is yielded in place (no copy); anything else is
    converted ``CONVERT_CHUNK_NUMEL`` elements at a time through ``staging``.
    """
    tensor = tensor.detach()
    if tensor.numel() == 0:
        return
    if (
        _LITTLE_ENDIAN
        and tensor.device.type == "cpu"
        and tensor.dtype == torch.float32
        and tensor.is_contiguous()
    ):
        yield _bytes_of(tensor)
        return
    flat = tensor.reshape(-1)  # a view when contiguous; one tensor copy otherwise
    for start in range(0, flat.numel(), CONVERT_CHUNK_NUMEL):
        part = flat[start : start + CONVERT_CHUNK_NUMEL]
        out = staging[: part.numel()]
        out.copy_(part)
        array = out.numpy()
        if not _LITTLE_ENDIAN:
            array = array.byteswap()
        yield memoryview(cast(Any, array)).cast("B")


def is_pack(path: Path) -> bool:
    """True if ``path`` is a pack directory (it has a ``manifest.json``)."""
    return _is_pack(path)


def _is_pack(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and (path / MANIFEST_FILE).is_file()


def write_pack(
    path: PathLike,
    state: Any,
    model_schema_hash: str,
    *,
    state_dict_filter: FilterLike = None,
    digest: bool = True,
) -> PackManifest:
    """Write ``state`` as a v1 pack at directory ``path`` and return its manifest.

    Streams tensor by tensor: a contiguous float32 CPU tensor is written from its own
    memory, others (float16, bfloat16, float64, CUDA, non-contiguous) are converted in
    chunks of ``CONVERT_CHUNK_NUMEL`` elements, so peak extra memory is about one
    tensor, not a model copy. Publication is atomic: a reader sees either the old pack
    (or none) or the complete new one; an exception leaves no pack and no temp dir.

    Args:
        path: pack directory to create (its parent is created if missing); an existing
            pack there is replaced.
        state: ``nn.Module``, ``{"model": m, ...}``, ``{"modules": {...}}`` or
            ``{name: Tensor}``.
        model_schema_hash: opaque schema id recorded in the manifest.
        state_dict_filter: which floating keys to include (None: all).
        digest: record an ``xxh3_64`` content digest of ``values.f32le``.

    Raises:
        UnsupportedStateError: ``state`` cannot be walked.
        CodecError: ``path`` exists and is not a pack.
        StorageError: the file system failed (``StorageFullError`` when it is full; both
            are also ``OSError``); nothing is published then.
    """
    layout, tensors = layout_and_tensors(state, state_dict_filter)
    staging = torch.empty(
        min(CONVERT_CHUNK_NUMEL, max((t.numel() for t in tensors), default=0)),
        dtype=torch.float32,
    )
    chunks = (chunk for tensor in tensors for chunk in _float32_chunks(tensor, staging))
    return _publish_pack(
        Path(path), chunks, lambda d: _manifest_for(layout, model_schema_hash, d), digest=digest
    )


def _publish_pack(
    dest: Path,
    chunks: Iterable[memoryview],
    manifest_for: Callable[[str | None], PackManifest],
    *,
    digest: bool = True,
) -> PackManifest:
    """Write ``chunks`` as ``values.f32le`` and ``manifest_for(values_digest)`` as
    ``manifest.json`` and publish the pack at ``dest`` atomically
    (:func:`fleet.storage.publishing`); an existing pack there is replaced.

    Raises:
        CodecError: ``dest`` exists and is not a pack.
        StorageError: the file system failed; nothing is published then.
    """
    if (dest.exists() or dest.is_symlink()) and not _is_pack(dest):
        raise CodecError(f"refusing to replace {dest}: it exists and is not a pack", path=str(dest))
    with publishing(dest, mkdir=True, replace_dir=_is_pack) as tmp:
        hasher = xxhash.xxh3_64() if digest else None
        with open(tmp / VALUES_FILE, "wb", buffering=0) as f:
            for chunk in chunks:
                _write_all(f, chunk)
                if hasher is not None:
                    hasher.update(chunk)
        manifest = manifest_for(f"{DIGEST_ALGORITHM}:{hasher.hexdigest()}" if hasher else None)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest.to_json(), indent=2), "utf-8")
    return manifest


def _write_all(f: FileIO, data: memoryview) -> None:
    written = 0
    while written < len(data):
        n = f.write(data[written:])
        written += n or 0


def _manifest_for(
    layout: Layout, model_schema_hash: str, values_digest: str | None
) -> PackManifest:
    return PackManifest(
        format=PACK_FORMAT_V1,
        model_schema_hash=model_schema_hash,
        layout_hash=layout.layout_hash,
        parameter_count=layout.parameter_count,
        values_f32_le=VALUES_FILE,
        state_dict_filter=layout.state_dict_filter,
        included_keys=list(layout.included_keys),
        excluded_float_keys=list(layout.excluded_float_keys),
        ignored_non_float_keys=list(layout.ignored_non_float_keys),
        values_digest=values_digest,
        layout=[e.to_json() for e in layout.entries],
    )


class ValuesSink:
    """Where :func:`writing_pack` takes blocks of values: :meth:`write` each in order."""

    def __init__(self, f: FileIO, parameter_count: int, where: str = "") -> None:
        self._f = f
        self._where = where
        self._hasher = xxhash.xxh3_64()
        self.expected = parameter_count
        self.written = 0
        self.manifest: PackManifest | None = None

    def write(self, block: torch.Tensor) -> None:
        """Append ``block`` (a contiguous float32 CPU tensor) to the values.

        Raises:
            ValueError: not contiguous float32 on the CPU, or more values than the layout has.
        """
        if not (block.dtype == torch.float32 and block.device.type == "cpu"):
            raise ValueError(
                f"blocks must be float32 on the CPU, got {block.dtype} on {block.device}"
            )
        if self.written + block.numel() > self.expected:
            raise ValueError(f"more than the layout's {self.expected} values")
        if not _LITTLE_ENDIAN:
            block = torch.from_numpy(block.numpy().byteswap())
        data = _bytes_of(block.contiguous())
        try:
            _write_all(self._f, data)
        except OSError as exc:  # typed here: an enclosing writer must not claim it
            raise storage_error(exc, self._where) from exc
        self._hasher.update(data)
        self.written += block.numel()

    @property
    def digest(self) -> str:
        return f"{DIGEST_ALGORITHM}:{self._hasher.hexdigest()}"


@contextmanager
def writing_pack(
    path: PathLike,
    like: PackManifest,
    *,
    model_schema_hash: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Iterator[ValuesSink]:
    """Write a pack with the layout of ``like`` block by block: the block yields a
    :class:`ValuesSink`; write ``like.parameter_count`` float32 values to it, in order.
    The values are hashed as they are written (no second pass); when the block ends
    the pack is published atomically and ``sink.manifest`` holds its manifest. Extra
    manifest keys go in ``extra``. An exception publishes nothing.

    Raises:
        ValueError: fewer or more values than the layout has, or a block that is not
            float32 on the CPU.
        CodecError: ``path`` exists and is not a pack.
        StorageError: the file system failed.
    """
    dest = Path(path)
    if (dest.exists() or dest.is_symlink()) and not _is_pack(dest):
        raise CodecError(f"refusing to replace {dest}: it exists and is not a pack", path=str(dest))
    with publishing(dest, mkdir=True, replace_dir=_is_pack) as tmp:
        with open(tmp / VALUES_FILE, "wb", buffering=0) as f:
            sink = ValuesSink(f, like.parameter_count, str(dest))
            yield sink
        if sink.written != like.parameter_count:
            raise ValueError(
                f"{sink.written} values written, the layout has {like.parameter_count}"
            )
        update: dict[str, Any] = {
            "values_f32_le": VALUES_FILE,
            "values_digest": sink.digest,
            "model_schema_hash": model_schema_hash or like.model_schema_hash,
            **(extra or {}),
        }
        manifest = like.model_copy(update=update)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest.to_json(), indent=2), "utf-8")
    sink.manifest = manifest


def write_values_pack(
    path: PathLike,
    values: torch.Tensor,
    like: PackManifest,
    *,
    model_schema_hash: str | None = None,
) -> PackManifest:
    """Publish flat ``values`` (float32 ``[parameter_count]``) as a pack with the layout
    of ``like`` (same layout hash, keys and entries), atomically, with a digest.

    Raises:
        ValueError: ``values`` is not a contiguous float32 CPU tensor of
            ``like.parameter_count`` elements.
    """
    if not (
        values.dtype == torch.float32
        and values.device.type == "cpu"
        and values.is_contiguous()
        and values.numel() == like.parameter_count
    ):
        raise ValueError(
            f"values must be contiguous float32 CPU [{like.parameter_count}], got "
            f"{values.dtype} {tuple(values.shape)} on {values.device}"
        )
    with writing_pack(path, like, model_schema_hash=model_schema_hash) as sink:
        sink.write(values)
    assert sink.manifest is not None
    return sink.manifest


# --------------------------------------------------------------------------- read


def _readinto_exact(f: Any, buffer: memoryview, path: Path, expected_bytes: int) -> None:
    got = 0
    while got < len(buffer):
        n = f.readinto(buffer[got:])
        if not n:
            raise ValuesLengthError(str(path), expected_bytes, f.tell())
        got += n


def check_expected(
    manifest: PackManifest,
    path: PathLike,
    *,
    layout_hash: str | None = None,
    values_digest: str | None = None,
) -> None:
    """Check a manifest against what a reference to it recorded (a PackRef's layout hash
    and digest): a replaced or mislabelled pack is refused before its values are read.

    Raises:
        LayoutMismatchError: the layout hash differs (pack's, then the expected one).
        DigestMismatchError: the recorded digest differs (expected, then the manifest's).
    """
    if layout_hash is not None and manifest.layout_hash != layout_hash:
        raise LayoutMismatchError(str(path), manifest.layout_hash, layout_hash)
    if values_digest is not None and manifest.values_digest != values_digest:
        raise DigestMismatchError(str(path), values_digest, str(manifest.values_digest))


class PackReader:
    """Reads a pack's values in order, block by block, and checks them while reading: the
    content digest (against the manifest's ``values_digest``) and, if asked, that every
    value is finite. Nothing is read twice.

    Use as a context manager; :meth:`read_into` fills blocks; :meth:`finish` (called on
    a clean exit once every value was read) raises if a check failed.

    Args:
        path: the pack directory.
        verify: check the content digest (when the manifest records one).
        check_finite: refuse NaN and infinite values.
        layout_hash / values_digest: what a reference to the pack recorded, checked
            against the manifest first (see :func:`check_expected`).
        manifest / file: the manifest and an open values file, for a pack that is not a
            local directory (:meth:`fleet.storage.Store.pack_reader`; ``path`` then only
            names it in errors). The reader closes ``file``.

    Raises:
        NotAPackError, ManifestError, UnknownPackFormatError: see :func:`read_manifest`.
        ValuesLengthError: ``values.f32le`` is not ``4 * parameter_count`` bytes.
        LayoutMismatchError, DigestMismatchError: see :func:`check_expected`.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        verify: bool = True,
        check_finite: bool = False,
        layout_hash: str | None = None,
        values_digest: str | None = None,
        manifest: PackManifest | None = None,
        file: Any = None,
    ) -> None:
        self.path = Path(path)
        self.manifest = manifest if manifest is not None else read_manifest(self.path)
        check_expected(self.manifest, path, layout_hash=layout_hash, values_digest=values_digest)
        if file is None:
            self.values_path = _values_file(self.path, self.manifest)
        else:
            self.values_path = Path(f"{path}/{self.manifest.values_f32_le}")
        self.remaining = self.manifest.parameter_count
        self._verify = verify and self.manifest.values_digest is not None
        self._check_finite = check_finite
        self._hasher = xxhash.xxh3_64()
        self._bad_count, self._first_bad, self._offset = 0, -1, 0
        self._file: Any = (
            file if file is not None else open(self.values_path, "rb", buffering=0)  # noqa: SIM115
        )

    def read_into(self, out: torch.Tensor) -> torch.Tensor:
        """Read the next ``min(out.numel(), remaining)`` values into ``out`` (a contiguous
        float32 CPU tensor); return the filled part."""
        n = min(out.numel(), self.remaining)
        block = out.view(-1)[:n]
        _readinto_exact(self._file, _bytes_of(block), self.values_path, self.manifest.values_nbytes)
        if not _LITTLE_ENDIAN:
            block.copy_(torch.from_numpy(block.numpy().byteswap()))
        self._scan(block)
        self.remaining -= n
        return block

    def _scan(self, block: torch.Tensor) -> None:
        if self._verify:
            self._hasher.update(_bytes_of(block))
        # a finite sum means no NaN or Inf (both propagate); only a block whose sum is
        # not finite (or overflowed) is scanned element by element
        if self._check_finite and not math.isfinite(float(block.sum())):
            finite = torch.isfinite(block)
            if not bool(finite.all()):
                bad = (~finite).nonzero()
                if self._first_bad < 0:
                    self._first_bad = self._offset + int(bad[0, 0])
                self._bad_count += bad.shape[0]
        self._offset += block.numel()

    def finish(self) -> None:
        """Check what was read.

        Raises:
            DigestMismatchError: the values do not hash to the manifest's digest.
            NonFiniteValuesError: ``check_finite`` and a value is NaN or infinite.
            ManifestError: the manifest names an unknown digest algorithm.
        """
        path = str(self.values_path)
        if self._verify:
            expected = self.manifest.values_digest or ""
            if expected.split(":", 1)[0] != DIGEST_ALGORITHM:
                raise ManifestError(
                    path, "values_digest", f"unknown digest algorithm in {expected!r}"
                )
            actual = f"{DIGEST_ALGORITHM}:{self._hasher.hexdigest()}"
            if actual != expected:
                raise DigestMismatchError(path, expected, actual)
        if self._bad_count:
            raise NonFiniteValuesError(path, self._bad_count, self._first_bad)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> PackReader:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.close()
        if exc_type is None and self.remaining == 0:
            self.finish()


def read_pack(
    path: PathLike,
    *,
    verify: bool = False,
    check_finite: bool = False,
    mmap: bool = False,
    out: torch.Tensor | None = None,
    layout_hash: str | None = None,
    values_digest: str | None = None,
) -> tuple[PackManifest, torch.Tensor]:
    """Read a pack as its manifest and flat values.

    Returns:
        ``(manifest, values)``; ``values`` is float32, shape ``[parameter_count]``,
        read with one ``readinto`` (or memory-mapped copy-on-write when ``mmap``), the
        digest and finiteness checked on the bytes as they were read.

    Args:
        verify: check the ``values_digest`` when the manifest has one.
        check_finite: raise if any value is NaN or infinite.
        mmap: map the file copy-on-write instead of reading it (pages load on touch).
        out: a preallocated contiguous float32 CPU tensor of ``parameter_count``
            elements to read into (saves the allocation and its page faults when
            packs of one layout are read repeatedly); returned as ``values``.
        layout_hash / values_digest: what a PackRef recorded, checked against the
            manifest before any value is read.

    Raises:
        NotAPackError, ManifestError, UnknownPackFormatError: see :func:`read_manifest`.
        ValuesLengthError: ``values.f32le`` is not ``4 * parameter_count`` bytes.
        LayoutMismatchError, DigestMismatchError: see :func:`check_expected`.
        ValueError: ``out`` has the wrong size, dtype, device or is not contiguous.
        DigestMismatchError: ``verify`` and the content digest differs.
        NonFiniteValuesError: ``check_finite`` and a value is NaN or infinite.
    """
    with PackReader(
        path,
        verify=verify,
        check_finite=check_finite,
        layout_hash=layout_hash,
        values_digest=values_digest,
    ) as reader:
        n = reader.manifest.parameter_count
        if out is not None and not (
            out.numel() == n
            and out.dtype == torch.float32
            and out.device.type == "cpu"
            and out.is_contiguous()
        ):
            raise ValueError(
                f"out must be a contiguous float32 CPU tensor of {n} elements, got "
                f"{out.dtype} {tuple(out.shape)} on {out.device}"
            )
        if mmap and n and out is None:
            values = torch.from_file(
                str(reader.values_path), shared=False, size=n, dtype=torch.float32
            )
            if not _LITTLE_ENDIAN:
                values = torch.from_numpy(values.numpy().byteswap())
            reader._scan(values)
            reader.remaining = 0
        else:
            values = torch.empty(n, dtype=torch.float32) if out is None else out.view(-1)
            reader.read_into(values)
    return reader.manifest, values


def _direct(tensor: torch.Tensor) -> bool:
    """True if pack bytes can be read straight into ``tensor``'s memory."""
    return (
        _LITTLE_ENDIAN
        and tensor.device.type == "cpu"
        and tensor.dtype == torch.float32
        and tensor.is_contiguous()
    )


def _tensors_for(
    pack: Path, manifest: PackManifest, state: Any, state_dict_filter: FilterLike
) -> tuple[list[torch.Tensor], Path]:
    """The tensors of ``state`` the pack's values fill, in layout order (by
    ``state_dict_filter``, else the manifest's), and the pack's values file.

    Raises:
        LayoutMismatchError: ``state``'s layout is not the pack's.
        ValuesLengthError: the values file's length is not the manifest's.
        UnsupportedStateError: ``state`` cannot be walked.
    """
    sdf = as_filter(
        state_dict_filter if state_dict_filter is not None else manifest.state_dict_filter
    )
    layout, tensors = layout_and_tensors(state, sdf)
    if layout.layout_hash != manifest.layout_hash:
        raise LayoutMismatchError(str(pack), manifest.layout_hash, layout.layout_hash)
    return tensors, _values_file(pack, manifest)


def load_pack_into(
    path: PathLike,
    state: Any,
    *,
    state_dict_filter: FilterLike = None,
    verify: bool = False,
    check_finite: bool = False,
    layout_hash: str | None = None,
    values_digest: str | None = None,
) -> PackManifest:
    """Load the pack at ``path`` into ``state`` in place; return its manifest.

    Each included tensor gets its values cast back to its own dtype and device. Without
    checks, a contiguous float32 CPU tensor is filled by ``readinto`` straight into its
    memory and others go through one float32 staging buffer the size of the largest
    such tensor. With ``verify`` or ``check_finite`` the values file is first read
    through once in blocks of ``CONVERT_CHUNK_NUMEL`` (hashed and checked, nothing
    kept), then, from the same open file, into the tensors: no float32 copy of the
    model is staged (it would be 28 GB at 7B parameters). Either way a failed load
    leaves ``state`` unchanged.

    Args:
        state: ``nn.Module``, ``{"model": m, ...}``, ``{"modules": {...}}`` or
            ``{name: Tensor}``; its layout must hash to the pack's ``layout_hash``.
        state_dict_filter: filter that selects the target tensors; None uses the
            filter recorded in the manifest (or all keys if none is recorded).
        verify: check the content digest.
        check_finite: refuse a pack with NaN or infinite values.
        layout_hash / values_digest: what a PackRef recorded (see :func:`check_expected`).

    Raises:
        NotAPackError, ManifestError, UnknownPackFormatError: see :func:`read_manifest`.
        LayoutMismatchError: with both layout hashes.
        ValuesLengthError, DigestMismatchError, NonFiniteValuesError: see :func:`read_pack`.
        UnsupportedStateError: ``state`` cannot be walked.
    """
    pack = Path(path)
    manifest = read_manifest(pack)
    check_expected(manifest, pack, layout_hash=layout_hash, values_digest=values_digest)
    tensors, values_path = _tensors_for(pack, manifest, state, state_dict_filter)
    with open(values_path, "rb", buffering=0) as f:
        if verify or check_finite:
            checked = os.fdopen(os.dup(f.fileno()), "rb", buffering=0)
            with PackReader(
                pack, verify=verify, check_finite=check_finite, manifest=manifest, file=checked
            ) as reader:
                block = torch.empty(min(CONVERT_CHUNK_NUMEL, max(reader.remaining, 1)))
                while reader.remaining:
                    reader.read_into(block)
            f.seek(0)
        _read_into_tensors(f, tensors, values_path, manifest.values_nbytes)
    return manifest


def mix_values_(own: torch.Tensor, other: torch.Tensor, alpha: float) -> torch.Tensor:
    """``own = alpha * own + (1 - alpha) * other``, in place (alpha 0: a copy of
    ``other``, bit for bit); returns ``own``. Streaming DiLoCo's fragment mix
    (arXiv:2501.18512 section 2.2), the one formula every mixing path uses.

    Args:
        own, other: tensors of one shape, dtype and device.
        alpha: the weight kept on ``own``, in ``[0, 1)``.
    """
    if alpha == 0.0:
        return own.copy_(other)
    return own.mul_(alpha).add_(other.mul(1.0 - alpha))


def mix_range_into(
    path: PathLike,
    state: Any,
    value_range: tuple[int, int],
    alpha: float,
    *,
    state_dict_filter: FilterLike = None,
) -> None:
    """Mix the pack's flat values ``[start, stop)`` into the same values of ``state``, in
    place: ``own = alpha * own + (1 - alpha) * pack`` (alpha 0: a copy, bit for bit);
    Streaming DiLoCo's fragment mix (arXiv:2501.18512; :mod:`fleet.diloco.fragments`)
    into a model between two inner steps. Only the range is read (4 bytes a value) and
    checked finite; the digest is not (use it on a pack this process wrote or checked).
    Each tensor keeps its dtype and device.

    Raises:
        NotAPackError, ManifestError, ValuesLengthError: see :func:`read_manifest`.
        LayoutMismatchError: ``state``'s layout is not the pack's.
        NonFiniteValuesError: a NaN or infinite value in the range (``state`` unchanged).
        ValueError: the range is not within the pack.
    """
    pack = Path(path)
    manifest = read_manifest(pack)
    start, stop = value_range
    if not 0 <= start <= stop <= manifest.parameter_count:
        raise ValueError(f"values [{start}, {stop}) of a {manifest.parameter_count}-value pack")
    tensors, values_path = _tensors_for(pack, manifest, state, state_dict_filter)
    values = torch.empty(stop - start, dtype=torch.float32)
    with open(values_path, "rb", buffering=0) as f:
        f.seek(4 * start)
        _readinto_exact(f, _bytes_of(values), values_path, manifest.values_nbytes)
    if not _LITTLE_ENDIAN:
        values = torch.from_numpy(values.numpy().byteswap())
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0, 0]) + start
        raise NonFiniteValuesError(str(values_path), int((~finite).sum()), first)
    offset = 0
    with torch.no_grad():
        for tensor in tensors:
            n = tensor.numel()
            a, b = max(start, offset), min(stop, offset + n)
            if a < b:
                target = tensor.detach()
                flat = target.view(-1) if target.is_contiguous() else target.reshape(-1).clone()
                piece = values[a - start : b - start].to(device=flat.device, dtype=flat.dtype)
                mix_values_(flat[a - offset : b - offset], piece, alpha)
                if not target.is_contiguous():
                    target.copy_(flat.view(target.shape))
            offset += n


def _read_into_tensors(f: Any, tensors: list[torch.Tensor], values_path: Path, nbytes: int) -> None:
    """Fill ``tensors`` in order from the values file ``f``: float32 CPU contiguous ones
    straight into their memory, others through one staging buffer."""
    staged = [t.numel() for t in tensors if not _direct(t)]
    staging = torch.empty(max(staged, default=0), dtype=torch.float32)
    staging_bytes = _bytes_of(staging)
    with torch.no_grad():
        for tensor in tensors:
            n = tensor.numel()
            if n == 0:
                continue
            target = tensor.detach()
            if _direct(target):
                _readinto_exact(f, _bytes_of(target), values_path, nbytes)
            else:
                _readinto_exact(f, staging_bytes[: 4 * n], values_path, nbytes)
                block = staging[:n]
                if not _LITTLE_ENDIAN:
                    block = torch.from_numpy(block.numpy().byteswap())
                target.copy_(block.view(target.shape))


__all__ = [
    "CONVERT_CHUNK_NUMEL",
    "MANIFEST_FILE",
    "PACK_FORMAT_V1",
    "VALUES_FILE",
    "PackManifest",
    "PackReader",
    "ValuesSink",
    "check_expected",
    "is_pack",
    "load_pack_into",
    "mix_range_into",
    "mix_values_",
    "read_manifest",
    "read_pack",
    "write_pack",
    "write_values_pack",
    "writing_pack",
]
