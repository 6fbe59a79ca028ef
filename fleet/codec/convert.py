"""Interchange between v1 packs and safetensors files.

A ``.safetensors`` file is the format other tools read; a pack is what fleet workers
exchange. Converting a pack needs each tensor's shape and dtype: fleet's packs record
them in the manifest's ``layout`` key; for packs from other writers pass a template
state whose layout hashes to the pack's ``layout_hash``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fleet.codec.layout import FilterLike, layout_hash_of, layout_of
from fleet.codec.pack import PackManifest, PathLike, read_pack, write_pack
from fleet.errors import CodecError, LayoutMismatchError, MissingLayoutError


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
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex}")
    try:
        save_file(
            tensors,
            str(tmp),
            metadata={
                "format": manifest.format,
                "model_schema_hash": manifest.model_schema_hash,
                "layout_hash": manifest.layout_hash,
            },
        )
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
