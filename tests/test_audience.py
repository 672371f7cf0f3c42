"""Audience packages: streamed builds, manifests, duplicates, parameters, exports."""

from __future__ import annotations

import csv
import hashlib
import json
import re

import pyarrow.parquet as pq
import pytest

from herald.audiences import builder, export, sql, store
from herald.core.errors import AudienceError, WorkspaceError

from .helpers import PROMO_YAML, people


def build(ws, params=None):
    flow = ws.flow("promo")
    return builder.build(ws, flow, sql.load_segment(ws, flow, params))


def test_manifest_records_what_was_built(make_workspace) -> None:
    ws = make_workspace(rows=250)
    package = build(ws, {"min_score": 5})
    sql = (ws.root / "audiences/people.sql").read_text().strip()
    assert package.sql_sha256 == hashlib.sha256(sql.encode()).hexdigest()
    assert package.params == {"min_score": 5}
    assert package.size == 125  # scores 5..9 of 0..9
    expected: dict[str, int] = {}
    for person in people(250):
        if person["score"] >= 5:
            expected[person["tier"]] = expected.get(person["tier"], 0) + 1
    assert package.tiers == dict(sorted(expected.items()))
    assert sum(package.tiers.values()) == package.size
    assert package.columns == ["id", "name", "email", "phone", "tier", "locale", "score"]
    assert store.count_rows(ws, package.id) == 125
    again = store.get(ws, package.id)
    assert again.manifest() == package.manifest()
    assert [p.id for p in store.list_packages(ws)] == [package.id]


def test_tier_counts_match_rows(make_workspace) -> None:
    ws = make_workspace(rows=100)
    package = build(ws)
    rows = list(store.iter_rows(ws, package.id, batch=7))
    assert [r.seq for r in rows] == list(range(100))
    counted: dict[str, int] = {}
    for r in rows:
        counted[r.tier] = counted.get(r.tier, 0) + 1
    assert counted == package.tiers == {"bronze": 50, "gold": 25, "silver": 25}


def test_packages_are_snapshots(make_workspace) -> None:
    ws = make_workspace(rows=30)
    first = build(ws)
    import sqlite3

    with sqlite3.connect(ws.root / "crm.db") as conn:
        conn.execute("DELETE FROM people WHERE id > 10")
    second = build(ws)
    assert (first.size, second.size) == (30, 10)
    assert store.count_rows(ws, first.id) == 30  # the earlier package is unchanged


def test_duplicate_keys_are_an_error_not_a_double_send(make_workspace) -> None:
    ws = make_workspace({"audiences/people.sql":
                         "SELECT * FROM people WHERE score >= :min_score\n"
                         "UNION ALL SELECT * FROM people WHERE id = 3"}, rows=20)
    with pytest.raises(AudienceError, match=r"audiences/people.sql: duplicate key '3'"):
        build(ws)
    assert store.list_packages(ws) == []  # nothing half-written is left behind


def test_missing_and_unknown_parameters(make_workspace) -> None:
    ws = make_workspace({"config/flows/promo.yaml": """\
        name: promo
        audience: {source: crm, segment: people, key: id, tier: tier}
        tiers: {default: {channels: [sms]}}
        """})
    with pytest.raises(AudienceError, match=r"people.sql: parameter :min_score not given"):
        build(ws)
    with pytest.raises(AudienceError, match=r"unknown parameter dayz \(the SQL uses: "
                                            r"min_score\)"):
        build(ws, {"min_score": 1, "dayz": 3})


def test_parameters_are_bound_never_formatted(make_workspace) -> None:
    ws = make_workspace(rows=20)
    evil = "0; DROP TABLE people; --"
    package = build(ws, {"min_score": evil})
    # SQLite compares the text value with the integer column: no row matches, the
    # statement was not split, and the table is still there.
    assert package.size == 0
    assert build(ws, {"min_score": 0}).size == 20


def test_missing_key_column_and_null_keys(make_workspace) -> None:
    ws = make_workspace({"audiences/people.sql":
                         "SELECT id AS pid, name, tier FROM people WHERE score >= :min_score"})
    with pytest.raises(AudienceError, match=r"no column 'id' \(audience.key"):
        build(ws)
    ws = make_workspace({"audiences/people.sql":
                         "SELECT CASE WHEN id = 4 THEN NULL ELSE id END AS id, name, tier "
                         "FROM people WHERE score >= :min_score"}, folder="ws2")
    with pytest.raises(AudienceError, match=r"row 4 has NULL in key column 'id'"):
        build(ws)


def test_failing_sql_names_the_file(make_workspace) -> None:
    ws = make_workspace({"audiences/people.sql": "SELECT nope FROM people WHERE 1 = :min_score"})
    with pytest.raises(AudienceError, match=r"audiences/people.sql: the query failed: "
                                            r"no such column: nope"):
        build(ws)


def test_dialect_variant_is_preferred(make_workspace) -> None:
    ws = make_workspace({"audiences/people.sqlite.sql":
                         "SELECT * FROM people WHERE score >= :min_score AND id <= 5"})
    assert build(ws).size == 5
    with pytest.raises(WorkspaceError, match=r"segment 'gone' not found"):
        ws.segment_file("gone", "sqlite")


def test_export_csv_and_parquet(make_workspace, tmp_path) -> None:
    ws = make_workspace(rows=60)
    package = build(ws)
    assert export.export(ws, package.id, tmp_path / "out/a.csv") == 60
    with (tmp_path / "out/a.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 60 and rows[6]["email"] == "" and rows[0]["email"] == "user1@example.com"
    assert export.export(ws, package.id, tmp_path / "a.parquet") == 60
    table = pq.read_table(tmp_path / "a.parquet")
    assert table.num_rows == 60
    assert table.column_names == package.columns
    assert table.column("score").to_pylist()[:3] == [1, 2, 3]
    with pytest.raises(WorkspaceError, match=r"export to .csv or .parquet"):
        export.export(ws, package.id, tmp_path / "a.xlsx")
    assert not list(tmp_path.glob("*.part"))


def test_rows_keep_their_values(make_workspace) -> None:
    ws = make_workspace(rows=10)
    package = build(ws)
    first = store.read(ws, package.id, 0, 1)[0]
    assert first.key == "1"
    assert first.data == {"id": 1, "name": "User 1", "email": "user1@example.com",
                          "phone": "+14155550001", "tier": "silver", "locale": "en_US",
                          "score": 1}
    assert json.loads(json.dumps(first.data)) == first.data


def test_a_byte_order_mark_before_the_segment_sql_is_ignored(make_workspace) -> None:
    ws = make_workspace({"audiences/people.sql": "\ufeffSELECT id, name, email, phone, "
                         "tier, locale, score FROM people WHERE score >= :min_score\n"})
    segment = sql.load_segment(ws, ws.flow("promo"))
    assert segment.sql.startswith("SELECT id")
    assert build(ws).size == 100


def test_colons_in_comments_and_strings_are_not_parameters(make_workspace, store_url,
                                                          capsys) -> None:
    """Only a ``:name`` in the statement binds: a JSON literal, a time in a string and a
    comment keep their colons, in builds (inside SQLite, streamed into Postgres),
    validation and previews, and the package's hash is the file's as written."""
    from herald.flows.cli import main

    query = ("-- the last :days of orders, see :note\n"
             "SELECT id, name, email, phone, tier, locale, score,\n"
             "       '{\"vip\":true}' AS attrs, 'at :noon' AS slot /* :later */\n"
             "FROM people WHERE score >= :min_score ORDER BY id\n")
    ws = make_workspace({"audiences/people.sql": query}, rows=5, store=store_url)
    segment = sql.load_segment(ws, ws.flow("promo"))
    assert set(segment.params) == {"min_score"}
    assert segment.sha256 == hashlib.sha256(query.strip().encode()).hexdigest()
    package = build(ws)
    row = next(iter(store.read(ws, package.id)))
    assert (row.data["attrs"], row.data["slot"]) == ('{"vip":true}', "at :noon")
    with pytest.raises(SystemExit) as exit_:
        main(["validate", "-w", str(ws.root)])
    assert (exit_.value.code, "9 columns") == (0, re.search(r"\d+ columns",
                                                           capsys.readouterr().out)[0])
    with pytest.raises(SystemExit):
        main(["preview", "promo", "--json", "-w", str(ws.root)])
    assert json.loads(capsys.readouterr().out)[0]["recipient"] == "1"


# A segment with list parameters: `IN :name` takes a list, one bound value per item.
LISTED_SQL = ("SELECT id, name, email, phone, tier, locale, score FROM people\n"
              "WHERE score >= :min_score AND id IN :ids AND tier NOT IN :tiers\n"
              "ORDER BY id\n")
LISTED = {"audiences/people.sql": LISTED_SQL,
          "config/flows/promo.yaml": PROMO_YAML.replace(
              "{min_score: 0}", "{min_score: 0, ids: [1, 2, 3, 4, 5], tiers: [gold]}")}


def test_a_list_parameter_binds_as_in(make_workspace, store_url, capsys) -> None:
    """From the flow's YAML and from -p: a list is bound item by item for ``IN :ids``
    (every way a package is built: inside SQLite, streamed into Postgres), in builds,
    previews and runs."""
    from herald.flows.cli import main
    from herald.flows.engine import run_local

    from .helpers import ledger_rows

    ws = make_workspace(LISTED, rows=20, store=store_url)
    package = build(ws)
    assert package.params == {"min_score": 0, "ids": [1, 2, 3, 4, 5], "tiers": ["gold"]}
    assert [r.key for r in store.read(ws, package.id)] == ["1", "2", "3", "5"]  # 4: gold
    assert build(ws, {"ids": [7, 8], "tiers": ["nobody", "silver"]}).size == 2
    with pytest.raises(SystemExit):
        main(["audience", "build", "promo", "-p", "ids=[10, 11, 13]", "-p",
              "tiers=[bronze]", "--json", "-w", str(ws.root)])
    built = json.loads(capsys.readouterr().out)
    assert (built["params"]["ids"], built["size"]) == ([10, 11, 13], 1)  # 13 is silver
    with pytest.raises(SystemExit):
        main(["preview", "promo", "-p", "ids=[1, 2, 3]", "--tier", "bronze", "--json",
              "-w", str(ws.root)])
    assert [s["recipient"] for s in json.loads(capsys.readouterr().out)] == ["2", "3"]
    run_local(ws, "promo", {"ids": [6, 9]}, run_key="listed")
    assert sorted(ledger_rows(ws, "status")) == ["6", "9"]


@pytest.mark.parametrize(("where", "params", "message"), [
    ("id = :ids", {"ids": [1, 2]},
     "people.sql: parameter :ids is a list, which binds only as IN :ids (written without "
     "parentheses"),
    ("id IN (:ids)", {"ids": [1]}, "parameter :ids is a list, which binds only as IN :ids"),
])
def test_a_list_used_elsewhere_than_in_is_refused(make_workspace, where, params,
                                                   message) -> None:
    ws = make_workspace({"audiences/people.sql": f"SELECT * FROM people WHERE {where} AND "
                         "score >= :min_score"})
    with pytest.raises(AudienceError, match=re.escape(message)):
        build(ws, params)
    assert store.list_packages(ws) == []


def test_list_parameters_that_cannot_be_are_refused_by_name(make_workspace, capsys) -> None:
    from herald.core.errors import ConfigError
    from herald.flows.cli import main

    ws = make_workspace({**LISTED, "config/flows/promo.yaml": PROMO_YAML.replace(
        "{min_score: 0}", "{min_score: 0, ids: [], tiers: {a: 1}}")})
    with pytest.raises(ConfigError) as caught:
        ws.flow("promo")
    assert [str(p) for p in caught.value.problems] == [
        "config/flows/promo.yaml:6 audience.params.ids: an empty list would select nobody: "
        "give one value or more",
        "config/flows/promo.yaml:6 audience.params.tiers: a parameter is a number, a text, "
        "true or false, or a list of them for IN :name, not a mapping"]
    for value, why in (("[]", "an empty list would select nobody"),
                       ("[[1], 2]", "a list of numbers, texts, true or false, not of lists"),
                       ("{a: 1}", "not a mapping")):
        with pytest.raises(SystemExit) as exc:
            main(["audience", "build", "promo", "-p", f"ids={value}", "-w", str(ws.root)])
        err = " ".join(capsys.readouterr().err.split())
        assert exc.value.code == 2 and "Invalid value for -p: ids: " in err and why in err
