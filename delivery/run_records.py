"""Run records: one row per run of a flow (id, run key, status, package, summary, the
process running it). The deliveries of a run are in :mod:`herald.delivery.ledger`."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    insert,
    select,
    update,
)

from herald.core.db import (
    owner_gone,
    process_owner,
    runs,
    writing,
)
from herald.core.errors import HeraldError
from herald.delivery.ledger import now


def start_run(engine: Engine, run_id: str, flow: str, run_key: str, dry_run: bool) -> None:
    with writing(engine) as conn:
        conn.execute(insert(runs).values(id=run_id, flow=flow, run_key=run_key,
                                         dry_run=dry_run, status="running",
                                         started_at=now(), owner=process_owner()))


def close_abandoned_runs(engine: Engine) -> list[str]:
    """Close runs left ``running`` by a process that has ended (killed, crashed) on this
    host: ``failed`` with the reason. Returns their ids. Their ledger rows stay as they
    are (a rerun with the run key resumes ``queued`` rows; ``sending`` ones stay)."""
    with engine.connect() as conn:
        found = [(r.id, r.owner) for r in conn.execute(select(runs.c.id, runs.c.owner).where(
            runs.c.status == "running", runs.c.owner.is_not(None)))
            if owner_gone(r.owner)]
    if not found:
        return []
    with writing(engine) as conn:
        for run_id, owner in found:
            conn.execute(update(runs).where(runs.c.id == run_id, runs.c.status == "running")
                         .values(status="failed", finished_at=now(),
                                 error=f"abandoned: the process running it ({owner}) ended "
                                       "without finishing it (killed?); rerun with its run "
                                       "key to resume"))
    return [run_id for run_id, _ in found]


def live_runs(conn: Connection, run_ids: Iterable[str | None]) -> set[str]:
    """Those of ``run_ids`` still running: recorded ``running`` by a process that is not
    known to have ended (on another host it never is). Their ``queued`` rows are theirs
    to send: another run of the run key leaves them alone."""
    wanted = sorted({r for r in run_ids if r})
    if not wanted:
        return set()
    return {r.id for r in conn.execute(select(runs.c.id, runs.c.owner).where(
        runs.c.id.in_(wanted), runs.c.status == "running")) if not owner_gone(r.owner)}


def close_run(engine: Engine, run_id: str) -> str:
    """Close a run left ``running`` by a process that cannot be seen to have ended (on
    another host, say): ``failed``, so that a rerun of its run key sends its ``queued``
    rows. Refused while its process runs on this host. Returns what was done."""
    with writing(engine) as conn:
        row = conn.execute(select(runs.c.status, runs.c.owner).where(
            runs.c.id == run_id)).first()
        if row is None:
            raise HeraldError(f"no run '{run_id}' (see: herald runs)")
        if row.status != "running":
            raise HeraldError(f"run {run_id} is {row.status}, not running: nothing to close")
        host, _, pid = (row.owner or "").rpartition(":")
        if host == socket.gethostname() and not owner_gone(row.owner):
            raise HeraldError(f"run {run_id} is still running here (process {pid}): stop "
                              "it (Ctrl-C or SIGTERM) instead")
        conn.execute(update(runs).where(runs.c.id == run_id, runs.c.status == "running")
                     .values(status="failed", finished_at=now(),
                             error=f"closed by the operator: its process ({row.owner}) "
                                   "was not seen to end; rerun with its run key to resume"))
    return f"run {run_id} closed as failed; its queued rows go out with the next run of its key"


def set_run_package(engine: Engine, run_id: str, package_id: str) -> None:
    with writing(engine) as conn:
        conn.execute(update(runs).where(runs.c.id == run_id).values(package_id=package_id))


def finish_run(engine: Engine, run_id: str, status: str, summary: dict[str, Any] | None,
               error: str | None = None) -> None:
    with writing(engine) as conn:
        conn.execute(update(runs).where(runs.c.id == run_id).values(
            status=status, finished_at=now(),
            summary=json.dumps(summary, ensure_ascii=False) if summary else None,
            error=error))


def get_run(engine: Engine, run_id: str | None = None, flow: str | None = None
            ) -> Any | None:
    """A run by id, or the latest run (of ``flow`` if given)."""
    query = select(runs)
    if run_id:
        query = query.where(runs.c.id == run_id)
    if flow:
        query = query.where(runs.c.flow == flow)
    with engine.connect() as conn:
        return conn.execute(query.order_by(runs.c.started_at.desc()).limit(1)).first()


def list_runs(engine: Engine, limit: int = 20, flow: str | None = None,
              run_key: str | None = None) -> list[Any]:
    """Runs, newest first (of ``flow`` and ``run_key`` if given)."""
    query = select(runs)
    if flow:
        query = query.where(runs.c.flow == flow)
    if run_key:
        query = query.where(runs.c.run_key == run_key)
    with engine.connect() as conn:
        return list(conn.execute(query.order_by(runs.c.started_at.desc()).limit(limit)))


def run_flows(engine: Engine) -> list[str]:
    """Every flow name the runs table knows."""
    with engine.connect() as conn:
        return list(conn.execute(select(runs.c.flow).distinct()).scalars())
