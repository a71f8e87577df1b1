"""The config reference: every field of the schema by its YAML path, with type, default and doc line.

:func:`fields` walks :class:`~ensemble_kd.core.config.ExperimentConfig` and yields one
:class:`FieldDoc` per field, named as it is written in a YAML file (``distill.optim.lr``; an item
of a list of sections as ``distill.losses[].kwargs``), its type as a YAML user reads it
(``int (>= 1)``, ``'sgd' | 'adamw'``, ``section | null``), its default as YAML (``required``
where there is none) and its one-line description (the schema's ``Field(description=...)``).
:func:`text` (``ensemble-kd config docs``) and :func:`markdown` (``docs/config.md``, written by
``ensemble-kd config docs --markdown > docs/config.md``) render the same rows, grouped by
top-level section. :func:`type_name` and :func:`yaml_value` are also how ``ensemble-kd list
losses`` shows each loss's options.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic_core import PydanticUndefined

from ensemble_kd.core.config import ExperimentConfig, to_dict

REGENERATE = "ensemble-kd config docs --markdown > docs/config.md"
"""The command that writes docs/config.md (a test fails when the file differs from its output)."""

TOP_LEVEL = "(top level)"
"""The group of the top-level fields that are not sections (``name``, ``output_dir``, ...)."""


@dataclass(frozen=True)
class FieldDoc:
    """One config field: ``path`` as written in YAML, ``type``, ``default`` (YAML), ``doc`` line,
    ``section`` (the top-level section it belongs to, or :data:`TOP_LEVEL`)."""

    path: str
    type: str
    default: str
    doc: str
    section: str


# ----------------------------------------------------------------------------------------------
# types and values as a YAML user reads them
# ----------------------------------------------------------------------------------------------
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _constraints(metadata: Sequence[Any]) -> list[str]:
    """``>= 1``, ``< 1``, ``at least 1 item``, ``matching ^...$`` of pydantic/annotated-types metadata."""
    out: list[str] = []
    for m in metadata:
        inner = getattr(m, "metadata", None)  # a pydantic FieldInfo inside Annotated[...]
        if isinstance(inner, list):
            out += _constraints(inner)
            continue
        for attr, sign in _BOUNDS:
            if getattr(m, attr, None) is not None:
                out.append(f"{sign} {getattr(m, attr)}")
        if getattr(m, "min_length", None):
            n = m.min_length
            out.append(f"at least {n} item{'s' if n != 1 else ''}")
        if getattr(m, "pattern", None):
            out.append(f"matching {m.pattern}")
    return out


def type_name(tp: Any, metadata: Sequence[Any] = ()) -> str:
    """A resolved annotation as a YAML user reads it: ``int (>= 1)``, ``'sgd' | 'adamw'``,
    ``list[int]``, ``mapping``, ``section``, ``list[section]``, ``str | null``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return type_name(args[0], [*args[1:], *metadata])
    limits = _constraints(metadata)
    suffix = f" ({', '.join(limits)})" if limits else ""
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in args) + suffix
    if origin in (typing.Union, types.UnionType):
        # the bounds belong to the members that are numbers or lists, not to null or a literal
        parts = [type_name(a, () if typing.get_origin(a) is Literal else metadata) for a in args if a is not type(None)]
        return " | ".join(parts + (["null"] if type(None) in args else []))
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        item = args[0] if args else Any
        return f"list[{type_name(item)}]{suffix}"
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        return f"mapping{suffix}"
    if dataclasses.is_dataclass(tp):
        return f"section{suffix}"
    if tp is Any:
        return f"any{suffix}"
    return f"{getattr(tp, '__name__', str(tp))}{suffix}"


def yaml_value(v: Any) -> str:
    """A default as it is written in YAML, on one line (``null``, ``true``, ``[150, 180, 210]``, ``{}``)."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        v = to_dict(v)
    elif isinstance(v, tuple) and any(dataclasses.is_dataclass(x) for x in v):
        v = [to_dict(x) for x in v]
    text = yaml.safe_dump(_plain(v), default_flow_style=True, sort_keys=False, width=10**9).strip()
    return text[:-len("\n...")].strip() if text.endswith("\n...") else text


def _plain(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return v


# ----------------------------------------------------------------------------------------------
# the walk
# ----------------------------------------------------------------------------------------------
def _default(info: Any) -> str:
    if info is dataclasses.MISSING:  # a plain field without a default
        return "required"
    if not hasattr(info, "description"):  # a plain default (not a pydantic Field)
        return yaml_value(info)
    if info.default_factory is not None:
        made = info.default_factory()
        return "" if dataclasses.is_dataclass(made) else yaml_value(made)  # a section: its fields have theirs
    return "required" if info.default is PydanticUndefined else yaml_value(info.default)


def _sections(tp: Any) -> tuple[type | None, bool]:
    """(the section class a field of type ``tp`` holds, whether as a list of them), through
    Annotated, ``X | None`` and ``tuple[X, ...]``; (None, False) for a value field."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _sections(args[0])
    if dataclasses.is_dataclass(tp):
        return tp, False
    if origin in (tuple, list) and args and dataclasses.is_dataclass(args[0]):
        return args[0], True
    if args and origin not in (tuple, list, dict, Literal):  # a union
        for a in args:
            found = _sections(a)
            if found[0] is not None:
                return found
    return None, False


def _walk(cls: type, prefix: str, section: str | None) -> Iterator[FieldDoc]:
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp, info = hints[f.name], f.default
        meta = getattr(info, "metadata", [])
        sub, many = _sections(tp)
        top = section if section is not None else (f.name if sub is not None else TOP_LEVEL)
        doc = " ".join((getattr(info, "description", None) or "").split())  # one line
        yield FieldDoc(path, type_name(tp, meta), _default(info), doc, top)
        if sub is not None:
            yield from _walk(sub, f"{path}[]." if many else f"{path}.", top)


def fields(root: type = ExperimentConfig) -> list[FieldDoc]:
    """Every field of the schema, depth first in the schema's order (a section's row, then its fields)."""
    return list(_walk(root, "", None))


def _grouped(rows: list[FieldDoc]) -> list[tuple[str, str, list[FieldDoc]]]:
    """(section, its doc line, its rows) per top-level section; the top-level values first."""
    docs = {r.path: r.doc for r in rows}
    order = [TOP_LEVEL] + list(dict.fromkeys(r.section for r in rows if r.section != TOP_LEVEL))
    groups = [(s, docs.get(s, "the experiment's own fields"), [r for r in rows if r.section == s]) for s in order]
    return [g for g in groups if g[2]]


# ----------------------------------------------------------------------------------------------
# renderings
# ----------------------------------------------------------------------------------------------
def text(rows: list[FieldDoc] | None = None) -> str:
    """``ensemble-kd config docs``: one line per field, ``path  type = default  -- doc``, under a line per
    top-level section (its own doc line; a section has no default of its own, its fields have)."""
    rows = fields() if rows is None else rows
    width = max(len(r.path) for r in rows)
    out = []
    for section, doc, group in _grouped(rows):
        out.append(f"{section}: {doc}")
        out += [f"  {r.path:<{width}}  {r.type}{f' = {r.default}' if r.default else ''}  -- {r.doc}"
                for r in group if r.path != section]
    return "\n".join(out) + "\n"


def _cell(s: str, code: bool = False) -> str:
    """A table cell's text: ``|`` escaped (it ends a cell even in code), ``<`` too outside code (an HTML tag)."""
    s = s.replace("|", "\\|")
    return s if code else s.replace("<", "&lt;")


def markdown(rows: list[FieldDoc] | None = None) -> str:
    """docs/config.md: a table per top-level section (key, type, default, description), under the
    section's heading and doc line."""
    rows = fields() if rows is None else rows
    out = ["# Config reference", "",
           "Every field of a config file, by its YAML path (`distill.losses[].kwargs`: the `kwargs` of each item of",
           "the list `distill.losses`), with its type, its default and what it does. A config file gives only the",
           "fields it changes; `ensemble-kd config show` prints a whole one, `ensemble-kd list losses` each loss's",
           "options (`distill.losses[].kwargs`) and `ensemble-kd list datasets` each dataset's (`data.kwargs`).",
           "", f"Generated from the schema (`ensemble_kd/core/config.py`) by `{REGENERATE}`; do not edit by hand.", ""]
    for section, doc, group in _grouped(rows):
        out += [f"## {section if section != TOP_LEVEL else 'Top level'}", "", doc[:1].upper() + doc[1:] + ".", "",
                "| key | type | default | description |", "| --- | --- | --- | --- |"]
        out += [f"| `{_cell(r.path, True)}` | `{_cell(r.type, True)}` | {f'`{_cell(r.default, True)}`' if r.default else ''} "
                f"| {_cell(r.doc)} |"
                for r in group if r.path != section]
        out.append("")
    return "\n".join(out)
