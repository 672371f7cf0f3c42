"""A workspace: a folder with ``config/``, ``audiences/`` (SQL) and ``templates/``.

``Workspace.open()`` loads and checks ``config/herald.yaml``; flows load on demand.
Every problem found in a file is reported together, each with its line and field.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Engine

from herald.core.channel_settings import KINDS, ChannelSettings, channel_kind
from herald.core.db import driver_problem, make_engine, open_store
from herald.core.errors import (
    ChannelError,
    ConfigError,
    Problem,
    WorkspaceError,
    did_you_mean,
)
from herald.core.plugins import channel_type
from herald.core.spec import (
    DEFAULT_TIER,
    CapRule,
    FlowCapRule,
    FlowSpec,
    TierSpec,
    WorkspaceConfig,
)
from herald.core.yamlio import Loc, Located, dotted, load_yaml, problems_from, validate

CONFIG_FILE = "config/herald.yaml"
FLOWS_DIR = "config/flows"
JOURNEYS_DIR = "config/journeys"


class SegmentNotFound(WorkspaceError):
    """No ``audiences/SEGMENT[.dialect].sql``: the caller names the field that wanted it."""


class SourceError(WorkspaceError):
    """A source that cannot be opened, located at its line in config/herald.yaml (callers
    add no location of their own)."""


def _with_unset(problems: list[Problem], doc: Located) -> list[Problem]:
    """``problems`` of config/herald.yaml, and the channels' unset environment variables
    (left to the commands that send when the file is right) after them: the file is
    refused anyway, and its operator fixes everything at once."""
    seen = {p.field for p in problems}
    return [*problems, *(p for p in doc.missing_env if p.field not in seen)]


class Workspace:
    """The operator's files and the databases they name."""

    def __init__(self, root: Path, config: WorkspaceConfig,
                 channels: dict[str, ChannelSettings], kinds: dict[str, str],
                 doc: Located) -> None:
        self.root = root
        self.config = config
        self.channels = channels
        self.kinds = kinds  # channel name -> the kind of message it carries
        self._doc = doc
        self._flows: dict[str, FlowSpec] = {}
        self._flow_docs: dict[str, Located] = {}
        self._engines: dict[str, Engine] = {}

    @classmethod
    def open(cls, root: str | Path | None = None) -> Workspace:
        """Open the workspace at ``root``, ``$HERALD_WORKSPACE`` or the current folder."""
        path = Path(root or os.environ.get("HERALD_WORKSPACE") or ".").resolve()
        if not (path / CONFIG_FILE).exists():  # a folder there is named by load_yaml
            raise WorkspaceError(f"{path} is not a Herald workspace: {CONFIG_FILE} not found "
                                 "(use --workspace DIR or set HERALD_WORKSPACE)")
        doc = load_yaml(path / CONFIG_FILE, CONFIG_FILE)
        try:
            config = validate(WorkspaceConfig, doc)
        except ConfigError as exc:
            # every problem at once: the channels' own settings too, where they are
            # mappings, not only once the rest of the file is right
            raw = doc.data.get("channels") if isinstance(doc.data, dict) else None
            more = _channel_settings(raw, doc)[2] if isinstance(raw, dict) and all(
                isinstance(v, dict) for v in raw.values()) else []
            seen = {p.field for p in exc.problems}
            raise ConfigError(_with_unset([*exc.problems, *(p for p in more
                                                             if p.field not in seen)], doc)
                              ) from None
        channels, kinds, problems = _channel_settings(config.channels, doc)
        driver = driver_problem(config.store)
        if driver:
            problems.append(Problem(driver, file=doc.file, line=doc.line_of(("store",)),
                                    field="store"))
        # every channel the YAML names: one whose settings are wrong is reported as such,
        # not again as unknown in each cap that names it
        problems += cap_problems(config.caps, doc, list(config.channels), flows=[
            *_stems(path / FLOWS_DIR), *(f"journey:{j}" for j in _stems(path / JOURNEYS_DIR))])
        if config.writeback and config.writeback.source not in config.sources:
            problems.append(Problem(
                f"unknown source '{config.writeback.source}' (sources: "
                f"{', '.join(config.sources) or 'none'})", file=doc.file,
                line=doc.line_of(("writeback", "source")), field="writeback.source"))
        if problems:
            raise ConfigError(_with_unset(problems, doc))
        return cls(path, config, channels, kinds, doc)

    def missing_secrets(self, channels: Iterable[str]) -> list[Problem]:
        """Unset environment variables of these channels' settings: checked by the
        commands that send (run, serve, deploy, send-test, validate), not by read-only
        ones."""
        wanted = {f"channels.{c}" for c in channels}
        if self.config.unsubscribe:  # every message carries an unsubscribe link
            wanted.add("unsubscribe.secret")
        return [p for p in self._doc.missing_env
                if p.field and ".".join(p.field.split(".")[:2]) in wanted]

    # -- flows ---------------------------------------------------------------------
    def flow_names(self) -> list[str]:
        return _stems(self.root / FLOWS_DIR)

    def journey_names(self) -> list[str]:
        return _stems(self.root / JOURNEYS_DIR)

    def not_found(self, kind: str, name: str) -> WorkspaceError:
        """``unknown flow 'X': config/flows/X.yaml not found`` (or journey), with what was
        meant: the file saved as ``X.yml``, the closest name of that kind, else that it is
        a name of the other kind (or close to one); then the names there are."""
        folder, known, other, others = (
            (FLOWS_DIR, self.flow_names(), "journey", self.journey_names()) if kind == "flow"
            else (JOURNEYS_DIR, self.journey_names(), "flow", self.flow_names()))
        hint = did_you_mean(name, known) or (
            f" ('{name}' is a {other})" if name in others else did_you_mean(name, others, other))
        return WorkspaceError(f"unknown {kind} '{name}': {folder}/{name}.yaml not found"
                              + _misnamed_hint(self.root / folder, name) + hint
                              + f" ({kind}s: {', '.join(known) or 'none'})")

    def misnamed(self) -> list[Problem]:
        """Files of ``config/flows`` and ``config/journeys`` Herald does not read because
        they do not end in ``.yaml`` (``promo.yml``): without this they are silently
        ignored."""
        out = []
        for folder, what in ((FLOWS_DIR, "flow"), (JOURNEYS_DIR, "journey")):
            for path in _misnamed(self.root / folder):
                out.append(Problem(f"{what} files end in .yaml, so this one is not read: "
                                   f"rename it to {path.stem}.yaml", file=f"{folder}/{path.name}"))
        return out

    def flow(self, name: str) -> FlowSpec:
        """Load and check ``config/flows/NAME.yaml``."""
        if name not in self._flows:
            self._flows[name] = self._load_flow(name)
        return self._flows[name]

    def _load_flow(self, name: str) -> FlowSpec:
        rel = f"{FLOWS_DIR}/{name}.yaml"
        if not (self.root / rel).exists():  # a folder there is named by load_yaml
            raise self.not_found("flow", name)
        doc = load_yaml(self.root / rel, rel)
        spec = validate(FlowSpec, doc)
        self._flow_docs[name] = doc
        problems: list[Problem] = []
        if spec.name != name:
            problems.append(Problem(f"name '{spec.name}' must match the file name '{name}'",
                                    file=rel, line=doc.line_of(("name",)), field="name"))
        if spec.audience.source not in self.config.sources:
            problems.append(Problem(
                f"unknown source '{spec.audience.source}' (sources in {CONFIG_FILE}: "
                f"{', '.join(self.config.sources) or 'none'})",
                file=rel, line=doc.line_of(("audience", "source")), field="audience.source"))
        if spec.conversion and spec.conversion.source and \
                spec.conversion.source not in self.config.sources:
            problems.append(Problem(
                f"unknown source '{spec.conversion.source}' (sources in {CONFIG_FILE}: "
                f"{', '.join(self.config.sources) or 'none'})",
                file=rel, line=doc.line_of(("conversion", "source")),
                field="conversion.source"))
        problems += tier_channel_problems(spec.tiers, doc, self.channels)
        problems += cap_problems(spec.caps, doc, self.channels, tiers=spec.tiers,
                                 tier_column=spec.audience.tier)
        if problems:
            raise ConfigError(problems)
        return spec

    def flow_file(self, name: str) -> str:
        return f"{FLOWS_DIR}/{name}.yaml"

    def config_line(self, loc: tuple[str | int, ...]) -> int | None:
        """The line of a field in ``config/herald.yaml`` (for error messages)."""
        return self._doc.line_of(loc)

    def flow_line(self, name: str, loc: tuple[str | int, ...]) -> int | None:
        """The line of a field in a loaded flow's YAML (for error messages)."""
        doc = self._flow_docs.get(name)
        return doc.line_of(loc) if doc else None

    # -- files ---------------------------------------------------------------------
    def segment_file(self, segment: str, dialect: str) -> Path:
        """``audiences/SEGMENT.<dialect>.sql`` if present, else ``audiences/SEGMENT.sql``."""
        for candidate in (f"audiences/{segment}.{dialect}.sql", f"audiences/{segment}.sql"):
            if (self.root / candidate).exists():  # a folder there is named when read
                return self.root / candidate
        raise SegmentNotFound(f"segment '{segment}' not found: audiences/{segment}.sql "
                              "does not exist")

    def relative(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    @property
    def templates_dir(self) -> Path:
        return self.root / "templates"

    # -- databases -----------------------------------------------------------------
    @cached_property
    def store(self) -> Engine:
        """The workspace database (package store, ledger, runs, suppression list)."""
        return open_store(self.config.store, self.root)

    def source(self, name: str, write: bool = False) -> Engine:
        """The engine of source ``name``: read-only (segments, conversions, preview)
        unless ``write`` (the write-back target, the only thing Herald writes there)."""
        handle = f"{name}\x00w" if write else name
        if handle not in self._engines:
            if name not in self.config.sources:
                raise WorkspaceError(f"unknown source '{name}'")
            try:
                self._engines[handle] = make_engine(self.config.sources[name], self.root,
                                                    read_only=not write)
            except WorkspaceError as exc:
                raise SourceError(str(Problem(
                    str(exc), file=CONFIG_FILE, line=self._doc.line_of(("sources", name)),
                    field=f"sources.{name}"))) from None
        return self._engines[handle]

    def channel_kind(self, channel: str) -> str:
        return self.kinds[channel]

    def address_column(self, channel: str) -> str:
        settings = self.channels[channel]
        return settings.address or KINDS[self.channel_kind(channel)]

    def timezone(self, flow: FlowSpec) -> str:
        return flow.timezone or self.config.timezone

    def chunk_size(self, flow: FlowSpec) -> int:
        return flow.chunk_size or self.config.chunk_size

    def dispose(self) -> None:
        for engine in self._engines.values():
            engine.dispose()
        if "store" in self.__dict__:
            self.store.dispose()


def _stems(folder: Path) -> list[str]:
    """The names of the YAML files in ``folder`` (flows, journeys), sorted; hidden files
    (``.promo.yaml``, macOS's ``._promo.yaml``, an editor's copies) are not flows."""
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.name.startswith(".")
                  ) if folder.is_dir() else []


def _misnamed(folder: Path) -> list[Path]:
    """YAML files in ``folder`` whose suffix is not exactly ``.yaml``."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".yml", ".yaml")
                  and p.suffix != ".yaml" and not p.name.startswith("."))


def _misnamed_hint(folder: Path, name: str) -> str:
    """`` (promo.yml is there: rename it to promo.yaml)`` when ``name`` was saved with
    another suffix, else ''."""
    found = [p.name for p in _misnamed(folder) if p.stem == name]
    return f" ({found[0]} is there: rename it to {name}.yaml)" if found else ""


def tier_channel_problems(tiers: Mapping[str, TierSpec], doc: Located,
                          channels: Collection[str], at: Loc = ()) -> list[Problem]:
    """Each channel of a tier entry (a flow's, or a journey send step's at ``at``) is a
    configured one, and listed once: the list is an order of preference, where a channel
    listed again could only repeat what its first place decided."""
    problems: list[Problem] = []
    for tier, entry in tiers.items():
        first: dict[str, int] = {}
        for i, channel in enumerate(entry.channels):
            loc = (*at, "tiers", tier, "channels", i)
            if channel not in channels:
                message = (f"unknown channel '{channel}'{did_you_mean(channel, channels)} "
                           f"(configured in {CONFIG_FILE}: {', '.join(channels) or 'none'})")
            elif channel in first:
                message = (f"channel '{channel}' is listed twice (first at channels"
                           f"[{first[channel]}]): list each channel once, in order of "
                           "preference")
            else:
                first[channel] = i
                continue
            problems.append(Problem(message, file=doc.file, line=doc.line_of(loc),
                                    field=dotted(loc)))
    return problems


def cap_problems(caps: Sequence[CapRule | FlowCapRule], doc: Located,
                 channels: Collection[str], flows: Collection[str] | None = None,
                 tiers: Collection[str] | None = None, tier_column: str | None = None
                 ) -> list[Problem]:
    """A cap scoped to something that does not exist never counts or stops anything, so
    the scope is checked where the cap is written: its channel among the configured ones;
    in ``config/herald.yaml`` its flow among the flows (and ``journey:NAME``); in a flow or
    journey its tier among the tier entries the recipients can have (``tiers``)."""
    problems: list[Problem] = []
    where = "" if doc.file == CONFIG_FILE else f" in {CONFIG_FILE}"

    def unknown(i: int, key: str, message: str) -> None:
        problems.append(Problem(message, file=doc.file, line=doc.line_of(("caps", i, key)),
                                field=f"caps[{i}].{key}"))

    for i, cap in enumerate(caps):
        if cap.channel is not None and cap.channel not in channels:
            unknown(i, "channel", f"unknown channel '{cap.channel}'"
                    f"{did_you_mean(cap.channel, channels)} (configured{where}: "
                    f"{', '.join(channels) or 'none'})")
        flow = getattr(cap, "flow", None)
        if flows is not None and flow is not None and flow not in flows:
            unknown(i, "flow", f"unknown flow '{flow}'{did_you_mean(flow, flows)} (flows: "
                    f"{', '.join(flows) or 'none'})")
        if tiers is None or cap.tier is None:
            continue
        if tier_column is None and cap.tier != DEFAULT_TIER:
            unknown(i, "tier", f"tier '{cap.tier}' never applies: the audience names no "
                    f"tier column, so every recipient is tier '{DEFAULT_TIER}'")
        elif cap.tier not in tiers and DEFAULT_TIER not in tiers:
            # a recipient of a tier without an entry (and no default) stops the run
            unknown(i, "tier", f"unknown tier '{cap.tier}'{did_you_mean(cap.tier, tiers)} "
                    f"(tiers: {', '.join(tiers)})")
    return problems


def _channel_settings(channels: Mapping[str, Any], doc: Located
                      ) -> tuple[dict[str, ChannelSettings], dict[str, str], list[Problem]]:
    """Validate each channel's settings against its adapter's Settings model, and decide
    the kind each carries."""
    out: dict[str, ChannelSettings] = {}
    kinds: dict[str, str] = {}
    problems: list[Problem] = []
    for name, raw in channels.items():
        loc: tuple[str, ...] = ("channels", name)
        type_name = raw.get("type")
        if not isinstance(type_name, str):
            problems.append(Problem("required key 'type' is missing", file=doc.file,
                                    line=doc.line_of(loc), field=f"channels.{name}.type"))
            continue
        try:
            cls = channel_type(type_name)
        except ChannelError as exc:
            problems.append(Problem(str(exc), file=doc.file,
                                    line=doc.line_of((*loc, "type")),
                                    field=f"channels.{name}.type"))
            continue
        try:
            settings: Any = cls.Settings.model_validate(raw)
        except ValidationError as exc:
            problems.extend(problems_from(exc, doc, cls.Settings, loc))
            continue
        kind = channel_kind(name, settings, cls.kinds)
        if kind is None or kind not in cls.kinds or kind not in KINDS:
            allowed = ", ".join(sorted(cls.kinds & KINDS.keys()))
            problems.append(Problem(f"set kind to one of: {allowed}", file=doc.file,
                                    line=doc.line_of((*loc, "kind")) or doc.line_of(loc),
                                    field=f"channels.{name}.kind"))
            continue
        out[name] = settings
        kinds[name] = kind
    return out, kinds, problems


# -- this process's workspaces -----------------------------------------------------------
# Chunk workers (threads, Dask processes, Prefect task runs) open a workspace from its
# folder once per process and share it: engines and parsed YAML are built once.
_shared: dict[str, Workspace] = {}
_shared_lock = threading.Lock()


def shared(root: str | Path) -> Workspace:
    """This process's workspace for ``root``, opened on first use."""
    key = str(root)
    with _shared_lock:
        if key not in _shared:
            _shared[key] = Workspace.open(key)
        return _shared[key]


def adopt(ws: Workspace) -> None:
    """Make ``ws`` the workspace this process shares for its folder."""
    with _shared_lock:
        _shared[str(ws.root)] = ws


def forget(root: str | Path) -> None:
    """Drop (and dispose) this process's workspace for ``root``: its files changed."""
    with _shared_lock:
        ws = _shared.pop(str(root), None)
    if ws:
        ws.dispose()


def forget_all() -> None:
    """Drop every shared workspace (tests that drop their databases)."""
    for root in list(_shared):
        forget(root)
