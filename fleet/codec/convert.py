"""Interchange between v1 packs and safetensors files, and fleet's default model
artifacts.

A ``.safetensors`` file is the format other tools read; a pack is what fleet workers
exchange. Converting a pack needs each tensor's shape and dtype: fleet's packs record
them in the manifest's ``layout`` key; for packs from other writers pass a template
state whose layout hashes to the pack's ``layout_hash``.

For workloads without artifact hooks, :func:`save_state_artifact` and
:func:`load_state_artifact` write and read the model part of a state (the modules
the codec walks, with every state-dict tensor under its full layout name, in its own
dtype) as a safetensors file (docs/protocol.md section 5.6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fleet.codec.layout import FilterLike, layout_hash_of, layout_of, named_tensors
from fleet.codec.manifest import PackManifest, PathLike
from fleet.codec.pack import read_pack, write_pack
from fleet.errors import ArtifactError, CodecError, LayoutMismatchError, MissingLayoutError
from fleet.files import publishing


def to_safetensors(
    pack_path: PathLike, out_file: PathLike, *, like: Any = None, verify: bool = True
) -> PackManifest:
    """Write the pack at ``pack_path`` as a safetensors file (atomically).

    Each tensor is stored under its full layout name, in its original dtype (values
    came from that dtype, so the float32 -> dtype cast is exact) and shape. The
    metadata holds ``format``, ``model_schema_hash`` and ``layout_hash``.

    Args:
        like: template state giving shapes when the manifest has no ``layout``.
        verify: check the pack's content digest first.

    Raises:
        MissingLayoutError: no ``layout`` in the manifest and no ``like``.
        LayoutMismatchError: recorded or template layout does not hash to ``layout_hash``.
        CodecError: any error of :func:`read_pack`.
    """
    manifest, values = read_pack(pack_path, verify=verify)
    entries = manifest.layout_entries()
    if entries is None:
        if like is None:
            raise MissingLayoutError(str(pack_path))
        entries = layout_of(like, manifest.state_dict_filter).entries
    actual_hash = layout_hash_of(entries)
    if actual_hash != manifest.layout_hash:
        raise LayoutMismatchError(str(pack_path), manifest.layout_hash, actual_hash)
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for entry in entries:
        block = values[offset : offset + entry.numel].view(entry.shape)
        tensors[entry.name] = block.to(entry.torch_dtype).contiguous()
        offset += entry.numel
    metadata = {
        "format": manifest.format,
        "model_schema_hash": manifest.model_schema_hash,
        "layout_hash": manifest.layout_hash,
    }
    with publishing(Path(out_file)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return manifest


def from_safetensors(
    file: PathLike,
    out_pack: PathLike,
    model_schema_hash: str | None = None,
    *,
    state_dict_filter: FilterLike = None,
) -> PackManifest:
    """Write the tensors of a safetensors file as a v1 pack at ``out_pack``.

    The file's tensors form a plain state dict (module ``""``), so the pack's layout is
    that of the same state dict held by a module.

    Args:
        model_schema_hash: recorded in the manifest; None takes the file's
            ``model_schema_hash`` metadata.

    Raises:
        CodecError: the file cannot be opened as safetensors, or no schema hash is
            given or recorded.
    """
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as exc:  # OSError, or safetensors' own SafetensorError
        raise CodecError(f"cannot read safetensors file {file}: {exc}", path=str(file)) from exc
    schema = model_schema_hash or metadata.get("model_schema_hash")
    if not schema:
        raise CodecError(
            f"no model_schema_hash given and none in the metadata of {file}", path=str(file)
        )
    return write_pack(out_pack, state, schema, state_dict_filter=state_dict_filter)


def save_state_artifact(state: Any, path: PathLike) -> int:
    """Write the model part of ``state`` as a safetensors file at ``path``, atomically:
    every state-dict tensor (floating or not) under its full layout name, in its own
    dtype and shape, copied to the CPU. Returns the number of tensors.

    Raises:
        UnsupportedStateError: ``state`` cannot be walked.
        StorageError: the file system failed (nothing is published then).
    """
    tensors = {name: t.detach().to("cpu", copy=True) for name, t in named_tensors(state)}
    with publishing(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "fleet-state-artifact-v1"})
    return len(tensors)


def load_state_artifact(path: PathLike, state: Any) -> int:
    """Load a file written by :func:`save_state_artifact` into ``state`` in place (each
    tensor copied onto its target's device). Every name, shape and dtype is checked
    before the first tensor is touched, so a refused file leaves ``state`` unchanged.
    Returns the number of tensors.

    Raises:
        ArtifactError: missing or unexpected names, or a shape or dtype that differs.
        CodecError: not a safetensors file.
    """
    targets = dict(named_tensors(state))
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            mismatched = {}
            for name in sorted(names & set(targets)):
                part = f.get_slice(name)
                shape, dtype = tuple(part.get_shape()), part.get_dtype()
                target = targets[name]
                want = str(target.dtype).removeprefix("torch.")
                if shape != tuple(target.shape) or _st_dtype(dtype) != want:
                    mismatched[name] = f"{list(shape)} {dtype} vs {list(target.shape)} {want}"
            missing, unexpected = sorted(set(targets) - names), sorted(names - set(targets))
            if missing or unexpected or mismatched:
                raise ArtifactError(
                    str(path), missing=missing, unexpected=unexpected, mismatched=mismatched
                )
            with torch.no_grad():
                for name, target in targets.items():
                    target.copy_(f.get_tensor(name))
    except ArtifactError:
        raise
    except Exception as exc:  # OSError, or safetensors' own SafetensorError
        raise CodecError(f"cannot read artifact {path}: {exc}", path=str(path)) from exc
    return len(targets)


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool"}  # fmt: skip


def _st_dtype(name: str) -> str:
    """A safetensors dtype name (``"F32"``) as torch names it (``"float32"``)."""
    return _ST_DTYPES.get(name, name.lower())
