"""Operators' Jinja templates: found by flow, tier, channel kind and locale; rendered in
the sandbox; checked against the segment's columns before anything is sent.

A template file is ``templates/<flow>/<tier>.<kind>.<part>[.<locale>].j2``:

- ``kind`` is the channel's kind (email, sms, wechat, webhook);
- ``part`` is ``subject``, ``txt`` or ``html`` (email: subject and txt required, html
  optional; every other kind: txt);
- ``locale`` is tried as the recipient's full locale (``zh_CN``), then its language
  (``zh``), then no suffix, then the workspace's default language;
- a tier without its own file uses ``<flow>/default``; ``template: winback/vip`` in a tier
  replaces ``<flow>/<tier>``;
- a content variant ``V`` of an experiment looks in a folder of its own first,
  ``<flow>/V/<tier>`` then ``<flow>/V/default`` (``winback/V/vip`` for a tier's
  ``template``), part by part, then falls back to the files above: a subject-line test
  needs only ``V/<tier>.email.subject.j2``.

Templates see the segment's columns plus ``flow``, ``tier``, ``run_key``, ``channel`` and
``variant`` (the content variant, or none), and ``unsubscribe_url`` when the workspace
sets ``unsubscribe`` (see ``herald.delivery.unsubscribe.for_message``).
"""

from __future__ import annotations

import re
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from jinja2 import (
    Environment,
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateSyntaxError,
    meta,
    nodes,
)
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from herald.core.errors import Problem, did_you_mean
from herald.core.files import UnreadableFile, read_text
from herald.core.spec import FlowSpec
from herald.core.workspace import Workspace

GLOBALS = frozenset({"flow", "tier", "run_key", "channel", "variant"})
PARTS: dict[str, tuple[tuple[str, bool], ...]] = {
    # kind: ((part, required), ...)
    "email": (("subject", True), ("txt", True), ("html", False)),
    "sms": (("txt", True),),
    "wechat": (("txt", True),),
    "webhook": (("txt", True),),
}
PART_NAMES = {"subject": "subject", "txt": "text", "html": "HTML"}
_VARIANT = re.compile(
    r"^(?P<base>.+)\.(?P<part>subject|txt|html)(?:\.(?P<locale>[A-Za-z_-]+))?\.j2$")


def _autoescape(name: str | None) -> bool:
    return bool(name) and ".html." in f"{name}."


def _blank_none(value: Any) -> Any:
    """A NULL column prints as nothing, never as the text "None" ("Dear None"); an
    unknown name still fails (StrictUndefined), and ``default('there', true)`` gives a
    fallback for both empty and NULL values."""
    return "" if value is None else value


def _render(template: Template, names: dict[str, Any]) -> str:
    """``template.render(variables)`` given the template's globals and the variables in
    one dict, which the context reads as it is: ``render`` copies the variables, and its
    context copies them again beside the globals, two copies of the row per part. What a
    template assigns goes into its context, never into ``names``."""
    context = template.new_context(names, shared=True)
    try:
        return template.environment.concat(  # type: ignore[attr-defined,no-any-return]
            template.root_render_func(context))
    except Exception:  # noqa: BLE001 - re-raised with the template's file and line
        template.environment.handle_exception()
        raise  # handle_exception always raises


OUTSIDE = "is a link to a file outside templates/ (templates are read only from there)"


# What Herald sets in every campaign message's variables, over the segment's columns of
# the same name (herald.flows.chunks.build_message; flows/validate.py warns of a column
# so hidden)
OWN_VARIABLES = {"flow": "the flow's name", "tier": "the recipient's tier",
                 "run_key": "the run key", "channel": "the channel's name",
                 "variant": "the experiment's variant", "unsubscribe_url": "the recipient's "
                 "unsubscribe link"}


class _Loader(FileSystemLoader):
    """Jinja's file loader, refusing a file whose real path is outside its folder (a
    link out of templates/): validation refuses it first, and a run never reads it."""

    def __init__(self, root: Path) -> None:
        # utf-8-sig: a byte-order mark some editors write would start the message
        super().__init__(str(root), encoding="utf-8-sig")
        self._real_root = root.resolve()

    def get_source(self, environment: Environment, template: str
                   ) -> tuple[str, str, Callable[[], bool]]:
        source, filename, uptodate = super().get_source(environment, template)
        if not Path(filename).resolve().is_relative_to(self._real_root):
            raise SecurityError(f"templates/{template} {OUTSIDE}")
        return source, filename, uptodate


class Rendered(NamedTuple):
    subject: str | None
    body: str
    html: str | None


class RenderError(Exception):
    """A template failed for one recipient (recorded as that recipient's outcome)."""


class Templates:
    """Find, compile and render a workspace's templates (one instance per run)."""

    def __init__(self, root: Path, default_locale: str = "en",
                 extra_globals: frozenset[str] = frozenset()) -> None:
        self.root = root
        self.default_locale = default_locale
        self.globals = GLOBALS | extra_globals  # e.g. unsubscribe_url, when configured
        self.env = SandboxedEnvironment(
            loader=_Loader(root),
            undefined=StrictUndefined,
            finalize=_blank_none,
            autoescape=_autoescape,
            keep_trailing_newline=False,
            auto_reload=False,
        )
        self._found: dict[tuple[str, ...], str | None] = {}
        self._compiled: dict[str, Template] = {}  # jinja's own cache locks on each lookup

    def prefixes(self, flow: FlowSpec, tier: str, variant: str | None = None) -> list[str]:
        """The file prefixes a tier's templates are looked up under, in order."""
        spec = flow.tiers.get(tier)
        first = spec.template if spec and spec.template else f"{flow.name}/{tier}"
        default = f"{flow.name}/default"
        plain = [first] if first == default else [first, default]
        if variant is None:
            return plain
        return [*(variant_prefix(p, variant) for p in plain), *plain]

    def own_prefixes(self, flow: FlowSpec, tier: str, variant: str) -> list[str]:
        """The prefixes only a variant's own files live under."""
        return [variant_prefix(p, variant) for p in self.prefixes(flow, tier)]

    def find(self, flow: FlowSpec, tier: str, kind: str, part: str,
             locale: str | None, variant: str | None = None) -> str | None:
        """The template name for one message part, or None when there is none."""
        cache_key = (flow.name, tier, kind, part, locale or "", variant or "")
        if cache_key in self._found:
            return self._found[cache_key]
        found = None
        for prefix in self.prefixes(flow, tier, variant):
            for suffix in self._locale_suffixes(locale):
                name = f"{prefix}.{kind}.{part}{suffix}.j2"
                if (self.root / name).is_file():
                    found = name
                    break
            if found:
                break
        self._found[cache_key] = found
        return found

    def _locale_suffixes(self, locale: str | None) -> list[str]:
        out: list[str] = []
        if locale:
            out.append(f".{locale}")
            lang = re.split(r"[_-]", locale)[0]
            if lang != locale:
                out.append(f".{lang}")
        out.append("")
        out.append(f".{self.default_locale}")
        return list(dict.fromkeys(out))

    def render(self, flow: FlowSpec, tier: str, kind: str, locale: str | None,
               variables: dict[str, Any], variant: str | None = None) -> Rendered:
        """Render every part of one message; RenderError says which part failed and why."""
        parts: dict[str, str | None] = {}
        names: dict[str, Any] | None = None  # what every part sees: globals, then variables
        for part, required in PARTS[kind]:
            name = self.find(flow, tier, kind, part, locale, variant)
            if name is None:
                if required:
                    raise RenderError(f"no {kind} {part} template for tier '{tier}'"
                                      f"{f' and locale {locale}' if locale else ''}")
                parts[part] = None
                continue
            try:
                template = self._compiled.get(name)
                if template is None:
                    template = self._compiled[name] = self.env.get_template(name)
                    # Jinja keeps a template's globals as a ChainMap over the
                    # environment's and copies it into every render's context (a quarter
                    # of a render's profiled time); Herald never changes globals after
                    # loading, so a plain dict of the same names serves
                    template.globals = dict(template.globals)
                if names is None:
                    names = {**template.globals, **variables}
                parts[part] = _render(template, names)
            except UndefinedError as exc:
                raise RenderError(f"{self._where(name, exc)}: {exc.message}") from None
            except SecurityError as exc:
                raise RenderError(f"{self._where(name, exc)}: blocked by the sandbox: "
                                  f"{exc}") from None
            except RecursionError:
                raise RenderError(f"templates/{name}: RecursionError: a macro or include "
                                  "calls itself without end") from None
            except Exception as exc:  # noqa: BLE001 - any failure is this recipient's
                # (a KeyError from str.format, a filter's error): the template is named
                # and the rest of the chunk is sent
                raise RenderError(f"{self._where(name, exc)}: {type(exc).__name__}: "
                                  f"{str(exc)[:200]}") from None
        subject = parts.get("subject")
        if subject is not None:
            subject = " ".join(subject.split())  # a header is one line
            if not subject:
                raise RenderError("the email subject rendered empty")
        body = (parts.get("txt") or "").strip()
        if not body:
            raise RenderError(f"the {kind} text rendered empty")
        return Rendered(subject, body, parts.get("html"))

    def _where(self, name: str, exc: BaseException) -> str:
        """``templates/FILE:LINE`` of the innermost template frame of ``exc`` (Jinja
        maps its frames to template files and lines), else the part's template."""
        root = str(self.root.resolve())
        where = f"templates/{name}"
        for frame in traceback.extract_tb(exc.__traceback__):
            if frame.filename.startswith(root) and frame.filename.endswith(".j2"):
                rel = Path(frame.filename).resolve().relative_to(root)
                where = f"templates/{rel}:{frame.lineno}"
        return where

    # -- validation ----------------------------------------------------------------
    def check(self, flow: FlowSpec, kinds_by_tier: dict[str, set[str]],
              columns: set[str]) -> list[Problem]:
        """Every template a flow may use: present, compiling, using only known variables."""
        problems: list[Problem] = []
        checked: set[str] = set()
        available = columns | self.globals
        for tier in kinds_by_tier:
            named = flow.tiers[tier].template if tier in flow.tiers else None
            if named and not self._any_file(named):
                # a tier may take some parts from FLOW/default, but a template: that names
                # no file at all is a typo, and every message would quietly be the default
                folder = (self.root / named).parent
                near = [str(Path(named).parent / p.name.split(".")[0])
                        for p in sorted(folder.glob("*.j2"))] if folder.is_dir() else []
                problems.append(Problem(
                    f"no template file starts with templates/{named}. (like "
                    f"templates/{named}.email.txt.j2){did_you_mean(named, near)}",
                    field=f"tiers.{tier}.template"))
        for tier, kinds in kinds_by_tier.items():
            experiment = flow.experiment_for(tier)
            for variant in ([None, *experiment[1].variants] if experiment else [None]):
                for kind in sorted(kinds):
                    for part, required in PARTS[kind]:
                        candidates = [f"{p}.{kind}.{part}.j2"
                                      for p in self.prefixes(flow, tier, variant)]
                        if required and self.find(flow, tier, kind, part, None,
                                                  variant) is None and not any(
                                (self.root / c).is_dir() for c in candidates):
                            # (a folder in a template's place is named by _check_one)
                            first, *shared = [f"templates/{c}" for c in candidates]
                            problems.append(Problem(
                                f"no {kind} {PART_NAMES.get(part, part)} template for tier "
                                f"'{tier}'" + (f" (variant '{variant}')" if variant else "")
                                + f": create {first}"
                                + (f" (or {shared[0]}, used by every tier without its own)"
                                   if shared else ""), field=f"tiers.{tier}"))
                        for name in self.variants(flow, tier, kind, part, variant):
                            if name not in checked and self._blank(name):
                                problems.append(Problem(
                                    f"empty: every {kind} {PART_NAMES.get(part, part)} "
                                    "rendered from it would be empty (write it, or delete "
                                    "the file)", file=f"templates/{name}"))
                            problems.extend(self._check_one(name, available, columns,
                                                            checked))
        return problems

    def _any_file(self, prefix: str) -> bool:
        """Whether any template file (any kind, part or locale) has this prefix, or a
        content variant's folder beside it does."""
        folder = (self.root / prefix).parent
        stem = Path(prefix).name
        return folder.is_dir() and (any(folder.glob(f"{stem}.*.j2"))
                                    or any(folder.glob(f"*/{stem}.*.j2")))

    def _blank(self, name: str) -> bool:
        """A message's template file that holds nothing but white space."""
        try:
            return not (self.root / name).read_bytes().decode("utf-8-sig").strip()
        except (OSError, UnicodeDecodeError):
            return False  # _check_one names what is wrong with it

    def variants(self, flow: FlowSpec, tier: str, kind: str, part: str,
                 variant: str | None = None) -> list[str]:
        """Every file (all locales) that can serve this tier, kind and part (of a
        content variant: its own files and those it falls back to)."""
        out = []
        for prefix in self.prefixes(flow, tier, variant):
            folder = (self.root / prefix).parent
            stem = Path(prefix).name
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob(f"{stem}.{kind}.{part}*.j2")):
                match = _VARIANT.match(path.name)
                if match and match["base"] == f"{stem}.{kind}" and match["part"] == part:
                    out.append(str(path.relative_to(self.root)))
        return out

    def _check_one(self, name: str, available: set[str], columns: set[str],
                   checked: set[str], stack: tuple[str, ...] = ()) -> list[Problem]:
        """One template and, through its includes, imports and extends, every template it
        reaches (each checked once)."""
        if name in checked:
            return []
        checked.add(name)
        file = f"templates/{name}"
        if not (self.root / name).resolve().is_relative_to(self.root.resolve()):
            return [Problem(OUTSIDE, file=file)]
        try:
            source = read_text(self.root / name, file)
        except UnreadableFile as exc:
            return [Problem(exc.reason, file=file)]
        except UnicodeDecodeError as exc:
            return [Problem(f"not valid UTF-8 (byte {exc.start})", file=file)]
        try:
            ast = self.env.parse(source, name=name)
            missing = _unknown_filters_and_tests(ast, self.env)
            if missing:
                return [Problem(f"syntax error: {message}", file=file, line=lineno)
                        for message, lineno in missing]
            # Generating the code (not compiling it to bytecode) catches the rest of what
            # parse() lets through at half the cost of from_string (and
            # find_undeclared_variables below generates it too)
            self.env.compile(ast, name=name, raw=True)
        except TemplateSyntaxError as exc:  # TemplateAssertionError included
            return [Problem(f"syntax error: {exc.message}", file=file, line=exc.lineno)]
        unknown = sorted(meta.find_undeclared_variables(ast) - available)
        problems = []
        if unknown:
            line = _first_line(ast, set(unknown))
            hint = ("; unsubscribe_url needs `unsubscribe: {base_url, secret}` in "
                    "config/herald.yaml" if "unsubscribe_url" in unknown else "")
            problems.append(Problem(
                f"uses {', '.join(repr(u) for u in unknown)}, which the segment does not "
                f"return (columns: {', '.join(sorted(columns))}; also: "
                f"{', '.join(sorted(self.globals))}){hint}", file=file, line=line))
        # The sandbox refuses these when rendering too; refusing them here means a
        # template that tries to reach Python's internals never starts a run.
        for attr, lineno in _private_access(ast):
            problems.append(Problem(f"access to '{attr}' is not allowed (sandbox)",
                                    file=file, line=lineno))
        for what, targets, lineno, optional in _references(ast):
            if targets is None:
                problems.append(Problem(f"{what} with a computed template name cannot be "
                                        "checked before sending: name the file", file=file,
                                        line=lineno))
                continue
            found = []
            for target in targets:
                path = (self.root / target).resolve()
                if not path.is_relative_to(self.root.resolve()) or ".." in target.split("/"):
                    problems.append(Problem(f"{what} '{target}' climbs out of templates/",
                                            file=file, line=lineno))
                elif path.is_file():
                    found.append(target)
            if not found and not optional and not any(
                    p.file == file and p.line == lineno for p in problems):
                problems.append(Problem(
                    f"{what} '{' or '.join(targets)}': templates/{targets[0]} does not exist",
                    file=file, line=lineno))
            for target in found:
                if target in stack or target == name:
                    problems.append(Problem(f"{what} '{target}' makes a cycle: "
                                            f"{' -> '.join((*stack, name, target))}",
                                            file=file, line=lineno))
                    continue
                problems.extend(self._check_one(target, available, columns, checked,
                                                (*stack, name)))
        return problems


def templates_for(ws: Workspace) -> Templates:
    """Fresh templates of ``ws`` (validation, preview): its folder, its default locale,
    and ``unsubscribe_url`` among the globals when it configures unsubscribe links."""
    extra = frozenset({"unsubscribe_url"}) if ws.config.unsubscribe else frozenset()
    return Templates(ws.templates_dir, ws.config.default_locale, extra)


# Compiled templates per workspace folder of this process, for the chunks of runs and
# ticks; rebuilt when the folder's workspace is another object (it was reopened).
_shared: dict[str, tuple[Workspace, Templates]] = {}
_shared_lock = threading.Lock()


def shared(ws: Workspace) -> Templates:
    """This process's compiled templates of ``ws``."""
    root = str(ws.root)
    with _shared_lock:
        cached = _shared.get(root)
        if cached is None or cached[0] is not ws:
            cached = _shared[root] = (ws, templates_for(ws))
        return cached[1]


def forget_shared() -> None:
    """Drop every cached set of templates (tests that drop their workspaces)."""
    with _shared_lock:
        _shared.clear()


def variant_prefix(prefix: str, variant: str) -> str:
    """``winback/loyal`` of variant ``b``: ``winback/b/loyal``."""
    folder, _, stem = prefix.rpartition("/")
    return f"{folder}/{variant}/{stem}" if folder else f"{variant}/{stem}"


def _references(ast: nodes.Template
                ) -> list[tuple[str, list[str] | None, int, bool]]:
    """Every ``include``, ``import``, ``from ... import`` and ``extends`` of a template:
    (what, the names it may load or None when computed, line, ignore missing)."""
    out: list[tuple[str, list[str] | None, int, bool]] = []
    for node in ast.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        what = {nodes.Include: "include", nodes.Import: "import",
                nodes.FromImport: "import", nodes.Extends: "extends"}[type(node)]
        expr = node.template  # type: ignore[attr-defined]
        names: list[str] | None = None
        if isinstance(expr, nodes.Const) and isinstance(expr.value, str):
            names = [expr.value]
        elif isinstance(expr, nodes.Const) and isinstance(expr.value, list | tuple) and \
                all(isinstance(v, str) for v in expr.value):
            names = list(expr.value)
        elif isinstance(expr, nodes.List | nodes.Tuple) and all(
                isinstance(i, nodes.Const) and isinstance(i.value, str) for i in expr.items):
            names = [str(i.value) for i in expr.items]  # type: ignore[attr-defined]
        out.append((what, names, int(node.lineno),
                    bool(getattr(node, "ignore_missing", False))))
    return out


def _unknown_filters_and_tests(ast: nodes.Template, env: Environment
                               ) -> list[tuple[str, int]]:
    """Filters and tests the environment lacks, as Jinja words them. Jinja itself refuses
    one only where it is sure to run: inside an ``if`` it becomes an error when the branch
    renders, a render error for those recipients only."""
    found: list[tuple[str, int]] = []
    for node in ast.find_all((nodes.Filter, nodes.Test)):
        known, what = (env.filters, "filter") if isinstance(node, nodes.Filter) \
            else (env.tests, "test")
        if node.name not in known:
            found.append((f"No {what} named '{node.name}'.", node.lineno))
    return found


def _private_access(ast: nodes.Template) -> list[tuple[str, int]]:
    """``x._y``, ``x['_y']`` and ``x|attr('_y')``: where a template reaches for a private
    or dunder attribute."""
    found: list[tuple[str, int]] = []
    for node in ast.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        name: object = None
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            name = node.arg.value
        elif isinstance(node, nodes.Filter) and node.name == "attr" and node.args \
                and isinstance(node.args[0], nodes.Const):
            name = node.args[0].value
        if isinstance(name, str) and name.startswith("_"):
            found.append((name, node.lineno))
    return found


def _first_line(ast: nodes.Template, names: set[str]) -> int | None:
    for node in ast.find_all(nodes.Name):
        if node.name in names and node.ctx == "load":
            return int(node.lineno)
    return None
