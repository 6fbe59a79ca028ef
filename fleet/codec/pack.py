"""Parameter packs, format v1: write, read, load (PROTOCOL.md section 4).

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
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from io import FileIO
from pathlib import Path
from typing import Any, cast

import torch
import xxhash
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet.codec.layout import (
    FilterLike,
    Layout,
    LayoutEntry,
    StateDictFilter,
    as_filter,
    layout_and_tensors,
)
from fleet.errors import (
    CodecError,
    DigestMismatchError,
    LayoutMismatchError,
    ManifestError,
    NonFiniteValuesError,
    NotAPackError,
    UnknownPackFormatError,
    ValuesLengthError,
)

PACK_FORMAT_V1 = "burn-p2p-python-flattened-parameter-pack-v1"
MANIFEST_FILE = "manifest.json"
VALUES_FILE = "values.f32le"
DIGEST_ALGORITHM = "xxh3_64"

#: Elements converted per chunk when a tensor is not already float32 on the CPU
#: (4 MiB of float32). Bounds the writer's extra memory.
CONVERT_CHUNK_NUMEL = 1 << 20
#: Bytes per read when scanning values for the digest or non-finite check (16 MiB).
SCAN_CHUNK_BYTES = 16 << 20

_LITTLE_ENDIAN = sys.byteorder == "little"
PathLike = str | os.PathLike[str]


class PackManifest(BaseModel):
    """``manifest.json`` of a v1 pack. Unknown keys are kept (``extra="allow"``) and
    ignored; the last four protocol keys and fleet's own keys are optional."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format: str
    model_schema_hash: str
    layout_hash: str
    parameter_count: int = Field(ge=0, strict=True)
    values_f32_le: str
    state_dict_filter: StateDictFilter | None = None
    included_keys: list[str] | None = None
    excluded_float_keys: list[str] | None = None
    ignored_non_float_keys: list[str] | None = None
    values_digest: str | None = None
    layout: list[dict[str, Any]] | None = None

    @property
    def values_nbytes(self) -> int:
        """Expected byte length of ``values.f32le``: ``4 * parameter_count``."""
        return 4 * self.parameter_count

    def layout_entries(self) -> tuple[LayoutEntry, ...] | None:
        """The recorded layout entries, or None when the writer did not record them."""
        if self.layout is None:
            return None
        return tuple(
            LayoutEntry(e["name"], tuple(e["shape"]), e["dtype"], e["numel"]) for e in self.layout
        )

    def to_json(self) -> dict[str, Any]:
        """The manifest as written: protocol keys first, then fleet's, None values dropped."""
        data = self.model_dump(mode="json", exclude_none=True)
        if self.state_dict_filter is not None:
            data["state_dict_filter"] = self.state_dict_filter.to_json()
        return data


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, sharing its memory (no copy)."""
    return memoryview(cast(Any, tensor.numpy())).cast("B")


# --------------------------------------------------------------------------- manifest


def _manifest_from_json(path: Path, raw: object) -> PackManifest:
    if not isinstance(raw, dict):
        raise ManifestError(str(path), None, f"expected a JSON object, got {type(raw).__name__}")
    if "format" not in raw:
        raise ManifestError(str(path), "format", "missing")
    if raw["format"] != PACK_FORMAT_V1:
        raise UnknownPackFormatError(str(path), raw["format"], PACK_FORMAT_V1)
    try:
        manifest = PackManifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or None
        detail = "missing" if first["type"] == "missing" else first["msg"]
        raise ManifestError(str(path), key, detail) from exc
    name = manifest.values_f32_le
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ManifestError(str(path), "values_f32_le", f"{name!r} is not a plain file name")
    return manifest


def read_manifest(path: PathLike) -> PackManifest:
    """Read and validate ``manifest.json`` of the pack directory ``path``.

    Raises:
        NotAPackError: ``path`` is not a directory or has no ``manifest.json``.
        ManifestError: not JSON, not an object, a required key missing or mistyped.
        UnknownPackFormatError: ``format`` is not v1.
    """
    pack = Path(path)
    if not pack.is_dir():
        raise NotAPackError(
            str(pack), "no such directory" if not pack.exists() else "not a directory"
        )
    manifest_file = pack / MANIFEST_FILE
    try:
        text = manifest_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotAPackError(str(pack), f"no {MANIFEST_FILE}") from None
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(str(manifest_file), None, f"not valid JSON: {exc}") from exc
    return _manifest_from_json(manifest_file, raw)


def _values_file(pack: Path, manifest: PackManifest) -> Path:
    """Path of the values file, after checking its byte length against the manifest."""
    values = pack / manifest.values_f32_le
    try:
        size = values.stat().st_size
    except FileNotFoundError:
        raise ValuesLengthError(str(values), manifest.values_nbytes, 0) from None
    if size != manifest.values_nbytes:
        raise ValuesLengthError(str(values), manifest.values_nbytes, size)
    return values


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(tmp: Path, dest: Path) -> None:
    """Rename the finished pack directory ``tmp`` to ``dest`` (same parent), replacing
    an existing pack there, and fsync the parent.

    Raises:
        CodecError: ``dest`` exists and is not a pack.
    """
    if dest.exists() or dest.is_symlink():
        if not (dest.is_dir() and not dest.is_symlink() and (dest / MANIFEST_FILE).is_file()):
            raise CodecError(
                f"refusing to replace {dest}: it exists and is not a pack", path=str(dest)
            )
        aside = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex}")
        os.rename(dest, aside)
        os.rename(tmp, dest)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, dest)
    _fsync_dir(dest.parent)


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
        OSError: the file system failed (nothing is published then).
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
    ``manifest.json`` into a temp dir next to ``dest``, fsync both, and publish the
    directory atomically. On any exception the temp dir is removed and nothing is
    published."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        hasher = xxhash.xxh3_64() if digest else None
        with open(tmp / VALUES_FILE, "wb", buffering=0) as f:
            for chunk in chunks:
                _write_all(f, chunk)
                if hasher is not None:
                    hasher.update(chunk)
            os.fsync(f.fileno())
        manifest = manifest_for(f"{DIGEST_ALGORITHM}:{hasher.hexdigest()}" if hasher else None)
        with open(tmp / MANIFEST_FILE, "w", encoding="utf-8") as mf:
            json.dump(manifest.to_json(), mf, indent=2)
            mf.flush()
            os.fsync(mf.fileno())
        _fsync_dir(tmp)
        publish_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def write_values_pack(
    path: PathLike,
    values: torch.Tensor,
    like: PackManifest,
    *,
    model_schema_hash: str | None = None,
) -> PackManifest:
    """Publish flat ``values`` (float32 ``[parameter_count]``) as a pack with the layout
    of ``like`` (same layout hash, keys and entries), atomically, with a digest.

    Used for packs computed on flat values (e.g. DiLoCo's outer step).

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
    if not _LITTLE_ENDIAN:
        values = torch.from_numpy(values.numpy().byteswap())
    chunks = [_bytes_of(values)] if values.numel() else []

    def manifest_for(values_digest: str | None) -> PackManifest:
        return like.model_copy(
            update={
                "values_f32_le": VALUES_FILE,
                "values_digest": values_digest,
                "model_schema_hash": model_schema_hash or like.model_schema_hash,
            }
        )

    return _publish_pack(Path(path), chunks, manifest_for)


# --------------------------------------------------------------------------- read


def _readinto_exact(f: FileIO, buffer: memoryview, path: Path, expected_bytes: int) -> None:
    got = 0
    while got < len(buffer):
        n = f.readinto(buffer[got:])
        if not n:
            raise ValuesLengthError(str(path), expected_bytes, f.tell())
        got += n


def _check_values(
    values: torch.Tensor | Path,
    manifest: PackManifest,
    *,
    verify: bool,
    check_finite: bool,
) -> None:
    """Digest and non-finite checks over a flat float32 tensor or a values file."""
    want_digest = verify and manifest.values_digest is not None
    if not (want_digest or check_finite):
        return
    hasher = xxhash.xxh3_64()
    bad_count, first_bad = 0, -1

    def scan(block: torch.Tensor, offset: int) -> None:
        nonlocal bad_count, first_bad
        if want_digest:
            hasher.update(_bytes_of(block))
        if check_finite:
            finite = torch.isfinite(block)
            if not bool(finite.all()):
                bad = (~finite).nonzero()
                if first_bad < 0:
                    first_bad = offset + int(bad[0, 0])
                bad_count += bad.shape[0]

    path_str = str(values) if isinstance(values, Path) else "<values>"
    if isinstance(values, torch.Tensor):
        scan(values, 0)
    else:
        buf = torch.empty(min(SCAN_CHUNK_BYTES, manifest.values_nbytes) // 4, dtype=torch.float32)
        view = _bytes_of(buf)
        offset = 0
        with open(values, "rb", buffering=0) as f:
            while offset < manifest.parameter_count:
                n = min(buf.numel(), manifest.parameter_count - offset)
                _readinto_exact(f, view[: 4 * n], values, manifest.values_nbytes)
                scan(buf[:n], offset)
                offset += n
    if want_digest:
        actual = f"{DIGEST_ALGORITHM}:{hasher.hexdigest()}"
        expected = manifest.values_digest or ""
        if expected.split(":", 1)[0] != DIGEST_ALGORITHM:
            raise ManifestError(
                path_str, "values_digest", f"unknown digest algorithm in {expected!r}"
            )
        if actual != expected:
            raise DigestMismatchError(path_str, expected, actual)
    if bad_count:
        raise NonFiniteValuesError(path_str, bad_count, first_bad)


def read_pack(
    path: PathLike,
    *,
    verify: bool = False,
    check_finite: bool = False,
    mmap: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[PackManifest, torch.Tensor]:
    """Read a pack as its manifest and flat values.

    Returns:
        ``(manifest, values)``; ``values`` is float32, shape ``[parameter_count]``,
        read with one ``readinto`` (or memory-mapped copy-on-write when ``mmap``).

    Args:
        verify: check the ``values_digest`` when the manifest has one.
        check_finite: raise if any value is NaN or infinite.
        mmap: map the file copy-on-write instead of reading it (pages load on touch).
        out: a preallocated contiguous float32 CPU tensor of ``parameter_count``
            elements to read into (saves the allocation and its page faults when
            packs of one layout are read repeatedly); returned as ``values``.

    Raises:
        NotAPackError, ManifestError, UnknownPackFormatError: see :func:`read_manifest`.
        ValuesLengthError: ``values.f32le`` is not ``4 * parameter_count`` bytes.
        ValueError: ``out`` has the wrong size, dtype, device or is not contiguous.
        DigestMismatchError: ``verify`` and the content digest differs.
        NonFiniteValuesError: ``check_finite`` and a value is NaN or infinite.
    """
    pack = Path(path)
    manifest = read_manifest(pack)
    values_path = _values_file(pack, manifest)
    n = manifest.parameter_count
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
        values = torch.from_file(str(values_path), shared=False, size=n, dtype=torch.float32)
    else:
        values = torch.empty(n, dtype=torch.float32) if out is None else out.view(-1)
        with open(values_path, "rb", buffering=0) as f:
            _readinto_exact(f, _bytes_of(values), values_path, manifest.values_nbytes)
    if not _LITTLE_ENDIAN:
        values = torch.from_numpy(values.numpy().byteswap())
    try:
        _check_values(values, manifest, verify=verify, check_finite=check_finite)
    except CodecError as exc:
        exc.path = str(values_path)
        raise
    return manifest, values


def _direct(tensor: torch.Tensor) -> bool:
    """True if pack bytes can be read straight into ``tensor``'s memory."""
    return (
        _LITTLE_ENDIAN
        and tensor.device.type == "cpu"
        and tensor.dtype == torch.float32
        and tensor.is_contiguous()
    )


def load_pack_into(
    path: PathLike,
    state: Any,
    *,
    state_dict_filter: FilterLike = None,
    verify: bool = False,
    check_finite: bool = False,
) -> PackManifest:
    """Load the pack at ``path`` into ``state`` in place; return its manifest.

    Each included tensor gets its values cast back to its own dtype and device. A
    contiguous float32 CPU tensor is filled by ``readinto`` straight into its memory;
    others go through one float32 staging buffer the size of the largest such tensor.
    All checks run before the first tensor is touched, so a failed load leaves
    ``state`` unchanged.

    Args:
        state: ``nn.Module``, ``{"model": m, ...}``, ``{"modules": {...}}`` or
            ``{name: Tensor}``; its layout must hash to the pack's ``layout_hash``.
        state_dict_filter: filter that selects the target tensors; None uses the
            filter recorded in the manifest (or all keys if none is recorded).
        verify: check the content digest first (reads the values twice).
        check_finite: refuse a pack with NaN or infinite values.

    Raises:
        NotAPackError, ManifestError, UnknownPackFormatError: see :func:`read_manifest`.
        LayoutMismatchError: with both layout hashes.
        ValuesLengthError, DigestMismatchError, NonFiniteValuesError: see :func:`read_pack`.
        UnsupportedStateError: ``state`` cannot be walked.
    """
    pack = Path(path)
    manifest = read_manifest(pack)
    sdf = as_filter(
        state_dict_filter if state_dict_filter is not None else manifest.state_dict_filter
    )
    layout, tensors = layout_and_tensors(state, sdf)
    if layout.layout_hash != manifest.layout_hash:
        raise LayoutMismatchError(str(pack), manifest.layout_hash, layout.layout_hash)
    values_path = _values_file(pack, manifest)
    _check_values(values_path, manifest, verify=verify, check_finite=check_finite)
    staged = [t.numel() for t in tensors if not _direct(t)]
    staging = torch.empty(max(staged, default=0), dtype=torch.float32)
    staging_bytes = _bytes_of(staging)
    nbytes = manifest.values_nbytes
    with open(values_path, "rb", buffering=0) as f, torch.no_grad():
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
    return manifest


__all__ = [
    "CONVERT_CHUNK_NUMEL",
    "MANIFEST_FILE",
    "PACK_FORMAT_V1",
    "VALUES_FILE",
    "PackManifest",
    "load_pack_into",
    "publish_dir",
    "read_manifest",
    "read_pack",
    "write_pack",
    "write_values_pack",
]
