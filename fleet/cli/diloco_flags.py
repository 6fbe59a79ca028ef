"""``fleet diloco``'s config flags: one flag per :class:`~fleet.diloco.DiLoCoConfig` field
(nested ones included), generated from the model, so each default and help text is
stated once, in the model. A flag left out leaves the field to the ``--config`` file, or
else to the model's default."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click
from pydantic import BaseModel

from fleet.codec.codecs import CODECS
from fleet.diloco.config import (
    OUTER_MERGE_POLICIES,
    DatasetConfig,
    DiLoCoConfig,
    StreamingConfig,
)


@dataclass(frozen=True)
class ConfigFlag:
    """A flag (``decl``, as click declares it) that sets the config field ``path``."""

    decl: str
    path: str
    type: Any = None
    multiple: bool = False

    @property
    def param(self) -> str:
        """The click parameter name: ``cfg_`` and the dotted path with ``_`` for ``.``."""
        return "cfg_" + self.path.replace(".", "__")

    @property
    def flag(self) -> str:
        """The flag as a user types it (the first of an on/off pair)."""
        return self.decl.split("/")[0]


CONFIG_FLAGS = (
    ConfigFlag("--workload", "workload"),
    ConfigFlag("--replicas", "replicas", int),
    ConfigFlag("--rounds", "rounds", int),
    ConfigFlag("--inner-steps", "inner_steps", int),
    ConfigFlag("--outer-lr", "outer.lr", float),
    ConfigFlag("--outer-momentum", "outer.momentum", float),
    ConfigFlag("--outer-optimizer", "outer.name"),
    ConfigFlag("--pseudo-gradient", "pseudo_gradient.codec", click.Choice(sorted(CODECS))),
    ConfigFlag("--pseudo-gradient-block-size", "pseudo_gradient.block_size", int),
    ConfigFlag("--error-feedback/--no-error-feedback", "pseudo_gradient.error_feedback"),
    ConfigFlag("--fragments", "streaming.fragments", int),
    ConfigFlag("--fragment-mixing", "streaming.mixing", float),
    ConfigFlag("--fragment-delay-steps", "streaming.delay_steps", int),
    ConfigFlag("--merge-policy", "merge_policy", click.Choice(OUTER_MERGE_POLICIES)),
    ConfigFlag("--device", "device"),
    ConfigFlag("--eval-every", "eval_every", int),
    ConfigFlag("--eval-split", "eval_split", click.Choice(["Train", "Validation", "Test"])),
    ConfigFlag("--eval-overlap/--eval-blocking", "eval_overlap"),
    ConfigFlag("--eval-worker", "eval_worker"),
    ConfigFlag("--min-replicas", "quorum.min_replicas", int),
    ConfigFlag("--round-deadline-s", "quorum.round_deadline_s", float),
    ConfigFlag("--adaptive-deadline/--generous-deadline", "quorum.adaptive_deadline.tight"),
    ConfigFlag(
        "--deadline-from-speed/--no-deadline-from-speed", "quorum.adaptive_deadline.enabled"
    ),
    ConfigFlag("--deadline-k", "quorum.adaptive_deadline.k", float),
    ConfigFlag("--deadline-window-rounds", "quorum.adaptive_deadline.window_rounds", int),
    ConfigFlag("--worker", "workers", multiple=True),
    ConfigFlag("--require-exact-steps/--any-step-count", "require_exact_steps"),
    ConfigFlag("--max-attempts", "max_attempts", int),
    ConfigFlag("--lost-worker-wait-s", "lost_worker_wait_s", float),
    ConfigFlag("--replica-call-timeout-s", "replica_call_timeout_s", float),
    ConfigFlag("--max-wall-s", "max_wall_s", float),
    ConfigFlag("--checkpoint-every", "checkpoint_every", int),
    ConfigFlag("--keep-checkpoints", "keep_checkpoints", int),
    ConfigFlag("--state-checkpoint-every", "state_checkpoint_every", int),
    ConfigFlag("--model-schema-hash", "model_schema_hash"),
    ConfigFlag("--outer-step-chunk-bytes", "outer_step_chunk_bytes", int),
    ConfigFlag("--dataset", "dataset.path"),
    ConfigFlag("--dataset-glob", "dataset.glob"),
    ConfigFlag("--dataset-seed", "dataset.seed", int),
    ConfigFlag("--microshards-per-batch", "dataset.microshards_per_batch", int),
    ConfigFlag("--microshards-per-lease", "dataset.microshards_per_lease", int),
    ConfigFlag("--microshards-per-round", "dataset.microshards_per_round", int),
    ConfigFlag(
        "--batch-kind",
        "dataset.batch_kind",
        click.Choice(["cached_microshard_group", "micro_epoch"]),
    ),
)

#: Nested config tables, by field path (their models hold the fields' docs and defaults).
_NESTED: dict[str, type[BaseModel]] = {"dataset": DatasetConfig, "streaming": StreamingConfig}


def field_info(path: str) -> tuple[str, Any]:
    """``(first sentence of the field's docstring, its default)`` for a dotted path."""
    model: type[BaseModel] = DiLoCoConfig
    *parents, last = path.split(".")
    for name in parents:
        annotation = model.model_fields[name].annotation
        model = _NESTED.get(name) or annotation  # type: ignore[assignment]
    field = model.model_fields[last]
    text = (field.description or "").replace("``", "").replace("\n", " ")
    text = re.split(r"(?<=[a-z0-9)\]])\.\s+(?=[A-Z])", text)[0].strip()
    if text.endswith(".") and not text.endswith("..."):
        text = text[:-1]
    default = field.get_default(call_default_factory=True)
    return text, default


def _help(flag: ConfigFlag) -> str:
    text, default = field_info(flag.path)
    if flag.path == "workload":
        return f"{text} (required, here or in --config)."
    shown = "none" if default is None else default
    if isinstance(shown, bool):
        shown = flag.decl.split("/")[0 if shown else 1]
    end = "" if text.endswith("...") else "."
    return f"{text}{end} Config: {flag.path} [default: {shown}]"


def config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add every :data:`CONFIG_FLAGS` flag to a click command (defaults None: unset)."""
    for flag in reversed(CONFIG_FLAGS):
        decls = [flag.decl, flag.param]
        kwargs: dict[str, Any] = {"default": None, "help": _help(flag)}
        if flag.multiple:
            kwargs |= {"multiple": True, "default": ()}
        if flag.type is not None:
            kwargs["type"] = flag.type
        command = click.option(*decls, **kwargs)(command)
    return command


def given_flags(params: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """``{config path: (flag, value)}`` of the config flags given on the command line."""
    out = {}
    for flag in CONFIG_FLAGS:
        value = params.get(flag.param)
        if value is None or (flag.multiple and not value):
            continue
        out[flag.path] = (flag.flag, list(value) if flag.multiple else value)
    return out
