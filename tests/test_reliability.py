"""The reliability catalogue: bad input, faults and secrets, tried on purpose.

Each bad input goes through ``herald run`` and must give exit status 1, the exact error
(file, line, field) and nothing sent. Each fault must leave no recipient sent twice, none
without a ledger reason, and a rerun with the same run key that finishes the job. Each
entry is recorded in the catalogue (RELIABILITY.md) once its assertions pass.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import closing
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from herald.core.errors import RunError
from herald.core.spec import TaskRunnerSpec
from herald.delivery import suppression
from herald.flows import chunks, engine
from herald.flows.cli import main

from .helpers import (
    HERALD_YAML,
    PROMO_YAML,
    SLOW_WORKERS_YAML,
    child_processes,
    fill_people,
    free_port,
    ledger_rows,
    outbox_files,
    outbox_messages,
    outbox_recipients,
    process_state,
    run_script,
    wait_for_outbox,
)
from .http_peer import Peer, serve

# -- bad input ------------------------------------------------------------------------------
SQL = "audiences/people.sql"
FLOW = "config/flows/promo.yaml"
FOLDER = object()  # in CASES: a folder where the file should be
CASES: list[tuple[str, dict[str, str | bytes | object | None], list[str]]] = [
    ("malformed YAML", {FLOW: PROMO_YAML.replace("key: id", "key: [id")},
     ["config/flows/promo.yaml:8: invalid YAML"]),
    ("unknown key, with a suggestion", {FLOW: PROMO_YAML.replace("tier: tier", "teir: tier")},
     ["config/flows/promo.yaml:8 audience.teir: unknown key 'teir' (did you mean 'tier'?)"]),
    ("wrong type", {FLOW: PROMO_YAML + "holdout: lots\n"},
     ["config/flows/promo.yaml:13 holdout: must be a number, not text"]),
    ("missing segment file", {SQL: None},
     ["config/flows/promo.yaml:5 audience.segment: segment 'people' not found: "
      "audiences/people.sql does not exist"]),
    ("segment SQL that is a folder", {SQL: FOLDER},
     ["audiences/people.sql: is a folder, not a file"]),
    ("flow YAML that is a folder", {FLOW: FOLDER},
     ["config/flows/promo.yaml: is a folder, not a file"]),
    ("template that is a folder", {"templates/promo/default.sms.txt.j2": FOLDER},
     ["error: templates/promo/default.sms.txt.j2: is a folder, not a file"]),
    ("missing template file", {"templates/promo/default.sms.txt.j2": None},
     ["no sms text template for tier 'default': create templates/promo/default.sms.txt.j2"]),
    ("SQL that fails", {SQL: "SELECT id, name FROM nowhere WHERE id > :min_score"},
     ["audiences/people.sql: the query failed: no such table: nowhere"]),
    ("SQL without the key column",
     {SQL: "SELECT name, email, phone, tier, locale, score FROM people WHERE score >= "
           ":min_score"}, ["audiences/people.sql", "'id'"]),
    ("SQL returning duplicate keys",
     {SQL: "SELECT id, name, email, phone, tier, locale, score FROM people "
           "WHERE score >= :min_score UNION ALL SELECT 3, 'x', NULL, NULL, 'gold', 'en', 1"},
     ["audiences/people.sql: duplicate key '3'"]),
    ("template syntax error", {"templates/promo/default.sms.txt.j2": "Hi {{ name }\n"},
     ["templates/promo/default.sms.txt.j2:1: syntax error"]),
    ("template escaping the sandbox (dunder attribute)",
     {"templates/promo/default.sms.txt.j2": "Hi {{ name }}\n{{ name.__class__.__mro__ }}"},
     ["templates/promo/default.sms.txt.j2:2: access to '__class__' is not allowed (sandbox)"]),
    ("template escaping the sandbox (item and attr filter)",
     {"templates/promo/default.sms.txt.j2": "{{ name['__class__'] }}{{ name|attr('__init__') }}"},
     ["templates/promo/default.sms.txt.j2:1: access to '__class__' is not allowed (sandbox)",
      "templates/promo/default.sms.txt.j2:1: access to '__init__' is not allowed (sandbox)"]),
    ("missing environment variable",
     {"config/herald.yaml": "timezone: UTC\nsources:\n  crm: \"${HERALD_NO_SUCH_DB}\"\n"
                            "channels:\n  email: {type: outbox, kind: email}\n"
                            "  sms: {type: outbox, kind: sms}\n"},
     ["config/herald.yaml:3 sources.crm: environment variable HERALD_NO_SUCH_DB is not set"]),
    ("non-UTF-8 flow YAML", {FLOW: PROMO_YAML.replace("A test campaign",
                                                      "Caf\u00e9").encode("latin-1")},
     ["config/flows/promo.yaml", "UTF-8"]),
    ("non-UTF-8 template", {"templates/promo/default.sms.txt.j2": "Caf\u00e9 {{ name }}"
                            .encode("latin-1")},
     ["templates/promo/default.sms.txt.j2: not valid UTF-8"]),
    ("non-UTF-8 segment SQL", {SQL: "SELECT id, name, email, phone, tier, locale, score "
                                    "FROM people -- caf\u00e9\n".encode("latin-1")},
     ["audiences/people.sql", "UTF-8"]),
    # sources are read, never written: only queries are segments, sources open read-only
    ("segment that is DROP TABLE", {SQL: "DROP TABLE people"},
     ["audiences/people.sql: not a query: a segment is one SELECT statement, this one "
      "starts with DROP"]),
    ("segment that is DELETE ... RETURNING",
     {SQL: "DELETE FROM people WHERE score >= :min_score RETURNING *"},
     ["audiences/people.sql: not a query", "starts with DELETE"]),
    ("segment that is UPDATE", {SQL: "UPDATE people SET email = NULL WHERE score >= "
                                     ":min_score"}, ["starts with UPDATE"]),
    ("segment that is INSERT ... SELECT", {SQL: "INSERT INTO people SELECT * FROM people "
                                                "WHERE score >= :min_score"},
     ["starts with INSERT"]),
    ("segment hiding a write after a comment",
     {SQL: "/* a query */ -- really\nDELETE FROM people WHERE score >= :min_score"},
     ["starts with DELETE"]),
    ("segment with a second statement", {SQL: "SELECT id, name, email, phone, tier, locale, "
                                              "score FROM people WHERE score >= :min_score; "
                                              "DROP TABLE people"},
     ["audiences/people.sql: more than one statement"]),
    ("segment that is ATTACH DATABASE", {SQL: "ATTACH DATABASE 'x.db' AS x"},
     ["starts with ATTACH"]),
    ("segment that is PRAGMA", {SQL: "PRAGMA writable_schema = 1"}, ["starts with PRAGMA"]),
    ("WITH ... DELETE RETURNING (a write hidden behind WITH)",
     {SQL: "WITH gone AS (SELECT id FROM people) DELETE FROM people WHERE id IN "
           "(SELECT id FROM gone) AND score >= :min_score RETURNING *"},
     ["audiences/people.sql: the query failed: near \"DELETE\": syntax error"]),
    # templates reaching other templates: the whole include graph is checked
    ("misspelt include in one locale's template",
     {"templates/promo/gold.email.txt.zh.j2": "{% include 'promo/footr.j2' %}"},
     ["templates/promo/gold.email.txt.zh.j2:1: include 'promo/footr.j2': "
      "templates/promo/footr.j2 does not exist"]),
    ("import of a missing macro file",
     {"templates/promo/default.sms.txt.j2": "{% import 'promo/macros.j2' as m %}"
                                            "{{ m.hi(name) }}"},
     ["templates/promo/default.sms.txt.j2:1: import 'promo/macros.j2': "
      "templates/promo/macros.j2 does not exist"]),
    ("include climbing out of templates/",
     {"templates/promo/default.sms.txt.j2": "{% include '../crm.db' %}"},
     ["templates/promo/default.sms.txt.j2:1: include '../crm.db' climbs out of templates/"]),
    ("include with a computed name",
     {"templates/promo/default.sms.txt.j2": "{% include name ~ '.j2' %}"},
     ["templates/promo/default.sms.txt.j2:1: include with a computed template name cannot "
      "be checked"]),
    ("include cycle",
     {"templates/promo/default.sms.txt.j2": "Hi {% include 'promo/a.j2' %}",
      "templates/promo/a.j2": "{% include 'promo/b.j2' %}",
      "templates/promo/b.j2": "{% include 'promo/a.j2' %}"},
     ["templates/promo/b.j2:1: include 'promo/a.j2' makes a cycle: "
      "promo/default.sms.txt.j2 -> promo/a.j2 -> promo/b.j2 -> promo/a.j2"]),
    ("included template using a column the segment lacks",
     {"templates/promo/default.sms.txt.j2": "Hi {% include 'promo/footer.j2' %}",
      "templates/promo/footer.j2": "Code {{ coupon }}"},
     ["templates/promo/footer.j2:1: uses 'coupon', which the segment does not return"]),
    ("included template with a syntax error",
     {"templates/promo/default.sms.txt.j2": "Hi {% include 'promo/footer.j2' %}",
      "templates/promo/footer.j2": "Bye {{ name }"},
     ["templates/promo/footer.j2:1: syntax error"]),
    ("extends of a missing layout",
     {"templates/promo/default.sms.txt.j2": "{% extends 'layouts/sms.j2' %}"},
     ["templates/promo/default.sms.txt.j2:1: extends 'layouts/sms.j2': "
      "templates/layouts/sms.j2 does not exist"]),
    # YAML that expands without end, and absurd values
    ("YAML alias bomb (a billion laughs in 600 bytes)",
     {FLOW: PROMO_YAML + "x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
         f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9))},
     ["config/flows/promo.yaml:", "invalid YAML: more than 100,000 values once aliases are "
      "expanded"]),
    ("YAML alias referring to itself", {FLOW: PROMO_YAML + "loop: &me [1, *me]\n"},
     ["config/flows/promo.yaml:13: invalid YAML: an alias refers to a value that contains "
      "it"]),
    ("YAML nested 10,000 levels deep", {FLOW: PROMO_YAML + "deep: " + "[" * 10_000
                                        + "]" * 10_000 + "\n"},
     ["config/flows/promo.yaml: invalid YAML: nested deeper than 64 levels"]),
    ("cap window of 99999999999999999999 days", {FLOW: PROMO_YAML + "caps: [{max: 1, per: "
                                                 "99999999999999999999d}]\n"},
     ["config/flows/promo.yaml:13 caps[0].per: duration must be at most 3650d"]),
    ("cap window of 999999 weeks", {FLOW: PROMO_YAML + "caps: [{max: 1, per: 999999w}]\n"},
     ["config/flows/promo.yaml:13 caps[0].per: duration must be at most 3650d"]),
    ("rate: 0 as a number (was: no limit)",
     {"config/herald.yaml": HERALD_YAML.replace("sms: {type: outbox, kind: sms}",
                                                "sms: {type: outbox, kind: sms, rate: 0}")},
     ["config/herald.yaml:7 channels.sms.rate: rate must be more than 0"]),
    ("rate: -5 as a number",
     {"config/herald.yaml": HERALD_YAML.replace("sms: {type: outbox, kind: sms}",
                                                "sms: {type: outbox, kind: sms, rate: -5}")},
     ["config/herald.yaml:7 channels.sms.rate: rate must be more than 0"]),
    ("rate: 0/s", {"config/herald.yaml": HERALD_YAML.replace(
        "sms: {type: outbox, kind: sms}", "sms: {type: outbox, kind: sms, rate: 0/s}")},
     ["config/herald.yaml:7 channels.sms.rate: rate must be more than 0"]),
    ("tier template climbing out of templates/ with ..",
     {FLOW: PROMO_YAML.replace("gold: {channels: [email, sms]}",
                               "gold: {channels: [email, sms], template: promo/../../crm}")},
     ["config/flows/promo.yaml:11 tiers.gold.template: 'promo/../../crm' is not a template "
      "path inside templates/"]),
    ("quiet hours from == to", {FLOW: PROMO_YAML + "quiet_hours: {from: \"21:00\", "
                                                   "to: \"21:00\"}\n"},
     ["config/flows/promo.yaml:13 quiet_hours: from and to are the same time"]),
    ("SMTP port 99999", {"config/herald.yaml": HERALD_YAML.replace(
        "email: {type: outbox, kind: email}",
        "email: {type: smtp, host: 127.0.0.1, port: 99999, sender: a@example.com}")},
     ["config/herald.yaml:6 channels.email.port: Input should be less than or equal to "
      "65535"]),
    ("HTTP channel timeout: 0", {"config/herald.yaml": HERALD_YAML.replace(
        "sms: {type: outbox, kind: sms}",
        "sms: {type: webhook, url: \"http://127.0.0.1:9/x\", address: phone, timeout: 0}")},
     ["config/herald.yaml:7 channels.sms.timeout: Input should be greater than 0"]),
    ("chunk_size: 0", {"config/herald.yaml": HERALD_YAML.replace("chunk_size: 40",
                                                                 "chunk_size: 0")},
     ["config/herald.yaml:9 chunk_size: Input should be greater than or equal to 1"]),
    ("mistyped SQLite source path",
     {"config/herald.yaml": HERALD_YAML.replace("sqlite:///crm.db", "sqlite:///crm_typo.db")},
     ["config/herald.yaml:3 sources.crm: sqlite:///", "crm_typo.db: database file not "
      "found"]),
    ("store whose database driver is not installed",
     {"config/herald.yaml": HERALD_YAML.replace("sqlite:///.herald/herald.db",
                                                "mysql://u:pw@127.0.0.1:1/db")},
     ["config/herald.yaml:4 store: unsupported database URL: its driver is not installed "
      "(no module 'MySQLdb'; use sqlite or postgresql+psycopg)"]),
    ("source whose database driver is not installed",
     {"config/herald.yaml": HERALD_YAML.replace("sqlite:///crm.db",
                                                "mysql://u:pw@127.0.0.1:1/db")},
     ["config/herald.yaml:3 sources.crm: mysql://u:***@127.0.0.1:1/db: unsupported "
      "database URL: its driver is not installed (no module 'MySQLdb'"]),
    ("source of an unknown database type",
     {"config/herald.yaml": HERALD_YAML.replace("sqlite:///crm.db", "nosuchdb://h/db")},
     ["config/herald.yaml:3 sources.crm: nosuchdb://h/db: unknown database type "
      "'nosuchdb' (use sqlite or postgresql+psycopg)"]),
]


def _write(ws: Any, files: dict[str, str | bytes | object | None]) -> None:
    for rel, content in files.items():
        path = ws.root / rel
        if content is None:
            path.unlink()
        elif content is FOLDER:
            path.unlink()
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            assert isinstance(content, str)
            path.write_text(content, encoding="utf-8")


def _deliveries(ws: Any) -> int:
    db = ws.root / ".herald" / "herald.db"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM herald_deliveries").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


@pytest.mark.parametrize(("name", "files", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named_and_nothing_is_sent(name, files, expected, make_workspace,
                                                capsys, catalogue) -> None:
    ws = make_workspace()
    _write(ws, files)
    with pytest.raises(SystemExit) as exc:
        main(["run", "promo", "--json", "-w", str(ws.root)])
    out, err = capsys.readouterr()
    assert exc.value.code == 1, err
    assert out == ""
    for line in expected:
        assert line in err, f"{line!r} not in {err!r}"
    assert "Traceback" not in err
    # Prefect's console lines stay off without --verbose: the error is Herald's one line
    assert "Finished in state" not in err and "NoneType: None" not in err, err
    assert all(err.count(line) == 1 for line in expected), err  # said once
    assert outbox_messages(ws) == 0 and _deliveries(ws) == 0
    with sqlite3.connect(ws.root / "crm.db") as conn:  # the source is never written
        assert conn.execute("SELECT count(*) FROM people WHERE email IS NOT NULL"
                            ).fetchone()[0] == 86
    assert not (ws.root / "crm_typo.db").exists()  # a mistyped path creates nothing
    shown = err.strip().splitlines()[-1].strip().replace(str(ws.root), "WORKSPACE")
    catalogue("input", name, "exit 1: " + shown[:160])


def test_an_empty_run_key_is_a_usage_error(make_workspace, capsys, catalogue) -> None:
    ws = make_workspace(rows=5)
    with pytest.raises(SystemExit) as exc:
        main(["run", "promo", "--run-key", "", "-w", str(ws.root)])
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and "--run-key" in err and "empty run key" in err
    assert outbox_messages(ws) == 0 and _deliveries(ws) == 0
    catalogue("input", "empty `--run-key \"\"` (was: silently today's key)",
              "exit 2 (usage): an empty run key; nothing sent")


@pytest.mark.parametrize("command", [["runs"], ["suppress", "list"], ["recipient", "1"],
                                     ["audience", "list"], ["preview", "promo"]])
def test_a_file_where_the_workspace_databases_folder_goes_is_one_line(
        command, make_workspace, capsys, catalogue) -> None:
    """`.herald` made a file: the commands that read the workspace database printed a
    traceback (FileExistsError) instead of saying what is in the way."""
    ws = make_workspace(rows=5)
    (ws.root / ".herald").write_text("not a folder")
    with pytest.raises(SystemExit) as exc:
        main([*command, "-w", str(ws.root)])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Traceback" not in err, err
    said = " ".join(err.split())  # as printed, whatever the console's width
    assert said == (f"error: the workspace database sqlite:///{ws.root}/.herald/herald.db: "
                    f"its folder cannot be made: {ws.root}/.herald is a file, not a folder"
                    ), err
    if command == ["runs"]:
        catalogue("input", "a file where the workspace database's folder goes (`.herald`)",
                  "exit 1: the workspace database's folder cannot be made: .herald is a "
                  "file, not a folder")


@pytest.mark.parametrize("command", [["suppress", "list"], ["audience", "list"],
                                     ["report", "promo"], ["suppress", "add", "a@example.com"],
                                     ["run", "promo"]])
def test_a_damaged_workspace_database_is_one_line(command, make_workspace, capsys,
                                                  catalogue) -> None:
    ws = make_workspace(rows=5)
    db = ws.root / ".herald" / "herald.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_bytes(b"this is not a database, it is a text file someone saved here\n" * 80)
    with pytest.raises(SystemExit) as exc:
        main([*command, "-w", str(ws.root)])
    out, err = capsys.readouterr()
    assert exc.value.code == 1 and "Traceback" not in err, err
    line = " ".join(err.split())
    assert line.startswith("error: the workspace database sqlite:///") and \
        ".herald/herald.db: file is not a database (the file is damaged" in line, line
    assert outbox_messages(ws) == 0
    catalogue("input", f"damaged workspace database: `herald {' '.join(command[:2])}`",
              "exit 1: " + line.replace(str(ws.root), "WORKSPACE")[:150])


def _herald(ws: Any, *argv: str) -> tuple[int, str]:
    """``herald ARGV -w WORKSPACE`` in its own process: exit status and the CLI's one
    error line (the last of stderr; a run's Prefect log lines come before it)."""
    herald = Path(sys.executable).parent / "herald"
    proc = subprocess.run([str(herald), *argv, "-w", str(ws.root)], capture_output=True,
                          text=True, timeout=180)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and lines, proc.stderr
    assert lines[-1].startswith("error:"), proc.stderr
    assert sum(line.startswith("error:") for line in lines) == 1, proc.stderr
    return proc.returncode, lines[-1]


def _read_only_store(ws: Any) -> str:
    """Point the workspace at its own database opened read-only (SQLite ``mode=ro``).

    The tests run as root, whom a file mode of 0444 does not stop; a read-only
    connection fails the way a file Herald may not write does, on Herald's first write."""
    db = ws.root / ".herald" / "herald.db"
    ws.store  # noqa: B018 - the database and its schema exist, as after an earlier command
    ws.dispose()
    url = f"sqlite:///file:{db}?mode=ro&uri=true"
    config = ws.root / "config" / "herald.yaml"
    config.write_text(config.read_text().replace('store: "sqlite:///.herald/herald.db"',
                                                 f'store: "{url}"'))
    return url


@pytest.mark.parametrize("command", [
    pytest.param(["run", "promo"], marks=pytest.mark.prefect),
    ["suppress", "add", "a@example.com"]])
def test_a_read_only_workspace_database_is_one_line_naming_it(command, make_workspace,
                                                              catalogue) -> None:
    ws = make_workspace(rows=5)
    url = _read_only_store(ws)
    code, line = _herald(ws, *command)
    assert code == 1
    assert line == (f"error: the workspace database {url}: attempt to write a readonly "
                    "database (Herald needs to write to it: check the file's and folder's "
                    "permissions)"), line
    with sqlite3.connect(ws.root / ".herald" / "herald.db") as conn:
        assert conn.execute("SELECT count(*) FROM herald_deliveries").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM herald_suppressions").fetchone() == (0,)
    assert outbox_messages(ws) == 0
    catalogue("input", f"read-only workspace database: `herald {' '.join(command[:2])}`",
              "exit 1, nothing written or sent: "
              + line.replace(str(ws.root), "WORKSPACE")[:150])


@pytest.mark.prefect
def test_a_locked_workspace_database_fails_after_the_busy_timeout(make_workspace,
                                                                 catalogue) -> None:
    """Another process holds the workspace database's write lock for longer than Herald
    waits (its busy timeout, 30 s): the run fails in one line naming the database."""
    ws = make_workspace(rows=5)
    db = ws.root / ".herald" / "herald.db"
    ws.store  # noqa: B018 - the database and its schema exist, as after an earlier command
    ws.dispose()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        code, line = _herald(ws, "run", "promo")
        waited = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert code == 1
    assert line == (f"error: the workspace database sqlite:///{db}: database is locked "
                    "(another process holds it: try again when it is done)"), line
    assert 30 <= waited < 60, waited  # one busy timeout (and Prefect's start), no more
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM herald_deliveries").fetchone() == (0,)
    assert outbox_messages(ws) == 0
    catalogue("fault", "workspace database locked by another process for longer than "
              "Herald waits (`herald run`)",
              f"waited its busy timeout (30 s; {waited:.0f} s with Prefect's start), then "
              "exit 1, nothing sent: " + line.replace(str(ws.root), "WORKSPACE")[:120],
              messages=5)


def test_contact_fields_null_malformed_or_absurd_are_recorded_never_sent(
        make_workspace, catalogue) -> None:
    ws = make_workspace({FLOW: PROMO_YAML.replace("gold: {channels: [email, sms]}",
                                                  "gold: {channels: [email]}").replace(
        "default: {channels: [sms, email]}", "default: {channels: [email]}")}, rows=8)
    with sqlite3.connect(ws.root / "crm.db") as conn:
        conn.executemany("UPDATE people SET email = ? WHERE id = ?", [
            (None, 1), ("", 2), ("not-an-address", 3), ("a@b@c.example", 4),
            ("x" * 100_000 + "@example.com", 5), ("   ", 6), ("ok@example.com", 8)])
    summary = engine.run_local(ws, "promo", run_key="contacts")
    with sqlite3.connect(ws.root / ".herald" / "herald.db") as conn:
        rows = dict(conn.execute("SELECT recipient, status || ': ' || coalesce(reason, '') "
                                 "FROM herald_deliveries").fetchall())
    assert rows["1"] == rows["2"] == rows["6"] == "no_address: email: email empty"
    assert rows["3"] == rows["4"] == "no_address: email: email invalid"
    assert rows["5"] == "no_address: email: email too long"
    assert rows["7"] == "no_address: email: email empty"  # the fixture's missing email
    assert rows["8"] == "sent: "
    assert summary["deliveries"]["sent"] == 1 and outbox_messages(ws) == 1
    catalogue("input", "NULL, empty, malformed and 100,000-character e-mail addresses",
              "recorded as no_address with the reason (empty, invalid, too long); never "
              "sent; the rest of the run goes on", messages=8)


def test_parameters_crafted_to_inject_sql_stay_data(make_workspace, capsys, catalogue
                                                    ) -> None:
    from .helpers import PROMO_YAML

    crafted = "0; DROP TABLE people; --"
    # where the flow's YAML gives the parameter a number, text in its place is refused
    ws = make_workspace(rows=10)
    with pytest.raises(SystemExit) as exc:
        main(["audience", "build", "promo", "-p", f"min_score={crafted}", "--json",
              "-w", str(ws.root)])
    assert exc.value.code == 1 and "-p min_score: '0; DROP TABLE people; --' is not a " \
        "number" in capsys.readouterr().err
    # where it gives none, the text is bound as data
    ws = make_workspace({"config/flows/promo.yaml": PROMO_YAML.replace(
        "  params: {min_score: 0}\n", "")}, rows=10, folder="untyped")
    with pytest.raises(SystemExit) as exc:
        main(["audience", "build", "promo", "-p", f"min_score={crafted}", "--json",
              "-w", str(ws.root)])
    out, err = capsys.readouterr()
    assert exc.value.code == 0, err
    built = json.loads(out)
    # SQLite compares the text with the integer score: no row is >= a text, nothing runs
    assert built["size"] == 0 and built["params"]["min_score"] == crafted
    for root in (ws.root, ws.root.parent / "ws"):
        with sqlite3.connect(root / "crm.db") as conn:
            assert conn.execute("SELECT count(*) FROM people").fetchone()[0] == 10
    catalogue("input", "segment parameter crafted to inject SQL (`0; DROP TABLE people; --`)",
              "refused where the flow's YAML makes the parameter a number (not a number); "
              "elsewhere bound as data: the query matched nothing, the table is intact")


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres",
                                                            marks=pytest.mark.postgres)])
def test_sources_are_opened_read_only(backend, make_workspace, request, catalogue) -> None:
    """Whatever a statement hides, the source's own connection refuses to write."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    ws = make_workspace(rows=10)
    if backend == "postgres":
        url = request.getfixturevalue("pg_database")
        fill_people(url, 10)
        config = ws.root / "config/herald.yaml"
        config.write_text(config.read_text().replace("sqlite:///crm.db", url))
        chunks.forget_workspace(ws.root)
        from herald.core.workspace import Workspace

        ws = Workspace.open(ws.root)
    source = ws.source("crm")
    statements = ["DELETE FROM people", "DROP TABLE people",
                  "UPDATE people SET email = NULL", "CREATE TABLE x (a INTEGER)"]
    if backend == "postgres":
        statements.append("WITH gone AS (DELETE FROM people RETURNING *) SELECT * FROM gone")
    refused = []
    for statement in statements:
        with pytest.raises(DBAPIError) as exc, source.begin() as conn:
            conn.execute(text(statement))
        refused.append(str(exc.value.orig).splitlines()[0])
    with source.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM people")).scalar() == 10
    expected = ("attempt to write a readonly database" if backend == "sqlite" else
                "in a read-only transaction")
    assert all(expected in r for r in refused), refused
    ws.dispose()
    catalogue("input", f"writing statements through a {backend} source connection "
              "(DELETE, DROP, UPDATE, CREATE" + (", a writing CTE" if backend == "postgres"
                                                 else "") + ")",
              f"each refused by the database ({expected}); the table is intact")


RUNTIME_TEMPLATE_ERRORS = {
    "KeyError from str.format": ("{{ '{missing}'.format(x=1) }}", "KeyError: 'missing'"),
    "RecursionError from a recursive macro": (
        "{% macro r(n) %}{{ r(n) }}{% endmacro %}{{ r(1) }}", "RecursionError"),
    "ZeroDivisionError from a column": ("{{ 100 // (score - score) }}", "ZeroDivisionError"),
    "error raised in an included template": (
        "{% include 'promo/footer.j2' %}", "KeyError: 'missing'"),
}


@pytest.mark.parametrize("case", list(RUNTIME_TEMPLATE_ERRORS))
def test_any_render_exception_is_that_recipients_render_error(case, make_workspace,
                                                              catalogue) -> None:
    """The gold tier's Chinese template fails at render time (validation cannot see it):
    those recipients are render_error naming the template, everyone else is sent."""
    source, expected = RUNTIME_TEMPLATE_ERRORS[case]
    ws = make_workspace({"templates/promo/gold.email.txt.zh.j2": source,
                         "templates/promo/footer.j2": "{{ '{missing}'.format(x=1) }}"},
                        rows=40)
    summary = engine.run_local(ws, "promo", run_key="render")
    ledger = _ledger(ws, "render")
    failing = {str(i) for i in range(1, 41) if i % 4 == 0 and i % 2 == 0 and i % 7}
    where = ("templates/promo/footer.j2:1" if "included" in case
             else "templates/promo/gold.email.txt.zh.j2")
    for key in failing:
        status, reason = ledger[key]
        assert status == "render_error" and where in str(reason) and expected in str(reason), \
            (key, status, reason)
    assert not any(s in ("queued", "sending") for s, _ in ledger.values())
    assert summary["deliveries"]["render_error"] == len(failing)
    delivered = outbox_recipients(ws)
    assert not set(delivered) & failing and max(delivered.values()) == 1
    assert summary["deliveries"]["sent"] == len(delivered) > 0
    lost, duplicated = _account(ledger, delivered, [str(i) for i in range(1, 41)])
    assert lost == 0 and duplicated == 0
    catalogue("input", f"template failing at render time: {case}",
              f"{len(failing)} recipients render_error naming {where} ({expected}); the "
              f"other {summary['deliveries']['sent']} sent; no row left queued",
              messages=40, lost=lost, duplicated=duplicated)


INTERNAL_URLS = {
    "loopback IPv4": "http://127.0.0.1:{port}/hook",
    "loopback IPv6": "http://[::1]:{port}/hook",
    "localhost (a name resolving to loopback)": "http://localhost:{port}/hook",
    "cloud metadata (link-local 169.254.169.254)": "http://169.254.169.254/latest/meta-data",
    "private 10.0.0.0/8": "http://10.1.2.3/hook",
    "private 192.168.0.0/16": "http://192.168.1.1/admin",
    "shared address space 100.64.0.0/10": "http://100.64.0.1/hook",
    "unspecified 0.0.0.0": "http://0.0.0.0:{port}/hook",
    "IPv6 link-local fe80::/10": "http://[fe80::1]/hook",
    "IPv4-mapped IPv6 loopback": "http://[::ffff:127.0.0.1]:{port}/hook",
}


def test_recipient_webhook_urls_inside_the_network_are_refused(make_workspace, hook, catalogue
                                                                ) -> None:
    names = list(INTERNAL_URLS)

    def workspace(allow: bool, folder: str) -> Any:
        ws = make_workspace({
            "config/herald.yaml": (
                "timezone: UTC\nsources:\n  crm: \"sqlite:///crm.db\"\nchannels:\n"
                "  hook: {type: webhook, address: email, timeout: 1"
                f"{', allow_private_addresses: true' if allow else ''}}}\n"),
            FLOW: PROMO_YAML.replace("gold: {channels: [email, sms]}", "gold: {channels: [hook]}")
            .replace("default: {channels: [sms, email]}", "default: {channels: [hook]}"),
            "templates/promo/default.webhook.txt.j2": "Hello {{ name }}"},
            rows=len(names), folder=folder)
        port = hook.url.rsplit(":", 1)[1]
        with sqlite3.connect(ws.root / "crm.db") as conn:
            conn.executemany("UPDATE people SET email = ? WHERE id = ?", [
                (INTERNAL_URLS[n].format(port=port), i) for i, n in enumerate(names, 1)])
        return ws

    ws = workspace(False, "closed")
    engine.run_local(ws, "promo", run_key="ssrf")
    ledger = _ledger(ws, "ssrf")
    assert hook.requests == []  # nothing reached any of them
    for i, name in enumerate(names, 1):
        status, reason = ledger[str(i)]
        assert status == "failed" and "non-public address" in str(reason), (name, reason)
    opened = workspace(True, "open")
    try:
        engine.run_local(opened, "promo", run_key="ssrf")
    except RunError as exc:  # a network's filter may refuse a private address (403): the
        assert "channel hook stopped" in str(exc)  # channel stops, the run fails
    reached = {str(r.json()["recipient"]) for r in hook.requests}
    # the peer listens on 127.0.0.1: the IPv4 loopback forms reach it once allowed
    assert reached == {"1", "3", "8", "10"}
    assert {r for r, (status, _) in _ledger(opened, "ssrf").items()
            if status == "sent"} == reached
    for name in names:
        catalogue("input", f"recipient's webhook URL inside the network: {name}",
                  "failed `address_not_allowed` before any request; sent only with "
                  "allow_private_addresses: true on the channel", messages=1)


# (case, recipient updated, its new email or phone, the recipient it duplicates)
SAME_PERSON = [
    ("same e-mail address in other case", 2, ("email", "USER1@Example.COM"), 1),
    ("same e-mail address with spaces around it", 3, ("email", "  user1@example.com "), 1),
    ("same phone number written differently", 9, ("phone", "+1 (415) 555-0006"), 6),
    ("same address in another chunk of the run", 38, ("email", "User11@example.com"), 11),
]


@pytest.mark.parametrize("dedupe", [True, False], ids=["deduplicated", "deduplicate-false"])
def test_the_same_person_under_two_keys_gets_one_message(dedupe, make_workspace, catalogue
                                                         ) -> None:
    ws = make_workspace({
        "config/herald.yaml": HERALD_YAML.replace("chunk_size: 40", "chunk_size: 8"),
        FLOW: PROMO_YAML.replace("gold: {channels: [email, sms]}", "gold: {channels: [email]}")
        .replace("default: {channels: [sms, email]}", "default: {channels: [email]}")
        + ("" if dedupe else "deduplicate: false\n")},
        rows=40)
    with sqlite3.connect(ws.root / "crm.db") as conn:
        for _, key, (column, value), _ in SAME_PERSON:
            conn.execute(f"UPDATE people SET {column} = ? WHERE id = ?", (value, key))
        # the phone case goes by SMS
        conn.execute("UPDATE people SET email = NULL WHERE id IN (6, 9)")
    flow = ws.root / FLOW
    flow.write_text(flow.read_text().replace("default: {channels: [email]}",
                                             "default: {channels: [email, sms]}"))
    chunks.forget_workspace(ws.root)
    from herald.core.workspace import Workspace

    ws = Workspace.open(ws.root)
    summary = engine.run_local(ws, "promo", run_key="same", max_workers=1)
    ledger = _ledger(ws, "same")
    delivered = outbox_recipients(ws)
    for name, key, _, first in SAME_PERSON:
        if dedupe:
            assert ledger[str(key)][0] == "duplicate", (name, ledger[str(key)])
            assert f"as recipient {first} in this run" in str(ledger[str(key)][1])
            assert not delivered[str(key)] and delivered[str(first)] == 1
        else:
            assert ledger[str(key)][0] == "sent" and delivered[str(key)] == 1
    again = engine.run_local(ws, "promo", run_key="same")
    assert again["deliveries"]["sent"] == 0
    if dedupe:
        assert summary["deliveries"]["duplicate"] == len(SAME_PERSON)
    ws.dispose()
    if not dedupe:
        catalogue("input", "the same person under two keys with `deduplicate: false`",
                  f"all {len(SAME_PERSON)} pairs sent twice, as configured; a rerun sends "
                  "nothing", messages=2 * len(SAME_PERSON))
        return
    for name, *_ in SAME_PERSON:
        catalogue("input", f"the same person under two keys: {name}",
                  "the second key recorded `duplicate` naming the first; one message",
                  messages=2)


# -- opt-outs: the suppression list ----------------------------------------------------------

# (case, how it was suppressed, recipient id): each suppressed value is written differently
# from the address the source holds; source addresses changed for a case are in SOURCE_AS
OPT_OUTS = [
    ("phone with spaces, dashes and parentheses", ("add", "+1 (415) 555-0001"), 1),
    ("phone with dots", ("add", "+1.415.555.0002"), 2),
    ("phone with the international prefix 00", ("add", "00 1 415 555 0003"), 3),
    ("national phone number (phone_region CN) against the source's E.164",
     ("add", "138 0013 8000"), 9),
    ("E.164 against the source's national format", ("add", "+86 138 0013 8001"), 10),
    ("phone suppressed before normalisation (an old entry, migrated)",
     ("old", "+1 415 555 0006"), 6),
    ("e-mail address in other case with spaces", ("add", "  USER4@Example.COM "), 4),
    ("e-mail domain in punycode, the source's in Unicode",
     ("add", "user8@xn--bcher-kva.example"), 8),
    ("e-mail domain in Unicode, the source's in punycode", ("add", "User12@B\u00fccher.example"),
     12),
    ("import: `Name <addr>`", ("import", "Ann Example <user16@example.com>"), 16),
    ("import: `mailto:addr`", ("import", "mailto:user20@example.com"), 20),
    ("import: a quoted display name holding a comma (a mail client's export)",
     ("import", '"Example, Ann" <user36@example.com>'), 36),
    ("import: semicolon CSV with a header (email;reason)", ("semicolon", "user24@example.com"),
     24),
    ("import: semicolon CSV, a quoted display name holding a comma",
     ("semicolon", '"Example, Ann" <user40@example.com>'), 40),
    ("import: quoted value and a reason holding the delimiter",
     ("import", '"user32@example.com",,"said ""stop"", twice"'), 32),
    ("import: a national phone number (phone_region CN)", ("import", "13800138002"), 11),
]
SOURCE_AS = {9: ("phone", "+8613800138000"), 10: ("phone", "138 0013 8001"),
             11: ("phone", "+86 138-0013-8002"), 8: ("email", "user8@b\u00fccher.example"),
             12: ("email", "user12@xn--bcher-kva.example")}


def test_opt_outs_hold_whatever_form_the_value_was_written_in(make_workspace, tmp_path,
                                                               capsys, catalogue) -> None:
    ws = make_workspace({
        "config/herald.yaml": HERALD_YAML + "phone_region: CN\n",
        FLOW: PROMO_YAML.replace("gold: {channels: [email, sms]}", "gold: {channels: [email]}")
        .replace("default: {channels: [sms, email]}", "default: {channels: [sms]}")}, rows=40)
    with sqlite3.connect(ws.root / "crm.db") as conn:
        for key, (column, value) in SOURCE_AS.items():
            conn.execute(f"UPDATE people SET {column} = ?, tier = ? WHERE id = ?",
                         (value, "gold" if column == "email" else "bronze", key))
    # an entry written by an older Herald: only trimmed and lower-cased, no form
    from herald.core.db import suppressions

    with ws.store.begin() as conn:
        conn.execute(suppressions.insert().values(
            value=next(v for _, (how, v), _ in OPT_OUTS if how == "old"), channel="*",
            reason="old", source="operator", created_at=engine.clock.now()))
    listing = tmp_path / "optouts.csv"
    listing.write_text("".join(v + "\n" for _, (how, v), _ in OPT_OUTS if how == "import"))
    semicolon = tmp_path / "export.csv"
    semicolon.write_text("email;reason\n" + "".join(
        f"{v};unsubscribed\n" for _, (how, v), _ in OPT_OUTS if how == "semicolon"))
    added = [v for _, (how, v), _ in OPT_OUTS if how == "add"]
    for args in (["suppress", "add", *added], ["suppress", "import", str(listing)],
                 ["suppress", "import", str(semicolon)]):
        with pytest.raises(SystemExit) as exc:
            main([*args, "-w", str(ws.root)])
        assert exc.value.code == 0, capsys.readouterr()
    capsys.readouterr()
    summary = engine.run_local(ws, "promo", run_key="optouts")
    ledger = _ledger(ws, "optouts")
    delivered = outbox_recipients(ws)
    for name, _how, key in OPT_OUTS:
        assert ledger[str(key)][0] == "suppressed", (name, ledger[str(key)])
        assert not delivered[str(key)], name
    # everyone else with an address was sent to, once
    sent = [k for k, (status, _) in ledger.items() if status == "sent"]
    assert sorted(sent, key=int) == sorted(delivered, key=int)
    assert summary["deliveries"]["suppressed"] == len(OPT_OUTS)
    assert max(delivered.values()) == 1
    with ws.store.connect() as conn:
        forms = conn.execute(suppressions.select().where(suppressions.c.form.is_(None))).all()
    assert forms == []  # the old entry was migrated
    for name, *_ in OPT_OUTS:
        catalogue("input", f"suppressed: {name}",
                  "recorded suppressed, never contacted (the value is normalised like the "
                  "address it names)", messages=1, opted_out=0)


IMPORT_REFUSALS = [
    ("stray quote swallowing the lines after it",
     '"a@example.com\nb@example.com\nc@example.com\n', ":1: unbalanced quote"),
    ("a line that is no address", "a@example.com\nJohn Smith\n",
     ":2: 'John Smith' is neither an e-mail address nor a phone number"),
    ("malformed e-mail address", "a@@example.com\n", ":1: 'a@@example.com' is not a valid "
                                                      "e-mail address"),
    ("malformed phone number", "+1 555 01\n", ":1: '+1 555 01' is not a valid phone number"),
    ("national phone number without phone_region", "4155550001\n",
     ":1: '4155550001' is not a valid phone number (invalid (no country code, and no "
     "phone_region in herald.yaml))"),
    ("too many columns", "a@example.com,email,STOP,extra\n",
     ":1: expected value[,channel[,reason]]"),
    ("unknown channel in a row", "a@example.com\nb@example.com,pigeon\n",
     ":2: unknown channel 'pigeon'"),
    ("semicolon CSV without a header (reason read as a channel)",
     "a@example.com;STOP\n", ":1: unknown channel 'STOP'"),
    ("empty value with a channel", "a@example.com\n,email,STOP\n",
     ":2: no value (an empty first column)"),
    ("`Name <addr` without its closing bracket", "Ann <ann@example.com\n",
     ":1: 'Ann <ann@example.com' is not an address (Name <addr> expected)"),
    ("unknown header column", "email,notes\na@example.com,x\n",
     ":1: unknown column 'notes' in the header"),
    ("non-UTF-8 import file", "a@example.com\ncaf\u00e9@example.com\n".encode("latin-1"),
     ":2: not valid UTF-8"),
    ("recipient key with spaces (--keys)", "42\nnot a key\n", ":2: 'not a key' is not a "
                                                              "recipient key"),
    ("an e-mail address for an SMS channel (it would never match)",
     "a@example.com\tsms\n", ":1: a***@example.com is an e-mail address, and channel 'sms' "
                              "sends sms (to phone): suppressed there it would never match"),
]


@pytest.mark.parametrize(("name", "content", "expected"), IMPORT_REFUSALS,
                         ids=[c[0] for c in IMPORT_REFUSALS])
def test_suppression_import_is_all_or_nothing(name, content, expected, make_workspace,
                                              tmp_path, capsys, catalogue) -> None:
    ws = make_workspace(rows=1)
    listing = tmp_path / "list.csv"
    if isinstance(content, bytes):
        listing.write_bytes(content)
    else:
        listing.write_text(content)
    keys = ["--keys"] if "--keys" in name else []
    with pytest.raises(SystemExit) as exc:
        main(["suppress", "import", str(listing), *keys, "-w", str(ws.root)])
    out, err = capsys.readouterr()
    assert exc.value.code == 1 and out == ""
    assert f"{listing}{expected}" in err.replace("\n  ", " ").replace("\n", " "), err
    assert "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["suppress", "list", "--json", "-w", str(ws.root)])
    assert json.loads(capsys.readouterr().out) == []  # nothing imported, not even line 1
    catalogue("input", f"suppress import: {name}",
              f"exit 1: {expected.lstrip(':')} (file:line); nothing imported")


# -- faults ---------------------------------------------------------------------------------
def _ledger(ws: Any, run_key: str) -> dict[str, tuple[str, str | None]]:
    """{recipient: (status, reason)} of one run key, on SQLite or Postgres."""
    return ledger_rows(ws, "status", "reason", where=f"run_key = '{run_key}'")


def _account(ledger: dict[str, tuple[str, str | None]], delivered: Counter[str],
             recipients: list[str]) -> tuple[int, int]:
    """(lost, duplicated) after the rerun. Lost: a recipient not delivered whose ledger
    row is missing, still queued, or says sent; duplicated: delivered more than once."""
    lost = sum(1 for r in recipients if not delivered[r] and (
        r not in ledger or ledger[r][0] in ("queued", "sent")))
    duplicated = sum(1 for r in recipients if delivered[r] > 1)
    return lost, duplicated


@pytest.fixture
def hook(tmp_path: Path) -> Any:
    server, peer = serve(Peer())
    yield peer
    server.shutdown()
    server.server_close()


def hook_ws(make_workspace: Any, peer: Peer, rows: int = 20, store: str | None = None,
            settings: str = "", chunk_size: int = 40, config: str = "") -> Any:
    """A promo flow sending through a webhook to ``peer``; ``settings`` are more of the
    channel's (``, concurrency: 1``: one request at a time, in the recipients' order),
    ``config`` more lines of herald.yaml."""
    return make_workspace({
        "config/herald.yaml": (
            "timezone: UTC\nsources:\n  crm: \"sqlite:///crm.db\"\nchannels:\n"
            f"  hook: {{type: webhook, url: \"{peer.url}/send\", address: email, "
            f"timeout: 1{settings}}}\nchunk_size: {chunk_size}\n{config}"),
        FLOW: PROMO_YAML.replace("gold: {channels: [email, sms]}", "gold: {channels: [hook]}")
        .replace("default: {channels: [sms, email]}", "default: {channels: [hook]}"),
        "templates/promo/default.webhook.txt.j2": "Hello {{ name }}"}, rows=rows, store=store)


HTTP_FAULTS = {
    "HTTP 5xx from the provider": [("status", 500), ("status", 503)],
    "HTTP timeout": [("timeout", 1.5)],
    "HTTP connection reset": [("reset",)],
    "HTTP 429 throttling with Retry-After": [("status", 429, {"Retry-After": "1"})],
    "HTTP answer trickling a byte every 0.4 s (timeout 1 s is a deadline per request)":
        [("trickle", 0.4)],
    "HTTP 502 HTML page from a proxy, then success": [("status", 502)],
}


@pytest.mark.parametrize("fault", list(HTTP_FAULTS))
def test_http_provider_faults(fault, make_workspace, hook, catalogue) -> None:
    ws = hook_ws(make_workspace, hook)
    every = [str(i) for i in range(1, 21)]
    for r in every[::3]:  # a third of the recipients meet the fault first
        hook.script(r, *HTTP_FAULTS[fault])
    summary = engine.run_local(ws, "promo", run_key="fault")
    ledger = _ledger(ws, "fault")
    lost, duplicated = _account(ledger, Counter(hook.kept()), every)
    assert lost == 0 and duplicated == 0
    assert summary["deliveries"]["sent"] == 18, [v for v in ledger.values() if v[0] != "sent"]
    again = engine.run_local(ws, "promo", run_key="fault")
    assert again["deliveries"]["sent"] == 0 and again["deliveries"]["duplicate"] == 20
    assert _account(ledger, Counter(hook.kept()), every) == (0, 0)
    catalogue("fault", fault, "retried with backoff; all 18 with an address sent once "
              "(2 have no email: no_address); the rerun sends nothing", messages=20,
              lost=lost, duplicated=duplicated)


def test_a_retryable_answer_beside_a_fatal_one_stays_queued_for_the_rerun(
        make_workspace, hook, catalogue) -> None:
    """Recipient 1 meets a 503 (retryable) in the batch where recipient 2 meets a 401
    (fatal, the channel stops): 1 was recorded `failed` and never sent, not even by the
    rerun, and a retry could go out after the channel had stopped. Now 1 stays queued,
    nothing is sent after the stop, and the rerun sends everyone once."""
    ws = hook_ws(make_workspace, hook)
    every = [str(i) for i in range(1, 21)]
    hook.script("1", ("status", 503))
    hook.script("2", ("status", 401))
    with pytest.raises(Exception, match="stopped"):
        engine.run_local(ws, "promo", run_key="mixed")
    ledger = _ledger(ws, "mixed")
    assert ledger["1"][0] == "queued" and "not retried, the channel stopped" in \
        str(ledger["1"][1]), ledger["1"]
    assert ledger["2"][0] == "queued"
    assert Counter(str(r.json()["recipient"]) for r in hook.requests)["1"] == 1
    summary = engine.run_local(ws, "promo", run_key="mixed")
    lost, duplicated = _account(_ledger(ws, "mixed"), Counter(hook.kept()), every)
    assert lost == 0 and duplicated == 0 and Counter(hook.kept())["1"] == 1
    assert summary["status"] == "completed"
    catalogue("fault", "a retryable answer (503) in the batch where another message's "
              "answer stopped the channel (401)", "the retryable one stays `queued`, not "
              "retried after the stop; the rerun sends it and the rest once",
              messages=20, lost=lost, duplicated=duplicated)


def test_http_malformed_answer_fails_that_message_only(make_workspace, hook, catalogue
                                                       ) -> None:
    """A load balancer answers some requests with a bad status line: those messages
    fail (outcome unknown, not retried); every other message of the batch is sent."""
    ws = hook_ws(make_workspace, hook)
    every = [str(i) for i in range(1, 21)]
    broken = ["1", "4", "10", "13"]
    for r in broken:
        hook.script(r, ("raw", b"HTTP/1.1 2OO FINE\r\n\r\n"))
    summary = engine.run_local(ws, "promo", run_key="garbage")
    ledger = _ledger(ws, "garbage")
    for r in broken:
        assert ledger[r][0] == "failed" and "malformed HTTP answer" in str(ledger[r][1]), \
            ledger[r]
        assert "outcome unknown, not retried" in str(ledger[r][1])
    assert summary["deliveries"]["sent"] == 18 - len(broken)
    arrived = Counter(str(r.json()["recipient"]) for r in hook.requests)
    assert all(arrived[r] == 1 for r in broken)  # never resent blindly
    lost, duplicated = _account(ledger, Counter(hook.kept()), every)
    assert lost == 0 and duplicated == 0
    catalogue("fault", "HTTP answer with a bad status line (a load balancer) for 4 of 20",
              "those 4 failed `unexpected_answer` (outcome unknown, not retried), each "
              "requested once; the other 14 with an address sent; failures per message, "
              "never per batch", messages=20, lost=lost, duplicated=duplicated)


def test_http_200_that_is_not_the_providers_success_is_failed(make_workspace, catalogue
                                                                ) -> None:
    """A Twilio profile behind a proxy: HTTP 200 with an HTML page, JSON without a sid,
    an empty body. Only the documented success (a sid) is sent."""
    from urllib.parse import parse_qs

    def to(r: Any) -> str:
        return parse_qs(r.body.decode())["To"][0]

    server, twilio = serve(Peer(key=to, ok_body=lambda r: {"sid": "SM" + "0" * 32}))
    try:
        ws = make_workspace({
            "config/herald.yaml": (
                "timezone: UTC\nphone_region: US\nsources:\n  crm: \"sqlite:///crm.db\"\n"
                f"channels:\n  sms: {{type: sms, provider: twilio, base_url: \"{twilio.url}\", "
                'account_sid: AC1, auth_token: "t", sender: "+15005550006"}\n'
                "  email: {type: outbox, kind: email}\n"),
            FLOW: PROMO_YAML.replace("gold: {channels: [email, sms]}", "gold: {channels: [sms]}")
            .replace("default: {channels: [sms, email]}", "default: {channels: [sms]}")},
            rows=12)
        twilio.script("+14155550001", ("raw", b"HTTP/1.1 200 OK\r\nContent-Type: text/html"
                                       b"\r\nContent-Length: 28\r\nConnection: close\r\n\r\n"
                                       b"<html>Gateway is busy</html>"))
        twilio.script("+14155550002", ("ok", {"status": "queued"}))
        twilio.script("+14155550003", ("ok", {}))
        summary = engine.run_local(ws, "promo", run_key="answers")
        ledger = _ledger(ws, "answers")
        requests = Counter(to(r) for r in twilio.requests)
    finally:
        server.shutdown()
        server.server_close()
    for key in ("1", "2", "3"):
        status, reason = ledger[key]
        assert status == "failed" and "outcome unknown, not retried" in str(reason), reason
        assert requests[f"+1415555{int(key):04d}"] == 1  # never sent twice
    assert "HTTP 200 (text/html) without a message sid" in str(ledger["1"][1])
    assert summary["deliveries"]["failed"] == 3 and summary["deliveries"]["sent"] == 7
    assert max(requests.values()) == 1
    catalogue("fault", "HTTP 200 that is not the provider's success (HTML page, JSON "
              "without a sid, an empty object)",
              "the 3 failed `unexpected_answer` (outcome unknown, not retried, counted in the "
              "failure rate), each requested once; 7 sent; 2 have no phone", messages=12)


def test_bodies_over_the_channel_limit_fail_unsent(make_workspace, catalogue) -> None:
    ws = make_workspace({
        "config/herald.yaml": HERALD_YAML.replace("sms: {type: outbox, kind: sms}",
                                                  "sms: {type: outbox, kind: sms, "
                                                  "max_body: 160}"),
        FLOW: PROMO_YAML.replace("gold: {channels: [email, sms]}", "gold: {channels: [sms]}"),
        "templates/promo/default.sms.txt.j2":
            "Hi {{ name }}{% if score > 6 %}{{ ' and more' * 240 }}{% endif %}"}, rows=20)
    summary = engine.run_local(ws, "promo", run_key="long")
    ledger = _ledger(ws, "long")
    long = {str(i) for i in range(1, 21) if i % 10 > 6 and i % 5}
    for key in long:
        assert ledger[key][0] == "failed" and "over the channel's limit of 160" in \
            str(ledger[key][1])
    delivered = outbox_recipients(ws)
    assert not set(delivered) & long and summary["deliveries"]["sent"] == len(delivered)
    lost, duplicated = _account(ledger, delivered, [str(i) for i in range(1, 21)])
    assert lost == 0 and duplicated == 0
    catalogue("input", "SMS body of over 2,000 characters, over the channel's max_body (160)",
              f"the {len(long)} failed `body_too_long`, never handed to the gateway; the "
              "rest sent", messages=20, lost=lost, duplicated=duplicated)


# answers a misbehaving or refusing endpoint gives a third of the recipients:
# (script, the ledger status they end with, what the reason says)
HTTP_REFUSALS = {
    "webhook 410 Gone (the address is suppressed)": ([("status", 410)], "failed", "410"),
    "webhook 400 Bad Request": ([("status", 400)], "failed", "permanent: HTTP 400"),
    "webhook 503 on every attempt (deferred to a later run)":
        ([("status", 503)] * 3, "deferred", "deferred to"),
}


@pytest.mark.parametrize("fault", list(HTTP_REFUSALS))
def test_http_refusals_are_recorded_never_lost(fault, make_workspace, hook, catalogue
                                               ) -> None:
    ws = hook_ws(make_workspace, hook)
    every = [str(i) for i in range(1, 21)]
    script, status, why = HTTP_REFUSALS[fault]
    hit = every[2::3]
    for r in hit:
        hook.script(r, *script)
    summary = engine.run_local(ws, "promo", run_key="refused")
    ledger = _ledger(ws, "refused")
    for r in hit:
        if ledger[r][0] != "no_address":
            assert ledger[r][0] == status and why in str(ledger[r][1]), ledger[r]
    lost, duplicated = _account(ledger, Counter(hook.kept()), every)
    assert lost == 0 and duplicated == 0
    assert all(s in ("sent", "failed", "deferred", "no_address") for s, _ in ledger.values())
    if "410" in fault:
        with sqlite3.connect(ws.root / ".herald" / "herald.db") as conn:
            assert conn.execute("SELECT count(*) FROM herald_suppressions").fetchone()[0] == 6
    d = summary["deliveries"]
    catalogue("fault", fault, f"{d['sent']} sent, {d['failed']} failed, {d['deferred']} "
              f"deferred, {d['no_address']} without an address: each with its reason; "
              "nothing sent twice", messages=20, lost=lost, duplicated=duplicated)


def test_refused_credentials_fail_the_run_and_its_rerun_sends_the_rest(
        make_workspace, hook, catalogue) -> None:
    ws = hook_ws(make_workspace, hook)
    every = [str(i) for i in range(1, 21)]
    for r in every[2::3]:
        hook.script(r, ("status", 401))
    with pytest.raises(RunError, match=r"channel hook stopped \(.*401.*\): \d+ message\(s\) "
                       r"not sent\. .*herald run promo --run-key refused"):
        engine.run_local(ws, "promo", run_key="refused")
    before = _ledger(ws, "refused")
    kept = [r for r, (status, _) in before.items() if status == "queued"]
    assert kept and all(str(before[r][1]).startswith("fatal: ") for r in kept)
    assert all(s in ("sent", "queued", "no_address") for s, _ in before.values())
    # meanwhile one of them unsubscribes and another's address bounces elsewhere: the
    # rerun must not send them what was reserved before
    assert len(kept) >= 3
    with closing(sqlite3.connect(ws.root / ".herald" / "herald.db")) as conn:
        (address,) = conn.execute("SELECT address FROM herald_deliveries WHERE recipient = ?",
                                  (kept[1],)).fetchone()
    suppression.suppress(ws.store, [(kept[0], None, "unsubscribed"),
                                    (address, "hook", "bounced")], "operator")
    hook.scripts.clear()  # the credentials fixed
    summary = engine.run_local(ws, "promo", run_key="refused")
    ledger = _ledger(ws, "refused")
    assert ledger[kept[0]] == ledger[kept[1]] == ("suppressed", suppression.LISTED_SINCE)
    assert kept[0] not in hook.kept() and kept[1] not in hook.kept()
    lost, duplicated = _account(ledger, Counter(hook.kept()), every)
    assert lost == 0 and duplicated == 0
    assert all(s in ("sent", "no_address", "suppressed") for s, _ in ledger.values())
    assert summary["deliveries"]["sent"] == len(kept) - 2
    assert summary["deliveries"]["suppressed"] == 2
    catalogue("fault", "webhook 401: credentials refused (the channel stops)",
              f"the run fails naming the channel and its answer; the {len(kept)} not sent "
              "stay queued, and the rerun with the run key sends them, except two put on "
              "the suppression list meanwhile (recorded `suppressed`); nothing sent twice",
              messages=20, lost=lost, duplicated=duplicated)


def test_smtp_server_unreachable_fails_the_run_and_its_rerun_sends(make_workspace,
                                                                   catalogue) -> None:
    port = free_port()
    ws = smtp_ws(make_workspace, port, timeout=2, rows=14)
    with pytest.raises(RunError, match=r"channel email stopped \(cannot connect"):
        engine.run_local(ws, "promo", run_key="smtp")
    before = _ledger(ws, "smtp")
    assert all(s in ("queued", "no_address") for s, _ in before.values())
    assert "cannot connect" in str(before["1"][1])
    box = _Answers({})
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        summary = engine.run_local(ws, "promo", run_key="smtp")
    finally:
        controller.stop()
    ledger = _ledger(ws, "smtp")
    delivered = Counter(a.split("@")[0].removeprefix("user") for a in box.received)
    lost, duplicated = _account(ledger, delivered, [str(i) for i in range(1, 15)])
    assert lost == 0 and duplicated == 0
    assert summary["deliveries"]["sent"] == sum(1 for s, _ in before.values() if s == "queued")
    catalogue("fault", "SMTP server unreachable",
              "the run fails naming the channel (cannot connect); nothing is lost: the "
              f"{summary['deliveries']['sent']} stay queued and the rerun with the run key, "
              "once the server is up, sends each once", messages=14, lost=lost,
              duplicated=duplicated)


def smtp_ws(make_workspace: Any, port: int, timeout: float, rows: int) -> Any:
    """The test workspace sending e-mail through the SMTP server on ``port`` (every tier
    by e-mail; SMS, where a tier asks for it, to the outbox)."""
    return make_workspace({
        "config/herald.yaml": (
            "timezone: UTC\nsources:\n  crm: \"sqlite:///crm.db\"\nchannels:\n"
            f"  email: {{type: smtp, host: 127.0.0.1, port: {port}, security: none, "
            f"sender: shop@example.com, timeout: {timeout:g}}}\n"
            "  sms: {type: outbox, kind: sms}\n"),
        FLOW: PROMO_YAML.replace("default: {channels: [sms, email]}",
                                 "default: {channels: [email]}")}, rows=rows)


class _Answers:
    """An SMTP server answering some recipients with a code of its choosing."""

    def __init__(self, codes: dict[str, str]) -> None:
        self.codes = codes
        self.received: list[str] = []

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,  # noqa: N802
                         options: Any) -> str:
        if address in self.codes:
            return self.codes[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.received.extend(envelope.rcpt_tos)
        return "250 OK"


SMTP_REFUSALS = {
    "SMTP 450 greylisting (deferred 5 minutes)": ("450 4.2.0 greylisted", "deferred"),
    "SMTP 550 mailbox unknown (hard bounce, suppressed)": ("550 5.1.1 no such user",
                                                           "failed"),
    "SMTP 452 mailbox full (retried, then deferred)": ("452 4.2.2 mailbox full", "deferred"),
}


@pytest.mark.parametrize("fault", list(SMTP_REFUSALS))
def test_smtp_refusals_are_recorded_never_lost(fault, make_workspace, catalogue) -> None:
    port = free_port()
    hit = {f"user{i}@example.com" for i in (3, 6, 9, 12)}
    code, status = SMTP_REFUSALS[fault]
    box = _Answers(dict.fromkeys(hit, code))
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        ws = smtp_ws(make_workspace, port, timeout=2, rows=14)
        summary = engine.run_local(ws, "promo", run_key="smtp")
        ledger = _ledger(ws, "smtp")
    finally:
        controller.stop()
    delivered = Counter(a.split("@")[0].removeprefix("user") for a in box.received)
    for address in hit:
        assert ledger[address.split("@")[0].removeprefix("user")][0] == status
    lost, duplicated = _account(ledger, delivered, [str(i) for i in range(1, 15)])
    assert lost == 0 and duplicated == 0
    d = summary["deliveries"]
    catalogue("fault", fault, f"{d['sent']} sent, {d['failed']} failed, {d['deferred']} "
              f"deferred, {d['no_address']} without an address: each with its reason; "
              "nothing sent twice", messages=14, lost=lost, duplicated=duplicated)


def test_settling_waits_out_a_locked_store(make_workspace, hook, caplog, catalogue) -> None:
    """Another process holds the workspace database's write lock for 7 s while the
    provider answers: the answers are recorded once it lets go (each attempt waits 5 s)."""
    import logging

    ws = hook_ws(make_workspace, hook, rows=10)
    for r in range(1, 11):
        hook.script(str(r), ("timeout", 0.6))  # answers after 0.6 s (ok)
    db = ws.root / ".herald" / "herald.db"
    held: list[float] = []

    def locker() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with sqlite3.connect(db, timeout=0.1) as conn:
                    if conn.execute("SELECT count(*) FROM herald_deliveries WHERE status = "
                                    "'sending'").fetchone()[0]:
                        break
            except sqlite3.OperationalError:
                pass
            time.sleep(0.02)
        conn = sqlite3.connect(db, timeout=10, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        held.append(time.monotonic())
        time.sleep(7)
        conn.execute("ROLLBACK")
        conn.close()
        held.append(time.monotonic())

    thread = threading.Thread(target=locker)
    caplog.set_level(logging.WARNING, logger="herald.ledger")
    thread.start()
    summary = engine.run_local(ws, "promo", run_key="locked")
    thread.join()
    ledger = _ledger(ws, "locked")
    assert len(held) == 2 and held[1] - held[0] >= 7
    assert summary["deliveries"]["sent"] == 9 and not any(
        s == "sending" for s, _ in ledger.values())
    assert any("workspace database is locked; recording" in r.getMessage()
               for r in caplog.records)
    lost, duplicated = _account(ledger, Counter(hook.kept()), [str(i) for i in range(1, 11)])
    assert lost == 0 and duplicated == 0
    catalogue("fault", "workspace database locked by another process for 7 s while the "
              "provider answers", "recording the answers retried (each attempt waits 5 s, "
              "at most 6): all 9 with an address recorded sent once the lock went; none "
              "left `sending`", messages=10, lost=lost, duplicated=duplicated)


def test_settling_retries_after_a_postgres_lock_timeout(make_workspace, hook, pg_database,
                                                       caplog, catalogue) -> None:
    """On Postgres a settle gives up waiting for a lock after 5 s (``lock_timeout``) and
    tries again: another session holds the ledger table for 7 s while the provider
    answers, so the first attempt fails and only a retry records the answers."""
    import logging

    from sqlalchemy import create_engine, text

    ws = hook_ws(make_workspace, hook, rows=10, store=pg_database)
    ws.store  # noqa: B018 - the ledger's tables exist before the locker looks at them
    for r in range(1, 11):
        hook.script(str(r), ("timeout", 0.6))  # answers after 0.6 s (ok)
    other = create_engine(pg_database)
    held: list[float] = []

    def locker() -> None:
        deadline = time.monotonic() + 30
        with other.connect() as conn:
            while time.monotonic() < deadline and not conn.execute(text(
                    "SELECT count(*) FROM herald_deliveries WHERE status = 'sending'")
                    ).scalar():
                conn.rollback()
                time.sleep(0.02)
            conn.rollback()
            with conn.begin():
                conn.execute(text("LOCK TABLE herald_deliveries IN EXCLUSIVE MODE"))
                held.append(time.monotonic())
                time.sleep(7)
            held.append(time.monotonic())

    thread = threading.Thread(target=locker)
    caplog.set_level(logging.WARNING, logger="herald.ledger")
    thread.start()
    try:
        summary = engine.run_local(ws, "promo", run_key="pglocked")
    finally:
        thread.join()
    other.dispose()
    ledger = _ledger(ws, "pglocked")
    assert len(held) == 2 and held[1] - held[0] >= 7
    retried = [r.getMessage() for r in caplog.records
               if "workspace database is locked; recording" in r.getMessage()]
    assert retried, "the settle was not retried"
    assert summary["deliveries"]["sent"] == 9 and not any(
        st == "sending" for st, _ in ledger.values())
    lost, duplicated = _account(ledger, Counter(hook.kept()), [str(i) for i in range(1, 11)])
    assert lost == 0 and duplicated == 0
    catalogue("fault", "ledger table (Postgres) locked by another session for 7 s while the "
              "provider answers", "the settle's lock_timeout (5 s) fails the first attempt; "
              f"retried ({len(retried)} warning(s)): all 9 with an address recorded sent; "
              "none left `sending`", messages=10, lost=lost, duplicated=duplicated)


def test_a_database_error_names_the_database_with_its_password_hidden(tmp_path, catalogue
                                                                      ) -> None:
    """The line the CLI prints for a database failing under a command names the database
    (every engine Herald makes notes its URL on its errors), its password hidden."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    from herald.core.db import describe_failure, make_engine

    from .conftest import PG_URL

    url = make_url(PG_URL).set(password="planted-db-password",
                               database="herald_no_such_database")
    source = make_engine(url.render_as_string(hide_password=False), tmp_path)
    with pytest.raises(DBAPIError) as exc, source.connect() as conn:
        conn.execute(text("SELECT 1"))
    source.dispose()
    line = describe_failure(exc.value)
    assert "planted-db-password" not in line
    assert line.startswith(f"the database {url.render_as_string(hide_password=True)}: "), line
    assert "***" in line
    catalogue("secret", "a database failing under a command, its URL holding a password",
              "one line naming the database with the password as ***: "
              + line.split(": ", 1)[0])


class _SlowAfterData:
    """An SMTP relay that scans content: for some recipients it answers after the
    client's timeout, once it has the message (it keeps it)."""

    def __init__(self, slow: set[str], seconds: float) -> None:
        self.received: list[str] = []
        self.slow = slow
        self.seconds = seconds

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        import asyncio

        rcpt = envelope.rcpt_tos[0]
        self.received.append(rcpt)
        if rcpt in self.slow:
            self.slow.discard(rcpt)
            await asyncio.sleep(self.seconds)
        return "250 OK queued as Q1"


def test_smtp_timeout_after_data_is_an_unknown_outcome(make_workspace, catalogue) -> None:
    port = free_port()
    slow = {"user3@example.com", "user9@example.com", "user16@example.com"}
    box = _SlowAfterData(set(slow), 2.5)
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        ws = smtp_ws(make_workspace, port, timeout=1, rows=20)
        first = engine.run_local(ws, "promo", run_key="slow")
        again = engine.run_local(ws, "promo", run_key="slow")
        ledger = _ledger(ws, "slow")
        delivered = Counter(a.split("@")[0].removeprefix("user") for a in box.received)
    finally:
        controller.stop()
    unknown = {"3", "9", "16"}
    for r in unknown:
        assert ledger[r][0] == "sending", ledger[r]
        assert "outcome unknown, not resent" in str(ledger[r][1])
    assert first["deliveries"]["sending"] == 3 and first["deliveries"]["sent"] == 15
    assert again["deliveries"]["sent"] == 0
    # a rerun after the run completed says the three are unknown, not only "nothing to do"
    from herald.flows.engine import nothing_to_do

    said = nothing_to_do(ws, "promo", "slow")
    assert said is not None and "3 with the outcome unknown (`sending`" in said["message"]
    every = [str(i) for i in range(1, 21)]
    lost, duplicated = _account(ledger, delivered, every)
    assert lost == 0 and duplicated == 0 and max(delivered.values()) == 1
    catalogue("fault", "SMTP relay answering after the client's timeout once it has the "
              "data (content scanning)",
              "the 3 left `sending` (outcome unknown, not resent: the relay kept them), "
              "15 sent; the rerun sends nothing; each received once", messages=20,
              lost=lost, duplicated=duplicated)


class _Mailbox:
    def __init__(self, drop_after: int) -> None:
        self.received: list[str] = []
        self.drop_after = drop_after

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        if self.drop_after and len(self.received) == self.drop_after:
            self.drop_after = 0
            server.transport.close()  # the server goes away mid-batch, once
            return "421 closing"
        self.received.append(envelope.rcpt_tos[0])
        return "250 OK"


def test_smtp_server_dropping_mid_batch(make_workspace, catalogue) -> None:
    port = free_port()
    box = _Mailbox(drop_after=7)
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        ws = smtp_ws(make_workspace, port, timeout=5, rows=20)
        summary = engine.run_local(ws, "promo", run_key="drop")
        ledger = _ledger(ws, "drop")
        delivered = Counter(address.split("@")[0].removeprefix("user")
                            for address in box.received)
        every = [str(i) for i in range(1, 21)]
        lost, duplicated = _account(ledger, delivered, every)
        assert lost == 0 and duplicated == 0
        assert summary["deliveries"]["sent"] == 20 - 2  # ids 7 and 14 have no email
        assert len(box.received) == 18
    finally:
        controller.stop()
    catalogue("fault", "SMTP server dropping the connection mid-batch",
              "reconnected and went on; 18 sent once each", messages=20, lost=lost,
              duplicated=duplicated)


@pytest.mark.postgres
def test_workspace_database_connections_killed_mid_run(make_workspace, pg_database,
                                                       catalogue) -> None:
    """Postgres drops the run's connections (a restart, a failover) while it sends."""
    from sqlalchemy import create_engine, text

    ws = make_workspace(rows=400, store=pg_database)
    dbname = pg_database.rsplit("/", 1)[1]
    admin = create_engine(pg_database.rsplit("/", 1)[0] + "/test",
                          isolation_level="AUTOCOMMIT")
    stop = threading.Event()

    def killer() -> None:
        time.sleep(0.3)
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": dbname})
        stop.set()

    thread = threading.Thread(target=killer)
    thread.start()
    first_error: str | None = None
    try:
        engine.run_local(ws, "promo", run_key="pgkill", max_workers=2)
    except Exception as exc:  # the run may fail: what matters is what the rerun finds
        first_error = type(exc).__name__
    thread.join()
    admin.dispose()
    chunks.forget_workspace(ws.root)
    from herald.core.workspace import Workspace

    ws2 = Workspace.open(ws.root)
    chunks.adopt_workspace(ws2)
    for _ in range(5):  # queued rows the kill left are sent by reruns of the run key
        again = engine.run_local(ws2, "promo", run_key="pgkill")
        if not again["deliveries"]["queued"]:
            break
    else:
        raise AssertionError(f"rows still queued after 5 reruns: {again['deliveries']}")
    eng = create_engine(pg_database)
    with eng.connect() as conn:
        statuses = dict(conn.execute(text(
            "SELECT recipient, status FROM herald_deliveries WHERE run_key = 'pgkill'")).all())
    eng.dispose()
    delivered = outbox_recipients(ws2)
    every = [str(i) for i in range(1, 401)]
    lost, duplicated = _account({r: (s, None) for r, s in statuses.items()}, delivered, every)
    assert duplicated == 0 and lost == 0
    assert len(statuses) == 400
    assert all(s in ("sent", "no_address", "sending", "failed") for s in statuses.values())
    catalogue("fault", "workspace database (Postgres) dropping every connection mid-run",
              f"first run: {first_error or 'finished'}; rerun with the same run key "
              "finished; rows caught in flight stay `sending` (never resent blindly)",
              messages=400, lost=lost, duplicated=duplicated)


KILLED_YAML = ("timezone: UTC\nsources:\n  crm: \"sqlite:///crm.db\"\nchannels:\n"
               "  email: {type: outbox, kind: email, rate: 100/s}\n"
               "  sms: {type: outbox, kind: sms, rate: 100/s}\nchunk_size: 50\n")


def test_process_killed_mid_send_then_rerun(make_workspace, catalogue) -> None:
    ws = make_workspace({"config/herald.yaml": KILLED_YAML}, rows=300)
    before, in_flight, lost, duplicated = _killed_mid_send_then_rerun(ws)
    catalogue("fault", "process killed (SIGKILL) mid-send, then rerun",
              f"killed after {before} messages; the rerun sent the rest once; {in_flight} "
              "rows caught in flight stay `sending` for review (never resent blindly)",
              messages=300, lost=lost, duplicated=duplicated)


@pytest.mark.postgres
def test_process_killed_mid_send_on_postgres_then_rerun(make_workspace, pg_database,
                                                        catalogue) -> None:
    """On Postgres a batch's settlement is written while the next batch is marked and
    sent, so a kill can leave two batches in flight: both stay `sending` (outcome
    unknown, never resent), rows not yet marked stay `queued`, and the rerun sends those
    once each."""
    ws = make_workspace({"config/herald.yaml": KILLED_YAML}, rows=300, store=pg_database)
    before, in_flight, lost, duplicated = _killed_mid_send_then_rerun(ws)
    catalogue("fault", "process killed (SIGKILL) mid-send, Postgres workspace database "
              "(settlements written beside the next batch), then rerun",
              f"killed after {before} messages; the rerun sent the rest once; {in_flight} "
              "rows caught in flight stay `sending` for review (never resent blindly)",
              messages=300, lost=lost, duplicated=duplicated)


def _killed_mid_send_then_rerun(ws: Any) -> tuple[int, int, int, int]:
    """Run the campaign in a process killed (SIGKILL) once 60 messages are out, rerun
    it here with the same run key; (messages before the kill, rows left `sending`,
    lost, duplicated), lost and duplicated asserted 0."""
    code = ("import sys; from herald.core.workspace import Workspace; "
            "from herald.flows.engine import run_local; "
            "run_local(Workspace.open(sys.argv[1]), 'promo', run_key='killed')")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ws.root)],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 60
    while outbox_messages(ws) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = outbox_messages(ws)
    assert 0 < before < 298
    chunks.forget_workspace(ws.root)
    from herald.core.workspace import Workspace

    ws2 = Workspace.open(ws.root)
    chunks.adopt_workspace(ws2)
    engine.run_local(ws2, "promo", run_key="killed")
    ledger = _ledger(ws2, "killed")
    delivered = outbox_recipients(ws2)
    every = [str(i) for i in range(1, 301)]
    lost, duplicated = _account(ledger, delivered, every)
    in_flight = sum(1 for s, _ in ledger.values() if s == "sending")
    assert lost == 0 and duplicated == 0
    # every recipient the outbox holds has its row sent or in flight, none queued
    assert all(ledger[r][0] in ("sent", "sending") for r in delivered)
    return before, in_flight, lost, duplicated


def test_worker_process_killed_mid_send_then_rerun(make_workspace, catalogue) -> None:
    """task_runner: processes: one worker killed (SIGKILL) while its chunk sends. The
    run fails saying so; the other worker finishes the batch it had in flight; the
    rerun with the run key sends the rest once each."""
    ws = make_workspace({"config/herald.yaml": SLOW_WORKERS_YAML}, rows=600)
    script = run_script(ws, "wkill")
    proc = subprocess.Popen([sys.executable, str(script), str(ws.root)],
                            stderr=subprocess.PIPE, text=True)
    wait_for_outbox(ws, 60)
    workers = _spawned_workers(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)
    killed = time.monotonic()
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - killed
    before = outbox_messages(ws)
    assert proc.returncode != 0 and "BrokenProcessPool" in err, err[-800:]
    assert 0 < before < 598
    ledger, lost, duplicated, in_flight = _rerun(ws, "wkill", 600)
    assert lost == 0 and duplicated == 0 and len(ledger) == 600
    # at most the killed worker's batches in flight: one per channel (two, of 20 each);
    # the other worker's were settled
    assert in_flight <= 40
    catalogue("fault", "a worker process (task_runner: processes) killed (SIGKILL) "
              "mid-send, then rerun",
              f"the run failed {took:.1f} s later (BrokenProcessPool) after {before} "
              f"messages; the rerun sent the rest once; {in_flight} rows of the killed "
              "worker's batches stay `sending` for review (never resent blindly)",
              messages=600, lost=lost, duplicated=duplicated)


def test_run_process_killed_with_chunks_in_worker_processes(make_workspace,
                                                            catalogue) -> None:
    """task_runner: processes: the run's own process killed (SIGKILL). Its workers end
    at once too (nothing more is sent), so the rerun, resuming the rows still `queued`,
    races no worker still sending them."""
    ws = make_workspace({"config/herald.yaml": SLOW_WORKERS_YAML}, rows=600)
    script = run_script(ws, "rkill")
    proc = subprocess.Popen([sys.executable, str(script), str(ws.root)])
    wait_for_outbox(ws, 60)
    workers = _spawned_workers(proc.pid)
    assert len(workers) == 2, workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = time.monotonic()
    while any(Path(f"/proc/{w}").exists() and "Z" not in process_state(w) for w in workers) \
            and time.monotonic() - killed < 5:
        time.sleep(0.01)
    gone = time.monotonic() - killed
    assert gone < 1, f"workers still running {gone:.1f} s after their run's process died"
    before = outbox_messages(ws)
    time.sleep(0.5)
    assert outbox_messages(ws) == before  # nothing more was sent
    assert 0 < before < 598
    ledger, lost, duplicated, in_flight = _rerun(ws, "rkill", 600)
    assert lost == 0 and duplicated == 0 and len(ledger) == 600
    catalogue("fault", "the run's process killed (SIGKILL) with chunks in two worker "
              "processes (task_runner: processes), then rerun",
              f"both workers ended {gone:.2f} s after it, nothing more sent (stopped at "
              f"{before} messages); the rerun sent the rest once; {in_flight} rows caught "
              "in flight stay `sending` for review (never resent blindly)",
              messages=600, lost=lost, duplicated=duplicated)


def _rerun(ws: Any, run_key: str, n: int
           ) -> tuple[dict[str, tuple[str, str | None]], int, int, int]:
    """After an interrupted run in another process: the rerun of ``run_key`` here, on
    threads; its ledger, (lost, duplicated) over recipients 1..n, and the rows still
    `sending`."""
    from herald.core.workspace import Workspace

    chunks.forget_workspace(ws.root)
    again = Workspace.open(ws.root)
    try:
        chunks.adopt_workspace(again)
        engine.run_local(again, "promo", run_key=run_key, runner=TaskRunnerSpec())
        ledger = _ledger(again, run_key)
        lost, duplicated = _account(ledger, outbox_recipients(again), [str(i) for i in
                                                                 range(1, n + 1)])
    finally:
        chunks.forget_workspace(again.root)
        again.dispose()
    return ledger, lost, duplicated, sum(1 for s, _ in ledger.values() if s == "sending")


def _spawned_workers(pid: int) -> list[int]:
    """The worker processes a run's process spawned (not multiprocessing's resource
    tracker), read from /proc."""
    return child_processes(pid, "spawn_main")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_stop_signal_takes_no_new_batch_and_says_how_to_resume(sig, make_workspace,
                                                               catalogue) -> None:
    ws = make_workspace({"config/herald.yaml": (
        "timezone: UTC\nsources:\n  crm: \"sqlite:///crm.db\"\nchannels:\n"
        "  email: {type: outbox, kind: email, rate: 100/s, batch_size: 20}\n"
        "  sms: {type: outbox, kind: sms, rate: 100/s, batch_size: 20}\n"
        "chunk_size: 100\nmax_workers: 2\n")}, rows=600)
    code = ("import sys; from herald.core.workspace import Workspace; "
            "from herald.flows import engine; "
            "ws = Workspace.open(sys.argv[1])\n"
            "with engine.stop_on_signals():\n"
            "    engine.run_local(ws, 'promo', run_key='stop')")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ws.root)],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while outbox_messages(ws) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    signalled = time.monotonic()
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - signalled
    before = outbox_messages(ws)
    assert proc.returncode != 0 and took < 5, (proc.returncode, took)
    assert "herald run promo --run-key stop" in err and "stopped by" in err, err[-500:]
    assert before < 400  # it stopped well before the end (598 have an address)
    first = _ledger(ws, "stop")
    assert not any(s == "sending" for s, _ in first.values())  # in flight: settled
    from herald.reporting import runs as run_views

    (stopped,) = run_views.list_runs(ws, "promo")  # counted from its rows: no summary
    assert (stopped["status"], stopped["sent"], stopped["recipients"]) == (
        "failed", before, 600), stopped
    chunks.forget_workspace(ws.root)
    from herald.core.workspace import Workspace

    ws2 = Workspace.open(ws.root)
    chunks.adopt_workspace(ws2)
    engine.run_local(ws2, "promo", run_key="stop")
    ledger = _ledger(ws2, "stop")
    delivered = outbox_recipients(ws2)
    lost, duplicated = _account(ledger, delivered, [str(i) for i in range(1, 601)])
    assert lost == 0 and duplicated == 0 and len(ledger) == 600
    assert sum(1 for s, _ in ledger.values() if s == "sent") == len(delivered)
    with sqlite3.connect(ws.root / ".herald" / "herald.db") as conn:
        runs = [s for (s,) in conn.execute("SELECT status FROM herald_runs ORDER BY "
                                           "started_at")]
    assert runs == ["failed", "completed"]
    ws2.dispose()
    catalogue("fault", f"{sig.name} during a run (600 recipients, 2 chunks in flight)",
              f"no new batch after it; exited {proc.returncode} in {took:.1f} s after "
              f"{before} messages, saying `herald run promo --run-key stop` resumes; the "
              "rerun sent the rest once each", messages=600, lost=lost,
              duplicated=duplicated)


@pytest.mark.prefect
@pytest.mark.parametrize("group", [False, True], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_to_herald_run_under_prefect(make_workspace, catalogue, group) -> None:
    """The same through the command line and its Prefect flow run (a temporary server).
    Ctrl-C in a terminal signals the whole process group: the temporary server, in a
    session of its own, does not hear it and the run finishes its batches in flight
    against it (before, the server died with it, and the run spent minutes retrying)."""
    ws = make_workspace({"config/herald.yaml": (
        "timezone: UTC\nsources:\n  crm: \"sqlite:///crm.db\"\nchannels:\n"
        "  email: {type: outbox, kind: email, rate: 50/s, batch_size: 10}\n"
        "  sms: {type: outbox, kind: sms, rate: 50/s, batch_size: 10}\n"
        "chunk_size: 100\nmax_workers: 2\n")}, rows=600)
    herald = Path(sys.executable).parent / "herald"
    proc = subprocess.Popen([str(herald), "run", "promo", "--run-key", "term", "-w",
                             str(ws.root)], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, start_new_session=group)
    deadline = time.monotonic() + 120
    while outbox_messages(ws) < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    if group:  # as a terminal's Ctrl-C: SIGINT to every process of the foreground group
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - signalled
    before = outbox_messages(ws)
    assert proc.returncode == 1 and took < 10, (proc.returncode, took, err[-800:])
    said = " ".join(err.split())
    assert "herald run promo --run-key term" in said, err[-800:]
    assert f"stopped by {'SIGINT' if group else 'SIGTERM'}" in said, err[-800:]
    assert "ConnectError" not in said and "Traceback" not in said, err[-800:]
    assert 30 <= before < 400
    assert not any(s == "sending" for s, _ in _ledger(ws, "term").values())
    chunks.forget_workspace(ws.root)
    from herald.core.workspace import Workspace

    ws2 = Workspace.open(ws.root)
    chunks.adopt_workspace(ws2)
    engine.run_local(ws2, "promo", run_key="term")  # what the error line says to run
    ledger = _ledger(ws2, "term")
    lost, duplicated = _account(ledger, outbox_recipients(ws2), [str(i) for i in range(1, 601)])
    assert lost == 0 and duplicated == 0
    ws2.dispose()
    catalogue("fault", ("Ctrl-C (SIGINT to the process group, Prefect's temporary server "
                        "included)" if group else "SIGTERM") + " to `herald run` (under its "
              "Prefect flow run)",
              f"exit 1 in {took:.1f} s after {before} messages, the error line naming "
              "`herald run promo --run-key term`; no row left `sending`; the rerun sent the "
              "rest once each", messages=600, lost=lost, duplicated=duplicated)


@pytest.mark.prefect
def test_sigterm_to_herald_run_before_sending(make_workspace, catalogue) -> None:
    """A signal before any chunk began (Prefect's temporary server starting, the audience
    being built) ends `herald run` without waiting for the rest of the start, the
    segment's statement included: nothing was reserved or sent, the run is recorded
    failed, and the rerun sends to each once."""
    # a segment that would take minutes (a recursive count) keeps the run in its build
    slow = ("WITH RECURSIVE burn(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM burn "
            "WHERE x < 300000000)\nSELECT id, name, email, phone, tier, locale, score\n"
            "FROM people WHERE score >= :min_score AND (SELECT count(*) FROM burn) > 0")
    ws = make_workspace({"audiences/people.sql": slow}, rows=200)
    herald = Path(sys.executable).parent / "herald"
    proc = subprocess.Popen([str(herald), "run", "promo", "--run-key", "early", "-w",
                             str(ws.root)], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    database = ws.root / ".herald" / "herald.db"

    def recorded() -> list[tuple[str, str | None]]:
        if not database.exists():
            return []
        try:
            with closing(sqlite3.connect(database, timeout=5)) as conn:
                return conn.execute("SELECT status, error FROM herald_runs WHERE "
                                    "run_key = 'early'").fetchall()
        except sqlite3.OperationalError:  # the schema not made yet
            return []

    deadline = time.monotonic() + 120
    while not recorded() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - signalled
    said = " ".join(err.split())
    assert proc.returncode == 1 and took < 10, (proc.returncode, took, err[-800:])
    assert "stopped by SIGTERM before sending: nothing was sent" in said, err[-800:]
    assert "herald run promo --run-key early" in said, err[-800:]
    assert recorded() == [("failed", "stopped by a signal while the audience was built: "
                                     "nothing was sent")]
    assert outbox_messages(ws) == 0 and _ledger(ws, "early") == {}
    chunks.forget_workspace(ws.root)
    from herald.core.workspace import Workspace

    # the rerun, with the segment's count made quick
    segment = ws.root / "audiences" / "people.sql"
    segment.write_text(slow.replace("300000000", "3"))
    ws2 = Workspace.open(ws.root)
    chunks.adopt_workspace(ws2)
    engine.run_local(ws2, "promo", run_key="early")  # what the error line says to run
    ledger = _ledger(ws2, "early")
    lost, duplicated = _account(ledger, outbox_recipients(ws2),
                                [str(i) for i in range(1, 201)])
    assert lost == 0 and duplicated == 0 and len(ledger) == 200
    ws2.dispose()
    catalogue("fault", "SIGTERM to `herald run` before sending (its audience being built)",
              f"exit 1 {took:.1f} s after it (the segment's statement stopped), saying "
              "nothing was sent and how to run it again; the run recorded failed with that "
              "reason; the rerun sent to each once", messages=200, lost=lost,
              duplicated=duplicated)


def test_process_killed_during_the_audience_build(make_workspace, catalogue) -> None:
    """SIGKILL while the package is being built: the next run closes the abandoned run
    with a reason, removes the half-built package and its rows, and sends once each."""
    ws = make_workspace({"config/herald.yaml": HERALD_YAML.replace("chunk_size: 40",
                                                                   "chunk_size: 1000")},
                        rows=8_000)
    code = ("import sys; from herald.core.workspace import Workspace; "
            "from herald.flows.engine import run_local; "
            "run_local(Workspace.open(sys.argv[1]), 'promo', run_key='build')")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ws.root)])
    db = ws.root / ".herald" / "herald.db"
    deadline = time.monotonic() + 60
    building = 0
    while time.monotonic() < deadline and not building:
        time.sleep(0.02)
        try:
            with sqlite3.connect(db) as conn:
                building = conn.execute("SELECT count(*) FROM herald_packages WHERE "
                                        "status = 'building'").fetchone()[0]
        except sqlite3.OperationalError:
            continue
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert building and outbox_messages(ws) == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT status FROM herald_runs").fetchall() == [("running",)]
    chunks.forget_workspace(ws.root)
    from herald.core.workspace import Workspace

    ws2 = Workspace.open(ws.root)
    chunks.adopt_workspace(ws2)
    # the next run (here of the 800 with score 9, to keep the test short) tidies up
    summary = engine.run_local(ws2, "promo", {"min_score": 9}, run_key="build")
    with sqlite3.connect(db) as conn:
        runs = conn.execute("SELECT status, error FROM herald_runs ORDER BY started_at"
                            ).fetchall()
        orphans = conn.execute("SELECT count(*) FROM herald_package_rows WHERE package_id "
                               "NOT IN (SELECT id FROM herald_packages WHERE status = "
                               "'ready')").fetchone()[0]
        left = conn.execute("SELECT count(*) FROM herald_packages WHERE status = 'building'"
                            ).fetchone()[0]
    assert runs[0][0] == "failed" and "abandoned: the process running it" in runs[0][1]
    assert runs[1][0] == "completed" and orphans == 0 and left == 0
    ledger = _ledger(ws2, "build")
    delivered = outbox_recipients(ws2)
    lost, duplicated = _account(ledger, delivered, [str(i) for i in range(9, 8_001, 10)])
    assert len(ledger) == 800
    assert lost == 0 and duplicated == 0 and summary["deliveries"]["sent"] == len(delivered)
    ws2.dispose()
    catalogue("fault", "process killed (SIGKILL) during the audience build",
              "the next run closed the abandoned run as failed with the reason, removed the "
              "half-built package and its rows, and sent to each once", messages=800,
              lost=lost, duplicated=duplicated)


# -- secrets --------------------------------------------------------------------------------
PLANTED = "s3cr3t-Planted-7Qx"


@pytest.mark.prefect
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
def test_planted_secrets_never_leak(make_workspace, hook, capsys, caplog, monkeypatch,
                                    prefect_harness, catalogue) -> None:
    """Secrets from ${ENV} (an SMTP password the server refuses, a webhook signing key)
    appear nowhere: logs, CLI output, run summary, report, artifacts, state messages,
    the ledger and every other table, the outbox, what the HTTP endpoint received."""
    import asyncio
    import logging

    from aiosmtpd.smtp import AuthResult, LoginPassword
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    def refuse(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        return AuthResult(success=isinstance(data, LoginPassword) and data.password == b"x",
                          handled=False)

    port = free_port()
    controller = Controller(_Mailbox(0), hostname="127.0.0.1", port=port,
                            authenticator=refuse, auth_required=True, auth_require_tls=False)
    controller.start()
    monkeypatch.setenv("HERALD_TEST_SMTP_PASSWORD", PLANTED)
    monkeypatch.setenv("HERALD_TEST_HOOK_SECRET", PLANTED + "-hook")
    caplog.set_level(logging.DEBUG)
    try:
        ws = make_workspace({
            "config/herald.yaml": (
                "timezone: UTC\nsources:\n  crm: \"sqlite:///crm.db\"\nchannels:\n"
                f"  email: {{type: smtp, host: 127.0.0.1, port: {port}, security: none, "
                "username: shop, password: \"${HERALD_TEST_SMTP_PASSWORD}\", "
                "sender: shop@example.com, timeout: 5}\n"
                f"  hook: {{type: webhook, url: \"{hook.url}/send\", address: phone, "
                "secret: \"${HERALD_TEST_HOOK_SECRET}\"}\n"),
            FLOW: PROMO_YAML.replace("gold: {channels: [email, sms]}",
                                     "gold: {channels: [email]}").replace(
                "default: {channels: [sms, email]}", "default: {channels: [hook]}"),
            "templates/promo/default.webhook.txt.j2": "Hello {{ name }}"}, rows=30)
        texts: list[str] = []
        codes = []
        for args in (["run", "promo", "--json", "--run-key", "leak"], ["report", "--json"],
                     ["report"], ["validate"], ["suppress", "list"]):
            with pytest.raises(SystemExit) as done:
                main([*args, "-w", str(ws.root)])
            codes.append(done.value.code)
            out, err = capsys.readouterr()
            texts += [out, err]
        # the refused password stops the e-mail channel: the run fails, the hook sends
        assert codes[0] == 1 and "channel email stopped (authentication failed" in texts[1]
        statuses = [s for s, _ in _ledger(ws, "leak").values()]
        assert "queued" in statuses and "sent" in statuses
    finally:
        controller.stop()

    texts += [r.getMessage() + (str(r.exc_info) if r.exc_info else "") for r in caplog.records]

    async def prefect_side() -> list[str]:
        async with get_client() as client:
            (run,) = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=["promo/leak"])))
            artifacts = await client.read_artifacts()
            logs = await client.read_logs()
        return [str(run.state), *(str(a.data) + str(a.description) for a in artifacts),
                *(log.message for log in logs)]

    texts += asyncio.run(prefect_side())
    with sqlite3.connect(ws.root / ".herald" / "herald.db") as conn:
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            texts += [repr(row) for row in conn.execute(f'SELECT * FROM "{table}"')]
    texts += [p.read_text(errors="replace") for p in outbox_files(ws)]
    texts += [r.body.decode(errors="replace") + repr(r.headers) for r in hook.requests]
    scanned = "\n".join(texts)
    assert "authentication failed" in scanned  # the failure itself is reported...
    assert PLANTED not in scanned  # ...without the password or the signing key
    # contact details in logs only masked: no e-mail address or phone number in any log
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert "@example.com" not in logs and "+1415555" not in logs
    catalogue("secret", "SMTP password and webhook signing key from ${ENV}, with the SMTP "
              "server refusing the password",
              f"not found in {len(texts)} scanned texts: CLI output, logs, Prefect state, "
              "artifacts and logs, every table of the workspace database, the outbox, the "
              "HTTP requests; no contact detail in any log")


# -- with Prefect (last: the harness routes logs to its API from here on) ----------------
@pytest.mark.prefect
def test_render_errors_of_a_run_key_resent_after_the_fix(make_workspace, prefect_harness,
                                                         capsys, catalogue) -> None:
    ws = make_workspace({"templates/promo/gold.email.txt.zh.j2":
                         "{{ '{missing}'.format(x=1) }}"}, rows=40)

    def run(*extra: str) -> dict[str, Any]:
        with pytest.raises(SystemExit) as exc:
            main(["run", "promo", "--json", "--run-key", "fixme", *extra, "-w", str(ws.root)])
        out, err = capsys.readouterr()
        assert exc.value.code == 0, err
        return dict(json.loads(out))

    first = run()
    failing = {"4", "8", "12", "16", "20", "24", "32", "36", "40"}  # gold, zh, with email
    assert first["deliveries"]["render_error"] == len(failing)
    sent_before = outbox_recipients(ws)
    (ws.root / "templates/promo/gold.email.txt.zh.j2").write_text("金卡会员 {{ name }}")
    again = run()  # a plain rerun does not touch them: the run key is complete
    assert again["status"] == "nothing_to_do" and outbox_recipients(ws) == sent_before
    second = run("--resend-render-errors")
    assert second["deliveries"]["sent"] == len(failing)
    assert second["deliveries"]["render_error"] == 0
    ledger = _ledger(ws, "fixme")
    delivered = outbox_recipients(ws)
    assert max(delivered.values()) == 1 and set(delivered) - set(sent_before) == failing
    assert all(s != "render_error" for s, _ in ledger.values())
    lost, duplicated = _account(ledger, delivered, [str(i) for i in range(1, 41)])
    assert lost == 0 and duplicated == 0
    catalogue("input", "render errors of a run key resent after fixing the template",
              "`herald run --run-key K --resend-render-errors` sent the 9 who had "
              "render_error, once each, and nobody else", messages=40, lost=lost,
              duplicated=duplicated)


def test_the_report_says_why_rows_wait_and_until_when(make_workspace, hook) -> None:
    """`herald report` listed reasons only for rows that will never be sent: a deferred
    row's provider answer and its time, a row queued by a stopped channel and one left
    `sending` (outcome unknown) were counted without a word."""
    from herald.reporting.runs import key_report

    ws = hook_ws(make_workspace, hook)
    hook.script("3", *[("status", 503)] * 3)
    engine.run_local(ws, "promo", run_key="waits")
    report = key_report(ws, "promo", "waits")
    waiting = [r for r in report["reasons"] if r["status"] == "deferred"]
    assert len(waiting) == 1 and waiting[0]["count"] == 1 and "HTTP 503" in waiting[0]["reason"]
    until = datetime.fromisoformat(report["deferred_until"])
    assert f"deferred to {until:%Y-%m-%d %H:%M:%S} UTC" in waiting[0]["reason"]
    assert until > engine.clock.now() + timedelta(seconds=50)


def test_a_long_retry_after_pauses_the_channel_instead_of_asking_again(make_workspace,
                                                                       hook) -> None:
    """A 429 asking for 120 s held back only the message it answered: every other
    message was still requested (and refused) at once. Now the channel sends nothing
    until then: the rest are deferred past that time without a request, and the rerun
    after it sends everyone once."""
    ws = hook_ws(make_workspace, hook, settings=", concurrency: 1")
    every = [str(i) for i in range(1, 21)]
    hook.script("3", ("status", 429, {"Retry-After": "120"}))
    for r in every[3:]:
        hook.script(r, ("status", 429, {"Retry-After": "120"}))  # what the rest would get
    summary = engine.run_local(ws, "promo", run_key="pause")
    ledger = _ledger(ws, "pause")
    asked = Counter(str(r.json()["recipient"]) for r in hook.requests)
    assert asked["3"] == 1 and sum(asked[r] for r in every[3:]) == 0, asked
    assert summary["deliveries"]["sent"] == 2  # 1 and 2, before the 429
    held = [r for r in every[2:] if ledger[r][0] != "no_address"]
    assert all(ledger[r][0] == "deferred" for r in held), ledger
    assert "the provider asked the channel to wait" in str(ledger["4"][1])


def test_a_long_retry_after_pauses_the_channel_in_every_worker_process(
        make_workspace, hook, store_url) -> None:
    """The pause after a 429 asking for 120 s held only the chunk that was told: with
    chunks in two worker processes, every chunk after it asked again (and was refused,
    counting against the account) before pausing itself. Now the channel's shared rate
    limit carries the pause: once told, no process asks until then."""
    ws = hook_ws(make_workspace, hook, rows=80, store=store_url, chunk_size=8,
                 settings=", concurrency: 1, rate: 20/s",
                 config="max_workers: 2\ntask_runner: {type: processes, workers: 2}\n")
    every = [str(i) for i in range(1, 81)]
    for r in every:  # what anyone asked after the pause began would get
        hook.script(r, ("status", 429, {"Retry-After": "120"}))
    summary = engine.run_local(ws, "promo", run_key="pause")
    ledger = _ledger(ws, "pause")
    asked = [str(r.json()["recipient"]) for r in hook.requests]
    assert summary["deliveries"]["sent"] == 0
    # the first answer paused the channel; the other process may have claimed its next
    # slice (two messages at 20/s) before the pause was written, and nobody asks more
    assert 1 <= len(asked) <= 3, asked
    held = [r for r in every if ledger[r][0] not in ("no_address", "held_out")]
    assert len(held) > 40 and all(ledger[r][0] == "deferred" for r in held), ledger
    waited = [r for r in held if r not in asked]
    assert all("the provider asked the channel to wait (HTTP 429" in str(ledger[r][1])
               for r in waited), ledger
