"""StateDictFilter: which floating-point state-dict keys a parameter pack includes
(docs/protocol.md section 3). Torch-free, so clients and orchestrators can build requests
without importing torch."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StateDictFilter(BaseModel):
    """Which floating-point state-dict keys a pack includes (docs/protocol.md section 3).

    Globs are ``fnmatch`` patterns, case-sensitive, matched against the full key. An
    empty ``include_globs`` includes every key; ``exclude_globs`` wins over includes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    include_globs: tuple[str, ...] = Field(default=())
    exclude_globs: tuple[str, ...] = Field(default=())

    def accepts(self, key: str) -> bool:
        """True if ``key`` is included by this filter."""
        if self.include_globs and not any(fnmatch.fnmatchcase(key, g) for g in self.include_globs):
            return False
        return not any(fnmatch.fnmatchcase(key, g) for g in self.exclude_globs)

    def to_json(self) -> dict[str, list[str]]:
        """The protocol's JSON form: ``{"include_globs": [...], "exclude_globs": [...]}``."""
        return {
            "include_globs": list(self.include_globs),
            "exclude_globs": list(self.exclude_globs),
        }


FilterLike = StateDictFilter | Mapping[str, Any] | None


def as_filter(state_dict_filter: FilterLike) -> StateDictFilter:
    """Coerce ``None`` / a JSON mapping / a :class:`StateDictFilter` to a filter.

    Raises:
        pydantic.ValidationError: the mapping has unknown keys or non-string globs.
    """
    if state_dict_filter is None:
        return StateDictFilter()
    if isinstance(state_dict_filter, StateDictFilter):
        return state_dict_filter
    return StateDictFilter.model_validate(dict(state_dict_filter))
