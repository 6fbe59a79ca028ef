"""Workload factories: ``module:attr`` specs, the allowlist, a per-process cache, and
calling hooks with failures turned into typed errors (docs/protocol.md section 1,
docs/design.md decision 8).
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleet.errors import (
    BadFactorySpecError,
    FactoryLoadError,
    HookFailedError,
    HookMissingError,
    NotAllowlistedError,
)


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``"module:attr"`` into ``(module, attr)``.

    Raises:
        BadFactorySpecError: not exactly one colon, or an empty part.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise BadFactorySpecError(str(spec))
    module, attr = spec.split(":")
    if not module.strip() or not attr.strip() or module != module.strip() or attr != attr.strip():
        raise BadFactorySpecError(spec)
    return module, attr


def check_allowed(spec: str, allowlist: list[str]) -> None:
    """Allow ``spec`` if it or its module matches a glob of ``allowlist``.

    Raises:
        BadFactorySpecError: malformed spec.
        NotAllowlistedError: no glob matches.
    """
    module, _ = parse_spec(spec)
    for glob in allowlist:
        if fnmatch.fnmatchcase(spec, glob) or fnmatch.fnmatchcase(module, glob):
            return
    raise NotAllowlistedError(spec, list(allowlist))


@dataclass
class Workload:
    """A built workload: the factory's object, its spec and config."""

    spec: str
    config: dict[str, Any]
    obj: Any

    @property
    def name(self) -> str:
        """``workload.workload_name`` if present, else the class name."""
        name = getattr(self.obj, "workload_name", None)
        return str(name) if name is not None else type(self.obj).__name__

    def has(self, hook: str) -> bool:
        """True if the workload defines ``hook``."""
        return callable(getattr(self.obj, hook, None))

    def call(self, hook: str, *args: Any) -> Any:
        """Call a hook.

        Raises:
            HookMissingError: the workload has no such hook.
            HookFailedError: the hook raised (type, text and traceback kept).
            FleetError: the hook raised one; a :class:`WorkloadError` without a
                ``spec`` (e.g. :class:`WorkloadDataError`) gets this workload's.
        """
        fn: Callable[..., Any] | None = getattr(self.obj, hook, None)
        if not callable(fn):
            raise HookMissingError(self.spec, hook)
        try:
            return fn(*args)
        except Exception as exc:
            from fleet.errors import FleetError, WorkloadError

            if isinstance(exc, FleetError):
                if isinstance(exc, WorkloadError) and exc.spec is None:
                    exc.spec = self.spec
                raise
            raise HookFailedError(
                self.spec, hook, type(exc).__name__, str(exc), traceback.format_exc()
            ) from exc


class WorkloadCache:
    """Builds workloads once per ``(spec, config)`` in this process, only if allowed."""

    def __init__(self, allowlist: list[str]) -> None:
        self.allowlist = list(allowlist)
        self._cache: dict[tuple[str, str], Workload] = {}
        self._lock = threading.Lock()

    def get(self, spec: str, config: dict[str, Any] | None = None) -> Workload:
        """The workload for ``spec`` with ``config``, built on first use.

        Raises:
            BadFactorySpecError, NotAllowlistedError: see :func:`check_allowed`.
            FactoryLoadError: import, attribute lookup or the factory call failed.
        """
        config = dict(config or {})
        check_allowed(spec, self.allowlist)
        key = (spec, json.dumps(config, sort_keys=True, default=str))
        with self._lock:
            if key not in self._cache:
                self._cache[key] = Workload(spec, config, _build(spec, config))
            return self._cache[key]

    def loaded(self) -> list[Workload]:
        """Every workload built so far."""
        with self._lock:
            return list(self._cache.values())


def import_object(spec: str) -> Any:
    """The callable named by ``"module:attr"`` (no allowlist check here).

    Raises:
        BadFactorySpecError: malformed spec.
        FactoryLoadError: the import failed or ``attr`` is not a callable of the module.
    """
    module_name, attr = parse_spec(spec)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise FactoryLoadError(
            spec, f"import {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    obj = getattr(module, attr, None)
    if not callable(obj):
        raise FactoryLoadError(spec, f"{module_name!r} has no callable {attr!r}")
    return obj


def _build(spec: str, config: dict[str, Any]) -> Any:
    factory = import_object(spec)
    try:
        return factory(config)
    except Exception as exc:
        raise FactoryLoadError(spec, f"factory raised {type(exc).__name__}: {exc}") from exc
