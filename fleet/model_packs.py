"""Packs in and out of held models on a worker: a new state from a pack, a state
written as a pack, a pack loaded into a held model in place (each checked against its
PackRef and for finite values while read). The workload's custom pack hooks are used
where it defines them (docs/protocol.md section 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleet.codec import load_pack_into, read_pack, write_pack
from fleet.codec.filter import StateDictFilter
from fleet.codec.pack import is_pack
from fleet.files import publishing
from fleet.runtime import HeldModel
from fleet.storage import PackRef
from fleet.workload import Workload


def check_pack(path: Path, ref: PackRef | None) -> None:
    """Check a pack before a custom hook reads it: against its PackRef if there is one
    (the manifest's layout hash and digest), and always the values' digest and
    finiteness (one read).

    Raises:
        LayoutMismatchError, DigestMismatchError, NonFiniteValuesError: a replaced or
            corrupt pack (naming its path).
    """
    read_pack(
        path,
        verify=True,
        check_finite=True,
        layout_hash=ref.layout_hash if ref is not None else None,
        values_digest=ref.values_digest if ref is not None else None,
    )


def _load(path: Path, state: Any, sdf: StateDictFilter | None, ref: PackRef | None) -> None:
    """Load a pack into a state: its values' digest and finiteness checked while they are
    read (by PackRef or by path alike), and the manifest against the PackRef if any."""
    load_pack_into(
        path,
        state,
        state_dict_filter=sdf,
        verify=True,
        check_finite=True,
        layout_hash=ref.layout_hash if ref is not None else None,
        values_digest=ref.values_digest if ref is not None else None,
    )


def state_from_pack(
    workload: Workload,
    device: str,
    path: Path,
    state_dict_filter: StateDictFilter | None,
    ref: PackRef | None = None,
) -> Any:
    """A new model state on ``device`` holding the pack at ``path``: the workload's
    ``import_parameter_pack_path`` hook if it has one, else ``init_model`` + the codec.
    With ``ref`` (a PackRef) the pack is checked against it while it is read.

    Raises:
        CodecError: not a pack, truncated, layout or digest mismatch, non-finite values.
        WorkloadError: a hook failed.
    """
    if workload.has("import_parameter_pack_path"):
        check_pack(path, ref)
        return workload.call("import_parameter_pack_path", device, str(path))
    state = workload.call("init_model", device)
    _load(path, state, state_dict_filter, ref)
    return state


def publish_state_pack(
    workload: Workload,
    state: Any,
    dest: Path,
    model_schema_hash: str,
    state_dict_filter: StateDictFilter | None,
) -> None:
    """Write ``state`` as a pack at ``dest``: the workload's ``export_parameter_pack_path``
    hook (into a temp dir, then published atomically) if it has one, else the codec."""
    if workload.has("export_parameter_pack_path"):
        with publishing(dest, replace_dir=is_pack) as tmp:
            workload.call("export_parameter_pack_path", state, str(tmp), model_schema_hash)
    else:
        write_pack(dest, state, model_schema_hash, state_dict_filter=state_dict_filter)


def load_pack_into_held(
    held: HeldModel,
    path: Path,
    state_dict_filter: StateDictFilter | None,
    ref: PackRef | None = None,
) -> None:
    """Load the pack at ``path`` into a held model: in place with the codec, or through
    the workload's ``import_parameter_pack_path`` hook (which gives a new state). With
    ``ref`` the pack is checked against it; a refused pack leaves the model unchanged.
    A pack whose digest the model holds already, unchanged since, is not loaded again.

    Raises:
        CodecError: not a pack, truncated, layout or digest mismatch, non-finite values.
    """
    key = None
    if ref is not None and ref.values_digest is not None:
        key = (ref.values_digest, repr(state_dict_filter))
        if held.loaded == key:
            return  # this very pack is in the model already (its digest was checked then)
    held.loaded = None
    if held.workload.has("import_parameter_pack_path"):
        check_pack(path, ref)
        held.state = held.workload.call("import_parameter_pack_path", held.device, str(path))
    else:
        _load(path, held.state, state_dict_filter, ref)
    held.loaded = key
