"""Load a job spec from YAML with positions, so that every error names its line and column.

The YAML is composed into nodes first (not loaded straight into dicts) to keep each value's
start mark; pydantic's error locations are then mapped back to ``file:line:col``. Overrides
from ``--set a.b=c`` are applied before validation and reported as their own origin.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from fljob.errors import UsageError
from fljob.spec.models import JobSpec

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec: where, which field, what to do about it."""

    origin: str  # "spec.yaml:12:3" or "--set training.steps=x"
    field: str  # dotted path, e.g. "optimizer.lr"
    message: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.field or '(top level)'}: {self.message}"


def problem_at(spec: JobSpec, field: str, message: str) -> Problem:
    """A problem found after validation (e.g. by a backend), placed at the field's YAML position."""
    return Problem(spec.origin(field), field, message)


class SpecError(UsageError):
    """The spec cannot be used; carries every problem found, each with its position."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        super().__init__(str(self))

    def __str__(self) -> str:
        n = len(self.problems)
        head = f"{self.source} is not a valid fljob job spec ({n} problem{'s' if n != 1 else ''}):"
        return "\n".join([head, *(f"  {p}" for p in self.problems)])


# --------------------------------------------------------------------------- YAML with marks


MAX_SPEC_BYTES = 1 << 20
"""A spec or site profile is a page of YAML; a megabyte is not one."""
MAX_VALUES = 100_000
"""Values after aliases are expanded: a few hundred bytes of nested aliases can otherwise
stand for billions ("billion laughs")."""
MAX_DEPTH = 64
YAML_TAG = "tag:yaml.org,2002:"
PLAIN_TAGS = frozenset(YAML_TAG + t for t in ("str", "int", "float", "bool", "null", "map", "seq"))
TEXT_TAGS = frozenset({YAML_TAG + "timestamp"})  # 2024-01-01 is kept as the text it is
MERGE_TAG = YAML_TAG + "merge"


class _Builder:
    """Plain data from composed YAML nodes, with each value's position.

    Plain data only: mappings, sequences, strings, numbers, booleans, null. Merge keys (`<<:
    *defaults`) are applied as YAML 1.1 defines them (the mapping's own keys win, then the
    merged mappings in order); any other tag is refused; aliases are expanded, but never past
    MAX_VALUES values or MAX_DEPTH levels.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.positions: dict[Loc, str] = {}
        self.problems: list[Problem] = []
        self.values = 0
        self.constructor = yaml.SafeLoader("")  # only its constructor is used: scalar tags -> values

    def mark(self, node: yaml.Node) -> str:
        return f"{self.source}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        self.values += 1
        if self.values > MAX_VALUES or len(loc) > MAX_DEPTH:
            raise _TooLarge(self.mark(node))
        self.positions.setdefault(loc, self.mark(node))
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, loc)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != YAML_TAG + "seq":
                return self._refuse(node, loc)
            return [self.build(child, (*loc, i)) for i, child in enumerate(node.value)]
        if node.tag in TEXT_TAGS:
            return node.value
        if node.tag not in PLAIN_TAGS:
            return self._refuse(node, loc)
        return self._scalar(node, loc)

    def _scalar(self, node: yaml.Node, loc: Loc) -> Any:
        try:
            return self.constructor.construct_object(node)
        except (ValueError, TypeError, IndexError, yaml.YAMLError):  # an explicit !!int on text that is none
            self.problems.append(Problem(self.mark(node), _dotted(loc), f"{node.value!r} is not a "
                                         f"{node.tag.replace(YAML_TAG, '!!')}; remove the tag or fix the value"))
            return None

    def _refuse(self, node: yaml.Node, loc: Loc) -> None:
        self.problems.append(Problem(self.mark(node), _dotted(loc), f"YAML tags are not supported (got "
                                     f"{node.tag.replace(YAML_TAG, '!!')}); write the plain value without it"))

    def _mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[Any, Any] | None:
        if node.tag != YAML_TAG + "map":
            return self._refuse(node, loc)
        merged: dict[Any, Any] = {}
        own: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                if not all(isinstance(m, yaml.MappingNode) for m in sources):
                    self.problems.append(Problem(self.mark(value_node), _dotted(loc), "a merge key (<<) takes a "
                                                 "mapping or a list of mappings, e.g. <<: *defaults"))
                    continue
                for source in reversed(sources):  # the first named wins
                    merged.update(self.build(source, loc) or {})
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in PLAIN_TAGS:
                self.problems.append(Problem(self.mark(key_node), _dotted(loc), "keys must be plain names"))
                continue
            key = self._scalar(key_node, loc)
            if key in own:
                self.problems.append(Problem(self.mark(key_node), _dotted((*loc, key)), "duplicate key; keep only one"))
            self.positions[(*loc, key)] = self.mark(key_node)
            own[key] = self.build(value_node, (*loc, key))
        return {**merged, **own}


class _TooLarge(Exception):
    """The YAML expands past MAX_VALUES values or MAX_DEPTH levels."""


def _compose(text: str, source: str) -> tuple[Any, dict[Loc, str]]:
    """Parse YAML into plain data plus a map from each value's location to 'file:line:col'."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(source, [Problem(source, "", f"{len(text)} characters is too long for a spec "
                                         f"(at most {MAX_SPEC_BYTES}); is it the right file?")])
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise SpecError(source, [Problem(where, "", f"YAML syntax error: {exc.problem}. Fix the YAML syntax there.")]) from None
    except yaml.YAMLError as exc:
        raise SpecError(source, [Problem(source, "", f"YAML error: {exc}")]) from None
    except RecursionError:
        raise SpecError(source, [Problem(source, "", "the YAML is nested too deeply to be a spec")]) from None
    builder = _Builder(source)
    try:
        data = None if root is None else builder.build(root, ())
    except _TooLarge as exc:
        raise SpecError(source, [Problem(str(exc), "", f"the YAML expands to more than {MAX_VALUES} values or "
                                         f"{MAX_DEPTH} levels (aliases of aliases?); write the spec out plainly")]) from None
    if builder.problems:
        raise SpecError(source, builder.problems)
    return data, builder.positions


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[Loc, Any]:
    """'a.b.0.c=value' -> (('a', 'b', 0, 'c'), value parsed as YAML)."""
    if "=" not in text:
        raise SpecError("--set", [Problem(f"--set {text}", "", "expected KEY=VALUE, e.g. --set training.steps=100")])
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise SpecError("--set", [Problem(f"--set {text}", key, "the key must be a dotted path like training.steps")])
    loc = tuple(int(p) if p.isdigit() else p for p in key.split("."))
    if raw == "":
        return loc, ""
    try:
        value, _ = _compose(raw, f"--set {text}")
    except SpecError as exc:
        if any("syntax error" in p.message for p in exc.problems):
            return loc, raw  # not YAML: the plain text it is
        raise
    return loc, value


def apply_override(data: dict[str, Any], loc: Loc, value: Any, origin: str) -> None:
    """Set data[loc] = value, creating mappings on the way; lists are indexed, never grown."""
    node: Any = data
    for i, part in enumerate(loc[:-1]):
        nxt = loc[i + 1]
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise SpecError("--set", [Problem(origin, _dotted(loc[: i + 1]), f"no list item {part} to set")])
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise SpecError("--set", [Problem(origin, _dotted(loc[:i]), "is not a mapping, cannot set a field inside it")])
        node = node.setdefault(part, [] if isinstance(nxt, int) else {})
    last = loc[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise SpecError("--set", [Problem(origin, _dotted(loc), f"no list item {last} to set")])
        node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise SpecError("--set", [Problem(origin, _dotted(loc[:-1]), "is not a mapping, cannot set a field inside it")])


# --------------------------------------------------------------------------- errors


def _unwrap(annotation: Any) -> Any:
    """The model or container type inside Optional[...] / Annotated[...]."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    return annotation


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The pydantic model class that owns the keys at `loc` (None for free-form mappings)."""
    current: Any = JobSpec
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif typing.get_origin(current) in (list, tuple) and isinstance(part, int):
            current = typing.get_args(current)[0]
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _describe(err: dict[str, Any]) -> str:
    loc: Loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden" and loc:
        owner = _model_at(loc[:-1])
        known = sorted(owner.model_fields) if owner else []
        hint = _suggest(str(loc[-1]), known)
        listing = f" Known fields here: {', '.join(known)}." if known else ""
        return f"unknown field {str(loc[-1])!r}.{hint}{listing} Remove or rename it."
    if kind == "missing":
        return "required field is missing; add it."
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        choices = [c.strip().strip("'") for c in expected.replace(" or ", ",").split(",") if c.strip()]
        got = str(err.get("input"))
        return f"{got!r} is not allowed; use one of {expected}.{_suggest(got, choices)}"
    if kind == "value_error":
        return err["msg"].removeprefix("Value error, ").rstrip(".") + "."
    return f"{err['msg']} (got {err.get('input')!r}); fix the value."


def validation_problems(exc: ValidationError, origin_of: Callable[[Loc], str],
                        prefix: str = "") -> list[Problem]:
    """pydantic's errors as Problems: each placed by ``origin_of(loc)``, its message prefixed."""
    problems = []
    for err in exc.errors():
        loc = _field_loc(tuple(err["loc"]))
        problems.append(Problem(origin_of(loc), _dotted(loc), prefix + _describe({**err, "loc": loc})))
    return problems


def _origin(loc: Loc, positions: dict[Loc, str], source: str) -> str:
    for n in range(len(loc), -1, -1):
        if loc[:n] in positions:
            return positions[loc[:n]]
    return source


# pydantic's synthetic location parts: 'function-after[_check(), Model]', 'list[str]', ...
_SYNTHETIC = re.compile(r"^[a-z][a-z-]*\[.*\]$")


def _field_loc(loc: Loc) -> Loc:
    """Drop pydantic's synthetic location parts (a user's key, however odd, stays)."""
    return tuple(p for p in loc if not (isinstance(p, str) and _SYNTHETIC.match(p)))


# --------------------------------------------------------------------------- entry points


SCRATCH_PREFIX = "x-"
"""Top-level keys starting with it hold YAML anchors for merge keys and are not spec fields:
`x-defaults: &defaults {...}`, then `training: {<<: *defaults, steps: 100}`."""


def _compose_mapping(text: str, source: str) -> tuple[dict[str, Any], dict[Loc, str]]:
    data, positions = _compose(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(source, [Problem(f"{source}:1:1", "", "the spec must be a YAML mapping of fields")])
    return {k: v for k, v in data.items() if not str(k).startswith(SCRATCH_PREFIX)}, positions


def _merge_under(site: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The spec over the site profile: mappings merge key by key, any other value replaces."""
    merged = dict(site)
    for key, value in spec.items():
        below = merged.get(key)
        merged[key] = _merge_under(below, value) if isinstance(below, dict) and isinstance(value, dict) else value
    return merged


def load_spec_text(text: str, source: str = "<spec>", overrides: list[str] = (),
                   site: tuple[str, str] | None = None) -> JobSpec:
    """Validate YAML text (plus `--set` overrides) into a JobSpec, or raise SpecError.

    ``site`` is (text, source) of a site profile: a partial spec of a cluster's defaults
    (partition, account, container mounts, storage endpoint) that the spec is laid over.
    """
    data, positions = _compose_mapping(text, source)
    if site is not None:
        site_data, site_positions = _compose_mapping(*site)
        data = _merge_under(site_data, data)
        positions = {**site_positions, **positions}
    for text_override in overrides:
        loc, value = parse_override(text_override)
        origin = f"--set {text_override}"
        apply_override(data, loc, value, origin)
        for known in [k for k in positions if k[: len(loc)] == loc]:
            positions[known] = origin
        positions[loc] = origin
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        problems = validation_problems(exc, lambda loc: _origin(loc, positions, source))
        problems.sort(key=lambda p: _line_col(p.origin))
        raise SpecError(source, problems) from None
    spec._origins = {"": source, **{_dotted(loc): where for loc, where in positions.items() if loc}}
    return spec


def _line_col(origin: str) -> tuple[int, int]:
    """Sort key: problems in file order, overrides last."""
    parts = origin.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return int(parts[1]), int(parts[2])
    return (1 << 30, 0)


def _read(path: str | Path, what: str) -> tuple[str, str]:
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8"), str(p)
    except OSError as exc:
        raise SpecError(str(p), [Problem(str(p), "", f"cannot read the {what}: {exc.strerror}. Check the path.")]) from None
    except UnicodeDecodeError:
        raise SpecError(str(p), [Problem(str(p), "", f"the {what} is not UTF-8 text")]) from None


def load_spec(path: str | Path, overrides: list[str] = (), site: str | Path | None = None) -> JobSpec:
    """Read and validate a spec file, laid over an optional site profile (see load_spec_text)."""
    text, source = _read(path, "spec")
    return load_spec_text(text, source, overrides, site=_read(site, "site profile") if site else None)


def dump_spec(spec: JobSpec) -> str:
    """The resolved spec as YAML, byte-stable, for shipping beside the job."""
    header = "# Resolved fljob job spec: every default filled in. Shipped with the job; the trainer reads it.\n"
    unset = {name for name in ("sweep", "trial") if getattr(spec, name) is None}  # plain jobs stay as they were
    data = spec.model_dump(mode="json", exclude=unset)
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)
