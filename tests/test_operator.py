"""What an operator sees (issue 16): commands that stay light, progress, failure reasons,
reports by run key, errors with hints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
         ["report", "promo", "--json"], ["suppress", "list"], ["suppress", "add", "x@y.z"]]


def test_read_only_commands_do_not_import_prefect(make_workspace) -> None:
    ws = make_workspace(rows=20)
    engine.run_local(ws, "promo", run_key="k1")  # something to report, without Prefect
    for args in LIGHT:
        proc = subprocess.run([sys.executable, "-c", _PROBE, *args, "-w", str(ws.root)],
                              capture_output=True, text=True, timeout=60)
        outcome = json.loads(proc.stderr.strip().splitlines()[-1])
        assert outcome == {"code": 0, "prefect": []}, (args, proc.stderr[-1500:])


def test_bad_cron_names_the_field_without_prefect(make_workspace, capsys) -> None:
    ws = make_workspace({"config/flows/promo.yaml": _with_schedule("0 25 * * *")})
    code, _, err = cli(capsys, "validate", "-w", str(ws.root))
    assert code == 1
    assert ('config/flows/promo.yaml:14 schedules[0]: Invalid cron string: "0 25 * * *": '
            "bad hour field '25'") in err
    ws = make_workspace({"config/flows/promo.yaml": _with_schedule("0 10 * * FRY")},
                        folder="ws2")
    code, _, err = cli(capsys, "validate", "-w", str(ws.root))
    assert code == 1 and "bad day-of-week field 'FRY'" in err
    for good in ("0 10 * * MON-FRI", "@daily", "*/15 9-17 * * 1#2"):
        ws = make_workspace({"config/flows/promo.yaml": _with_schedule(good)},
                            folder=f"ok{abs(hash(good))}")
        code, _, err = cli(capsys, "validate", "-w", str(ws.root))
        assert code == 0, err


def _with_schedule(cron: str) -> str:
    from .conftest import PROMO_YAML

    return PROMO_YAML + f"schedules:\n  - {{cron: '{cron}', timezone: Asia/Shanghai}}\n"
