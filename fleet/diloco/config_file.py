"""Run configs from files and flags: ``fleet diloco --config run.toml`` (or ``.yaml``,
``.yml``, ``.json``) holds any :class:`~fleet.diloco.DiLoCoConfig` field, nested ones as
tables (``[quorum]``, ``[dataset]``, ``[outer]``); flags override the file, key by key.

```toml
workload = "fleet.examples.digits:make"
replicas = 2
rounds = 10
inner_steps = 50
[config]          # the workload factory's own config
lr = 0.01
[quorum]
min_replicas = 1
```
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fleet.diloco.config import DiLoCoConfig
from fleet.errors import RunConfigError

#: The file types ``--config`` reads, by suffix.
CONFIG_SUFFIXES = (".toml", ".yaml", ".yml", ".json")


def read_config_file(path: Path) -> dict[str, Any]:
    """The table of a run config file.

    Raises:
        RunConfigError: missing, unreadable, not TOML/YAML/JSON, or not a table at the top.
    """
    suffix = path.suffix.lower()
    if suffix not in CONFIG_SUFFIXES:
        raise RunConfigError(
            str(path), f"unknown config file type {suffix!r}: use one of {CONFIG_SUFFIXES}"
        )
    try:
        text = path.read_text()
    except OSError as exc:
        raise RunConfigError(str(path), f"cannot read it: {exc.strerror or exc}") from exc
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise RunConfigError(str(path), f"not valid {suffix[1:].upper()}: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError and its kin
        raise RunConfigError(str(path), f"not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RunConfigError(str(path), f"the top level must be a table, not {type(data).__name__}")
    return data


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``data[a][b] = value`` for ``dotted == "a.b"``, making tables on the way."""
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[last] = value


def build_config(
    file_data: dict[str, Any], overrides: dict[str, Any], *, source: str = "flags"
) -> DiLoCoConfig:
    """The config of ``file_data`` with ``overrides`` (dotted field paths) applied on top.

    Raises:
        RunConfigError: an unknown key (named with its path), or a value the model refuses.
    """
    data = json.loads(json.dumps(file_data))  # a deep copy
    for dotted, value in overrides.items():
        set_path(data, dotted, value)
    try:
        return DiLoCoConfig.model_validate(data)
    except ValidationError as exc:
        raise RunConfigError(source, describe(exc)) from exc


def describe(exc: ValidationError) -> str:
    """A pydantic error as one line: ``path: message`` for each error, unknown keys first."""
    parts = []
    for error in sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden"):
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            parts.append(f"unknown key {where!r}")
        elif error["type"] == "missing":
            parts.append(f"{where!r} is required")
        else:
            parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
