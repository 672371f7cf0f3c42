"""The YAML loader and the schema: errors name the file, the line and the field."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from herald.core.errors import ConfigError, ValidationFailed, WorkspaceError
from herald.core.spec import FlowSpec, WorkspaceConfig
from herald.core.workspace import Workspace
from herald.core.yamlio import parse_yaml, validate
from herald.flows.cli import main
from herald.flows.validate import check_flow

from .helpers import HERALD_YAML, JOURNEY_FILES, PROMO_YAML


def problems(exc: pytest.ExceptionInfo[Any]) -> list[str]:
    return [str(p) for p in exc.value.problems]


def test_yaml_12_scalars_stay_what_they_look_like() -> None:
    doc = parse_yaml("a: no\nb: on\nc: 2024-01-01\nd: 12\ne: 1.5\nf: '12'\ng: ~\nh: true\n",
                     "x.yaml", {})
    assert doc.data == {"a": "no", "b": "on", "c": "2024-01-01", "d": 12, "e": 1.5,
                        "f": "12", "g": None, "h": True}
    assert doc.lines[("c",)] == 3


def test_env_interpolation_and_missing_variable_names_line_and_field() -> None:
    doc = parse_yaml("x:\n  host: ${HOST}\n  port: ${PORT:-587}\n", "h.yaml", {"HOST": "mx"})
    assert doc.data == {"x": {"host": "mx", "port": "587"}}
    with pytest.raises(ConfigError) as exc:
        parse_yaml("x:\n  token: ${NOPE_TOKEN}\n", "h.yaml", {})
    assert problems(exc) == ["h.yaml:2 x.token: environment variable NOPE_TOKEN is not set"]


def test_malformed_yaml_and_duplicate_keys() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_yaml("a: 1\nb: [1, 2\n", "bad.yaml", {})
    assert problems(exc)[0].startswith("bad.yaml:3: invalid YAML")
    with pytest.raises(ConfigError) as exc:
        parse_yaml("a: 1\nb: 2\na: 3\n", "dup.yaml", {})
    assert problems(exc) == ["dup.yaml:3: duplicate key 'a'"]


def test_unknown_key_suggests_and_every_error_is_reported() -> None:
    text = ("name: promo\naudience:\n  source: crm\n  segmnt: people\n  key: id\n"
            "tiers:\n  gold: {channels: []}\nholdout: lots\n")
    with pytest.raises(ConfigError) as exc:
        validate(FlowSpec, parse_yaml(text, "f.yaml", {}))
    found = problems(exc)
    assert "f.yaml:4 audience.segmnt: unknown key 'segmnt' (did you mean 'segment'?)" in found
    assert "f.yaml:2 audience.segment: required key is missing" in found
    assert any(p.startswith("f.yaml:7 tiers.gold.channels: List should have at least 1")
               for p in found)
    assert "f.yaml:8 holdout: must be a number, not text" in found
    assert len(found) == 4


def test_workspace_settings_types() -> None:
    text = "timezone: Mars/Base\nchunk_size: 0\ncaps:\n  - {max: 2, per: fortnight}\n"
    with pytest.raises(ConfigError) as exc:
        validate(WorkspaceConfig, parse_yaml(text, "herald.yaml", {}))
    found = problems(exc)
    assert any(p.startswith("herald.yaml:1 timezone: unknown time zone 'Mars/Base'")
               for p in found)
    assert any(p.startswith("herald.yaml:2 chunk_size:") for p in found)
    assert any(p.startswith("herald.yaml:4 caps[0].per: per must be a duration like")
               for p in found)


def test_values_of_the_wrong_yaml_type_are_not_coerced() -> None:
    """``exempt: on`` would uncap a flow and ``chunk_size: true`` mean 1: booleans must be
    true or false, numbers must be numbers (not true, not quoted)."""
    text = ("name: promo\naudience: {source: crm, segment: people, key: id}\n"
            "tiers: {default: {channels: [email]}}\nexempt: on\ndeduplicate: 'no'\n"
            "holdout: true\npriority: '5'\nchunk_size: true\n")
    with pytest.raises(ConfigError) as exc:
        validate(FlowSpec, parse_yaml(text, "f.yaml", {}))
    words = "(YAML 1.2 reads yes, no, on, off and quoted words as text)"
    assert sorted(problems(exc)) == [
        f"f.yaml:4 exempt: must be true or false, not text {words}",
        f"f.yaml:5 deduplicate: must be true or false, not text {words}",
        "f.yaml:6 holdout: must be a number, not true",
        "f.yaml:7 priority: must be a whole number, not text (a quoted number is text)",
        "f.yaml:8 chunk_size: must be a whole number, not true",
    ]
    with pytest.raises(ConfigError) as exc:
        validate(WorkspaceConfig, parse_yaml("chunk_size: true\nemail: "
                                             "{allow_special_use_domains: 1}\n", "h.yaml", {}))
    assert sorted(problems(exc)) == [
        "h.yaml:1 chunk_size: must be a whole number, not true",
        "h.yaml:2 email.allow_special_use_domains: must be true or false, not a number"]
    # what was written, said as such: a fraction, a number from the environment
    with pytest.raises(ConfigError) as exc:
        validate(WorkspaceConfig, parse_yaml("chunk_size: ${CHUNK:-100}\nmax_workers: 1.5\n",
                                             "h.yaml", {}))
    assert sorted(problems(exc)) == [
        "h.yaml:1 chunk_size: must be a whole number, not text (a ${NAME} value is always "
        "text: outside channels write the number itself)",
        "h.yaml:2 max_workers: must be a whole number, not a fraction"]
    from herald.core.fields import parse_duration

    for zero in ("0d", "-1d"):  # they look like durations: what is wrong is the sign
        with pytest.raises(ValueError, match=rf"duration must be more than 0 \(got {zero};"):
            parse_duration(zero)


def test_strict_types_still_read_what_yaml_means() -> None:
    """Whole numbers where a number is wanted, and a schedule's anchor as ISO text."""
    text = ("name: promo\naudience: {source: crm, segment: people, key: id}\n"
            "tiers: {default: {channels: [email]}}\nexempt: true\nholdout: 0\n"
            "alerts: {failure_rate: 1}\nexperiment: {variants: {a: 1, b: 2}}\n"
            "schedules: [{interval: 6h, anchor: '2026-01-05T08:00'}]\n")
    spec = validate(FlowSpec, parse_yaml(text, "f.yaml", {}))
    assert spec.exempt is True and spec.holdout == 0.0
    assert spec.alerts is not None and spec.alerts.failure_rate == 1.0
    assert spec.schedules[0].anchor is not None and spec.schedules[0].anchor.hour == 8


def test_phone_region_must_be_one_phone_numbers_have() -> None:
    with pytest.raises(ConfigError) as exc:
        validate(WorkspaceConfig, parse_yaml("timezone: UTC\nphone_region: XX\n",
                                             "herald.yaml", {}))
    assert problems(exc) == ["herald.yaml:2 phone_region: unknown region 'XX' (an ISO 3166 "
                             "country that phone numbers have, such as CN or US)"]
    config = validate(WorkspaceConfig, parse_yaml("phone_region: CN\n", "herald.yaml", {}))
    assert config.phone_region == "CN"


@pytest.mark.parametrize("store", [
    "sqlite://", "sqlite:///:memory:", "sqlite+pysqlite:///:memory:",
    "sqlite:///file::memory:?cache=shared&uri=true",
    "sqlite:///file:ledger?mode=memory&cache=shared&uri=true"])
@pytest.mark.parametrize("runner", ["threads", "processes"])
def test_an_in_memory_store_is_refused(store: str, runner: str) -> None:
    """Every command is its own process: an in-memory workspace database would forget a
    suppression or a ledger row as soon as the command that wrote it ends."""
    text = f'timezone: UTC\nstore: "{store}"\ntask_runner: {{type: {runner}}}\n'
    with pytest.raises(ConfigError) as exc:
        validate(WorkspaceConfig, parse_yaml(text, "config/herald.yaml", {}))
    assert problems(exc) == [
        "config/herald.yaml:2 store: an in-memory SQLite database is gone when the command "
        "ends, and with it the ledger, the suppression list and the packages: use a "
        "database file (sqlite:///.herald/herald.db) or a server"]
    for kept in ("sqlite:///.herald/herald.db", "sqlite:///file:ledger.db?uri=true",
                 "postgresql+psycopg://u@h/db"):
        config = validate(WorkspaceConfig, parse_yaml(f'store: "{kept}"\n', "h.yaml", {}))
        assert config.store == kept


def test_quiet_hours_errors_are_one_line_each_and_name_no_class() -> None:
    """``quiet_hours`` is a mapping or ``false``: a bad mapping is not also reported as
    "Input should be False", and no message names a model class (QuietHours, FlowSpec)."""
    base = ("name: promo\naudience: {source: crm, segment: people, key: id}\n"
            "tiers: {default: {channels: [email]}}\n")

    def found(text: str) -> list[str]:
        with pytest.raises(ConfigError) as exc:
            validate(FlowSpec, parse_yaml(text, "f.yaml", {}))
        return problems(exc)

    assert found(base + 'quiet_hours: {from: "25:00", to: "09:00"}\n') == [
        "f.yaml:4 quiet_hours.from: a time of day like 21:00 or 9:30"]
    assert found(base + "quiet_hours: true\n") == [
        "f.yaml:4 quiet_hours: must be a mapping or false, not true"]
    assert found(base.replace("[email]}", "[email], experiment: 3}")) == [
        "f.yaml:3 tiers.default.experiment: must be a mapping or false, not a number"]
    assert found("- promo\n") == ["f.yaml:1: must be a mapping, not a list"]
    spec = validate(FlowSpec, parse_yaml(base + 'quiet_hours: {from: "21:00", to: 9:00}\n',
                                         "f.yaml", {}))
    assert spec.quiet_hours and spec.quiet_hours.describe() == "21:00-09:00"


def test_flow_cross_references(make_workspace) -> None:
    """Sources and channels are configured ones; a tier's channels are an order of
    preference, so one listed twice is refused at its own line (in a journey send step's
    tiers too)."""
    nudge = str(JOURNEY_FILES["config/journeys/nudge.yaml"])
    ws = make_workspace({**JOURNEY_FILES, "config/flows/promo.yaml": """\
        name: promo
        audience: {source: nowhere, segment: people, key: id}
        tiers:
          gold: {channels: [email, wchat]}
          silver:
            channels:
              - sms
              - emial
              - sms
        """, "config/journeys/nudge.yaml": nudge.replace(
        "tiers: {default: {channels: [email, sms]}}",
        "tiers: {default: {channels: [email, sms]}, gold: {channels: [sms, sms]}}")})
    with pytest.raises(ConfigError) as exc:
        ws.flow("promo")
    assert problems(exc) == [
        "config/flows/promo.yaml:2 audience.source: unknown source 'nowhere' "
        "(sources in config/herald.yaml: crm)",
        "config/flows/promo.yaml:4 tiers.gold.channels[1]: unknown channel 'wchat' "
        "(configured in config/herald.yaml: email, sms)",
        "config/flows/promo.yaml:8 tiers.silver.channels[1]: unknown channel 'emial' (did "
        "you mean 'email'?) (configured in config/herald.yaml: email, sms)",
        "config/flows/promo.yaml:9 tiers.silver.channels[2]: channel 'sms' is listed twice "
        "(first at channels[0]): list each channel once, in order of preference",
    ]
    from herald.journeys import load as journeys

    with pytest.raises(ConfigError, match=re.escape(
            "config/journeys/nudge.yaml:20 steps.first.tiers.gold.channels[1]: channel 'sms' "
            "is listed twice (first at channels[0])")):
        journeys.load(ws, "nudge")


def test_workspace_cap_scoped_to_unknown_channel_or_flow_is_refused(make_workspace) -> None:
    """A cap whose scope names nothing that exists would count and stop nothing."""
    with pytest.raises(ConfigError) as exc:
        make_workspace({"config/herald.yaml": HERALD_YAML.replace("caps: []", """\
caps:
  - {channel: emial, max: 1, per: 30d}
  - {flow: promoo, max: 1, per: 30d}
  - {flow: "journey:promo", max: 1, per: 30d}
  - {max: 3, per: 7d}""")})
    assert problems(exc) == [
        "config/herald.yaml:9 caps[0].channel: unknown channel 'emial' (did you mean "
        "'email'?) (configured: email, sms)",
        "config/herald.yaml:10 caps[1].flow: unknown flow 'promoo' (did you mean 'promo'?) "
        "(flows: promo)",
        "config/herald.yaml:11 caps[2].flow: unknown flow 'journey:promo' (flows: promo)",
    ]


def test_workspace_cap_may_name_a_journey(make_workspace) -> None:
    ws = make_workspace({**JOURNEY_FILES, "config/herald.yaml": HERALD_YAML.replace(
        "caps: []", 'caps: [{flow: "journey:nudge", max: 1, per: 7d}]')})
    assert [c.flow for c in ws.config.caps] == ["journey:nudge"]


def test_flow_cap_scoped_to_unknown_channel_or_tier_is_refused(make_workspace) -> None:
    """A tier-scoped cap of a flow without a ``default`` entry applies to its tiers only
    (a recipient of any other tier stops the run); without a tier column every recipient
    is tier ``default``."""
    no_default = PROMO_YAML.replace("  default: {channels: [sms, email]}\n", "")
    ws = make_workspace({"config/flows/promo.yaml": no_default + """\
caps:
  - {tier: gld, max: 1, per: 1d}
  - {channel: smss, max: 1, per: 1d}
  - {tier: gold, channel: sms, max: 1, per: 1d}
""", "config/flows/untiered.yaml": """\
name: untiered
audience: {source: crm, segment: people, key: id}
tiers: {gold: {channels: [email]}, default: {channels: [email]}}
caps: [{tier: gold, max: 1, per: 1d}, {tier: default, max: 1, per: 1d}]
"""})
    with pytest.raises(ConfigError) as exc:
        ws.flow("promo")
    assert problems(exc) == [
        "config/flows/promo.yaml:13 caps[0].tier: unknown tier 'gld' (did you mean 'gold'?) "
        "(tiers: gold)",
        "config/flows/promo.yaml:14 caps[1].channel: unknown channel 'smss' (did you mean "
        "'sms'?) (configured in config/herald.yaml: email, sms)",
    ]
    with pytest.raises(ConfigError) as exc:
        ws.flow("untiered")
    assert problems(exc) == [
        "config/flows/untiered.yaml:4 caps[0].tier: tier 'gold' never applies: the audience "
        "names no tier column, so every recipient is tier 'default'"]


def test_journey_cap_scoped_to_unknown_tier_is_refused(make_workspace) -> None:
    from herald.journeys import load as journeys

    nudge = JOURNEY_FILES["config/journeys/nudge.yaml"]
    assert nudge is not None
    ws = make_workspace({**JOURNEY_FILES, "config/journeys/nudge.yaml": nudge.replace(
        "default: {channels: [email]}", "gold: {channels: [email]}").replace(
        "default: {channels: [email, sms]}", "gold: {channels: [email, sms]}").replace(
        "default: {channels: [sms, email]}", "gold: {channels: [sms, email]}")
        + "caps: [{tier: gld, max: 1, per: 1d}, {channel: emial, max: 1, per: 1d}]\n"})
    with pytest.raises(ConfigError) as exc:
        journeys.load(ws, "nudge")
    assert [p.split(" (")[0] for p in problems(exc)] == [
        "config/journeys/nudge.yaml:43 caps[0].tier: unknown tier 'gld'",
        "config/journeys/nudge.yaml:43 caps[1].channel: unknown channel 'emial'",
    ]


def test_cap_tier_without_an_entry_is_a_warning_where_default_takes_it(make_workspace,
                                                                        capsys) -> None:
    """With a ``default`` entry any tier of the data can be capped, so a tier no entry
    names is only suspicious: validate warns, for the flow's caps and the workspace's."""
    from herald.flows.cli import main

    ws = make_workspace({
        "config/herald.yaml": HERALD_YAML.replace(
            "caps: []", "caps: [{tier: silverr, max: 1, per: 1d}]"),
        "config/flows/promo.yaml": PROMO_YAML + "caps: [{tier: gld, max: 1, per: 1d}]\n"})
    with pytest.raises(SystemExit) as done:
        main(["validate", "-w", str(ws.root)])
    assert done.value.code == 0
    err = " ".join(capsys.readouterr().err.split())
    assert ("warning: config/flows/promo.yaml:13 caps[0].tier: no tier entry is named 'gld' "
            "(did you mean 'gold'?); the cap applies only to recipients whose tier is 'gld' "
            "(tiers: gold, default)") in err
    assert ("warning: config/herald.yaml:8 caps[0].tier: no tier entry is named 'silverr'; "
            "the cap applies only to recipients whose tier is 'silverr' (tiers: default, "
            "gold)") in err


def test_flow_name_must_match_file_and_unknown_flow(make_workspace) -> None:
    ws = make_workspace({"config/flows/other.yaml":
                         "name: promo2\naudience: {source: crm, segment: people, key: id}\n"
                         "tiers: {default: {channels: [sms]}}\n"})
    with pytest.raises(ConfigError, match=r"other.yaml:1 name: name 'promo2' must match"):
        ws.flow("other")
    with pytest.raises(WorkspaceError, match=r"unknown flow 'nope'.*flows: other, promo"):
        ws.flow("nope")


def test_flow_or_journey_saved_as_yml_is_reported_not_ignored(make_workspace,
                                                              capsys) -> None:
    """Herald reads ``config/flows/*.yaml``: a ``promo.yml`` beside another flow was left
    out of ``validate`` (exit 0) and of every run."""
    from herald.flows.cli import main
    from herald.journeys import load as journeys

    ws = make_workspace({"config/flows/other.yaml": PROMO_YAML.replace("name: promo",
                                                                       "name: other"),
                         "config/journeys/nudge.YML": "name: nudge\n"})
    shutil.copytree(ws.root / "templates/promo", ws.root / "templates/other")
    (ws.root / "config/flows/promo.yaml").rename(ws.root / "config/flows/promo.yml")
    with pytest.raises(SystemExit) as done:
        main(["validate", "-w", str(ws.root)])
    out, err = capsys.readouterr()
    assert "✓ other" in out and "✗" not in err  # the only problems: the two names
    assert done.value.code == 1
    assert ("config/flows/promo.yml: flow files end in .yaml, so this one is not read: "
            "rename it to promo.yaml") in err
    assert ("config/journeys/nudge.YML: journey files end in .yaml, so this one is not "
            "read: rename it to nudge.yaml") in err
    with pytest.raises(WorkspaceError, match=r"unknown flow 'promo': config/flows/promo.yaml "
                       r"not found \(promo.yml is there: rename it to promo.yaml\)"):
        ws.flow("promo")
    with pytest.raises(WorkspaceError, match=r"\(nudge.YML is there: rename it to nudge.yaml"):
        journeys.load(ws, "nudge")
    # hidden files (macOS's ._other.yaml beside a copied flow, an editor's) are not flows
    (ws.root / "config/flows/._other.yaml").write_bytes(b"\x00\x05\x16\x07binary")
    (ws.root / "config/flows/.draft.yml").write_text("name: draft\n")
    assert ws.flow_names() == ["other"]
    with pytest.raises(SystemExit):
        main(["validate", "-w", str(ws.root)])
    assert "._other" not in capsys.readouterr().err


def test_unknown_channel_type_lists_installed(make_workspace) -> None:
    with pytest.raises(ConfigError) as exc:
        make_workspace({"config/herald.yaml": """\
            sources: {crm: "sqlite:///crm.db"}
            channels:
              push: {type: wecom}
              email: {type: smtp, host: mx.example.com, sender: "a@example.com", prot: 25}
            """})
    found = problems(exc)
    assert found[0].startswith("config/herald.yaml:3 channels.push.type: unknown channel "
                               "type 'wecom' (installed: ")
    assert "outbox" in found[0] and "smtp" in found[0]
    assert found[1] == ("config/herald.yaml:4 channels.email.prot: unknown key 'prot' "
                        "(did you mean 'port'?)")
    # with a problem elsewhere in the file too: all of them at once, not pass by pass
    with pytest.raises(ConfigError) as exc:
        make_workspace({"config/herald.yaml": """\
            timezone: Asia/Shangai
            sources: {crm: "sqlite:///crm.db"}
            channels:
              email: {type: outbx, kind: email}
              sms: {type: outbox, kind: emial}
            """}, folder="both")
    found = problems(exc)
    assert [p.split(":")[1].split(" ")[0] + " " + p.split(" ")[1] for p in found] == [
        "1 timezone:", "4 channels.email.type:", "5 channels.sms.kind:"], found



def test_a_channel_with_wrong_settings_is_reported_once(make_workspace) -> None:
    """A cap naming a channel whose settings are wrong: the settings are the problem, not
    the cap (it read `unknown channel` as well)."""
    with pytest.raises(ConfigError) as exc:
        make_workspace({"config/herald.yaml": HERALD_YAML.replace(
            "sms: {type: outbox, kind: sms}", "sms: {type: outbox, kind: sms, batch_size: -1}"
        ).replace("caps: []", "caps:\n  - {channel: sms, max: 1, per: 1d}")})
    assert problems(exc) == [
        "config/herald.yaml:7 channels.sms.batch_size: Input should be greater than 0"]

def test_a_channel_safety_switch_takes_true_or_false_only(make_workspace) -> None:
    """``validate_certs: "off"`` and ``allow_private_addresses: on`` were read as booleans
    by pydantic's lax mode: a typo could turn certificate checks or the private-address
    guard off. A channel's other settings (ports from ``${VAR}``) stay as they were."""
    with pytest.raises(ConfigError) as exc:
        make_workspace({"config/herald.yaml": """\
            sources: {crm: "sqlite:///crm.db"}
            channels:
              email: {type: smtp, host: mx.example.com, sender: "a@example.com",
                      port: "2525", validate_certs: "off"}
              hook: {type: webhook, kind: webhook, allow_private_addresses: on}
            """})
    words = "(YAML 1.2 reads yes, no, on, off and quoted words as text)"
    assert problems(exc) == [
        f"config/herald.yaml:4 channels.email.validate_certs: must be true or false, not "
        f"text {words}",
        f"config/herald.yaml:5 channels.hook.allow_private_addresses: must be true or "
        f"false, not text {words}"]


def test_missing_secret_env_var_is_named_not_printed(make_workspace, monkeypatch) -> None:
    """A channel's secret is required by what sends through it (check_flow: validate,
    run, serve), not by opening the workspace (report, suppress list)."""
    from herald.flows.validate import check_flow

    monkeypatch.delenv("HERALD_TEST_SMTP_PASSWORD", raising=False)
    ws = make_workspace({"config/herald.yaml": """\
            sources: {crm: "sqlite:///crm.db"}
            channels:
              email: {type: smtp, host: mx.example.com, sender: "a@example.com",
                      password: "${HERALD_TEST_SMTP_PASSWORD}"}
              sms: {type: outbox, kind: sms}
            """})
    with pytest.raises(ValidationFailed) as exc:
        check_flow(ws, "promo")
    assert problems(exc) == ["config/herald.yaml:4 channels.email.password: environment "
                             "variable HERALD_TEST_SMTP_PASSWORD is not set"]
    assert ws.missing_secrets(["sms"]) == []


def test_unset_secrets_are_listed_with_the_other_problems(make_workspace, monkeypatch,
                                                            capsys) -> None:
    """An unset secret was said only once everything else was right: an operator who
    fixed a typo in herald.yaml, or a wrong --param, learnt of it at the next try."""
    monkeypatch.delenv("HERALD_TEST_SMTP_PASSWORD", raising=False)
    smtp = ('  email: {type: smtp, host: mx.example.com, sender: "a@example.com",\n'
            '          password: "${HERALD_TEST_SMTP_PASSWORD}"}\n')
    unset = ("config/herald.yaml:4 channels.email.password: environment variable "
             "HERALD_TEST_SMTP_PASSWORD is not set")
    ws = make_workspace({"config/herald.yaml": 'sources: {crm: "sqlite:///crm.db"}\n'
                         "channels:\n" + smtp + "  sms: {type: outbox, kind: sms}\n"})
    with pytest.raises(ValidationFailed) as exc:
        check_flow(ws, "promo", {"min_score": "lots"})
    assert len(problems(exc)) == 2 and problems(exc)[1] == unset, problems(exc)
    assert "min_score" in problems(exc)[0]
    for typo, said in (("chunk_size: lots\n", "chunk_size: must be"),
                       ("chunk_sise: 10\n", "unknown key 'chunk_sise'"),
                       ("caps: [{max: 1, per: day, channel: fax}]\n", "unknown channel 'fax'")):
        (ws.root / "config/herald.yaml").write_text(
            'sources: {crm: "sqlite:///crm.db"}\nchannels:\n' + smtp
            + "  sms: {type: outbox, kind: sms}\n" + typo)
        with pytest.raises(ConfigError) as err:
            Workspace.open(ws.root)
        assert len(problems(err)) == 2 and said in problems(err)[0], problems(err)
        assert problems(err)[1] == unset
        with pytest.raises(SystemExit) as done:
            main(["validate", "-w", str(ws.root)])
        assert done.value.code == 1
        printed = capsys.readouterr().err
        assert said in printed and unset in printed, printed


def test_not_a_workspace(tmp_path) -> None:
    with pytest.raises(WorkspaceError, match="not a Herald workspace"):
        Workspace.open(tmp_path)


def test_non_utf8_yaml(make_workspace) -> None:
    ws = make_workspace()
    (ws.root / "config/flows/promo.yaml").write_bytes(b"name: promo\ndescription: \xff\n")
    with pytest.raises(ConfigError, match=r"promo.yaml:2: not valid UTF-8"):
        Workspace.open(ws.root).flow("promo")


@pytest.mark.parametrize("rel", ["config/herald.yaml", "config/flows/promo.yaml",
                                 "audiences/people.sql",
                                 "templates/promo/gold.email.txt.j2"])
def test_a_file_that_cannot_be_read_is_named(rel, make_workspace, monkeypatch,
                                              capsys) -> None:
    """The OS refusing a read (the tests run as root, whom file modes do not stop: the
    refusal is raised where Herald reads the file's bytes) is one line naming the file."""
    ws = make_workspace()
    refused = ws.root / rel
    real_read_bytes = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        if path == refused:
            raise PermissionError(13, "Permission denied", str(path))
        return real_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(SystemExit) as exc:
        main(["validate", "-w", str(ws.root)])
    out, err = capsys.readouterr()
    assert exc.value.code == 1 and "Traceback" not in err, err
    assert f"{rel}: cannot read: permission denied" in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_a_flow_file_without_read_permission_is_named(make_workspace) -> None:
    ws = make_workspace()
    (ws.root / "config/flows/promo.yaml").chmod(0)
    with pytest.raises(ConfigError) as exc:
        Workspace.open(ws.root).flow("promo")
    assert problems(exc) == ["config/flows/promo.yaml: cannot read: permission denied"]


def _refuse_to_open(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = Path.open

    def refuse(path: Path, *args: Any, **kwargs: Any) -> Any:
        if path == db:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)


def _folder_instead(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db.unlink()
    db.mkdir()


@pytest.mark.parametrize(("spoil", "reason"), [
    (_refuse_to_open, "cannot read: permission denied"),
    (_folder_instead, "is a folder, not a file"),
], ids=["unreadable", "a folder"])
def test_a_source_database_that_cannot_be_read_is_named_not_the_sql(
        make_workspace, monkeypatch, spoil, reason) -> None:
    ws = make_workspace()
    db = ws.root / "crm.db"
    spoil(db, monkeypatch)
    with pytest.raises(ValidationFailed) as exc:
        check_flow(Workspace.open(ws.root), "promo")
    assert problems(exc) == [f"config/herald.yaml:3 sources.crm: sqlite:///{db}: {reason}"]


def test_a_byte_order_mark_before_yaml_is_ignored(make_workspace) -> None:
    ws = make_workspace()
    flow = ws.root / "config/flows/promo.yaml"
    flow.write_bytes(b"\xef\xbb\xbf" + flow.read_bytes())
    assert Workspace.open(ws.root).flow("promo").name == "promo"


def test_validate_refuses_a_store_whose_driver_is_not_installed(make_workspace,
                                                                 capsys) -> None:
    ws = make_workspace()
    config = ws.root / "config/herald.yaml"
    config.write_text(config.read_text().replace("sqlite:///.herald/herald.db",
                                                 "mysql://u:secret@127.0.0.1:1/db"))
    with pytest.raises(SystemExit) as exc:
        main(["validate", "-w", str(ws.root)])
    out, err = capsys.readouterr()
    assert exc.value.code == 1 and "Traceback" not in err and "secret" not in err, err
    assert err.strip() == ("error: config/herald.yaml:4 store: unsupported database URL: "
                           "its driver is not installed (no module 'MySQLdb'; use sqlite "
                           "or postgresql+psycopg)")


def test_a_workspace_database_from_an_older_herald_is_named(make_workspace) -> None:
    import sqlite3

    ws = make_workspace()
    (ws.root / ".herald").mkdir(exist_ok=True)
    with sqlite3.connect(ws.root / ".herald/herald.db") as conn:
        conn.execute("CREATE TABLE herald_runs (id TEXT PRIMARY KEY)")
    with pytest.raises(WorkspaceError, match=r"made by an older Herald: table herald_runs "
                                             r"lacks flow, run_key"):
        Workspace.open(ws.root).store.connect()  # the database opens on first use


def test_a_nullable_column_added_since_is_added_to_an_existing_ledger(make_workspace
                                                                      ) -> None:
    import sqlite3

    from herald.flows import chunks, engine

    ws = make_workspace(rows=5)
    engine.run_local(ws, "promo", run_key="before")
    ws.dispose()
    db = ws.root / ".herald/herald.db"
    with sqlite3.connect(db) as conn:  # the ledger as an older Herald left it
        conn.execute("ALTER TABLE herald_deliveries DROP COLUMN segments")
    chunks.forget_workspace(ws.root)
    again = Workspace.open(ws.root)
    chunks.adopt_workspace(again)
    assert engine.run_local(again, "promo", run_key="before")["deliveries"]["duplicate"] == 5
    with sqlite3.connect(db) as conn:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(herald_deliveries)")]
        assert "segments" in columns
        assert conn.execute("SELECT count(*) FROM herald_deliveries").fetchone()[0] == 5
    again.dispose()


def test_schedules_are_checked_with_line_and_field() -> None:
    text = ("name: promo\naudience: {source: crm, segment: people, key: id}\n"
            "tiers: {default: {channels: [email]}}\nschedules:\n"
            "  - {cron: '0 10 * * *', interval: 1h}\n"
            "  - {cron: '61 * * * *'}\n"
            "  - {rrule: 'FREQ=SOMETIMES'}\n"
            "  - {active: false}\n"
            "  - {cron: '0 9 * * 1', anchor: '2026-01-01T08:00'}\n"
            "  - {interval: 1h, timezone: Moon/Base}\n"
            "  - {rrule: 'FREQ=MINUTELY;INTERVAL=0'}\n")
    with pytest.raises(ConfigError) as exc:
        validate(FlowSpec, parse_yaml(text, "f.yaml", {}))
    found = problems(exc)
    assert ("f.yaml:5 schedules[0]: a schedule needs exactly one of cron, interval or "
            "rrule (found cron, interval)") in found
    assert any(p.startswith("f.yaml:6 schedules[1]: Invalid cron string") for p in found)
    assert any(p.startswith('f.yaml:7 schedules[2]: Invalid RRule string') for p in found)
    assert ("f.yaml:8 schedules[3]: a schedule needs exactly one of cron, interval or "
            "rrule") in found
    assert "f.yaml:9 schedules[4]: anchor applies to interval schedules only" in found
    assert any(p.startswith("f.yaml:10 schedules[5].timezone: unknown time zone 'Moon/Base'")
               for p in found)
    assert ('f.yaml:11 schedules[6]: Invalid RRule string "FREQ=MINUTELY;INTERVAL=0": '
            "INTERVAL must be 1 or more") in found
    assert len(found) == 7
    twice = ("name: promo\naudience: {source: crm, segment: people, key: id}\n"
             "tiers: {default: {channels: [email]}}\nschedules:\n"
             "  - {name: a, cron: '0 9 * * *'}\n  - {name: a, interval: 2h}\n")
    with pytest.raises(ConfigError) as exc:
        validate(FlowSpec, parse_yaml(twice, "f.yaml", {}))
    assert problems(exc) == ["f.yaml:4 schedules: schedule names must be distinct"]


def test_schedules_become_prefect_schedules(make_workspace) -> None:
    from herald.flows.deploy import schedule

    ws = make_workspace({"config/flows/promo.yaml": (
        "name: promo\naudience: {source: crm, segment: people, key: id, tier: tier}\n"
        "timezone: Asia/Shanghai\ntiers: {default: {channels: [email]}}\nschedules:\n"
        "  - {name: am, cron: '0 10 * * *', params: {min_score: 5}}\n"
        "  - {interval: 6h, active: false}\n"
        "  - {rrule: 'FREQ=WEEKLY;BYDAY=MO', timezone: UTC}\n")})
    specs = ws.flow("promo").schedules
    cron, interval, rrule = (schedule(ws, "promo", i, s) for i, s in enumerate(specs))
    assert (cron.cron, cron.timezone, cron.slug, cron.active) == (
        "0 10 * * *", "Asia/Shanghai", "promo-am", True)
    assert cron.parameters == {"params": {"min_score": 5}}
    assert interval.interval is not None and interval.interval.total_seconds() == 6 * 3600
    assert interval.slug == "promo-1" and interval.active is False
    # counted from local midnight, so "every 6h" fires at 00, 06, 12 and 18 Shanghai time
    assert interval.anchor_date is not None
    assert (interval.anchor_date.hour, str(interval.anchor_date.tzinfo)) == (
        0, "Asia/Shanghai")
    assert (rrule.rrule, rrule.timezone, rrule.parameters) == ("FREQ=WEEKLY;BYDAY=MO", "UTC",
                                                               {})


def test_quiet_hours_false_in_herald_yaml_turns_them_off(make_workspace) -> None:
    """The README says `quiet_hours: false` turns quiet hours off, and a window from a
    time to itself is refused saying to write it; herald.yaml refused it ("must be a
    mapping, not false"), only a flow took it."""
    ws = make_workspace()
    (ws.root / "config/herald.yaml").write_text(
        HERALD_YAML + 'quiet_hours: {from: "21:00", to: "21:00"}\n')
    with pytest.raises(ConfigError) as exc:
        Workspace.open(ws.root)
    assert "write quiet_hours: false" in problems(exc)[0]
    (ws.root / "config/herald.yaml").write_text(HERALD_YAML + "quiet_hours: false\n")
    assert Workspace.open(ws.root).config.quiet_hours is None


def test_a_column_hidden_by_heralds_own_variable_is_warned_of(make_workspace, capsys
                                                              ) -> None:
    """A segment's `flow` or `channel` column was replaced in every template by Herald's
    own variable of that name without a word."""
    ws = make_workspace({"audiences/people.sql": (
        "SELECT id, name, email, phone, tier, locale, score, 'crm' AS flow, 'x' AS channel "
        "FROM people WHERE score >= :min_score")})
    with pytest.raises(SystemExit) as done:
        main(["validate", "-w", str(ws.root)])
    assert done.value.code == 0
    err = " ".join(capsys.readouterr().err.split())
    for column, what in (("flow", "the flow's name"), ("channel", "the channel's name")):
        assert (f"warning: audiences/people.sql: column '{column}' is hidden in the templates "
                f"by Herald's own '{column}' ({what}): rename it in the query (... AS "
                f"{column}_) to use it") in err, err
    assert "column 'tier'" not in err  # the audience's tier column: the same value
