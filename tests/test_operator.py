"""What an operator sees (issue 16): commands that stay light, progress, failure reasons,
reports by run key, errors with hints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from herald.core.errors import ConfigError
from herald.flows import engine
from herald.flows.cli import main


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.out, captured.err


# -- commands that do not need Prefect do not import it ---------------------------------
_PROBE = """\
import json, sys
from herald.flows.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code or 0
print(json.dumps({"code": code, "prefect": sorted(m for m in sys.modules
                                                  if m.split('.')[0] == 'prefect')}),
      file=sys.stderr)
"""

LIGHT = [["validate"], ["preview", "promo"], ["preview", "promo", "--tier", "gold"],
         ["audience", "list"], ["audience", "build", "promo"], ["report", "promo"],
         ["report", "promo", "--json"], ["suppress", "list"], ["suppress", "add", "x@y.z"],
         ["runs"], ["recipient", "1"], ["audience", "prune", "--keep", "5"],
         ["run", "promo", "--run-key", "k1"]]  # a complete run key: answered without Prefect


def test_read_only_commands_do_not_import_prefect(make_workspace) -> None:
    ws = make_workspace(rows=20)
    engine.run_local(ws, "promo", run_key="k1")  # something to report, without Prefect
    for args in LIGHT:
        proc = subprocess.run([sys.executable, "-c", _PROBE, *args, "-w", str(ws.root)],
                              capture_output=True, text=True, timeout=60)
        outcome = json.loads(proc.stderr.strip().splitlines()[-1])
        assert outcome == {"code": 0, "prefect": []}, (args, proc.stderr[-1500:])


def test_bad_cron_names_the_field_without_prefect(make_workspace, capsys) -> None:
    from .helpers import PROMO_YAML

    ws = make_workspace({"config/flows/promo.yaml": _with_schedule("0 25 * * *")})
    code, _, err = cli(capsys, "validate", "-w", str(ws.root))
    assert code == 1
    assert ('config/flows/promo.yaml:14 schedules[0]: Invalid cron string: "0 25 * * *": '
            "bad hour field '25'") in err
    ws = make_workspace({"config/flows/promo.yaml": _with_schedule("0 10 * * FRY")},
                        folder="ws2")
    code, _, err = cli(capsys, "validate", "-w", str(ws.root))
    assert code == 1 and "bad day-of-week field 'FRY'" in err
    # a day every month named lacks: Prefect takes it and never runs it
    ws = make_workspace({"config/flows/promo.yaml": _with_schedule("0 9 30 2 *")},
                        folder="ws3")
    code, _, err = cli(capsys, "validate", "-w", str(ws.root))
    assert code == 1 and ("day-of-month '30' never falls in month '2', so the schedule "
                          "would never run") in " ".join(err.split()), err
    # the same day as an RRule (dateutil would search up to the year 9999 for it)
    ws = make_workspace({"config/flows/promo.yaml": PROMO_YAML + (
        "schedules:\n  - {rrule: 'FREQ=DAILY;BYMONTH=2;BYMONTHDAY=30'}\n")}, folder="ws4")
    code, _, err = cli(capsys, "validate", "-w", str(ws.root))
    assert code == 1 and ('config/flows/promo.yaml:14 schedules[0]: Invalid RRule string '
                          '"FREQ=DAILY;BYMONTH=2;BYMONTHDAY=30": no month it names has the '
                          "day of the month it names, so it would never run"
                          ) in " ".join(err.split()), err
    for good in ("0 10 * * MON-FRI", "@daily", "*/15 9-17 * * 1#2", "0 9 31 * *",
                 "0 9 30 2 MON"):
        ws = make_workspace({"config/flows/promo.yaml": _with_schedule(good)},
                            folder=f"ok{abs(hash(good))}")
        code, _, err = cli(capsys, "validate", "-w", str(ws.root))
        assert code == 0, err


def test_a_tier_template_naming_no_file_is_refused(make_workspace, capsys) -> None:
    """A tier's `template:` may take some parts from FLOW/default, but one that names no
    file at all (a typo) sent every message of the tier with the default templates."""
    from .helpers import PROMO_YAML

    typo = PROMO_YAML.replace("gold: {channels: [email, sms]}",
                              "gold: {channels: [email, sms], template: promo/vip_typo}")
    vip = {"templates/promo/vip.email.txt.j2": "VIP {{ name }}"}
    ws = make_workspace({"config/flows/promo.yaml": typo, **vip})
    code, _, err = cli(capsys, "validate", "-w", str(ws.root))
    assert code == 1 and ("config/flows/promo.yaml:11 tiers.gold.template: no template file "
                          "starts with templates/promo/vip_typo. (like templates/promo/"
                          "vip_typo.email.txt.j2) (did you mean 'promo/vip'?)"
                          ) in " ".join(err.split()), err
    code, _, err = cli(capsys, "run", "promo", "--dry-run", "-w", str(ws.root))
    assert code == 1 and "tiers.gold.template: no template file" in err, err
    # naming a real prefix, it takes the parts it lacks (the subject) from promo/default
    ws = make_workspace({"config/flows/promo.yaml": typo.replace("vip_typo", "vip"), **vip},
                        folder="ok")
    code, _, err = cli(capsys, "validate", "-w", str(ws.root))
    assert code == 0, err


def _with_schedule(cron: str) -> str:
    from .helpers import PROMO_YAML

    return PROMO_YAML + f"schedules:\n  - {{cron: '{cron}', timezone: Asia/Shanghai}}\n"


# -- live progress ------------------------------------------------------------------------
@pytest.mark.prefect
def test_progress_lines_and_artifacts_mid_run(make_workspace, prefect_harness,
                                              monkeypatch) -> None:
    """Chunk by chunk, the CLI's lines and the Prefect artifacts carry the same figures;
    the artifacts are read back from the Prefect API while the run is still sending."""
    import io

    from prefect.artifacts import Artifact
    from rich.console import Console

    from herald.flows import campaign
    from herald.flows.cli.live import LiveReport
    from herald.flows.progress import watching

    monkeypatch.setattr(campaign, "PUBLISH_EVERY", 0.0)  # every chunk's figures written
    ws = make_workspace(rows=100)  # 40 a chunk: 3 chunks, 2 recipients without address
    seen: list[tuple[int, str, str, float]] = []

    class Spy:
        def begin(self, progress) -> None:
            pass

        def chunk(self, progress, line) -> None:
            table = Artifact.get("herald-promo-sending")
            bar = Artifact.get("herald-promo-progress")
            assert table is not None and bar is not None
            seen.append((progress.done, str(table.data), str(bar.description),
                         float(bar.data)))

        def end(self, progress) -> None:
            pass

    screen = io.StringIO()
    with watching(Spy()), watching(LiveReport(Console(file=screen, width=200))):
        summary = campaign.run(ws, "promo", {}, "k-progress", False)
    assert summary["deliveries"]["sent"] == 98
    assert [done for done, *_ in seen] == [1, 2, 3]
    done, table, headline, percent = seen[1]  # mid-run: two chunks of three (40, 40, 20)
    processed = int(headline.split(" · ")[1].split("/")[0])
    assert processed in (60, 80) and "| chunks | 2 / 3 |" in table
    assert f"| recipients processed | {processed} / 100 ({processed}%) |" in table
    assert headline.startswith(f"2/3 chunks · {processed}/100 recipients · sent ")
    assert percent == pytest.approx(processed)
    final = seen[-1]
    assert "| chunks | 3 / 3 |" in final[1] and "| sent | 98 |" in final[1]
    assert "| no_address | 2 |" in final[1]
    lines = screen.getvalue().splitlines()
    assert lines[0].startswith("promo k-progress · run run-")
    assert "100 recipients in 3 chunks" in lines[0]
    chunk_lines = [line for line in lines if line.startswith("chunk ")]
    assert [line.split(" (")[0] for line in chunk_lines] == ["chunk 1/3", "chunk 2/3",
                                                             "chunk 3/3"]
    sent = sum(int(line.split("sent ")[1].split(",")[0]) for line in chunk_lines)
    assert sent == 98 and chunk_lines[-1].endswith("100/100 recipients")


@pytest.mark.prefect
def test_progress_artifacts_are_written_at_most_every_few_seconds(
        make_workspace, prefect_harness, monkeypatch) -> None:
    """Between the first chunk's figures and the last's, the artifacts are rewritten only
    once PUBLISH_EVERY seconds have passed (two API calls each: a run of many chunks
    cost the server more for them than for its task runs); the last figures always
    reach them."""
    from prefect.artifacts import Artifact

    from herald.flows import campaign
    from herald.flows.progress import watching

    monkeypatch.setattr(campaign, "PUBLISH_EVERY", 3600.0)
    ws = make_workspace(rows=100)  # 40 a chunk: 3 chunks
    seen: list[tuple[int, str]] = []
    tables: list[str] = []

    class Spy:
        def begin(self, progress) -> None:
            pass

        def chunk(self, progress, line) -> None:
            bar = Artifact.get("herald-promo-progress")
            assert bar is not None
            seen.append((progress.done, str(bar.description)))

        def end(self, progress) -> None:
            table = Artifact.get("herald-promo-sending")
            assert table is not None
            tables.append(str(table.data))

    with watching(Spy()):
        summary = campaign.run(ws, "promo", {}, "k-throttled", False)
    assert summary["deliveries"]["sent"] == 98
    assert [done for done, _ in seen] == [1, 2, 3]
    assert seen[0][1].startswith("1/3 chunks")  # the first at once
    assert seen[1][1].startswith("1/3 chunks")  # the second within the interval: not yet
    assert seen[2][1].startswith("3/3 chunks · 100/100 recipients · sent 98")  # the last
    assert len(tables) == 1 and "| chunks | 3 / 3 |" in tables[0]


# -- failures an operator can act on --------------------------------------------------------
def test_failure_reasons_keep_the_providers_code(make_workspace, peer, capsys) -> None:
    """A gateway's own error code and message travel from its answer to the ledger, the
    report's top failure reasons and the delivery artifact's Markdown."""
    from herald.reporting import runs
    from herald.reporting.text import delivery_markdown

    from .helpers import PROMO_YAML

    ws = make_workspace({
        "config/herald.yaml": (
            "timezone: UTC\nsources:\n  crm: \"sqlite:///crm.db\"\nchannels:\n"
            f"  hook: {{type: webhook, url: \"{peer.url}/v1/messages\", address: email}}\n"
            "chunk_size: 40\n"),
        "config/flows/promo.yaml": PROMO_YAML.replace(
            "gold: {channels: [email, sms]}", "gold: {channels: [hook]}").replace(
            "default: {channels: [sms, email]}", "default: {channels: [hook]}"),
        "templates/promo/default.webhook.txt.j2": "Hello {{ name }}",
    }, rows=12)
    for key in ("1", "2", "3"):
        peer.script(key, ("json", 400, {"error": {"code": "E_NUMBER",
                                                  "message": "number not reachable"}}))
    peer.script("4", ("json", 422, {"code": 30007, "message": "carrier filtered"}))
    summary = engine.run_local(ws, "promo", run_key="k")
    assert summary["deliveries"]["failed"] == 4

    code, out, _ = cli(capsys, "report", "promo", "-w", str(ws.root), "--json")
    assert code == 0
    top = json.loads(out)["failure_reasons"]
    assert top[0] == {"channel": "hook", "code": "E_NUMBER", "count": 3,
                      "reason": "permanent: HTTP 400 Bad Request: E_NUMBER: number not "
                                "reachable"}
    assert (top[1]["code"], top[1]["count"]) == ("30007", 1)
    assert "carrier filtered" in top[1]["reason"]
    code, out, _ = cli(capsys, "report", "promo", "-w", str(ws.root))
    assert code == 0 and "top failure reasons" in out and "E_NUMBER" in out

    markdown = delivery_markdown(summary, runs.failure_reasons(ws, "promo", "k"))
    assert "## Per tier" in markdown and "## Per channel" in markdown
    assert ("| hook | E_NUMBER | permanent: HTTP 400 Bad Request: E_NUMBER: number not "
            "reachable | 3 |") in markdown
    tiers = {line.split(" | ")[0].strip("| ") for line in
             markdown.split("## Per tier")[1].split("##")[0].splitlines() if "|" in line}
    assert {"bronze", "gold", "silver", "**all**"} <= tiers


# -- reports by run key ----------------------------------------------------------------------
def test_report_by_run_key_runs_and_a_complete_rerun(make_workspace, capsys) -> None:
    from herald.audiences import store

    ws = make_workspace(rows=100)
    first = engine.run_local(ws, "promo", run_key="k")
    again = engine.run_local(ws, "promo", run_key="k")  # everyone a duplicate
    assert again["deliveries"]["duplicate"] == 100 and again["deliveries"]["sent"] == 0
    dry = engine.run_local(ws, "promo", run_key="k", dry_run=True)

    code, out, _ = cli(capsys, "report", "promo", "-w", str(ws.root), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["run_key"] == "k" and report["deliveries"]["sent"] == 98
    assert report["deliveries"]["duplicate"] == 0  # each recipient once, as first sent
    assert [r["run_id"] for r in report["runs"]] == [again["run_id"], first["run_id"]]
    assert report["package"]["id"] == first["package"]["id"]
    code, out, _ = cli(capsys, "report", "promo", "--dry-runs", "-w", str(ws.root), "--json")
    assert dry["run_id"] in [r["run_id"] for r in json.loads(out)["runs"]]
    code, out, _ = cli(capsys, "report", first["run_id"], "-w", str(ws.root), "--json")
    assert json.loads(out)["run_id"] == first["run_id"]  # a run id: that run alone

    code, out, _ = cli(capsys, "runs", "promo", "-w", str(ws.root), "--json")
    listed = json.loads(out)
    assert code == 0 and [r["run_id"] for r in listed] == [dry["run_id"], again["run_id"],
                                                           first["run_id"]]
    assert (listed[2]["sent"], listed[1]["duplicate"], listed[0]["dry_run"]) == (98, 100, True)
    assert listed[2]["run_key"] == "k" and listed[2]["duration_seconds"] is not None
    code, out, _ = cli(capsys, "runs", "-w", str(ws.root))
    assert code == 0 and first["run_id"] in out

    packages = len(store.list_packages(ws, "promo"))
    code, out, err = cli(capsys, "run", "promo", "--run-key", "k", "-w", str(ws.root))
    assert code == 0
    assert out.strip() == "already sent under run key k: 98 sent, 0 failed; nothing to do"
    assert len(store.list_packages(ws, "promo")) == packages  # no package built
    code, out, _ = cli(capsys, "run", "promo", "--run-key", "k", "--json", "-w", str(ws.root))
    done = json.loads(out)
    assert code == 0 and done["status"] == "nothing_to_do"
    assert done["deliveries"]["sent"] == 98 and done["sent_by"] == first["run_id"]


def test_a_run_key_that_reached_nobody_is_not_used_up(make_workspace, capsys, caplog
                                                      ) -> None:
    """A mistyped parameter made the audience empty: the run completed without a word,
    and the corrected run under the same run key answered "already sent: 0 sent;
    nothing to do". Now the empty audience is said, and the rerun builds it again."""
    from herald.flows import engine

    from .helpers import outbox_messages

    ws = make_workspace(rows=20)
    with caplog.at_level("WARNING", logger="herald"):
        summary = engine.run_local(ws, "promo", {"min_score": 100000}, run_key="k")
    assert summary["deliveries"]["sent"] == 0
    assert ("the audience of promo is empty: audiences/people.sql returned no rows with "
            "min_score=100000; nothing is sent (a rerun of run key k builds it again)"
            ) in caplog.messages, caplog.messages
    code, out, err = cli(capsys, "run", "promo", "--run-key", "k", "-w", str(ws.root),
                         "--json")
    again = json.loads(out)
    assert code == 0 and again["status"] != "nothing_to_do"
    assert again["deliveries"]["sent"] > 0 and outbox_messages(ws) == again["deliveries"]["sent"]
    code, out, _ = cli(capsys, "run", "promo", "--run-key", "k", "-w", str(ws.root))
    assert code == 0 and "nothing to do" in out  # now it reached people: complete


def test_a_repeated_channel_stops_validate_and_run_before_any_send(make_workspace,
                                                                   capsys) -> None:
    from .helpers import PROMO_YAML, ledger_rows, outbox_messages

    ws = make_workspace({"config/flows/promo.yaml": PROMO_YAML.replace(
        "gold: {channels: [email, sms]}", "gold: {channels: [sms, sms]}")})
    line = ("config/flows/promo.yaml:11 tiers.gold.channels[1]: channel 'sms' is listed "
            "twice (first at channels[0])")
    code, _, err = cli(capsys, "validate", "-w", str(ws.root))
    assert code == 1 and line in err
    code, out, err = cli(capsys, "run", "promo", "--json", "-w", str(ws.root))
    assert code == 1 and out == "" and line in err
    assert outbox_messages(ws) == 0 and ledger_rows(ws, "status") == {}


def test_unknown_flows_runs_and_keys_get_did_you_mean(make_workspace, capsys) -> None:
    ws = make_workspace(rows=10)
    engine.run_local(ws, "promo", run_key="2026-11-22")
    code, _, err = cli(capsys, "report", "promx", "-w", str(ws.root))
    assert code == 1 and "no run or flow 'promx' (did you mean 'promo'?)" in err
    code, _, err = cli(capsys, "report", "promo", "--run-key", "2026-11-23", "-w",
                       str(ws.root))
    assert code == 1 and "did you mean '2026-11-22'?" in err
    code, _, err = cli(capsys, "runs", "prom", "-w", str(ws.root))
    assert code == 1 and "unknown flow 'prom' (did you mean 'promo'?)" in err


def test_every_command_taking_a_name_says_what_was_meant(make_workspace, capsys) -> None:
    """Journeys, flows, packages and channels given by name: a typo gets the closest
    name, a journey's name where a flow is wanted (or the reverse) says what it is."""
    from herald.audiences import store
    from herald.flows import deploy

    from .helpers import JOURNEY_FILES

    ws = make_workspace(JOURNEY_FILES, rows=10)
    engine.run_local(ws, "promo", run_key="2026-11-22")
    package = store.list_packages(ws)[0].id
    w = ("-w", str(ws.root))
    wanted = {
        ("journey", "tick", "nudg"): "unknown journey 'nudg': config/journeys/nudg.yaml not "
                                     "found (did you mean 'nudge'?) (journeys: nudge)",
        ("journey", "status", "nudg"): "unknown journey 'nudg'",
        ("journey", "show", "nudg", "1"): "unknown journey 'nudg'",
        ("journey", "report", "nudg"): "unknown journey 'nudg'",
        ("journey", "tick", "promo"): "not found ('promo' is a flow) (journeys: nudge)",
        ("run", "nudge"): "not found ('nudge' is a journey) (flows: promo)",
        ("validate", "nudg"): "unknown flow 'nudg': config/flows/nudg.yaml not found (did "
                              "you mean journey 'nudge'?) (flows: promo)",
        ("report", "nudge"): "no run or flow 'nudge' ('nudge' is a journey: herald journey "
                             "report nudge)",
        ("demo-data", "--simulate-response", "nudg"): "(did you mean journey 'nudge'?)",
        ("runs", "nudge"): "'nudge' is a journey, not a flow: its ticks are in herald "
                           "journey status nudge and herald journey report nudge",
        ("audience", "list", "--flow", "prom"): "--flow: unknown flow 'prom' (did you mean "
                                                "'promo'?)",
        ("audience", "prune", "--keep", "0", "--flow", "prom"): "(did you mean 'promo'?)",
        ("audience", "show", package[:-1]): f"(did you mean '{package}'?)",
        ("suppress", "add", "x@y.z", "--channel", "emial"): "unknown channel 'emial' (did you mean "
                                                    "'email'?)",
    }
    for args, message in wanted.items():
        code, _, err = cli(capsys, *args, *w)
        assert code == 1 and message in err, (args, err)
    assert store.list_packages(ws) != []  # the prune of an unknown flow deleted nothing
    with pytest.raises(ConfigError, match=r"unknown flow 'prom'.*did you mean 'promo'"):
        deploy._flows_and_journeys(ws, ["prom", "nudge"])


# -- errors, each one line with file:line field and a hint -------------------------------------
def test_errors_name_the_line_and_give_a_hint(make_workspace, capsys, monkeypatch) -> None:
    from herald.audiences import store

    from .helpers import PROMO_YAML, outbox_messages

    flow = "config/flows/promo.yaml"
    ws = make_workspace({flow: PROMO_YAML.replace("{min_score: 0}",
                                                  "{min_scor: 0}")})
    code, _, err = cli(capsys, "validate", "-w", str(ws.root))
    assert code == 1
    assert (f"{flow}:6 audience.params.min_scor: audiences/people.sql does not use "
            ":min_scor (did you mean 'min_score'?) (it uses: :min_score)") in err
    code, _, err = cli(capsys, "preview", "promo", "-w", str(ws.root), "-p", "min_score=1",
                       "-p", "dayz=3")
    assert code == 1 and "-p dayz: audiences/people.sql does not use :dayz" in err
    # a typo in a number would be bound as text and select another audience: refused,
    # nothing built or sent
    ws = make_workspace(folder="w1")
    for value, what in (("1O", "'1O' is not a number"), ("true", "true is not a number")):
        code, _, err = cli(capsys, "run", "promo", "-w", str(ws.root), "-p",
                           f"min_score={value}")
        assert code == 1 and (f"-p min_score: {what}, as the flow's value 0 is "
                              f"({flow}:6)") in " ".join(err.split()), err
    code, _, err = cli(capsys, "run", "promo", "-w", str(ws.root), "-p", "min_score=1e400")
    assert code == 2 and "min_score: inf is not a finite number" in " ".join(err.split()), err
    huge = "99999999999999999999999"  # no database stores it: was a traceback
    for command in (["run", "promo"], ["preview", "promo"], ["audience", "build", "promo"]):
        code, _, err = cli(capsys, *command, "-w", str(ws.root), "-p", f"min_score={huge}")
        said = " ".join(err.split())
        assert code == 2 and "Traceback" not in err and (
            f"min_score: {huge} is outside the whole numbers a database stores") in said, err
    assert outbox_messages(ws) == 0 and store.list_packages(ws) == []
    ws = make_workspace({flow: PROMO_YAML.replace("{min_score: 0}", f"{{min_score: {huge}}}")},
                        folder="w2")
    code, _, err = cli(capsys, "validate", "-w", str(ws.root))
    assert code == 1 and (f"{flow}:6 audience.params.min_score: {huge} is outside the whole "
                          "numbers") in " ".join(err.split()), err
    # a schedule's params are checked as -p values are, before serving: each of its
    # runs would otherwise fail at the same point
    ws = make_workspace({flow: PROMO_YAML + (
        "schedules:\n  - {cron: '0 10 * * *', params: {min_score: abc}}\n"
        "  - {cron: '0 11 * * *', params: {nosuch: 1}}\n")}, folder="w9")
    code, _, err = cli(capsys, "validate", "-w", str(ws.root))
    said = " ".join(err.split())
    assert code == 1 and (f"{flow}:14 schedules[0].params.min_score: 'abc' is not a "
                          "number, as audience.params.min_score (0) is") in said, err
    assert (f"{flow}:15 schedules[1].params.nosuch: audiences/people.sql does not use "
            ":nosuch (it uses: :min_score)") in said, err
    from herald.core.errors import ValidationFailed
    from herald.flows import deploy

    with pytest.raises(ValidationFailed, match=r"schedules\[0\]\.params\.min_score"):
        deploy.deployment(ws, "promo")  # what herald serve and deploy build first

    ws = make_workspace({flow: PROMO_YAML + "holdout: 5%\n"}, folder="w2")
    code, _, err = cli(capsys, "validate", "-w", str(ws.root))
    assert code == 1 and f"{flow}:13 holdout: " in err
    assert "write the fraction 0.05 for 5%" in err
    ws = make_workspace({flow: PROMO_YAML + "holdout: 5\n"}, folder="w3")
    code, _, err = cli(capsys, "validate", "-w", str(ws.root))
    assert code == 1 and "5 is not a fraction: write 0.05 for 5%" in err

    ws = make_workspace({"templates/promo/default.sms.txt.j2": None}, folder="w4")
    code, _, err = cli(capsys, "validate", "-w", str(ws.root))
    assert code == 1
    assert (f"{flow}:12 tiers.default: no sms text template for tier 'default': create "
            "templates/promo/default.sms.txt.j2") in err

    ws = make_workspace(folder="w5")
    code, out, err = cli(capsys, "preview", "promo", "--tier", "gld", "-w", str(ws.root))
    assert code == 1 and "--tier: no recipients in tier 'gld' (did you mean 'gold'?)" in err
    code, _, err = cli(capsys, "run", "promx", "-w", str(ws.root))
    assert code == 1 and "unknown flow 'promx'" in err and "did you mean 'promo'?" in err


def test_secrets_are_required_by_commands_that_send_only(make_workspace, capsys,
                                                          monkeypatch) -> None:
    from .helpers import HERALD_YAML

    monkeypatch.delenv("HERALD_TEST_SMTP_PASSWORD", raising=False)
    ws = make_workspace({"config/herald.yaml": HERALD_YAML.replace(
        "email: {type: outbox, kind: email}",
        'email: {type: smtp, host: 127.0.0.1, port: 2525, sender: "a@example.com", '
        'password: "${HERALD_TEST_SMTP_PASSWORD}"}')}, rows=10)
    for read_only in (["suppress", "list"], ["runs"], ["audience", "list"],
                      ["preview", "promo"]):
        code, _, err = cli(capsys, *read_only, "-w", str(ws.root))
        assert code == 0, (read_only, err)
    code, _, err = cli(capsys, "report", "promo", "-w", str(ws.root))
    assert code == 1 and "flow 'promo' has no real runs yet" in err  # not the secret
    for sending in (["validate"], ["run", "promo"]):
        code, _, err = cli(capsys, *sending, "-w", str(ws.root))
        assert code == 1
        assert ("config/herald.yaml:6 channels.email.password: environment variable "
                "HERALD_TEST_SMTP_PASSWORD is not set") in err


# -- send-test, preview --out, version, completion, prune --------------------------------------
def test_help_keeps_square_brackets_as_text(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = cli(capsys, "send-test", "--help")
    assert code == 0 and "to your own address (marked [test]; recorded apart" in out
    code, out, _ = cli(capsys, "--help")
    assert code == 0 and "(marked [test];" in out


def test_send_test_reaches_a_real_smtp_server_and_counts_nowhere(make_workspace,
                                                                  capsys) -> None:
    import sqlite3

    from aiosmtpd.controller import Controller

    from .helpers import HERALD_YAML, free_port
    from .test_channel_smtp import Handler

    handler, port = Handler(), free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        ws = make_workspace({"config/herald.yaml": HERALD_YAML.replace(
            "email: {type: outbox, kind: email}",
            f'email: {{type: smtp, host: 127.0.0.1, port: {port}, security: none, '
            'sender: "Shop <news@shop.example>"}')}, rows=20)
        code, out, err = cli(capsys, "send-test", "promo", "--tier", "gold", "--to",
                             "me@ops.example", "-w", str(ws.root))
        assert code == 0, err
        assert "sent promo/gold" in out and "through email" in out
        assert len(handler.received) == 1
        got = handler.received[0]
        assert got["To"] == "me@ops.example" and got["X-Herald-Test"] == "1"
        assert got["Subject"].startswith("[test] ") and "User " in got["Subject"]
        code, _, err = cli(capsys, "send-test", "promo", "--tier", "gld", "--to",
                           "me@ops.example", "-w", str(ws.root))
        assert code == 1 and "did you mean 'gold'?" in err
        code, _, err = cli(capsys, "send-test", "promo", "--tier", "gold", "--to",
                           "not-an-address", "-w", str(ws.root))
        assert code == 1 and "--to: 'not-an-address' is not an address" in err
        code, _, err = cli(capsys, "send-test", "promo", "--tier", "gold", "--to",
                           "me@ops.example\r\nBcc: x@evil.example", "-w", str(ws.root))
        assert code == 1 and err.startswith(
            "error: --to: 'me@ops.example\\r\\nBcc: x@evil.example' is not an address for "
            "email: invalid; sms: invalid") and len(err.splitlines()) == 1, err
    finally:
        controller.stop()
    with sqlite3.connect(ws.root / ".herald/herald.db") as conn:
        tests = conn.execute("SELECT flow, tier, channel, address, status "
                             "FROM herald_test_sends").fetchall()
        ledger = conn.execute("SELECT count(*) FROM herald_deliveries").fetchone()[0]
    assert tests == [("promo", "gold", "email", "me@ops.example", "sent")]
    assert ledger == 0  # not a delivery: no cap, report or rerun sees it
    code, out, _ = cli(capsys, "runs", "-w", str(ws.root))
    assert out.strip() == "no runs yet"


def test_preview_out_version_completion_and_prune(make_workspace, tmp_path, capsys) -> None:
    from email import message_from_bytes

    from herald.audiences import builder, store

    ws = make_workspace(rows=20)
    code, _, err = cli(capsys, "preview", "promo", "--tier", "gold", "--limit", "2",
                       "--out", str(tmp_path / "pv"), "-w", str(ws.root))
    assert code == 0 and "files written" in err
    names = sorted(p.name for p in (tmp_path / "pv").iterdir())
    assert [n for n in names if n.endswith(".json")] and [n for n in names
                                                         if n.endswith(".eml")]
    eml = next((tmp_path / "pv").glob("*.eml"))
    parsed = message_from_bytes(eml.read_bytes())
    assert parsed["Subject"] and parsed["To"].endswith("@example.com")
    sample = json.loads(next((tmp_path / "pv").glob("*.json")).read_text())
    assert sample["tier"] == "gold" and sample["status"] == "would_send"

    existing = ws.root / "config/herald.yaml"
    before = existing.read_text()
    code, _, err = cli(capsys, "preview", "promo", "--limit", "1", "--out", str(existing),
                       "-w", str(ws.root))
    assert code == 1 and err == f"error: --out {existing}: is a file, not a folder\n"
    assert existing.read_text() == before

    code, out, _ = cli(capsys, "--version")
    assert code == 0 and out.startswith("herald ")
    # completion as bash asks for it (`--show-completion` detects the shell from the parent
    # process, which a test run may not have): the installed command in its own process
    herald = os.path.join(os.path.dirname(sys.executable), "herald")
    shown = subprocess.run([herald], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "_HERALD_COMPLETE": "source_bash"})
    assert shown.returncode == 0 and "_HERALD_COMPLETE" in shown.stdout, shown.stderr
    words = subprocess.run([herald], capture_output=True, text=True, timeout=60, env={
        **os.environ, "_HERALD_COMPLETE": "complete_bash", "COMP_WORDS": "herald aud",
        "COMP_CWORD": "1"})
    assert words.returncode == 0 and "audience" in words.stdout

    first = engine.run_local(ws, "promo", run_key="a")["package"]["id"]
    built = [builder.build(ws, ws.flow("promo"), engine.check_flow(ws, "promo").segment).id
             for _ in range(3)]
    from herald.core.db import deliveries, writing

    with writing(ws.store) as conn:  # the first run's key still has a queued recipient
        conn.execute(deliveries.update().where(deliveries.c.recipient == "1")
                     .values(status="queued"))
    code, out, _ = cli(capsys, "audience", "prune", "--keep", "1", "-w", str(ws.root))
    assert code == 0
    left = {p.id for p in store.list_packages(ws, "promo")}
    assert left == {built[-1], first}
    assert "2 packages deleted; 1 kept because a run key still needs it" in out


def test_recipient_history_caps_suppression_and_holdout(make_workspace, capsys) -> None:
    from .helpers import HERALD_YAML, PROMO_YAML

    ws = make_workspace({
        "config/herald.yaml": HERALD_YAML.replace("caps: []",
                                                  "caps: [{max: 2, per: 7d}]"),
        "config/flows/promo.yaml": PROMO_YAML + "holdout: 0.3\ncaps: [{max: 1, per: 30d}]\n",
    }, rows=40)
    engine.run_local(ws, "promo", run_key="a")
    from herald.delivery.policy import in_holdout

    sent = next(str(i) for i in range(1, 41) if not in_holdout("promo", str(i), 0.3)
                and i % 7 != 0)
    held = next(str(i) for i in range(1, 41) if in_holdout("promo", str(i), 0.3))
    code, out, _ = cli(capsys, "suppress", "add", "--keys", sent, "-w", str(ws.root))
    assert code == 0
    code, out, _ = cli(capsys, "recipient", sent, "-w", str(ws.root), "--json")
    assert code == 0
    view = json.loads(out)
    assert [(h["flow"], h["run_key"], h["status"]) for h in view["history"]] == [
        ("promo", "a", "sent")]
    caps = {c["rule"]: (c["used"], c["max"], c["reached"]) for c in view["caps"]}
    assert caps == {"max 2 per 7d (all channels)": (1, 2, False),
                    "max 1 per 30d (flow promo)": (1, 1, True)}
    assert view["suppressed"] == [{"value": sent, "channels": ["*"]}]
    assert view["held_out"] == {"promo": False}
    code, out, _ = cli(capsys, "recipient", held, "-w", str(ws.root))
    assert code == 0 and "held out: promo" in out and "held_out" in out
    code, out, _ = cli(capsys, "recipient", "nobody", "-w", str(ws.root))
    assert code == 0 and "history: no ledger rows" in out
    # an address the ledger does not hold (the held-out recipient was never sent to):
    # read from the flow's latest package; suppressed there, it is said
    held_email = f"user{held}@example.com" if int(held) % 7 else None
    held_phone = f"+1415555{int(held):04d}"
    listed = held_email or held_phone
    code, out, _ = cli(capsys, "suppress", "add", listed.upper(), "-w", str(ws.root))
    assert code == 0
    code, out, _ = cli(capsys, "recipient", held, "-w", str(ws.root), "--json")
    assert code == 0 and json.loads(out)["suppressed"] == [
        {"value": listed.lower(), "channels": ["*"]}], out
    code, _, err = cli(capsys, "recipient", " ", "-w", str(ws.root))
    assert code == 2 and "an empty key names nobody" in err


# -- unsubscribe ---------------------------------------------------------------------------------
def test_unsubscribe_link_and_one_click_post_suppress_for_the_next_run(
        make_workspace, monkeypatch) -> None:
    import re
    from email import message_from_bytes

    import httpx

    from herald.delivery import suppression

    from .helpers import (
        UNSUBSCRIBE_SECRET_ENV,
        free_port,
        outbox_files,
        unsubscribe_server,
        unsubscribe_yaml,
    )

    monkeypatch.setenv(UNSUBSCRIBE_SECRET_ENV, "s3cret-for-the-unsubscribe-test")
    port = free_port()
    ws = make_workspace({
        "config/herald.yaml": unsubscribe_yaml(port),
        "templates/promo/default.sms.txt.j2": "Hi {{ name }}. Stop: {{ unsubscribe_url }}",
    }, rows=20)
    first = engine.run_local(ws, "promo", run_key="one")
    sent = first["deliveries"]["sent"]
    assert sent > 10
    emails = [message_from_bytes(p.read_bytes()) for p in outbox_files(ws)
              if p.suffix == ".eml"]
    mail = next(m for m in emails if m["List-Unsubscribe"])
    link = re.sub(r"\s+", "", str(mail["List-Unsubscribe"])).strip("<>")  # unfolded
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    sms = "\n".join(p.read_text() for p in outbox_files(ws) if p.suffix == ".jsonl")
    sms_link = re.search(r"Stop: (http://\S+?)\"", sms)
    assert sms_link and "/u/" in sms_link.group(1)

    with unsubscribe_server(ws, port):
        page = httpx.get(link)
        assert page.status_code == 200 and '<form method="post"' in page.text
        assert httpx.get(link[:-3] + "AAA").status_code == 404  # forged: nothing written
        assert suppression.list_suppressions(ws.store) == []  # a GET unsubscribes nobody
        done = httpx.post(link, content="List-Unsubscribe=One-Click",
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert done.status_code == 200 and "Unsubscribed" in done.text
        clicked = httpx.post(sms_link.group(1))
        assert clicked.status_code == 200
    rows = {(r.value, r.channel, r.source) for r in suppression.list_suppressions(ws.store)}
    assert len(rows) == 2 and {r[1] for r in rows} == {"*"}  # every channel
    assert all(source == "unsubscribe" for *_, source in rows)
    gone = {value for value, *_ in rows}
    second = engine.run_local(ws, "promo", run_key="two")
    assert second["deliveries"]["suppressed"] == len(gone)
    assert second["deliveries"]["sent"] == sent - len(gone)
    from herald.delivery.ledger_reads import existing

    with ws.store.connect() as conn:
        found = existing(conn, "promo", "two", sorted(gone))
    assert len(found) == len(gone) and {v.status for v in found.values()} == {"suppressed"}


# -- the HTML report a marketing manager reads ------------------------------------------------
def test_incremental_conversions_and_revenue_with_intervals() -> None:
    from datetime import UTC, datetime, timedelta

    from herald.reporting.conversions import ConversionReport, Group, Row, incremental

    # contacted: 1,000, 100 converted spending 50 each; held out: 200, 10 spending 50 each
    report = ConversionReport("f", "k", "orders", timedelta(days=7), True,
                              datetime(2026, 1, 1, tzinfo=UTC))
    report.total = Row("all", Group(1000, 100, 5000.0, 100 * 50.0 ** 2),
                       Group(200, 10, 500.0, 10 * 50.0 ** 2))
    found = incremental(report)
    assert found is not None
    assert found.conversions == pytest.approx(50.0)  # (10% - 5%) x 1,000
    assert found.conversions_low < 50 < found.conversions_high
    assert found.revenue == pytest.approx(2500.0)  # (5.00 - 2.50) per recipient x 1,000
    # per-recipient revenue: variance p(1-p) x 50^2, Welch interval over both groups
    half = 1.959964 * ((0.1 * 0.9 * 2500 * 1000 / 999) / 1000
                       + (0.05 * 0.95 * 2500 * 200 / 199) / 200) ** 0.5 * 1000
    assert found.revenue_low == pytest.approx(2500 - half, rel=1e-4)
    assert found.revenue_high == pytest.approx(2500 + half, rel=1e-4)


def test_html_report_has_tiers_failures_messages_and_segment(make_workspace, peer, tmp_path,
                                                             capsys) -> None:
    from .helpers import PROMO_YAML

    ws = make_workspace({
        "config/herald.yaml": (
            "timezone: UTC\nsources:\n  crm: \"sqlite:///crm.db\"\ncurrency: CNY\n"
            f"channels:\n  hook: {{type: webhook, url: \"{peer.url}/v1\", address: email}}\n"
            "chunk_size: 40\n"),
        "config/flows/promo.yaml": PROMO_YAML.replace(
            "gold: {channels: [email, sms]}", "gold: {channels: [hook]}").replace(
            "default: {channels: [sms, email]}", "default: {channels: [hook]}"),
        "templates/promo/default.webhook.txt.j2": "Hello {{ name }}\nYour score: {{ score }}",
        "templates/promo/gold.webhook.txt.j2": "Dear gold member {{ name }}",
    }, rows=12)
    peer.script("3", ("json", 400, {"code": "E_NUMBER", "message": "number not reachable"}))
    engine.run_local(ws, "promo", run_key="k")
    page = tmp_path / "r.html"
    code, _, err = cli(capsys, "report", "promo", "--to", str(page), "-w", str(ws.root))
    assert code == 0, err
    html = page.read_text()
    assert "<h2>Deliveries per tier</h2>" in html and "<td>gold</td>" in html
    assert "<td>E_NUMBER</td>" in html and "number not reachable" in html
    assert "segment <code>people</code> · parameters <code>min_score = 0</code>" in html
    assert "<h2>The messages, per tier</h2>" in html
    assert "Dear gold member User" in html and "Your score:" in html


def test_a_missing_unsubscribe_secret_stops_senders_only(make_workspace, capsys,
                                                         monkeypatch) -> None:
    from .helpers import HERALD_YAML

    monkeypatch.delenv("HERALD_TEST_NO_UNSUB", raising=False)
    ws = make_workspace({"config/herald.yaml": HERALD_YAML + (
        'unsubscribe: {base_url: "https://u.example", secret: "${HERALD_TEST_NO_UNSUB}"}\n')})
    code, _, err = cli(capsys, "suppress", "list", "-w", str(ws.root))
    assert code == 0, err
    for sending in (["validate"], ["run", "promo"], ["unsubscribe-server"]):
        code, _, err = cli(capsys, *sending, "-w", str(ws.root))
        assert code == 1 and "unsubscribe.secret: environment variable HERALD_TEST_NO_UNSUB " \
                             "is not set" in err, (sending, err)
    monkeypatch.setenv("HERALD_TEST_NO_UNSUB", "short")
    code, _, err = cli(capsys, "suppress", "list", "-w", str(ws.root))
    assert code == 1 and "16 characters or more" in err


def test_a_segment_naming_a_column_twice_is_refused(make_workspace, capsys) -> None:
    """`score` twice (or `name` and `Name` on SQLite, whose names are case-insensitive):
    templates got one of the two without a word, and the build kept the other."""
    from .helpers import outbox_messages

    for select, twice in (("score, 'DUP' AS score", "score"), ("'X' AS Name", "Name")):
        sql = (f"SELECT id, name, email, phone, tier, locale, score, {select} FROM people "
               "WHERE score >= :min_score")
        ws = make_workspace({"audiences/people.sql": sql}, folder=f"w{twice}")
        code, _, err = cli(capsys, "validate", "-w", str(ws.root))
        said = " ".join(err.split())
        assert code == 1 and ("audiences/people.sql: the result has more than one column "
                              f"named '{twice}': give each its own name (AS ...)") in said, err
        code, _, err = cli(capsys, "run", "promo", "-w", str(ws.root))
        assert code == 1 and "more than one column named" in err
        assert outbox_messages(ws) == 0


def test_suppress_add_refuses_an_address_its_channel_never_sends_to(make_workspace,
                                                                   capsys) -> None:
    """An e-mail address suppressed for the SMS channel (or a number for e-mail) can
    never match anything: refused, nothing added; on every channel it is taken."""
    ws = make_workspace(rows=1)
    for value, channel in (("bob@shop.example", "sms"), ("+14155550002", "email")):
        code, _, err = cli(capsys, "suppress", "add", value, "--channel", channel,
                           "-w", str(ws.root))
        assert code == 1 and "suppressed there it would never match" in " ".join(
            err.split()) and "nothing added" in err, err
    code, out, _ = cli(capsys, "suppress", "list", "--json", "-w", str(ws.root))
    assert json.loads(out) == []
    code, out, _ = cli(capsys, "suppress", "add", "bob@shop.example", "--channel", "email",
                       "-w", str(ws.root))
    assert code == 0 and "1 added" in out
