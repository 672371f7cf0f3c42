"""Pre-send validation: everything a run needs is checked before its first message.

The segment compiles against its source and returns the key, tier, locale and address
columns the flow needs; every template compiles and uses only variables the segment
returns; every channel the flow names is configured (checked when the flow loads).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from herald.audiences.sql import Segment, load_segment, probe_columns, segment_params
from herald.channels import outbox
from herald.channels.outbox import OutboxSettings
from herald.core.errors import (
    AudienceError,
    Problem,
    ValidationFailed,
    WorkspaceError,
    did_you_mean,
)
from herald.core.files import read_text
from herald.core.spec import CapRule, FlowCapRule, FlowSpec, Param
from herald.core.workspace import CONFIG_FILE, Workspace
from herald.delivery.render import OWN_VARIABLES, Templates, templates_for


@dataclass(frozen=True)
class CheckedFlow:
    """A flow that passed validation, with what validation learned."""

    spec: FlowSpec
    segment: Segment
    columns: list[str]
    templates: int
    warnings: tuple[str, ...] = ()


def outbox_problems(ws: Workspace, channels: Collection[str]) -> list[Problem]:
    """Outbox channels whose folder cannot be made: a file where its ``dir`` or one of
    the folders above it should be (a run would stop at its first write)."""
    found = []
    for name in channels:
        settings = ws.channels.get(name)
        if not isinstance(settings, OutboxSettings):
            continue
        blocking = outbox.blocked(settings, ws.root)
        if blocking is not None:
            found.append(Problem(
                f"channel '{name}' writes under {settings.dir}, but "
                f"{ws.relative(blocking)} is a file, not a folder", file=CONFIG_FILE,
                line=ws.config_line(("channels", name, "dir"))
                or ws.config_line(("channels", name)), field=f"channels.{name}.dir"))
    return found


# Carriers in mainland China require marketing SMS to say how to opt out.
OPT_OUT_MARKERS = ("退订", "回T", "拒收", "回TD")


def check_flow(ws: Workspace, name: str, overrides: Mapping[str, Param] | None = None,
               templates: Templates | None = None, secrets: bool = True) -> CheckedFlow:
    """Validate one flow; ValidationFailed lists every problem found. ``secrets``: also
    require the environment variables of the channels it sends through (everything
    but preview, which sends nothing)."""
    flow = ws.flow(name)  # ConfigError for the YAML itself
    file = ws.flow_file(name)
    problems: list[Problem] = param_problems(ws, flow, overrides or {})
    wrong_params = bool(problems)
    if secrets:
        problems.extend(ws.missing_secrets(flow.channel_names()))
        problems.extend(outbox_problems(ws, flow.channel_names()))
    if wrong_params:  # the segment cannot be run: what else is known is said with them
        raise ValidationFailed(problems)
    try:
        segment = load_segment(ws, flow, overrides)
        columns = probe_columns(ws, flow, segment)
    except (AudienceError, WorkspaceError) as exc:
        problems.append(Problem(str(exc)))
        raise ValidationFailed(problems) from None

    have = set(columns)
    audience = flow.audience
    for field, column in (("key", audience.key), ("tier", audience.tier),
                          ("locale", audience.locale), ("timezone", audience.timezone)):
        if column and column not in have:
            problems.append(Problem(
                f"column '{column}' is not in the result of {segment.file} "
                f"(columns: {', '.join(columns)})", file=file,
                line=ws.flow_line(name, ("audience", field)), field=f"audience.{field}"))
    for tier_name, tier in flow.tiers.items():
        for i, channel in enumerate(tier.channels):
            column = ws.address_column(channel)
            if column not in have:
                problems.append(Problem(
                    f"channel '{channel}' sends to column '{column}', which {segment.file} "
                    "does not return", file=file,
                    line=ws.flow_line(name, ("tiers", tier_name, "channels", i)),
                    field=f"tiers.{tier_name}.channels[{i}]"))
    if flow.conversion:
        from herald.reporting.conversions import check_conversion

        problems.extend(check_conversion(ws, flow))
    engine = templates or templates_for(ws)
    kinds = {tier: {ws.channel_kind(c) for c in spec.channels}
             for tier, spec in flow.tiers.items()}
    for problem in engine.check(flow, kinds, have):
        if problem.file is None and problem.field:  # a tier's: point at its YAML line
            loc = tuple(problem.field.split("."))
            problem = Problem(problem.message, file, ws.flow_line(name, loc), problem.field)
        problems.append(problem)
    problems.extend(_check_experiments(ws, flow, engine, kinds))
    if problems:
        raise ValidationFailed(problems)
    files = {name for tier, ks in kinds.items() for kind in ks
             for part in ("subject", "txt", "html")
             for variant in _variants_of(flow, tier)
             for name in engine.variants(flow, tier, kind, part, variant)}
    warnings = [*cap_tier_warnings(flow.caps, flow.tiers, file,
                                   lambda loc: ws.flow_line(name, loc)),
                *_opt_out_warnings(ws, flow, engine, kinds),
                *_hidden_columns(flow, segment.file, columns)]
    return CheckedFlow(flow, segment, columns, len(files), tuple(warnings))


def cap_tier_warnings(caps: Sequence[CapRule | FlowCapRule], tiers: Collection[str],
                      file: str, line_of: Callable[[tuple[str | int, ...]], int | None]
                      ) -> list[str]:
    """Caps scoped to a tier that has no entry in ``tiers``: such a cap applies only if
    the segment returns recipients of that tier (who then use ``default``), so a typo
    there is found only by reading the data; worth a warning."""
    found = []
    for i, cap in enumerate(caps):
        if cap.tier is not None and cap.tier not in tiers:
            found.append(str(Problem(
                f"no tier entry is named '{cap.tier}'{did_you_mean(cap.tier, tiers)}; the "
                f"cap applies only to recipients whose tier is '{cap.tier}' (tiers: "
                f"{', '.join(tiers) or 'none'})",
                file, line_of(("caps", i, "tier")), f"caps[{i}].tier")))
    return found


def _hidden_columns(flow: FlowSpec, segment_file: str, columns: Sequence[str]
                    ) -> list[str]:
    """Columns of the segment that templates never see: Herald's own variable of that
    name takes their place (a column 'tier' that is the audience's tier column holds the
    same value, and is not hidden)."""
    return [f"{segment_file}: column '{column}' is hidden in the templates by Herald's own "
            f"'{column}' ({OWN_VARIABLES[column]}): rename it in the query (... AS "
            f"{column}_) to use it"
            for column in columns if column in OWN_VARIABLES
            and not (column == "tier" and flow.audience.tier == "tier")]


def _variants_of(flow: FlowSpec, tier: str) -> list[str | None]:
    found = flow.experiment_for(tier)
    return [None, *found[1].variants] if found else [None]


def _experiment_loc(flow: FlowSpec, tier: str) -> tuple[str | int, ...]:
    """Where a tier's experiment is written in the YAML: the tier's own, or the flow's."""
    spec = flow.tiers.get(tier)
    return ("tiers", tier, "experiment") if spec and spec.experiment else ("experiment",)


def _check_experiments(ws: Workspace, flow: FlowSpec, engine: Templates,
                       kinds: dict[str, set[str]]) -> list[Problem]:
    """A variant other than the control has templates of its own for every kind of message
    its tiers may send (else it would send the control's message under another name); a
    test that decides measures conversions; one experiment name, one definition."""
    file = ws.flow_file(flow.name)
    problems: list[Problem] = []
    seen: dict[str, object] = {}
    for tier, ks in kinds.items():
        found = flow.experiment_for(tier)
        if not found:
            continue
        name, spec = found
        loc = _experiment_loc(flow, tier)
        field = ".".join(map(str, loc))
        if name in seen and seen[name] != spec:
            problems.append(Problem(
                f"experiment '{name}' is defined twice with different settings (give "
                "each its own name)", file=file, line=ws.flow_line(flow.name, loc),
                field=field))
        seen[name] = spec
        if spec.test_share is not None and flow.conversion is None:
            problems.append(Problem(
                "test_share needs a metric to decide on: add conversion: to the flow "
                "(metric: conversion)", file=file,
                line=ws.flow_line(flow.name, (*loc, "test_share")),
                field=f"{field}.test_share"))
        for variant in spec.variants:
            if variant == spec.control_variant:
                continue
            mine = engine.own_prefixes(flow, tier, variant)
            for kind in sorted(ks):
                own = [n for part in ("subject", "txt", "html")
                       for n in engine.variants(flow, tier, kind, part, variant)
                       if any(n.startswith(p + ".") for p in mine)]
                if own:
                    continue
                where = " or ".join(f"templates/{p}.{kind}.*.j2" for p in mine)
                problems.append(Problem(
                    f"variant '{variant}' has no {kind} templates of its own for tier "
                    f"'{tier}' (expected {where}); its {kind} messages would be the "
                    "control's", file=file,
                    line=ws.flow_line(flow.name, (*loc, "variants", variant)),
                    field=f"{field}.variants.{variant}"))
    return problems


def param_problems(ws: Workspace, flow: FlowSpec, overrides: Mapping[str, Param]
                   ) -> list[Problem]:
    """Parameters given (in the flow's YAML or with -p) that the segment SQL does not
    use, each named where it was given, with the SQL's own parameters as the hint."""
    try:
        file, used = segment_params(ws, flow.audience.segment, flow.audience.source)
    except (AudienceError, WorkspaceError):
        return []  # the segment itself is reported by load_segment
    problems = []
    listed = ", ".join(f":{u}" for u in sorted(used)) or "none"

    def unused(name: str) -> str:
        return f"{file} does not use :{name}{did_you_mean(name, used)} (it uses: {listed})"

    for name in flow.audience.params:
        if name not in used and name not in overrides:
            problems.append(Problem(
                unused(name), file=ws.flow_file(flow.name),
                line=ws.flow_line(flow.name, ("audience", "params", name)),
                field=f"audience.params.{name}"))
    for i, schedule in enumerate(flow.schedules):  # each run of it binds these
        for name, value in schedule.params.items():
            if name not in used:
                message = unused(name)
            elif name in flow.audience.params and (
                    unlike := _unlike(value, flow.audience.params[name])):
                message = (f"{_shown(value)} is not {unlike}, as audience.params.{name} "
                           f"({_shown(flow.audience.params[name])}) is")
            else:
                continue
            problems.append(Problem(
                message, file=ws.flow_file(flow.name),
                line=ws.flow_line(flow.name, ("schedules", i, "params", name)),
                field=f"schedules[{i}].params.{name}"))
    for name, value in overrides.items():
        if name not in used:
            problems.append(Problem(f"-p {name}: {unused(name)}"))
        elif name in flow.audience.params:
            unlike = _unlike(value, flow.audience.params[name])
            if unlike:
                problems.append(Problem(
                    f"-p {name}: {_shown(value)} is not {unlike}, as the flow's value "
                    f"{_shown(flow.audience.params[name])} is ({ws.flow_file(flow.name)}:"
                    f"{ws.flow_line(flow.name, ('audience', 'params', name))})"))
    return problems


def _shown(value: Param | None) -> str:
    """A parameter's value as YAML and -p write it (true, null), texts quoted."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)


def _unlike(value: Param, default: Param) -> str | None:
    """What ``value`` (given with -p) should be to take the place of the flow's own
    ``default``, or None when it may: a typo (``-p days=9O``) would otherwise be bound as
    text and the segment would select another audience than meant."""
    def number(v: object) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    if number(default) and not number(value):
        return "a number"
    if isinstance(default, bool) and not isinstance(value, bool):
        return "true or false"
    if isinstance(default, list) and not isinstance(value, list):
        return "a list like [1, 2]"
    return None


def _opt_out_warnings(ws: Workspace, flow: FlowSpec, engine: Templates,
                      kinds: dict[str, set[str]]) -> list[str]:
    """Marketing SMS templates in Chinese (what mainland numbers get) without opt-out
    text. Exempt (transactional) flows need none."""
    if flow.exempt:
        return []
    default_zh = ws.config.default_locale.startswith("zh")
    found = []
    for tier, ks in kinds.items():
        if "sms" not in ks:
            continue
        for name in engine.variants(flow, tier, "sms", "txt"):
            locale = name.rsplit("/", 1)[-1].split(".")[3:-1]
            chinese = locale[0].startswith("zh") if locale else default_zh
            text = read_text(ws.templates_dir / name, f"templates/{name}")
            if chinese and not any(marker in text for marker in OPT_OUT_MARKERS):
                found.append(f"templates/{name}: a marketing SMS to mainland China must say "
                             "how to opt out (e.g. 回T退订)")
    return sorted(set(found))
