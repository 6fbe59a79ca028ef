"""The manifest side of a parameter pack, format v1 (docs/protocol.md section 4): layout
entries and their hash, ``manifest.json`` and the checks on it. Torch-free, so clients
and orchestrators can read and reason about packs without importing torch.

fleet adds two manifest keys that other readers ignore: ``values_digest``
(``"xxh3_64:<16 hex>"``, a content digest of ``values.f32le``) and ``layout`` (the
entries ``[{name, shape, dtype, numel}]``), so a pack can be checked, inspected or
converted without the model at hand.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet.codec.filter import StateDictFilter
from fleet.errors import ManifestError, NotAPackError, UnknownPackFormatError, ValuesLengthError

if TYPE_CHECKING:
    import torch

PACK_FORMAT_V1 = "burn-p2p-python-flattened-parameter-pack-v1"
MANIFEST_FILE = "manifest.json"
VALUES_FILE = "values.f32le"
DIGEST_ALGORITHM = "xxh3_64"
LAYOUT_HASH_PREFIX = "torch-layout-"

PathLike = str | os.PathLike[str]


@dataclass(frozen=True, slots=True)
class LayoutEntry:
    """One tensor of a layout: full ``name``, ``shape``, original ``dtype`` string (e.g.
    ``"torch.float32"``) and ``numel`` (number of elements, = product of shape)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int

    def to_json(self) -> dict[str, Any]:
        """The entry as hashed by the protocol: ``{name, shape, dtype, numel}``."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "numel": self.numel,
        }

    @property
    def torch_dtype(self) -> torch.dtype:
        """The entry's dtype as a ``torch.dtype`` (imports torch).

        Raises:
            ValueError: the dtype string does not name a torch dtype.
        """
        import torch

        value = getattr(torch, self.dtype.removeprefix("torch."), None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"not a torch dtype: {self.dtype!r}")
        return value


def layout_hash_of(entries: tuple[LayoutEntry, ...] | list[LayoutEntry]) -> str:
    """``"torch-layout-" + sha256_hex`` of the compact, key-sorted JSON of ``entries``."""
    payload = json.dumps([e.to_json() for e in entries], sort_keys=True, separators=(",", ":"))
    return LAYOUT_HASH_PREFIX + hashlib.sha256(payload.encode("utf-8")).hexdigest()


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
