"""MkDocs hook (mkdocs.yml ``hooks:``): the parts of the docs that are generated.

- ``<!-- fleet:config-reference -->`` becomes the reference of every ``fleet diloco``
  config key, generated from the pydantic models of :mod:`fleet.diloco.config` (their
  field docstrings, types, constraints and defaults) and the flags of
  :mod:`fleet.cli.diloco_flags`, so each default is stated once, in the code.
- ``{{ default quorum.adaptive_deadline.window_rounds }}`` becomes that config key's
  default, for prose that names one.
- ``<!-- fleet:include ops/README.md -->`` becomes that file (the operations guide lives
  beside ``ops/``, where the tests read it), its headings one level down and its links
  to ``../docs/...`` made relative to the docs directory.
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[2]
CONFIG_MARKER = "<!-- fleet:config-reference -->"
INCLUDE = re.compile(r"<!-- fleet:include (\S+) -->")
DEFAULT = re.compile(r"\{\{ default ([a-z_.]+) \}\}")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if CONFIG_MARKER in markdown:
        markdown = markdown.replace(CONFIG_MARKER, config_reference())
    markdown = DEFAULT.sub(lambda m: _default_of(m.group(1)), markdown)
    return INCLUDE.sub(lambda m: _include(m.group(1)), markdown)


def _default_of(path: str) -> str:
    """The default of the config key ``path`` (a dotted path into DiLoCoConfig)."""
    from fleet.diloco.config import DiLoCoConfig

    model: type[BaseModel] = DiLoCoConfig
    *parents, last = path.split(".")
    for name in parents:
        sub = _submodel(model.model_fields[name].annotation)
        if sub is None:
            raise ValueError(f"{{{{ default {path} }}}}: {name} is not a table")
        model = sub
    if last not in model.model_fields:
        raise ValueError(f"{{{{ default {path} }}}}: no config key {last!r}")
    value = model.model_fields[last].get_default(call_default_factory=True)
    return f"`{value}`" if isinstance(value, str) else _default(model.model_fields[last])


def _include(path: str) -> str:
    lines, fenced = [], False
    for line in (REPO / path).read_text().splitlines():
        fenced ^= line.lstrip().startswith("```")
        if not fenced and line.startswith("#"):
            line = "#" + line  # under the page's own title
        lines.append(line)
    return "\n".join(lines).replace("](../docs/", "](")


# ---- the config reference ---------------------------------------------------------


def config_reference() -> str:
    from fleet.cli.diloco_flags import CONFIG_FLAGS
    from fleet.diloco.config import DiLoCoConfig

    flags = {flag.path: flag for flag in CONFIG_FLAGS}
    sections: list[str] = []
    _model_section(DiLoCoConfig, "", flags, sections)
    return "\n\n".join(sections)


def _model_section(
    model: type[BaseModel], prefix: str, flags: dict[str, Any], out: list[str]
) -> None:
    title = f"`[{prefix}]`" if prefix else "Top level"
    doc = _text(model.__doc__ or "")
    rows = ["| key | flag | type | default | meaning |", "|---|---|---|---|---|"]
    nested: list[tuple[type[BaseModel], str]] = []
    out.append("")  # this model's place: before the tables of its nested models
    place = len(out) - 1
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        sub = _submodel(field.annotation)
        flag = flags.get(path)
        if sub is not None:
            nested.append((sub, path))
            kind, default = f"table [`[{path}]`](#{_anchor(path)})", "(its keys' defaults)"
            if not field.is_required() and field.get_default(call_default_factory=True) is None:
                default = "`None`"
        else:
            kind = _type(field.annotation, flag)
            default = "required" if field.is_required() else _default(field)
        limits = _limits(field.metadata)
        if limits:
            kind += f", {limits}"
        shown_flag = " / ".join(f"`{f}`" for f in flag.decl.split("/")) if flag else ""
        cells = [f"`{name}`", shown_flag, kind, default, _text(field.description or "")]
        rows.append("| " + " | ".join(c.replace("\n", " ") for c in cells) + " |")
    heading = f"### {title} {{#{_anchor(prefix or 'top-level')}}}"
    out[place] = "\n\n".join([heading, doc, "\n".join(rows)])
    for sub, path in nested:
        _model_section(sub, path, flags, out)


def _anchor(path: str) -> str:
    return "config-" + path.replace(".", "-").replace("_", "-")


def _submodel(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            if candidate.__name__.startswith("_"):
                continue
            return candidate
    return None


def _type(annotation: Any, flag: Any) -> str:
    choices = getattr(getattr(flag, "type", None), "choices", None)
    if choices:
        return "one of " + ", ".join(f"`{c}`" for c in choices)
    return _type_name(annotation)


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "`None`"
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(_type_name(a) for a in args))
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (list, tuple, set):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict or annotation is dict:
        return "table"
    if isinstance(annotation, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, f"`{annotation.__name__}`"
        )
    return f"`{annotation}`"


def _default(field: Any) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if value is None:
        return "`None`"
    return f"`{value!r}`"


def _limits(metadata: list[Any]) -> str:
    words = []
    for item in metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(item, attr, None)
            if value is not None and isinstance(item, annotated_types.BaseMetadata):
                words.append(f"{sign} {value}")
    return " and ".join(words)


def _text(docstring: str) -> str:
    """A docstring as Markdown: one paragraph per blank line, ``code`` and Sphinx roles as
    code spans."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", docstring)
    text = text.replace("``", "`")
    paragraphs = [" ".join(line.strip() for line in p.splitlines()) for p in text.split("\n\n")]
    return "\n\n".join(p.strip() for p in paragraphs if p.strip())
