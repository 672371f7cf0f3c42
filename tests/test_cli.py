"""The command line: the contract in DESIGN.md, exit statuses, and what operators see."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from herald.core import clock
from herald.core.db import runs
from herald.delivery.run_records import list_runs
from herald.flows.cli import main

from .helpers import child_processes, outbox_messages, people, process_state

# the command line of Prefect's server (uvicorn with Prefect's app)
SERVER_APP = "prefect.server.api.server:create_app"


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.out, captured.err


def test_validate_ok_and_problems(make_workspace, capsys) -> None:
    ws = make_workspace()
    code, out, _ = cli(capsys, "validate", "--workspace", str(ws.root))
    assert code == 0
    assert "promo: segment audiences/people.sql (7 columns), 2 tiers, 8 templates" in out
    (ws.root / "templates/promo/gold.email.txt.j2").write_text("{{ nickname }}")
    code, _, err = cli(capsys, "validate", "-w", str(ws.root))
    assert code == 1
    assert "templates/promo/gold.email.txt.j2:1: uses 'nickname'" in err


def test_an_outbox_folder_that_is_a_file_is_found_before_sending(make_workspace,
                                                                 capsys) -> None:
    """`.herald/outbox` made a file (a careless `>` redirect): validate names the channels
    and their line in herald.yaml, and a run stops before anything is reserved."""
    ws = make_workspace()
    (ws.root / ".herald").mkdir(exist_ok=True)
    (ws.root / ".herald/outbox").write_text("not a folder\n")
    code, _, err = cli(capsys, "validate", "-w", str(ws.root))
    assert code == 1
    for name, line in (("email", 6), ("sms", 7)):
        assert (f"config/herald.yaml:{line} channels.{name}.dir: channel '{name}' writes "
                f"under .herald/outbox, but .herald/outbox is a file, not a folder") in err
    code, out, err = cli(capsys, "run", "promo", "-w", str(ws.root), "--json")
    assert code == 1 and out == ""
    assert ".herald/outbox is a file, not a folder" in err
    assert list_runs(ws.store) == []  # stopped before the run was recorded
    assert (ws.root / ".herald/outbox").read_text() == "not a folder\n"


def test_bad_template_stops_run_before_anything_is_sent(make_workspace, capsys) -> None:
    ws = make_workspace({"templates/promo/default.sms.txt.j2": "{{ points }} left"})
    code, out, err = cli(capsys, "run", "promo", "-w", str(ws.root), "--json")
    assert code == 1
    assert out == ""
    assert "templates/promo/default.sms.txt.j2:1: uses 'points'" in err
    assert outbox_messages(ws) == 0


def test_usage_errors_exit_2(make_workspace, capsys) -> None:
    ws = make_workspace()
    assert cli(capsys, "run", "-w", str(ws.root))[0] == 2
    code, _, err = cli(capsys, "run", "promo", "-w", str(ws.root), "-p", "nonsense")
    assert code == 2 and "'nonsense' is not NAME=VALUE" in err
    assert cli(capsys, "frobnicate")[0] == 2


def test_unknown_flow_and_bad_workspace_exit_1(make_workspace, tmp_path, capsys) -> None:
    ws = make_workspace()
    code, _, err = cli(capsys, "run", "nope", "-w", str(ws.root))
    assert code == 1 and "unknown flow 'nope'" in err
    code, _, err = cli(capsys, "validate", "-w", str(tmp_path / "empty"))
    assert code == 1 and "is not a Herald workspace" in err


def test_audience_commands(make_workspace, tmp_path, capsys) -> None:
    ws = make_workspace(rows=30)
    code, out, _ = cli(capsys, "audience", "build", "promo", "-w", str(ws.root),
                       "-p", "min_score=5", "--json")
    assert code == 0
    manifest = json.loads(out)
    assert manifest["size"] == 15 and manifest["params"] == {"min_score": 5}
    expected: dict[str, int] = {}
    for person in people(30):
        if person["score"] >= 5:
            expected[person["tier"]] = expected.get(person["tier"], 0) + 1
    assert manifest["tiers"] == dict(sorted(expected.items()))
    code, out, _ = cli(capsys, "audience", "list", "-w", str(ws.root), "--json")
    assert [p["id"] for p in json.loads(out)] == [manifest["id"]]
    code, out, _ = cli(capsys, "audience", "show", manifest["id"], "-w", str(ws.root),
                       "--json", "--rows", "2")
    shown = json.loads(out)
    assert shown["sql_sha256"] == manifest["sql_sha256"] and len(shown["rows"]) == 2
    code, out, _ = cli(capsys, "audience", "show", manifest["id"], "-w", str(ws.root))
    assert code == 0 and "u***@example.com" in out and "user5@example.com" not in out
    target = tmp_path / "export.csv"
    code, out, _ = cli(capsys, "audience", "export", manifest["id"], "--to", str(target),
                       "-w", str(ws.root))
    assert code == 0 and len(target.read_text().splitlines()) == 16
    code, _, err = cli(capsys, "audience", "show", "pkg-missing", "-w", str(ws.root))
    assert code == 1 and "no audience package 'pkg-missing'" in err


def test_preview_sends_nothing(make_workspace, capsys) -> None:
    ws = make_workspace(rows=30)
    code, out, _ = cli(capsys, "preview", "promo", "--tier", "gold", "--limit", "2",
                       "-w", str(ws.root), "--json")
    assert code == 0
    samples = json.loads(out)
    assert [s["recipient"] for s in samples] == ["4", "8"]
    assert samples[0]["subject"] == "User 4，送您一份礼物"  # zh_CN locale
    assert samples[0]["channel"] == "email" and samples[0]["status"] == "would_send"
    code, out, _ = cli(capsys, "preview", "promo", "-w", str(ws.root))
    assert code == 0 and "Reply STOP to opt out" in out
    assert outbox_messages(ws) == 0


def test_suppress_commands(make_workspace, tmp_path, capsys) -> None:
    ws = make_workspace()
    assert cli(capsys, "suppress", "add", "a@example.com", "B@Example.com", "--channel",
               "email", "-w", str(ws.root))[0] == 0
    listing = tmp_path / "list.csv"
    listing.write_text("value,channel,reason\n+14155550001,sms,STOP\nc@example.com,,\n"
                       "a@example.com,email,again\n", encoding="utf-8")
    code, out, _ = cli(capsys, "suppress", "import", str(listing), "-w", str(ws.root))
    assert code == 0 and "2 added, 1 already suppressed" in out
    code, out, _ = cli(capsys, "suppress", "list", "--json", "-w", str(ws.root))
    values = {(r["value"], r["channel"]) for r in json.loads(out)}
    assert values == {("a@example.com", "email"), ("b@example.com", "email"),
                      ("+14155550001", "sms"), ("c@example.com", "*")}
    assert cli(capsys, "suppress", "remove", "c@example.com", "-w", str(ws.root))[0] == 0
    code, _, err = cli(capsys, "suppress", "add", "x", "--channel", "fax", "-w", str(ws.root))
    assert code == 1 and "unknown channel 'fax'" in err
    before = cli(capsys, "suppress", "list", "--json", "-w", str(ws.root))[1]
    code, _, err = cli(capsys, "suppress", "add", "  ", "-w", str(ws.root))
    assert code == 1 and err == "error: an empty value; nothing added\n"
    code, _, err = cli(capsys, "suppress", "add", "d@example.com", "John Smith", "",
                       "-w", str(ws.root))
    assert code == 1 and err.splitlines() == [
        "error: 3 problems",
        "  'John Smith' is neither an e-mail address nor a phone number (recipient keys: "
        "--keys)", "  an empty value", "  nothing added: 2 values refused"]
    assert cli(capsys, "suppress", "list", "--json", "-w", str(ws.root))[1] == before
    code, out, _ = cli(capsys, "suppress", "add", "--keys", "cust-7", "-w", str(ws.root))
    assert code == 0 and "1 added" in out
    code, _, err = cli(capsys, "suppress", "add", "--keys", "John Smith", "-w", str(ws.root))
    assert code == 1 and "'John Smith' is not a recipient key; nothing added" in err
    code, _, err = cli(capsys, "suppress", "add", "x@example.com\nBcc: y@example.com",
                       "-w", str(ws.root))
    assert code == 1 and err == ("error: 'x@example.com\\nBcc: y@example.com' is not a valid "
                                 "e-mail address (invalid); nothing added\n")
    listing.write_text("x@example.com,pigeon\n", encoding="utf-8")
    code, _, err = cli(capsys, "suppress", "import", str(listing), "-w", str(ws.root))
    assert code == 1 and f"{listing}:1: unknown channel 'pigeon'" in err


@pytest.mark.prefect
def test_run_json_contract_and_rerun(make_workspace, prefect_harness, capsys) -> None:
    ws = make_workspace(rows=100)
    code, out, _ = cli(capsys, "run", "promo", "-w", str(ws.root), "--json",
                       "--run-key", "2026-11-22")
    assert code == 0
    summary = json.loads(out)
    assert {"run_id", "flow", "package", "deliveries", "by_channel"} <= summary.keys()
    assert summary["flow"] == "promo"
    assert summary["package"]["size"] == 100
    assert summary["package"]["tiers"] == {"bronze": 50, "gold": 25, "silver": 25}
    assert set(summary["deliveries"]) == {"sent", "failed", "capped", "suppressed",
                                          "held_out", "no_address", "render_error",
                                          "quiet_hours", "deferred", "stopped", "withdrawn",
                                          "duplicate", "queued", "sending"}
    assert summary["deliveries"]["sent"] == 98
    assert summary["by_channel"]["email"]["sent"] + summary["by_channel"]["sms"]["sent"] == 98
    assert outbox_messages(ws) == 98

    code, out, _ = cli(capsys, "run", "promo", "-w", str(ws.root), "--json",
                       "--run-key", "2026-11-22")
    again = json.loads(out)  # the run key is complete: nothing built, nothing sent
    assert code == 0 and again["status"] == "nothing_to_do"
    assert again["deliveries"]["sent"] == 98 and again["sent_by"] == summary["run_id"]
    assert outbox_messages(ws) == 98

    code, out, _ = cli(capsys, "report", summary["run_id"], "-w", str(ws.root), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["deliveries"]["sent"] == 98 and report["status"] == "completed"
    assert report["deliveries"]["no_address"] == 2
    code, out, _ = cli(capsys, "report", "-w", str(ws.root))
    assert code == 0 and summary["run_id"] in out


def test_cli_runs_without_a_prefect_server(make_workspace, tmp_path) -> None:
    """`herald run` in a fresh process with no PREFECT_API_URL runs on the temporary
    server it starts; before stopping it, every task run's state reached it (they travel
    as events), and the process is left pointing at no server, so a second command
    called in the same process does not talk to one that is gone."""
    ws = make_workspace(rows=20)
    _abandoned_run(ws)  # the build closes it, with a warning
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    home = tmp_path / "prefect-home"
    env["PREFECT_HOME"] = str(home)
    script = (
        "import json, os, sys\n"
        "from herald.flows.cli import main\n"
        "try:\n"
        f"    main(['run', 'promo', '--json', '-w', {str(ws.root)!r}])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "from prefect.settings import PREFECT_API_URL\n"
        "from prefect.events.worker import EventsWorker\n"
        "print(json.dumps({'env': os.environ.get('PREFECT_API_URL'),\n"
        "                  'setting': PREFECT_API_URL.value(),\n"
        "                  'services': len(EventsWorker._instances)}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary_text, after_line = proc.stdout.strip().rsplit("\n", 1)
    summary = json.loads(summary_text)
    assert summary["deliveries"]["sent"] == 20 and summary["dry_run"] is False
    assert proc.stderr == ""  # --json: stdout holds the object, stderr stays quiet
    assert outbox_messages(ws) == 20
    assert json.loads(after_line) == {"env": None, "setting": None, "services": 0}
    with sqlite3.connect(home / "prefect.db") as db:  # the temporary server's database
        flows = db.execute("SELECT id, state_type FROM flow_run").fetchall()
        tasks = db.execute("SELECT name, state_type FROM task_run ORDER BY name").fetchall()
        events = dict(db.execute("SELECT event, count(*) FROM events GROUP BY event"))
    assert [state for _, state in flows] == ["COMPLETED"]
    assert tasks == [("build-audience", "COMPLETED"), ("chunk-0000", "COMPLETED")], tasks
    # no flow-run heartbeats to a server that ends with the command (Prefect joined their
    # thread at the flow's end, up to a second); the run's own events are all there
    assert events.get("prefect.flow-run.Running") == 1
    assert "prefect.flow-run.heartbeat" not in events, events
    # the audience was built while the server started; what the build logged is in its
    # task run's logs all the same (and was not printed: stderr is empty)
    with sqlite3.connect(home / "prefect.db") as db:
        logs = [m for (m,) in db.execute(
            "SELECT message FROM log JOIN task_run ON task_run.id = log.task_run_id "
            "WHERE task_run.name = 'build-audience' ORDER BY log.timestamp")]
    assert any(m.startswith("run run-abandoned was left running by a process that "
                            "ended") for m in logs), logs
    assert any(m.startswith("built in ") and "before this flow run began" in m
               for m in logs), logs
    assert {r.id: r.status for r in list_runs(ws.store)} == {
        "run-abandoned": "failed", summary["run_id"]: "completed"}


def _abandoned_run(ws) -> None:
    """A run a killed process left running (run key ``k``)."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    with ws.store.begin() as conn:
        conn.execute(runs.insert().values(
            id="run-abandoned", flow="promo", run_key="k", dry_run=False, status="running",
            started_at=clock.now(), owner=f"{socket.gethostname()}:{gone.pid}"))


def test_an_early_build_that_fails_fails_its_flow_run(make_workspace, tmp_path) -> None:
    """A segment that fails (a key twice) while the temporary server starts: the command
    says why in one line naming the segment's file, sends nothing, and the Prefect flow
    run is failed at its build-audience task, as when the task builds. A warning of the
    build (made before Prefect's logging is set up) is printed once, before that line."""
    columns = "SELECT id, name, email, phone, tier, locale, score FROM people"
    broken = f"{columns} WHERE score >= :min_score\nUNION ALL\n{columns} WHERE id = 1"
    ws = make_workspace({"audiences/people.sql": broken}, rows=20)
    _abandoned_run(ws)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    home = tmp_path / "prefect-home"
    env["PREFECT_HOME"] = str(home)
    herald = os.path.join(os.path.dirname(sys.executable), "herald")
    proc = subprocess.run([herald, "run", "promo", "-w", str(ws.root)], capture_output=True,
                          text=True, env=env, timeout=240)
    assert proc.returncode == 1, proc.stderr[-2000:]
    said = " ".join(proc.stderr.split())  # (a terminal's width wraps the warning)
    assert said.count("run run-abandoned was left running by a process that ended") == 1
    lines = proc.stderr.strip().splitlines()
    assert "people.sql" in lines[-1] and "duplicate" in lines[-1], lines
    assert not any("people.sql" in line for line in lines[:-1]), lines
    assert outbox_messages(ws) == 0
    with sqlite3.connect(home / "prefect.db") as db:
        flows = [state for (state,) in db.execute("SELECT state_type FROM flow_run")]
        tasks = db.execute("SELECT name, state_type FROM task_run").fetchall()
    assert flows == ["FAILED"] and tasks == [("build-audience", "FAILED")], (flows, tasks)
    [record] = [r for r in list_runs(ws.store) if r.id != "run-abandoned"]
    assert record.status == "failed" and record.error == lines[-1].removeprefix("error: ")


def test_an_early_build_is_closed_when_the_server_never_answers(make_workspace,
                                                                tmp_path) -> None:
    """The audience built while the temporary server starts belongs to a run that fails
    when the server does not answer: recorded as failed with the reason, nothing sent."""
    ws = make_workspace(rows=20)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "0"
    herald = os.path.join(os.path.dirname(sys.executable), "herald")
    proc = subprocess.run([herald, "run", "promo", "-w", str(ws.root)], capture_output=True,
                          text=True, env=env, timeout=240)
    assert proc.returncode == 1
    assert "did not answer within 0 s" in proc.stderr, proc.stderr[-2000:]
    assert outbox_messages(ws) == 0
    [record] = list_runs(ws.store)
    assert record.status == "failed" and record.package_id is not None
    assert "did not answer within 0 s" in record.error


def test_an_early_build_no_task_took_is_recorded_failed(make_workspace) -> None:
    """The run of an audience built early that no flow run's task took (the server never
    answered, a signal while it started, a flow run that ended first) is closed as
    failed with the reason, once; one a task took is left to its run."""
    from herald.core.errors import RunError
    from herald.flows.engine import build_early

    ws = make_workspace(rows=20)
    reasons = {"signal": KeyboardInterrupt("SIGTERM"), "server": RunError("no answer"),
               "ended": "the flow run ended first"}
    for key, why in reasons.items():
        early = build_early(ws, "promo", {}, key, False)
        assert early.prepared is not None and early.failure is None
        early.close_unused(ws, why)
        early.close_unused(ws, "again")  # recorded once
    taken = build_early(ws, "promo", {}, "taken", False)
    taken.taken = True
    taken.close_unused(ws, "not used")
    records = {r.run_key: (r.status, r.error) for r in list_runs(ws.store)}
    assert records == {
        "signal": ("failed", "stopped by SIGTERM before sending: nothing was sent"),
        "server": ("failed", "no answer"),
        "ended": ("failed", "the flow run ended first"),
        "taken": ("running", None)}


def test_replayed_build_records_are_printed_once() -> None:
    """An early build's records, printed as they happened, are replayed into its task
    run's logs for the Prefect UI; no console handler prints them again, --verbose or
    not."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    from herald.flows.cli.common import prefect_console

    handler = PrefectConsoleHandler()  # as Prefect's logging setup puts on Herald's logger
    logging.getLogger("herald").addHandler(handler)
    replayed = logging.makeLogRecord({"msg": "package built", "replayed": True})
    fresh = logging.makeLogRecord({"msg": "package built", "name": "herald.build",
                                   "pathname": __file__})
    try:
        for verbose in (True, False, True):
            prefect_console(verbose)
            assert not handler.filter(replayed)
            assert handler.filter(fresh)
    finally:
        logging.getLogger("herald").removeHandler(handler)


def test_heartbeats_stay_on_against_a_server_of_ones_own() -> None:
    """Only a flow run on the command's temporary server goes without heartbeats: until
    the server is attached (PREFECT_API_URL names another one, or a profile does) the
    settings stay Prefect's."""
    import typer.core
    from prefect.settings import get_current_settings

    from herald.flows.cli.server import TemporaryServer

    before = get_current_settings().flows.heartbeat_frequency
    assert before is not None  # Prefect's default: heartbeats on
    with typer.core.TyperCommand("x").make_context("x", []) as ctx:
        server = TemporaryServer(ctx)
        with server.serving():
            assert get_current_settings().flows.heartbeat_frequency == before
        server.attached = ""  # as attach() leaves it once Prefect points at the server
        with server.serving():
            assert get_current_settings().flows.heartbeat_frequency is None
        server.attached = None
    assert get_current_settings().flows.heartbeat_frequency == before


def _alive(pid: int) -> bool:
    return process_state(pid) not in ("Z", "gone")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads processes from /proc")
def test_the_temporary_server_ends_with_a_killed_command(make_workspace, tmp_path) -> None:
    """`herald run` starts Prefect's temporary server as it starts; killed (SIGKILL, no
    chance to stop anything), it leaves no server behind: the server stops itself."""
    slow = ("WITH RECURSIVE burn(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM burn "
            "WHERE x < 30000000)\nSELECT id, name, email, phone, tier, locale, score\n"
            "FROM people WHERE score >= :min_score AND (SELECT count(*) FROM burn) > 0")
    ws = make_workspace({"audiences/people.sql": slow}, rows=20)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    herald = os.path.join(os.path.dirname(sys.executable), "herald")
    proc = subprocess.Popen([herald, "run", "promo", "-w", str(ws.root)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (servers := child_processes(proc.pid, SERVER_APP)) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert servers, "no temporary server started"
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 15
    while any(map(_alive, servers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, servers)), "the temporary server outlived its command"


@pytest.mark.prefect
def test_a_server_named_by_a_prefect_profile_is_used(make_workspace, prefect_harness,
                                                     tmp_path) -> None:
    """The temporary server is started early, before Prefect's settings are read; a
    server named in the operator's Prefect profile (not the environment) still wins: the
    run is recorded there, and the early server is stopped."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "profiles.toml").write_text(
        f'active = "ops"\n[profiles.ops]\nPREFECT_API_URL = "{PREFECT_API_URL.value()}"\n')
    ws = make_workspace(rows=20)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(home)
    herald = os.path.join(os.path.dirname(sys.executable), "herald")
    proc = subprocess.run([herald, "run", "promo", "--run-key", "profiled", "--json", "-w",
                           str(ws.root)], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["deliveries"]["sent"] == 20

    async def names() -> list[str]:
        async with get_client() as client:
            return [r.name for r in await client.read_flow_runs()]

    assert "promo/profiled" in asyncio.run(names())


def test_the_temporary_prefect_server_is_given_time_to_start(monkeypatch) -> None:
    """Prefect waits 20 s for the temporary server `herald run` starts; it took longer
    on a loaded 2-core machine and the run failed before sending. Herald waits longer,
    unless the operator chose a wait."""
    from prefect.settings import Settings

    from herald.flows.cli.common import EPHEMERAL_STARTUP_SECONDS, prefect_env

    name = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    monkeypatch.delenv(name, raising=False)
    prefect_env()
    assert os.environ[name] == str(EPHEMERAL_STARTUP_SECONDS) == "120"
    assert Settings().server.ephemeral.startup_timeout_seconds == 120  # Prefect reads it
    monkeypatch.setenv(name, "45")
    prefect_env()
    assert os.environ[name] == "45"  # the operator's choice stands


def test_dry_run_table_and_report_of_a_real_run(make_workspace, capsys) -> None:
    from herald.flows.cli.common import print_summary

    print_summary({"flow": "promo", "run_id": "r", "run_key": "k", "dry_run": True,
                    "package": {"id": "p", "size": 2},
                    "deliveries": {"sent": 1, "capped": 1}, "by_channel": {}, "by_tier": {},
                    "reasons": [{"status": "capped", "reason": "cap max 1 per 1d", "count": 1}]})
    out = capsys.readouterr().out
    assert "would be" in out and "cap max 1 per 1d" in out
    print_summary({"flow": "promo", "run_id": "r", "run_key": "k", "dry_run": False,
                    "package": {"id": "p", "size": 2}, "deliveries": {"sent": 2},
                    "by_channel": {}, "by_tier": {},
                    "reasons": [{"status": "capped", "reason": "x", "count": 1}]})
    assert "would be" not in capsys.readouterr().out
