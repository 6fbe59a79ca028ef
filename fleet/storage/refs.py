"""What fleet's stores share: :class:`PackRef` (a pack by reference) and the names of
the marker files fleet keeps beside what it publishes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from fleet.codec.manifest import PackManifest


class PackRef(BaseModel):
    """A parameter pack by reference: ``path`` relative to the shared root, plus its
    ``layout_hash``, ``values_digest`` (``xxh3_64:<hex>`` or None) and
    ``model_schema_hash``, so a reader can check it without opening it first."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    layout_hash: str | None = None
    values_digest: str | None = None
    model_schema_hash: str | None = None
    parameter_count: int | None = None

    @classmethod
    def of(cls, rel_path: str, manifest: PackManifest) -> PackRef:
        """The PackRef of a pack at ``rel_path`` with this manifest."""
        return cls(
            path=rel_path,
            layout_hash=manifest.layout_hash,
            values_digest=manifest.values_digest,
            model_schema_hash=manifest.model_schema_hash,
            parameter_count=manifest.parameter_count,
        )


#: Suffix of the file beside a task's output that records the task's result, so a
#: redelivered task returns it instead of running again (docs/design.md decision 5).
RESULT_SUFFIX = ".result.json"


def result_marker(path: str) -> str:
    """The result file of the task whose output is ``path`` (shared-root relative)."""
    return path + RESULT_SUFFIX
