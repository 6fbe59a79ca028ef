"""Reading any pack format from wherever its files are: the codec knows the formats, a
:class:`FileSource` (a local directory, or a :class:`~fleet.storage.Store`) only moves
bytes. :func:`open_pack` streams a pack's values (v1, or a pseudo-gradient pack decoded
to float32) with its digest and finiteness checked while read; :func:`pack_files` says
which files a pack holds and how their digests make the pack's ``values_digest``, so a
store can fetch a pack of any format into its cache and verify it on the way in.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from fleet.codec.manifest import MANIFEST_FILE, PackManifest, _manifest_from_json
from fleet.codec.pseudo_gradient import (
    PseudoGradientReader,
    combine_digests,
    is_pseudo_gradient,
    parse_pseudo_gradient_manifest,
)
from fleet.errors import ManifestError, NotAPackError, ValuesLengthError

if TYPE_CHECKING:
    from fleet.codec.pack import PackReader


class FileSource(Protocol):
    """Where a pack's files are read from: paths are relative to the source, joined with
    ``/``. :class:`~fleet.storage.Store` is one (the shared root); :class:`LocalFiles`
    another (a local directory)."""

    url: str

    def read_bytes(self, rel: str) -> bytes:
        """The bytes of a file (FileNotFoundError if it is missing)."""

    def open_read(self, rel: str, *, block_size: int = 1 << 22) -> IO[bytes]:
        """A binary file object on a file (FileNotFoundError if it is missing)."""

    def size(self, rel: str) -> int:
        """A file's byte length (FileNotFoundError if it is missing)."""


class LocalFiles:
    """A local directory as a :class:`FileSource`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = str(self.root)

    def _path(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def read_bytes(self, rel: str) -> bytes:
        path = self._path(rel)
        if path.is_dir():
            raise FileNotFoundError(str(path))
        return path.read_bytes()

    def open_read(self, rel: str, *, block_size: int = 1 << 22) -> IO[bytes]:
        return open(self._path(rel), "rb", buffering=0)

    def size(self, rel: str) -> int:
        path = self._path(rel)
        if not path.is_file():
            raise FileNotFoundError(str(path))
        return path.stat().st_size


def read_manifest_json(source: FileSource, rel: str) -> Any:
    """The parsed ``manifest.json`` of the pack at ``rel``, of any format.

    Raises:
        NotAPackError: no manifest there.
        ManifestError: not JSON.
    """
    where = posixpath.join(rel, MANIFEST_FILE) if rel else MANIFEST_FILE
    try:
        data = source.read_bytes(where)
    except (FileNotFoundError, NotADirectoryError):
        raise NotAPackError(_where(source, rel), f"no {MANIFEST_FILE}") from None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(
            f"{_where(source, rel)}/{MANIFEST_FILE}", None, f"not valid JSON: {exc}"
        ) from exc


def _where(source: FileSource, rel: str) -> str:
    return f"{source.url}/{rel}" if rel else source.url


@dataclass(frozen=True)
class PackFiles:
    """What a pack holds: its manifest (v1 or pseudo-gradient), its data files ``(name,
    bytes)`` in digest order, and how their xxh3_64 digests (8 big-endian bytes each)
    make its ``values_digest`` (None: a v1 pack that records none)."""

    manifest: PackManifest | Any
    files: list[tuple[str, int]]
    values_digest: str | None
    combine: Callable[[list[bytes]], str]


def _v1_digest(parts: list[bytes]) -> str:
    from fleet.codec.manifest import DIGEST_ALGORITHM

    return f"{DIGEST_ALGORITHM}:{parts[0].hex()}"


def pack_files(raw: Any, where: str) -> PackFiles:
    """The files of a pack from its parsed ``manifest.json`` (any format).

    Raises:
        ManifestError, UnknownPackFormatError: an unreadable manifest.
    """
    if is_pseudo_gradient(raw):
        pg = parse_pseudo_gradient_manifest(raw, f"{where}/{MANIFEST_FILE}")
        return PackFiles(pg, pg.files(), pg.values_digest, combine_digests)
    manifest = _manifest_from_json(Path(f"{where}/{MANIFEST_FILE}"), raw)
    name = manifest.values_f32_le
    if "/" in name or name in ("", ".", ".."):
        raise ManifestError(f"{where}/{MANIFEST_FILE}", "values_f32_le", f"{name!r} is not plain")
    return PackFiles(manifest, [(name, manifest.values_nbytes)], manifest.values_digest, _v1_digest)


def open_pack(
    source: FileSource,
    rel: str,
    *,
    block_size: int = 1 << 22,
    check_finite: bool = False,
    layout_hash: str | None = None,
    values_digest: str | None = None,
) -> PackReader | PseudoGradientReader:
    """A reader streaming the pack at ``rel`` of ``source`` (ranged reads of
    ``block_size`` on a remote store), its digest checked while read: a
    :class:`~fleet.codec.pack.PackReader` for a v1 pack, a
    :class:`~fleet.codec.pseudo_gradient.PseudoGradientReader` (decoding to float32)
    for a pseudo-gradient pack. ``layout_hash`` and ``values_digest`` (what a PackRef
    recorded) are checked against the manifest before any value is read.

    Raises:
        NotAPackError: no manifest.
        ManifestError, UnknownPackFormatError: an unreadable manifest.
        ValuesLengthError: a data file of the wrong length.
        LayoutMismatchError, DigestMismatchError: not the pack the ref names.
    """
    from fleet.codec.pack import PackReader, check_expected

    where = _where(source, rel)
    spec = pack_files(read_manifest_json(source, rel), where)
    check_expected(spec.manifest, where, layout_hash=layout_hash, values_digest=values_digest)
    for name, nbytes in spec.files:
        try:
            size = source.size(posixpath.join(rel, name) if rel else name)
        except FileNotFoundError:
            size = 0
        if size != nbytes:
            raise ValuesLengthError(f"{where}/{name}", nbytes, size)
    opened = [
        source.open_read(posixpath.join(rel, name) if rel else name, block_size=block_size)
        for name, _ in spec.files
    ]
    if isinstance(spec.manifest, PackManifest):
        return PackReader(
            where,
            check_finite=check_finite,
            manifest=spec.manifest,
            file=opened[0],
        )
    return PseudoGradientReader(spec.manifest, opened, where, check_finite=check_finite)


def open_reader(
    path: Path,
    *,
    check_finite: bool = False,
    layout_hash: str | None = None,
    values_digest: str | None = None,
) -> PackReader | PseudoGradientReader:
    """A reader of the local pack directory ``path``, v1 or pseudo-gradient (see
    :func:`open_pack` for packs on a store).

    Raises:
        CodecError: not a readable pack, or not the one the ref recorded.
    """
    return open_pack(
        LocalFiles(path),
        "",
        check_finite=check_finite,
        layout_hash=layout_hash,
        values_digest=values_digest,
    )


__all__ = [
    "FileSource",
    "LocalFiles",
    "PackFiles",
    "open_pack",
    "open_reader",
    "pack_files",
    "read_manifest_json",
]
