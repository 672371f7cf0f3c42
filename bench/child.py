"""One end-to-end run in its own process, reporting its own peak memory.

    python bench/child.py engine|prefect WORKSPACE OUT.json

``engine`` runs the flow with the engine alone (threads, no Prefect); ``prefect`` runs
``herald run`` in this process. OUT.json gets the summary and this process's peak RSS
(children such as Prefect's temporary server are not counted: they are not Herald) and
the largest child's.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import sys
import time


def main() -> None:
    mode, folder, out = sys.argv[1:4]
    start = time.perf_counter()
    if mode == "engine":
        from herald.core.workspace import Workspace
        from herald.flows.engine import run_local

        summary = run_local(Workspace.open(folder), "bench", run_key="e2e")
    else:
        from herald.flows.cli import main as herald

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            try:
                herald(["run", "bench", "--json", "--run-key", "e2e", "-w", folder])
            except SystemExit as exc:
                if exc.code:
                    raise
        summary = json.loads(buffer.getvalue())
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # the largest child ended: a worker process (task_runner: processes) or, through
    # Prefect, its temporary server
    children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with open(out, "w") as fh:
        json.dump({"summary": summary, "wall": wall, "peak_kib": peak_kib,
                   "children_kib": children_kib}, fh)


if __name__ == "__main__":
    main()
