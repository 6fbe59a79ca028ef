"""Parameter packs, format v1 (docs/protocol.md section 4): layout, read/write, safetensors.

Public API::

    layout_of(state, state_dict_filter=None) -> Layout
    pack_plan(state, state_dict_filter=None) -> dict
    write_pack(path, state, model_schema_hash, *, state_dict_filter=None) -> PackManifest
    read_pack(path, *, verify=False) -> (PackManifest, Tensor float32 [parameter_count])
    load_pack_into(path, state, *, state_dict_filter=None, verify=False) -> PackManifest
    to_safetensors(pack_path, out_file) / from_safetensors(file, out_pack, model_schema_hash)

Names resolve lazily: the manifest side (:mod:`fleet.codec.manifest`,
:mod:`fleet.codec.filter`) never imports torch, so clients and orchestrators can use
``PackManifest``, ``read_manifest`` and ``StateDictFilter`` without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleet.codec.convert import from_safetensors, to_safetensors
    from fleet.codec.filter import StateDictFilter
    from fleet.codec.layout import Layout, layout_of, pack_plan
    from fleet.codec.manifest import (
        PACK_FORMAT_V1,
        LayoutEntry,
        PackManifest,
        layout_hash_of,
        read_manifest,
    )
    from fleet.codec.pack import load_pack_into, read_pack, write_pack, write_values_pack

_LAZY = {
    "from_safetensors": "fleet.codec.convert",
    "to_safetensors": "fleet.codec.convert",
    "StateDictFilter": "fleet.codec.filter",
    "Layout": "fleet.codec.layout",
    "layout_of": "fleet.codec.layout",
    "pack_plan": "fleet.codec.layout",
    "PACK_FORMAT_V1": "fleet.codec.manifest",
    "LayoutEntry": "fleet.codec.manifest",
    "PackManifest": "fleet.codec.manifest",
    "layout_hash_of": "fleet.codec.manifest",
    "read_manifest": "fleet.codec.manifest",
    "load_pack_into": "fleet.codec.pack",
    "read_pack": "fleet.codec.pack",
    "write_pack": "fleet.codec.pack",
    "write_values_pack": "fleet.codec.pack",
}

__all__ = [
    "PACK_FORMAT_V1",
    "Layout",
    "LayoutEntry",
    "PackManifest",
    "StateDictFilter",
    "from_safetensors",
    "layout_hash_of",
    "layout_of",
    "load_pack_into",
    "pack_plan",
    "read_manifest",
    "read_pack",
    "to_safetensors",
    "write_pack",
    "write_values_pack",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fleet.codec' has no attribute {name!r}")
