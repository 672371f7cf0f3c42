"""Whole-process time of the read-only commands on the demo workspace (``make demo``
first): each command run five times as its own process, the median kept.

    .venv/bin/python bench/cli_latency.py            # prints the table
    .venv/bin/python bench/cli_latency.py --write    # and replaces it in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERALD = str(Path(sys.executable).parent / "herald")
COMMANDS = [
    ["validate"],
    ["preview", "winback"],
    ["audience", "list"],
    ["report", "winback"],
    ["suppress", "list"],
    ["runs"],
    ["recipient", "1"],
]
TARGET_S = 1.2


def measure(args: list[str], repeat: int = 5) -> tuple[float, float, bool]:
    """Median wall time and CPU time (user + system) of ``herald ARGS`` in a fresh
    process, and whether it succeeded. The CPU time shows what the command costs when
    other processes share the machine's cores."""
    times, cpus, ok = [], [], True
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = subprocess.run([HERALD, *args, "--workspace", str(ROOT)], cwd=ROOT,
                              capture_output=True, env={**os.environ, "COLUMNS": "120"})
        times.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        ok = ok and proc.returncode == 0
    return statistics.median(times), statistics.median(cpus), ok


def table() -> str:
    rows = ["| command | wall, median of 5 (s) | CPU, median of 5 (s) | target (s) | met |",
            "|---|---|---|---|---|"]
    for args in COMMANDS:
        seconds, cpu, ok = measure(args)
        met = "yes" if ok and seconds < TARGET_S else "no" if ok else "failed"
        rows.append(f"| `herald {' '.join(args)}` | {seconds:.2f} | {cpu:.2f} | {TARGET_S} "
                    f"| {met} |")
    rows.append(f"| (reference: `python -c 'import prefect'`) | "
                f"{statistics.median(_import_prefect() for _ in range(5)):.2f} | | | |")
    return "\n".join(rows)


def _import_prefect() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import prefect"], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    found = table()
    print(found)
    if parser.parse_args().write:
        path = ROOT / "BENCHMARKS.md"
        text = path.read_text(encoding="utf-8")
        text = re.sub(r"(<!-- cli -->\n).*?(<!-- /cli -->)",
                      lambda m: m.group(1) + found + "\n" + m.group(2), text, flags=re.S)
        path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
