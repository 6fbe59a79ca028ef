"""The one error hierarchy of fleet.

Every failure fleet reports is a :class:`FleetError`. Each subclass names what went
wrong and carries the values that failed as attributes (listed in ``fields``), so a
caller can act on them without parsing the message, and :meth:`FleetError.to_dict`
turns any error into JSON for the wire.

Tree::

    FleetError
      CodecError                 parameter packs (PROTOCOL.md section 4)
        NotAPackError            path is not a pack directory (no manifest.json)
        UnknownPackFormatError   manifest "format" is not v1
        ManifestError            manifest missing a key, wrong type, or not JSON
        ValuesLengthError        byte length of values.f32le != 4 * parameter_count
        LayoutMismatchError      pack layout_hash != target model's layout_hash
        DigestMismatchError      content digest of values.f32le differs from manifest
        NonFiniteValuesError     NaN/Inf found when asked to check
        UnsupportedStateError    a model state the codec cannot walk
        MissingLayoutError       shapes needed but the pack does not record them
      StorageError               shared-root paths
        PathOutsideRootError     a path escapes the shared root
"""

from __future__ import annotations

from typing import Any, ClassVar


class FleetError(Exception):
    """Root of every error fleet raises.

    Subclasses list in ``fields`` the attribute names that carry the failing data.
    """

    fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``{"type": class name, "message": str, "data": {field: value}}``."""
        return {
            "type": type(self).__name__,
            "message": self.message,
            "data": {name: getattr(self, name) for name in self.fields},
        }


# --------------------------------------------------------------------------- codec


class CodecError(FleetError):
    """A parameter pack could not be written, read or loaded."""

    fields: ClassVar[tuple[str, ...]] = ("path",)

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class NotAPackError(CodecError):
    """``path`` is not a pack directory (missing, a file, or without ``manifest.json``)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"not a parameter pack: {path} ({reason})", path=path)
        self.reason = reason

    fields = ("path", "reason")


class UnknownPackFormatError(CodecError):
    """The manifest's ``format`` is not one this codec reads."""

    fields = ("path", "format", "expected")

    def __init__(self, path: str, format: object, expected: str) -> None:
        super().__init__(
            f"unknown pack format {format!r} in {path} (expected {expected!r})", path=path
        )
        self.format = format
        self.expected = expected


class ManifestError(CodecError):
    """The manifest is not JSON, lacks a required key, or has a value of the wrong type."""

    fields = ("path", "key", "detail")

    def __init__(self, path: str, key: str | None, detail: str) -> None:
        where = f" key {key!r}" if key else ""
        super().__init__(f"bad pack manifest in {path}:{where} {detail}", path=path)
        self.key = key
        self.detail = detail


class ValuesLengthError(CodecError):
    """``values.f32le`` is not ``4 * parameter_count`` bytes long (truncated or padded)."""

    fields = ("path", "expected_bytes", "actual_bytes", "parameter_count")

    def __init__(self, path: str, expected_bytes: int, actual_bytes: int) -> None:
        super().__init__(
            f"values file {path} has {actual_bytes} bytes, expected {expected_bytes} "
            f"(4 * parameter_count {expected_bytes // 4})",
            path=path,
        )
        self.expected_bytes = expected_bytes
        self.actual_bytes = actual_bytes
        self.parameter_count = expected_bytes // 4


class LayoutMismatchError(CodecError):
    """The pack's layout hash differs from the layout of the model it is loaded into."""

    fields = ("path", "pack_layout_hash", "model_layout_hash")

    def __init__(self, path: str, pack_layout_hash: str, model_layout_hash: str) -> None:
        super().__init__(
            f"layout mismatch loading {path}: pack has {pack_layout_hash}, "
            f"model has {model_layout_hash}",
            path=path,
        )
        self.pack_layout_hash = pack_layout_hash
        self.model_layout_hash = model_layout_hash


class DigestMismatchError(CodecError):
    """The content digest of ``values.f32le`` differs from the one in the manifest."""

    fields = ("path", "expected", "actual")

    def __init__(self, path: str, expected: str, actual: str) -> None:
        super().__init__(
            f"content digest mismatch in {path}: manifest says {expected}, values hash to {actual}",
            path=path,
        )
        self.expected = expected
        self.actual = actual


class NonFiniteValuesError(CodecError):
    """The pack holds NaN or infinite values (raised only when asked to check)."""

    fields = ("path", "count", "first_index")

    def __init__(self, path: str, count: int, first_index: int) -> None:
        super().__init__(
            f"{count} non-finite values in {path} (first at flat index {first_index})",
            path=path,
        )
        self.count = count
        self.first_index = first_index


class UnsupportedStateError(CodecError):
    """A model state that is not a module, ``{"model": m}``, ``{"modules": {...}}`` or a
    ``{name: Tensor}`` mapping, or a ``{"modules"}`` name that is empty or has a dot."""

    fields = ("detail",)

    def __init__(self, detail: str) -> None:
        super().__init__(f"unsupported model state: {detail}")
        self.detail = detail


class MissingLayoutError(CodecError):
    """Tensor shapes are needed (e.g. for safetensors) but the pack does not record them
    and no template state was given."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"pack {path} has no 'layout' entries in its manifest; pass a template state",
            path=path,
        )


# --------------------------------------------------------------------------- storage


class StorageError(FleetError):
    """A shared-root path could not be used."""

    fields: ClassVar[tuple[str, ...]] = ()


class PathOutsideRootError(StorageError):
    """A path resolves outside the shared root (``..``, absolute, or a symlink out)."""

    fields = ("path", "root")

    def __init__(self, path: str, root: str) -> None:
        super().__init__(f"path {path!r} escapes the shared root {root!r}")
        self.path = path
        self.root = root
