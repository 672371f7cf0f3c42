"""``herald report``: conversions in the terminal and as JSON, the HTML file, write-back."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from herald.delivery import run_records
from herald.flows.engine import run_local

from .helpers import HERALD_YAML, fill_people
from .test_cli import cli
from .test_results import FILES, LEDGER, ORDERS, write_ledger, write_orders

WRITEBACK = HERALD_YAML + "writeback: {source: crm, prefix: an_}\n"


def recorded_run(ws, run_key: str = "k1") -> None:
    run_records.start_run(ws.store, "run-1", "promo", run_key, False)
    write_ledger(ws, LEDGER, run_key)
    run_records.finish_run(ws.store, "run-1", "completed", None)


@pytest.fixture
def reported(make_workspace):
    ws = make_workspace(FILES)
    write_orders(ws, ORDERS)
    recorded_run(ws)
    return ws


def test_report_json_carries_the_conversions(reported, capsys) -> None:
    code, out, _ = cli(capsys, "report", "promo", "-w", str(reported.root), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["deliveries"]["sent"] == 24 and data["deliveries"]["held_out"] == 9
    conversion = data["conversion"]
    assert conversion["total"]["contacted"]["converted"] == 6
    assert conversion["total"]["held_out"]["converted"] == 1
    assert [t["name"] for t in conversion["by_tier"]] == ["gold", "silver", "bronze",
                                                         "platinum"]
    assert "html" not in data


def test_report_tables_in_the_terminal(reported, capsys) -> None:
    code, out, _ = cli(capsys, "report", "run-1", "-w", str(reported.root))
    assert code == 0
    assert "conversions (audiences/orders_after.sql, 7d after contact)" in out
    assert "attribution window closed" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert lines["all"] == ["all", "6/24", "25.0%", "1/9", "11.1%", "+13.9", "pp",
                            "[-21.0,", "+35.8]", "+125%"]
    assert lines["gold"] == ["gold", "4/10", "40.0%", "1/5", "20.0%", "+20.0", "pp",
                             "[-28.4,", "+53.1]", "+100%"]
    assert lines["silver"] == ["silver", "2/8", "25.0%", "0", "–", "no", "holdout", "–"]
    assert lines["bronze"][-1] == "–"  # no relative uplift without held-out conversions
    assert lines["platinum"] == ["platinum", "0", "0", "–", "no", "recipients", "–"]
    assert lines["sms"][:3] == ["sms", "2/14", "14.3%"]
    assert "revenue: contacted 315.00 (13.12 each), held out 60.00 (6.67 each)" in out
    assert "intent to treat vs held out: +13.03 pp [-21.49, +33.18]" in out


def test_html_report_is_one_self_contained_file(reported, capsys, tmp_path) -> None:
    code, out, _ = cli(capsys, "report", "promo", "-w", str(reported.root), "--html")
    path = reported.root / "reports/promo/k1.html"
    assert code == 0 and f"HTML report: {path}" in out
    page = path.read_text(encoding="utf-8")
    parser = Tags()
    parser.feed(page)
    assert parser.counts["svg"] == 3
    assert parser.counts.get("script", 0) == 0
    assert not parser.external  # nothing fetched when the file opens
    assert "Conversion rate by tier" in page and "40.00%" in page
    target = tmp_path / "elsewhere" / "r.html"
    code, out, _ = cli(capsys, "report", "promo", "-w", str(reported.root), "--to",
                       str(target), "--json")
    assert code == 0 and json.loads(out)["html"] == str(target) and target.is_file()


def test_report_to_a_folder_writes_into_it_and_a_bad_path_is_one_line(
        reported, capsys, tmp_path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    code, out, _ = cli(capsys, "report", "promo", "-w", str(reported.root), "--to",
                       str(folder), "--json")
    assert code == 0 and json.loads(out)["html"] == str(folder / "promo-k1.html")
    assert "Conversion rate by tier" in (folder / "promo-k1.html").read_text()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = cli(capsys, "report", "promo", "-w", str(reported.root), "--to",
                       str(blocker / "r.html"))
    assert code == 1 and "Traceback" not in err
    assert err.startswith(f"error: --to {blocker / 'r.html'}: cannot write") and \
        len(err.splitlines()) == 1, err
    assert blocker.read_text() == "x"
    # a path that is neither an existing folder nor an .html file is refused, whatever
    # is there: the workspace's own configuration stays as it was
    config = reported.root / "config/herald.yaml"
    before = config.read_text()
    for target in (config, tmp_path / "not-yet"):
        code, _, err = cli(capsys, "report", "promo", "-w", str(reported.root), "--to",
                           str(target))
        assert code == 1 and err == (f"error: --to {target}: neither a folder that exists "
                                     "nor a file name ending in .html (create the folder "
                                     "first to write into it)\n"), err
    assert config.read_text() == before and not (tmp_path / "not-yet").exists()


def test_a_run_key_with_slashes_stays_one_file_inside_reports(make_workspace,
                                                               capsys) -> None:
    """A run key is any text: `../../x` or `a/b` names one file inside reports/FLOW/,
    never a path out of it."""
    from herald.flows.engine import run_local

    ws = make_workspace(FILES, rows=5)
    write_orders(ws, ORDERS)
    for key in ("../../../escaped", "a/b"):
        run_local(ws, "promo", run_key=key)
        code, out, _ = cli(capsys, "report", "promo", "--run-key", key, "--html", "--json",
                           "-w", str(ws.root))
        page = Path(json.loads(out)["html"])
        assert code == 0 and page.parent == ws.root / "reports" / "promo", page
        assert page.is_file() and page.name.endswith(".html")
    assert not list(ws.root.parent.glob("**/escaped*"))


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.counts[tag] = self.counts.get(tag, 0) + 1
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith("#"):
                self.external.append(value)


def test_report_of_a_flow_without_conversion(make_workspace, capsys) -> None:
    ws = make_workspace(rows=20)
    run_local(ws, "promo", run_key="plain")
    code, out, _ = cli(capsys, "report", "promo", "-w", str(ws.root), "--json", "--html")
    data = json.loads(out)
    assert code == 0 and "conversion" not in data
    page = (ws.root / "reports/promo/plain.html").read_text()
    assert "declares no <code>conversion:</code>" in page and page.count("<svg") == 1


def written(url: str, table: str) -> list[dict]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(text(f"SELECT * FROM {table}"))]
    engine.dispose()
    return rows


def check_writeback(ws, url: str, capsys) -> None:
    code, out, _ = cli(capsys, "report", "promo", "-w", str(ws.root))
    assert code == 0 and "written back" not in out  # a report alone writes nothing
    for _ in range(2):  # writing again replaces the run key's rows
        code, out, _ = cli(capsys, "report", "promo", "--write-back", "-w", str(ws.root))
        assert code == 0
        assert "written back to source crm: 38 deliveries, 7 result rows" in out
    deliveries = written(url, "an_deliveries")
    assert len(deliveries) == len(LEDGER)
    by_key = {d["recipient"]: d for d in deliveries}
    assert (by_key["1"]["arm"], by_key["1"]["converted"], by_key["1"]["revenue"]) == (
        "contacted", True, 150.0)
    assert (by_key["11"]["arm"], by_key["11"]["converted"]) == ("held_out", True)
    assert (by_key["16"]["arm"], by_key["16"]["status"]) == ("not_contacted", "capped")
    assert by_key["5"]["converted"] is False or by_key["5"]["converted"] == 0
    assert "address" not in by_key["1"]
    results = {(r["scope"], r["name"]): r for r in written(url, "an_conversion_results")}
    assert len(results) == 1 + 4 + 2  # the run, four tiers, two channels
    run = results["run", "all"]
    assert (run["contacted"], run["contacted_converted"], run["held_out"],
            run["held_out_converted"], run["not_contacted"]) == (24, 6, 9, 1, 5)
    assert run["uplift_ci_low"] == pytest.approx(-0.210118, abs=1e-6)
    assert results["tier", "silver"]["uplift"] is None
    assert results["tier", "silver"]["note"].startswith("no held-out recipients")


def test_writeback_to_sqlite(make_workspace, capsys) -> None:
    ws = make_workspace({**FILES, "config/herald.yaml": WRITEBACK})
    write_orders(ws, ORDERS)
    recorded_run(ws)
    check_writeback(ws, f"sqlite:///{ws.root / 'crm.db'}", capsys)


@pytest.mark.postgres
def test_writeback_to_postgres(make_workspace, pg_database, capsys) -> None:
    fill_people(pg_database, 40)
    config = WRITEBACK.replace('crm: "sqlite:///crm.db"', f'crm: "{pg_database}"')
    ws = make_workspace({**FILES, "config/herald.yaml": config})
    write_orders(ws, ORDERS)
    recorded_run(ws)
    check_writeback(ws, pg_database, capsys)


def test_writeback_names_an_unknown_source(make_workspace) -> None:
    from herald.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"config/herald.yaml:11 writeback.source: unknown "
                                          r"source 'nope' \(sources: crm\)"):
        make_workspace({"config/herald.yaml": HERALD_YAML + "writeback: {source: nope}\n"})


def test_a_run_writes_its_ledger_back_before_conversions_are_known(make_workspace) -> None:
    import logging

    from herald.flows.conversion_report import after_run

    ws = make_workspace({**FILES, "config/herald.yaml": WRITEBACK}, rows=30)
    write_orders(ws, [])
    summary = run_local(ws, "promo", run_key="wb-1")
    after_run(ws, summary, logging.getLogger("test"))
    rows = written(f"sqlite:///{ws.root / 'crm.db'}", "an_deliveries")
    assert len(rows) == 30 and {r["run_key"] for r in rows} == {"wb-1"}
    assert {r["converted"] for r in rows} == {None}
    arms = {r["arm"] for r in rows}
    assert arms <= {"contacted", "held_out", "not_contacted"} and "contacted" in arms


SAME_DATABASE = HERALD_YAML.replace('store: "sqlite:///.herald/herald.db"',
                                    'store: "sqlite:///crm.db"')


def test_writeback_prefix_of_herald_tables_is_refused_at_validate(make_workspace, capsys
                                                                  ) -> None:
    from herald.core.errors import ConfigError

    bad = SAME_DATABASE + "writeback: {source: crm, prefix: Herald_}\n"
    with pytest.raises(ConfigError, match=r"config/herald.yaml:11 writeback.prefix: "
                                          r".*'Herald_' is reserved: Herald's own tables "
                                          r"start with 'herald_'"):
        make_workspace({"config/herald.yaml": bad})
    ws = make_workspace({"config/herald.yaml": SAME_DATABASE}, folder="ok")
    (ws.root / "config/herald.yaml").write_text(bad)
    code, out, err = cli(capsys, "validate", "--workspace", str(ws.root))
    assert code == 1 and "config/herald.yaml:11 writeback.prefix" in out + err


def test_writeback_into_the_workspace_database_itself(make_workspace) -> None:
    """The store is also the write-back source: the default prefix keeps the copies
    apart from the ledger's own tables."""
    import logging

    from herald.flows.conversion_report import after_run

    ws = make_workspace({**FILES, "config/herald.yaml": SAME_DATABASE
                         + "writeback: {source: crm}\n"}, rows=30)
    write_orders(ws, [])
    summary = run_local(ws, "promo", run_key="same-db")
    after_run(ws, summary, logging.getLogger("test"))
    url = f"sqlite:///{ws.root / 'crm.db'}"
    copies = written(url, "campaign_deliveries")
    assert len(copies) == 30 and {r["arm"] for r in copies} >= {"contacted"}
    assert len(written(url, "herald_deliveries")) == 30  # the ledger, untouched


def test_a_failed_writeback_fails_the_run(make_workspace, capsys) -> None:
    """A table of that name that is something else: the run fails with the reason
    (exit 1), instead of logging it and exiting 0."""
    ws = make_workspace({**FILES, "config/herald.yaml": WRITEBACK}, rows=10)
    write_orders(ws, [])
    engine = create_engine(f"sqlite:///{ws.root / 'crm.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE an_deliveries (flow TEXT, run_key TEXT)"))
    engine.dispose()
    code, out, err = cli(capsys, "run", "promo", "--run-key", "wb-x", "--workspace",
                         str(ws.root))
    assert code == 1
    assert "write-back of promo wb-x to source crm" in out + err
    assert "no column named" in out + err
    run = run_records.get_run(ws.store, flow="promo")
    assert run.status == "failed" and "write-back" in run.error
