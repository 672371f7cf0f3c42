"""Load ``config/journeys/NAME.yaml`` with positions, and validate it before any send.

``load`` checks the YAML and the graph (successors exist, every step is reachable, every
cycle passes a wait, channels and sources are configured); ``check`` adds what needs the
databases and files: the entry SQL and its columns, every condition's SQL, every template.
Each problem names the file, the line and the field, and all are reported at once.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError

from herald.audiences.sql import Segment, load_sql, probe
from herald.core import clock
from herald.core.errors import (
    AudienceError,
    ConfigError,
    Problem,
    ValidationFailed,
    WorkspaceError,
    did_you_mean,
)
from herald.core.spec import AudienceSpec, FlowSpec
from herald.core.workspace import (
    JOURNEYS_DIR,
    SourceError,
    Workspace,
    cap_problems,
    tier_channel_problems,
)
from herald.core.yamlio import Located, dotted, load_yaml, readable_errors, unknown_key
from herald.delivery.render import Templates, templates_for
from herald.journeys.spec import (
    STEP_TYPES,
    BranchStep,
    Condition,
    JourneySpec,
    SendStep,
    SplitStep,
    WaitForStep,
    WaitStep,
)
from herald.reporting.conversions import bind_period

GLOBALS = frozenset({"journey", "step", "variant"})  # besides the flows' template globals
_STEP_MODELS: dict[str, type[BaseModel]] = {
    "send": SendStep, "wait": WaitStep, "wait_for": WaitForStep, "branch": BranchStep,
    "split": SplitStep}


@dataclass(frozen=True)
class Loaded:
    spec: JourneySpec
    doc: Located
    file: str
    version: str
    definition: str  # the YAML's data as JSON: what a version stores

    def line(self, *loc: str | int) -> int | None:
        return self.doc.line_of(tuple(loc))


_cache: weakref.WeakKeyDictionary[Workspace, dict[str, Loaded]] = weakref.WeakKeyDictionary()


def names(ws: Workspace) -> list[str]:
    return ws.journey_names()


def load(ws: Workspace, name: str) -> Loaded:
    """The journey's validated YAML (ConfigError lists every problem)."""
    cached = _cache.setdefault(ws, {})
    if name not in cached:
        cached[name] = _load(ws, name)
    return cached[name]


def forget(ws: Workspace) -> None:
    _cache.pop(ws, None)


def _load(ws: Workspace, name: str) -> Loaded:
    rel = f"{JOURNEYS_DIR}/{name}.yaml"
    if not (ws.root / rel).exists():  # a folder there is named by load_yaml
        raise ws.not_found("journey", name)
    doc = load_yaml(ws.root / rel, rel)
    try:
        spec = JourneySpec.model_validate(doc.data)
    except ValidationError as exc:
        raise ConfigError(_problems(exc, doc)) from None
    definition = json.dumps(doc.data, ensure_ascii=False, default=str)
    version = hashlib.sha256(definition.encode()).hexdigest()[:16]
    loaded = Loaded(spec, doc, rel, version, definition)
    problems = _check_refs(ws, loaded, name) + graph_problems(loaded)
    if problems:
        raise ConfigError(problems)
    return loaded


def parse_definition(definition: str) -> JourneySpec:
    """A stored version's definition, validated again (it was valid when stored, perhaps
    under the lax types of earlier versions: an enrollment keeps its definition)."""
    return JourneySpec.model_validate(json.loads(definition), strict=False)


def _problems(exc: ValidationError, doc: Located) -> list[Problem]:
    """pydantic's errors as located Problems, without the step type pydantic inserts
    into the path of a step (``steps.warn.send.tiers`` is ``steps.warn.tiers``)."""
    out = []
    for found, err, msg in readable_errors(exc):
        loc = list(found)
        if len(loc) > 2 and loc[0] == "steps" and loc[2] in STEP_TYPES:
            del loc[2]
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = unknown_key(loc[-1], _owner(doc, loc))
        elif kind in ("union_tag_not_found", "union_tag_invalid"):
            msg = f"type must be one of: {', '.join(STEP_TYPES)}"
            loc = [*loc, "type"] if loc[-1:] != ["type"] else loc
        out.append(Problem(msg, file=doc.file, line=doc.line_of(tuple(loc)),
                           field=dotted(loc) or None))
    return out


def _owner(doc: Located, loc: list[str | int]) -> type[BaseModel] | None:
    """The model an unknown key was written in: the journey's, or a step's by its type
    (deeper keys get no suggestion)."""
    if len(loc) == 3 and loc[0] == "steps":
        step = doc.data.get("steps", {}).get(loc[1], {})
        return _STEP_MODELS.get(str(step.get("type")) if isinstance(step, dict) else "")
    return JourneySpec if len(loc) == 1 else None


def _check_refs(ws: Workspace, j: Loaded, name: str) -> list[Problem]:
    spec, problems = j.spec, []

    def add(message: str, *loc: str | int) -> None:
        problems.append(Problem(message, file=j.file, line=j.line(*loc), field=dotted(loc)))

    if spec.name != name:
        add(f"name '{spec.name}' must match the file name '{name}'", "name")
    if name in ws.flow_names():
        add(f"a flow is also named '{name}' (config/flows/{name}.yaml): give the journey "
            "another name", "name")
    sources = ws.config.sources
    if spec.entry.source not in sources:
        add(f"unknown source '{spec.entry.source}' (sources in config/herald.yaml: "
            f"{', '.join(sources) or 'none'})", "entry", "source")
    for loc, cond in conditions(spec):
        if cond.source and cond.source not in sources:
            add(f"unknown source '{cond.source}'", *loc, "source")
    if spec.goal and spec.goal.source and spec.goal.source not in sources:
        add(f"unknown source '{spec.goal.source}'", "goal", "source")
    for step_name, step in spec.steps.items():
        if isinstance(step, SendStep):
            problems += tier_channel_problems(step.tiers, j.doc, ws.channels,
                                              ("steps", step_name))
    return problems + cap_problems(spec.caps, j.doc, ws.channels, tiers=spec.tier_names(),
                                   tier_column=spec.entry.tier)


def conditions(spec: JourneySpec) -> list[tuple[tuple[str | int, ...], Condition]]:
    """Every SQL condition of a journey with its YAML path."""
    out: list[tuple[tuple[str | int, ...], Condition]] = [
        (("exit_when", i), c) for i, c in enumerate(spec.exit_when)]
    for name, step in spec.steps.items():
        if isinstance(step, WaitForStep):
            out.append((("steps", name), step))
        elif isinstance(step, BranchStep):
            out.extend((("steps", name, "cases", i, "condition"), c.condition)
                       for i, c in enumerate(step.cases) if c.condition)
    return out


def _edges(j: Loaded) -> list[tuple[str, str, tuple[str | int, ...]]]:
    """(from, to, YAML path of the reference) for every successor."""
    out: list[tuple[str, str, tuple[str | int, ...]]] = []
    for name, step in j.spec.steps.items():
        base = ("steps", name)
        if isinstance(step, SendStep | WaitStep) and step.next:
            out.append((name, step.next, (*base, "next")))
        elif isinstance(step, WaitForStep):
            out += [(name, step.matched, (*base, "matched")),
                    (name, step.timeout, (*base, "timeout"))]
        elif isinstance(step, BranchStep):
            out += [(name, c.next, (*base, "cases", i, "next")) for i, c in enumerate(step.cases)]
            out.append((name, step.default, (*base, "default")))
        elif isinstance(step, SplitStep):
            out += [(name, c.next, (*base, "cohorts", cohort, "next"))
                    for cohort, c in step.cohorts.items() if c.next]
    return out


def graph_problems(j: Loaded) -> list[Problem]:
    """Successors exist; every step is reachable; no cycle avoids a wait."""
    steps = j.spec.steps
    problems = []
    edges = _edges(j)
    for _src, dst, loc in edges:
        if dst not in steps:
            problems.append(Problem(
                f"unknown step '{dst}'" + (did_you_mean(dst, steps)
                                           or f" (steps: {', '.join(steps)})"),
                file=j.file, line=j.line(*loc), field=dotted(loc)))
    following: dict[str, list[str]] = {n: [] for n in steps}
    for src, dst, _ in edges:
        if dst in steps:
            following[src].append(dst)
    seen, todo = set(), [j.spec.first]
    while todo:
        step = todo.pop()
        if step not in seen:
            seen.add(step)
            todo.extend(following[step])
    for name in steps:
        if name not in seen:
            problems.append(Problem(f"step '{name}' is not reachable from the first step "
                                    f"'{j.spec.first}'", file=j.file,
                                    line=j.line("steps", name), field=f"steps.{name}"))
    # A cycle that can take no time would move a recipient round it forever within a
    # tick, sending at each turn. What always takes time: a wait for a duration or until
    # a time of day, and a wait_for's timeout. What may not: a wait_for's matched branch
    # (a condition that already holds does not wait) and a wait until a date column (a
    # date in the past, or none, does not wait).
    instant: dict[str, list[str]] = {n: [] for n in steps}
    for src, dst, loc in edges:
        if dst in steps and _takes_no_time(steps[src], loc):
            instant[src].append(dst)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in instant[node]:
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, [*path, nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for node in instant:
        if node not in state:
            cycle = visit(node, [node])
            if cycle:
                problems.append(Problem(
                    f"the cycle {' -> '.join(cycle)} can go round without waiting (a "
                    "wait_for's matched branch and a wait until a date column take no "
                    "time when the condition holds or the date has passed): put a "
                    "`wait: {for: ...}` in it",
                    file=j.file, line=j.line("steps", cycle[0]), field=f"steps.{cycle[0]}"))
                break
    return problems


def _takes_no_time(step: BaseModel, loc: tuple[str | int, ...]) -> bool:
    """Whether following this successor of ``step`` may happen in the same instant."""
    if isinstance(step, WaitStep):
        return step.until is not None and step.until.date is not None
    if isinstance(step, WaitForStep):
        return loc[-1] == "matched"
    return True


# -- the deeper check: SQL, columns, templates -----------------------------------------
@dataclass(frozen=True)
class Checked:
    loaded: Loaded
    segment: Segment
    columns: list[str]
    templates: int


def entry_audience(spec: JourneySpec) -> AudienceSpec:
    return spec.entry


def step_flow(spec: JourneySpec, step: SendStep, name: str) -> FlowSpec:
    """A send step as the flow the contact policy and the templates understand.

    ``name`` is ``journey:NAME`` for the policy (caps scoped to the journey count its
    ledger rows) or ``JOURNEY/STEP[/VARIANT]`` for templates (their folder).
    """
    flow = FlowSpec(name="journey", audience=spec.entry, tiers=step.tiers,
                    caps=spec.caps, quiet_hours=spec.quiet_hours, exempt=spec.exempt,
                    priority=spec.priority, timezone=spec.timezone)
    return flow.model_copy(update={"name": name})


def entry_segment(ws: Workspace, spec: JourneySpec) -> Segment:
    from herald.audiences.sql import bind_time

    return load_sql(ws, spec.entry.segment, spec.entry.source, spec.entry.params,
                    hint="set entry.params in the journey",
                    defaults={"now": bind_time(ws.source(spec.entry.source), clock.now())})


def condition_source(spec: JourneySpec, cond: Condition) -> str:
    return cond.source or spec.entry.source


def condition_sql(ws: Workspace, spec: JourneySpec, cond: Condition) -> Segment:
    return load_sql(ws, cond.condition, condition_source(spec, cond), cond.params,
                    ("since", "until"), hint="set params on the condition")


def check(ws: Workspace, name: str, templates: Templates | None = None) -> Checked:
    """Everything a tick needs, checked before anything is sent (ValidationFailed)."""
    j = load(ws, name)
    spec, problems = j.spec, []

    def at(message: str, *loc: str | int) -> Problem:
        return Problem(message, file=j.file, line=j.line(*loc), field=dotted(loc))

    try:
        segment = entry_segment(ws, spec)
        columns = probe(ws, spec.entry.source, segment, segment.params)
    except SourceError as exc:
        raise ValidationFailed([Problem(str(exc))]) from None
    except (AudienceError, WorkspaceError) as exc:
        raise ValidationFailed([at(str(exc), "entry", "segment")]) from None
    have = set(columns)
    entry = spec.entry
    for field, column in (("key", entry.key), ("tier", entry.tier),
                          ("locale", entry.locale), ("timezone", entry.timezone)):
        if column and column not in have:
            problems.append(at(f"column '{column}' is not in the result of {segment.file} "
                               f"(columns: {', '.join(columns)})", "entry", field))
    now = clock.now()
    for loc, cond in conditions(spec):
        try:
            query = condition_sql(ws, spec, cond)
            engine = ws.source(condition_source(spec, cond))
            got = probe(ws, condition_source(spec, cond), query,
                        bind_period(engine, query, now, now))
        except SourceError as exc:
            if Problem(str(exc)) not in problems:  # one line per source, not per condition
                problems.append(Problem(str(exc)))
            continue
        except (AudienceError, WorkspaceError) as exc:
            problems.append(at(str(exc), *loc, "condition"))
            continue
        for what, column in (("key", entry.key), ("at", cond.at)):
            if column and column not in got:
                problems.append(at(f"{query.file} must return the {what} column '{column}' "
                                   f"(columns: {', '.join(got)})", *loc,
                                   "condition" if what == "key" else "at"))
    if spec.goal:
        goal = spec.goal
        try:
            query = load_sql(ws, goal.segment, goal.source or entry.source, goal.params,
                             ("since", "until"), hint="set goal.params")
            source = goal.source or entry.source
            got = probe(ws, source, query, bind_period(ws.source(source), query, now, now))
            for field, column in (("key", goal.key or entry.key), ("at", goal.at),
                                  ("amount", goal.amount)):
                if column and column not in got:
                    problems.append(at(f"column '{column}' is not in the result of "
                                       f"{query.file} (columns: {', '.join(got)})",
                                       "goal", field if field != "key" or goal.key
                                       else "segment"))
        except SourceError as exc:
            if Problem(str(exc)) not in problems:
                problems.append(Problem(str(exc)))
        except (AudienceError, WorkspaceError) as exc:
            problems.append(at(str(exc), "goal", "segment"))
    engine_templates = templates or templates_for(ws)
    files = 0
    for step_name, step in spec.steps.items():
        if isinstance(step, BranchStep):
            for i, case in enumerate(step.cases):
                if case.when and case.when.column not in have:
                    problems.append(at(f"column '{case.when.column}' is not in the result of "
                                       f"{segment.file}", "steps", step_name, "cases", i,
                                       "when", "column"))
        if isinstance(step, WaitStep) and step.until and step.until.date and \
                step.until.date not in have:
            problems.append(at(f"column '{step.until.date}' is not in the result of "
                               f"{segment.file}", "steps", step_name, "until", "date"))
        if not isinstance(step, SendStep):
            continue
        for tier, spec_tier in step.tiers.items():
            for i, channel in enumerate(spec_tier.channels):
                column = ws.address_column(channel)
                if column not in have:
                    problems.append(at(f"channel '{channel}' sends to column '{column}', "
                                       f"which {segment.file} does not return",
                                       "steps", step_name, "tiers", tier, "channels", i))
        kinds = {tier: {ws.channel_kind(c) for c in t.channels} for tier, t in step.tiers.items()}
        chosen: list[str | None] = [*step.variants] or [None]
        for variant in chosen:
            flow = step_flow(spec, step, template_folder(spec.name, step_name, variant))
            for p in engine_templates.check(flow, kinds, have | GLOBALS):
                problems.append(p if p.file else at(p.message, "steps", step_name,
                                                    *(p.field or "").split(".")[:2]))
            files += len({f for tier, ks in kinds.items() for kind in ks
                          for part in ("subject", "txt", "html")
                          for f in engine_templates.variants(flow, tier, kind, part)})
    if problems:
        raise ValidationFailed(problems)
    return Checked(j, segment, columns, files)


def template_folder(journey: str, step: str, variant: str | None) -> str:
    """``JOURNEY/STEP`` or ``JOURNEY/STEP/VARIANT``: where a send step's templates live."""
    return f"{journey}/{step}" + (f"/{variant}" if variant else "")
