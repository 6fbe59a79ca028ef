"""Parameter packs, format v1 (PROTOCOL.md section 4): layout, read/write, safetensors.

Public API::

    layout_of(state, state_dict_filter=None) -> Layout
    pack_plan(state, state_dict_filter=None) -> dict
    write_pack(path, state, model_schema_hash, *, state_dict_filter=None) -> PackManifest
    read_pack(path, *, verify=False) -> (PackManifest, Tensor float32 [parameter_count])
    load_pack_into(path, state, *, state_dict_filter=None, verify=False) -> PackManifest
    to_safetensors(pack_path, out_file) / from_safetensors(file, out_pack, model_schema_hash)
"""

from fleet.codec.convert import from_safetensors, to_safetensors
from fleet.codec.layout import (
    Layout,
    LayoutEntry,
    StateDictFilter,
    layout_hash_of,
    layout_of,
    pack_plan,
)
from fleet.codec.pack import (
    PACK_FORMAT_V1,
    PackManifest,
    load_pack_into,
    read_manifest,
    read_pack,
    write_pack,
    write_values_pack,
)

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
