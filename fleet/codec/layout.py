"""Layout of a model state: which tensors a parameter pack holds, in which order.

Source: docs/protocol.md section 4 ("Layout"). Modules are walked in sorted name order (a
plain module, ``{"model": m}`` or a ``{name: Tensor}`` mapping is the single module
``""``), each module's state dict in sorted key order. The full name is
``f"{module}.{key}"``, or ``key`` for module ``""``. Non-floating tensors are ignored;
floating tensors rejected by the :class:`StateDictFilter` are excluded; the rest form
the layout. ``layout_hash = "torch-layout-" + sha256(json(entries, sorted keys, compact))``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fleet.codec.filter import FilterLike, StateDictFilter, as_filter
from fleet.codec.manifest import LAYOUT_HASH_PREFIX, LayoutEntry, layout_hash_of
from fleet.errors import UnsupportedStateError

__all__ = [
    "LAYOUT_HASH_PREFIX",
    "FilterLike",
    "Layout",
    "LayoutEntry",
    "StateDictFilter",
    "as_filter",
    "layout_and_tensors",
    "layout_hash_of",
    "layout_of",
    "modules_of",
    "named_tensors",
    "pack_plan",
]


@dataclass(frozen=True, slots=True)
class Layout:
    """What a pack of a given state holds.

    ``entries`` are in pack order; ``parameter_count`` is the sum of their ``numel``
    (the pack's ``values.f32le`` is ``4 * parameter_count`` bytes).
    """

    entries: tuple[LayoutEntry, ...]
    layout_hash: str
    included_keys: tuple[str, ...]
    excluded_float_keys: tuple[str, ...]
    ignored_non_float_keys: tuple[str, ...]
    parameter_count: int
    state_dict_filter: StateDictFilter


def modules_of(state: Any) -> dict[str, Mapping[str, torch.Tensor] | torch.nn.Module]:
    """Split a model state into its named modules (docs/protocol.md section 1).

    Accepts an ``nn.Module`` (module ``""``), ``{"model": module, ...}`` (module ``""``;
    other keys such as an optimizer are not part of the pack), ``{"modules": {name:
    module}}``, or a plain state dict ``{name: Tensor}`` (module ``""``).

    Raises:
        UnsupportedStateError: anything else, or a ``modules`` name that is empty or
            contains a ``.``.
    """
    if isinstance(state, torch.nn.Module):
        return {"": state}
    if isinstance(state, Mapping):
        if isinstance(state.get("model"), torch.nn.Module):
            return {"": state["model"]}
        modules = state.get("modules")
        if isinstance(modules, Mapping) and modules:
            out: dict[str, Mapping[str, torch.Tensor] | torch.nn.Module] = {}
            for name, module in modules.items():
                if not isinstance(name, str) or not name or "." in name:
                    raise UnsupportedStateError(
                        f"module name {name!r} in 'modules' must be a non-empty string without '.'"
                    )
                if not isinstance(module, torch.nn.Module | Mapping):
                    raise UnsupportedStateError(
                        f"'modules'[{name!r}] is {type(module).__name__}, not an nn.Module"
                    )
                out[name] = module
            return out
        if all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            return {"": state}
    raise UnsupportedStateError(
        f"{type(state).__name__} is not an nn.Module, {{'model': module}}, "
        "{'modules': {name: module}} or a {name: Tensor} state dict"
    )


def named_tensors(state: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every state-dict tensor of ``state`` as ``(full name, tensor)``, in layout order.

    For modules the tensors are ``state_dict()`` views: they share memory with the
    module's parameters and buffers, so writing into them updates the model.

    Raises:
        UnsupportedStateError: see :func:`modules_of`.
    """
    for module_name, module in sorted(modules_of(state).items()):
        tensors = module.state_dict() if isinstance(module, torch.nn.Module) else module
        for key in sorted(tensors):
            tensor = tensors[key]
            if not isinstance(tensor, torch.Tensor):
                raise UnsupportedStateError(f"state dict value {key!r} is {type(tensor).__name__}")
            yield (f"{module_name}.{key}" if module_name else key), tensor


def layout_and_tensors(
    state: Any, state_dict_filter: FilterLike = None
) -> tuple[Layout, list[torch.Tensor]]:
    """The :class:`Layout` of ``state`` and the included tensors, in layout order.

    Raises:
        UnsupportedStateError: see :func:`modules_of`.
    """
    sdf = as_filter(state_dict_filter)
    entries: list[LayoutEntry] = []
    tensors: list[torch.Tensor] = []
    excluded: list[str] = []
    ignored: list[str] = []
    for name, tensor in named_tensors(state):
        if not tensor.is_floating_point():
            ignored.append(name)
        elif not sdf.accepts(name):
            excluded.append(name)
        else:
            entries.append(
                LayoutEntry(name, tuple(tensor.shape), str(tensor.dtype), tensor.numel())
            )
            tensors.append(tensor)
    layout = Layout(
        entries=tuple(entries),
        layout_hash=layout_hash_of(entries),
        included_keys=tuple(e.name for e in entries),
        excluded_float_keys=tuple(excluded),
        ignored_non_float_keys=tuple(ignored),
        parameter_count=sum(e.numel for e in entries),
        state_dict_filter=sdf,
    )
    return layout, tensors


def layout_of(state: Any, state_dict_filter: FilterLike = None) -> Layout:
    """The :class:`Layout` a pack of ``state`` would have (docs/protocol.md section 4).

    Args:
        state: ``nn.Module``, ``{"model": module, ...}``, ``{"modules": {name: module}}``
            or a ``{name: Tensor}`` state dict.
        state_dict_filter: :class:`StateDictFilter`, its JSON mapping, or None (all keys).

    Raises:
        UnsupportedStateError: ``state`` has none of the shapes above.
    """
    return layout_and_tensors(state, state_dict_filter)[0]


def pack_plan(state: Any, state_dict_filter: FilterLike = None) -> dict[str, Any]:
    """The protocol's ``parameter_pack_plan`` result for the generic codec (docs/protocol.md
    section 2): ``uses_custom_parameter_pack_hooks`` (always False here), ``layout_hash``,
    ``included_keys``, ``excluded_float_keys``, ``ignored_non_float_keys``,
    ``parameter_count``.

    Raises:
        UnsupportedStateError: see :func:`layout_of`.
    """
    layout = layout_of(state, state_dict_filter)
    return {
        "uses_custom_parameter_pack_hooks": False,
        "layout_hash": layout.layout_hash,
        "included_keys": list(layout.included_keys),
        "excluded_float_keys": list(layout.excluded_float_keys),
        "ignored_non_float_keys": list(layout.ignored_non_float_keys),
        "parameter_count": layout.parameter_count,
    }
