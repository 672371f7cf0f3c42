"""Load operators' YAML with line numbers, YAML 1.2 scalars and ``${ENV}`` interpolation.

PyYAML composes the node tree (which keeps each node's position); we convert the nodes
ourselves so that ``no``, ``on`` and ``2024-01-01`` stay strings (YAML 1.2 core schema,
not PyYAML's 1.1 surprises), duplicate keys are errors, and every value remembers its
line. Validation errors from pydantic are then mapped back to ``file:line field``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from herald.core.errors import ConfigError, Problem, did_you_mean
from herald.core.files import UnreadableFile, read_text

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)

_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = {"true": True, "True": True, "TRUE": True,
         "false": False, "False": False, "FALSE": False}
_INT = re.compile(r"^[-+]?[0-9]+$")
_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class Located:
    """The parsed document plus the line of every value, by path."""

    def __init__(self, file: str, data: Any, lines: dict[Loc, int],
                 missing_env: list[Problem] | None = None) -> None:
        self.file = file
        self.data = data
        self.lines = lines
        self.missing_env = missing_env or []  # channels' unset ${VARS}, for senders

    def line_of(self, loc: Loc) -> int | None:
        """The line of ``loc``, or of its nearest ancestor that has one."""
        for end in range(len(loc), -1, -1):
            line = self.lines.get(tuple(loc[:end]))
            if line is not None:
                return line
        return None


def load_yaml(path: Path, display: str | None = None, env: Mapping[str, str] | None = None
              ) -> Located:
    """Read ``path``; raise ConfigError naming the file and line on any problem."""
    name = display or str(path)
    try:
        text = read_text(path, name)
    except UnreadableFile as exc:
        raise ConfigError([Problem(exc.reason, file=name)]) from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError([Problem("not valid UTF-8", file=name, line=line)]) from None
    return parse_yaml(text, name, os.environ if env is None else env)


def parse_yaml(text: str, file: str, env: Mapping[str, str]) -> Located:
    """Parse YAML text (see module docstring) into a ``Located`` document."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise ConfigError([Problem(f"invalid YAML: nested deeper than {MAX_DEPTH} levels",
                                   file=file)]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        msg = exc.problem or exc.context or "invalid YAML"
        raise ConfigError([Problem(f"invalid YAML: {msg}", file=file, line=line)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(f"invalid YAML: {exc}", file=file)]) from None
    lines: dict[Loc, int] = {}
    problems: list[Problem] = []
    try:
        data = {} if root is None else _convert(root, (), lines, problems, file, env,
                                                _Budget(), ())
    except _Refused as exc:
        raise ConfigError([Problem(f"invalid YAML: {exc.args[0]}", file=file,
                                   line=exc.args[1])]) from None
    # A channel's secrets (and the unsubscribe secret) matter only to the commands that
    # send: a missing one is kept for them to report (``Workspace.missing_secrets``), so
    # read-only commands (report, suppress list) work without them.
    deferred = [p for p in problems if p.field
                and p.field.startswith(("channels.", "unsubscribe.secret"))
                and p.message.startswith("environment variable ")]
    problems = [p for p in problems if p not in deferred]
    if problems:
        raise ConfigError(problems)
    return Located(file, data, lines, deferred)


# Bounds on what a document may expand to: aliases can make a few hundred bytes stand
# for billions of values ("billion laughs"), or refer to themselves.
MAX_DEPTH = 64
MAX_VALUES = 100_000


class _Refused(Exception):
    """(message, line): the document is refused as a whole."""


class _Budget:
    values = 0


def _convert(node: yaml.Node, loc: Loc, lines: dict[Loc, int], problems: list[Problem],
             file: str, env: Mapping[str, str], budget: _Budget,
             path: tuple[int, ...]) -> Any:
    line = node.start_mark.line + 1
    if id(node) in path:
        raise _Refused("an alias refers to a value that contains it", line)
    if len(path) >= MAX_DEPTH:
        raise _Refused(f"nested deeper than {MAX_DEPTH} levels", line)
    budget.values += 1
    if budget.values > MAX_VALUES:
        raise _Refused(f"more than {MAX_VALUES:,} values once aliases are expanded "
                       "(an alias bomb?)", line)
    path = (*path, id(node))
    lines[loc] = line
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is None or key == "<<":
                problems.append(Problem("keys must be plain strings (no merge keys)",
                                        file=file, line=key_node.start_mark.line + 1,
                                        field=dotted(loc)))
                continue
            if key in out:
                problems.append(Problem(f"duplicate key '{key}'", file=file,
                                        line=key_node.start_mark.line + 1,
                                        field=dotted(loc)))
                continue
            out[key] = _convert(value_node, (*loc, key), lines, problems, file, env, budget,
                                path)
            # point at the key's line: for a nested mapping that is where "key:" stands
            lines[(*loc, key)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*loc, i), lines, problems, file, env, budget, path)
                for i, item in enumerate(node.value)]
    assert isinstance(node, yaml.ScalarNode)
    if node.tag not in ("tag:yaml.org,2002:str", "tag:yaml.org,2002:int",
                        "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool",
                        "tag:yaml.org,2002:null", "tag:yaml.org,2002:timestamp",
                        "tag:yaml.org,2002:value", "tag:yaml.org,2002:merge"):
        problems.append(Problem(f"unsupported YAML tag {node.tag}", file=file,
                                line=lines[loc], field=dotted(loc)))
        return None
    value = node.value
    if "${" in value:
        value = _interpolate(value, env, lambda msg: problems.append(
            Problem(msg, file=file, line=lines[loc], field=dotted(loc))))
        return EnvText(value)  # an interpolated value is always a string
    if node.style is not None:  # quoted or block scalar: a string, whatever it looks like
        return value
    if _NULL.match(value):
        return None
    if value in _BOOL:
        return _BOOL[value]
    if _INT.match(value):
        return int(value)
    if _FLOAT.match(value):
        return float(value)
    return value


class EnvText(str):
    """A value with ``${NAME}`` in it: text, whatever it looks like (a model's field
    keeps it as a plain str); its type errors say where the text came from."""

    __slots__ = ()


def _interpolate(value: str, env: Mapping[str, str], report: Any) -> str:
    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        report(f"environment variable {name} is not set")
        return ""

    return _ENV.sub(sub, value)


def dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def validate(model: type[M], doc: Located, context: dict[str, Any] | None = None,
             prefix: Loc = ()) -> M:
    """Validate ``doc.data`` (or the part at ``prefix``) into ``model``.

    Every pydantic error becomes a Problem with the file, the line and the field path;
    unknown keys get a "did you mean" suggestion.
    """
    data: Any = doc.data
    for part in prefix:
        data = data[part]
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(problems_from(exc, doc, model, prefix)) from None


def problems_from(exc: ValidationError, doc: Located, model: type[BaseModel] | None = None,
                  prefix: Loc = ()) -> list[Problem]:
    """Turn a pydantic ValidationError into located Problems (never echoing values)."""
    problems: list[Problem] = []
    for loc, err, msg in readable_errors(exc):
        loc = (*prefix, *loc)
        if err["type"] == "extra_forbidden":
            msg = unknown_key(loc[-1], _owner(model, loc[len(prefix):]) if model else None)
        problems.append(Problem(msg, file=doc.file, line=doc.line_of(loc),
                                field=dotted(loc) or None))
    return problems


def readable_errors(exc: ValidationError) -> list[tuple[Loc, ErrorDetails, str]]:
    """pydantic's errors as (path in the YAML, error, message for an operator).

    A value that no branch of a union accepts (``quiet_hours``: a mapping or ``false``)
    is reported once, by the branch the YAML meant, not also as "Input should be False";
    the message never names a model class, nor echoes the value (it may be a secret from
    the environment): it says which YAML type was expected and which was found."""
    located = [(_clean_loc(err["loc"]), err) for err in exc.errors(include_url=False)]
    out = []
    for loc, err in located:
        if _lost_branch(err) and any(other is not err and other_loc[:len(loc)] == loc
                                     for other_loc, other in located):
            continue  # another branch of the same union says what is wrong
        out.append((loc, err, _message(err, loc, located)))
    return out


def _lost_branch(err: ErrorDetails) -> bool:
    """A ``Literal`` branch of a union (pydantic names it ``literal[False]``)."""
    return (err["type"] == "literal_error" and bool(err["loc"])
            and str(err["loc"][-1]).startswith("literal["))


def _message(err: ErrorDetails, loc: Loc, located: list[tuple[Loc, ErrorDetails]]) -> str:
    kind = err["type"]
    if kind in _EXPECTED:
        return _wrong_type(_EXPECTED[kind], err.get("input"), yes_no=kind == "bool_type")
    if kind == "model_type":  # "Input should be a valid dictionary or instance of QuietHours"
        others = [str((other.get("ctx") or {}).get("expected", "")).lower()
                  for other_loc, other in located if other_loc == loc and _lost_branch(other)]
        return _wrong_type(" or ".join(["a mapping", *others]), err.get("input"))
    if kind == "missing":
        return "required key is missing"
    return err["msg"].removeprefix("Value error, ")


# What a strict model's type errors expect. The value itself is never echoed (it may be
# a secret from the environment); its YAML type is what went wrong.
_EXPECTED = {"bool_type": "true or false", "int_type": "a whole number",
             "float_type": "a number"}


def _wrong_type(expected: str, value: Any, yes_no: bool = False) -> str:
    if isinstance(value, bool):
        return f"must be {expected}, not {str(value).lower()}"
    if isinstance(value, str):
        word = value.strip().lower()
        if yes_no and word in ("yes", "no", "on", "off", "y", "n", "true", "false"):
            why = " (YAML 1.2 reads yes, no, on, off and quoted words as text)"
        elif isinstance(value, EnvText):
            why = (" (a ${NAME} value is always text: outside channels write the number "
                   "itself)")
        elif _INT.match(word) or _FLOAT.match(word):
            why = " (a quoted number is text)"
        else:
            why = ""
        return f"must be {expected}, not text{why}"
    if isinstance(value, float) and expected == "a whole number":
        return f"must be {expected}, not a fraction"
    if isinstance(value, int | float):
        return f"must be {expected}, not a number"
    kind = {list: "a list", dict: "a mapping", type(None): "empty"}.get(type(value))
    return f"must be {expected}, not {kind}" if kind else f"must be {expected}"


def _clean_loc(loc: tuple[Any, ...]) -> Loc:
    # pydantic inserts union/validator names (e.g. 'function-after[...]'); drop them
    return tuple(p for p in loc if isinstance(p, int) or not (
        "[" in p and "]" in p or p in ("str", "int", "float", "dict", "list")))


def unknown_key(key: str | int, owner: Any) -> str:
    """``unknown key 'X'``, with the closest field of ``owner`` (the model the key was
    written in, if known) as a did-you-mean."""
    fields = getattr(owner, "model_fields", None) or {}
    return f"unknown key '{key}'" + did_you_mean(
        str(key), [f.alias or n for n, f in fields.items()])


def _owner(model: type[BaseModel], loc: Loc) -> Any:
    """The model that owns the last key of ``loc`` (None when the path leaves models)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        fields = getattr(current, "model_fields", {})
        if part in fields:
            current = _model_in(fields[part].annotation)
        # keys of a dict[str, Model] field: stay on the value model
    return current


def _model_in(annotation: Any) -> Any:
    """The BaseModel inside ``annotation`` (``X``, ``list[X]``, ``dict[str, X]``, ``X|None``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
