"""The reliability catalogue: every bad input and fault the tests try, with its outcome.

Catalogue tests call ``record(...)`` (the ``catalogue`` fixture) after their assertions
pass. With ``HERALD_CATALOGUE=path.json`` set, the session writes every entry there, and

    python -m tests.catalogue path.json > RELIABILITY.md

renders the catalogue with its totals (``make reliability`` does both).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    kind: str  # "input", "fault" or "secret"
    name: str
    outcome: str  # what Herald did, as asserted by the test
    messages: int = 0  # messages the scenario involved
    lost: int = 0  # recipients with neither a delivery nor a ledger reason
    duplicated: int = 0  # recipients delivered more than once
    opted_out: int = 0  # recipients on the suppression list who were contacted anyway


ENTRIES: list[Entry] = []


def record(kind: str, name: str, outcome: str, messages: int = 0, lost: int = 0,
           duplicated: int = 0, opted_out: int = 0) -> None:
    ENTRIES.append(Entry(kind, name, outcome, messages, lost, duplicated, opted_out))


def save(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(e) for e in ENTRIES], indent=1, ensure_ascii=False))


HEAD = """\
# Reliability

What Herald does with bad input, provider faults, crashes and secrets, as tried on
purpose by the test suite (`tests/test_reliability.py`, for journeys
`tests/test_journeys.py`, for chunks in worker processes `tests/test_processes.py`; part
of `make test`). Every entry
below is a test that passed; its outcome column is what the test asserts. Regenerate with
`make reliability` (runs the catalogue and rewrites this file).

For every fault the test counts, per recipient, what actually reached the peer (the SMTP
server's mailbox, the HTTP endpoint's log, the outbox): *lost* is a recipient with
neither a delivery nor a ledger row saying why, *duplicated* a recipient delivered more
than once (an HTTP request that timed out after arriving and was retried counts once,
the receiver dropping the retry by its `Idempotency-Key`, as documented). Entries about
the suppression list also count the opted-out recipients who were contacted anyway.
"""


def render(entries: list[dict[str, object]]) -> str:
    out = [HEAD]
    titles = {"input": "Bad input", "fault": "Faults", "secret": "Secrets"}
    for kind, title in titles.items():
        rows = [e for e in entries if e["kind"] == kind]
        if not rows:
            continue
        out += [f"## {title}", "", "| # | case | outcome | messages | lost | duplicated |",
                "|---|---|---|---|---|---|"]
        for i, e in enumerate(rows, 1):
            outcome = str(e["outcome"]).replace("|", "\\|")
            out.append(f"| {i} | {e['name']} | {outcome} | {e['messages']} | {e['lost']} | "
                       f"{e['duplicated']} |")
        out.append("")
    total = {k: sum(1 for e in entries if e["kind"] == k) for k in titles}
    messages = sum(int(str(e["messages"])) for e in entries)
    lost = sum(int(str(e["lost"])) for e in entries)
    duplicated = sum(int(str(e["duplicated"])) for e in entries)
    opted_out = sum(int(str(e.get("opted_out", 0))) for e in entries)
    out += ["## Totals", "",
            f"- bad inputs tried: **{total['input']}** (each with its outcome above: a "
            "refused input sends nothing; where the input is data a run goes on with, only "
            "the recipients the outcome names as sent were sent)",
            f"- faults injected: **{total['fault']}**, over {messages} messages",
            f"- secret scans: **{total['secret']}**",
            f"- messages lost: **{lost}**",
            f"- messages duplicated: **{duplicated}**",
            f"- opted-out recipients contacted: **{opted_out}**", ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render(json.loads(Path(sys.argv[1]).read_text())))
