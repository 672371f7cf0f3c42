"""``herald run``, ``herald serve`` and ``herald deploy``: running flows, here or on Prefect."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Annotated

import typer
from sqlalchemy.exc import DBAPIError

from herald.core.errors import HeraldError, RunError
from herald.core.spec import TaskRunnerSpec
from herald.core.workspace import Workspace
from herald.flows.cli.common import (
    NowOpt,
    ParamOpt,
    WorkspaceOpt,
    app,
    err,
    open_workspace,
    out,
    parse_params,
    prefect_console,
    prefect_env,
    print_json,
    print_summary,
    require_server,
    set_now,
    state,
)
from herald.flows.cli.server import TemporaryServer


# -- run and report ---------------------------------------------------------------------
@app.command()
def run(ctx: typer.Context, flow: str, param: ParamOpt = None,
        run_key: Annotated[str | None, typer.Option("--run-key", help="Default: today's date "
                                                    "in the flow's time zone")] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Decide and render; send "
                                              "and record nothing")] = False,
        as_json: Annotated[bool, typer.Option("--json")] = False,
        task_runner: Annotated[str | None, typer.Option(
            "--task-runner", help="threads, processes or dask (default: the workspace's "
            "task_runner)")
        ] = None,
        dask_address: Annotated[str | None, typer.Option(
            "--dask-address", help="Dask scheduler, e.g. tcp://10.0.0.5:8786 (implies "
            "--task-runner dask; default: a local cluster)")] = None,
        resend_render_errors: Annotated[bool, typer.Option(
            "--resend-render-errors", help="After fixing a template: send to the "
            "recipients of --run-key whose message failed to render (nobody else)")] = False,
        now: NowOpt = None,
        verbose: Annotated[bool, typer.Option(
            "--verbose", "-v", help="Also show Prefect's own log lines on stderr")] = False,
        workspace: WorkspaceOpt = None) -> None:
    """Run FLOW once, now (by Herald's clock), as a Prefect flow run.

    stderr shows one line per chunk (a progress bar on a terminal); with --json, stdout
    holds the JSON object only and stderr stays quiet unless --verbose."""
    set_now(now)
    prefect_env()
    if not verbose:
        # Prefect's console lines (task states, temporary server) stay off stderr; its
        # logs still reach the Prefect API and UI, whose level is not changed. Herald's
        # own lines: with --json only errors (a run's warnings, failure reasons, are in
        # its JSON).
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL",
                              "ERROR" if as_json else "WARNING")
    server = TemporaryServer(ctx)
    server.start()  # it gets ready while the flow is checked and Prefect imported
    ws = open_workspace(workspace)
    params = parse_params(param)
    if run_key is not None and not run_key.strip():
        raise typer.BadParameter("an empty run key (leave --run-key out for today's)",
                                 param_hint="--run-key")
    if resend_render_errors and (run_key is None or dry_run):
        raise typer.BadParameter("needs the --run-key of the run to complete, and no "
                                 "--dry-run", param_hint="--resend-render-errors")
    runner = _runner(ws, task_runner, dask_address)
    from herald.flows import engine
    from herald.flows.validate import check_flow

    check_flow(ws, flow, params)  # fail fast, before Prefect starts
    ws.store.connect().close()  # so does the workspace database (one line if it cannot)
    # released render errors are work to do, though no row of the key is open any more
    done = None if dry_run or resend_render_errors else engine.nothing_to_do(
        ws, flow, run_key or engine.default_run_key(ws, flow))
    if done is not None:  # a complete run key: no package, no Prefect run
        server.stop()
        if as_json:
            print_json(done)
        else:
            out.print(done["message"])
        return
    if state.debug:
        os.environ["HERALD_DEBUG"] = "1"  # the flow raises with its traceback
    from herald.flows.cli.live import LiveReport
    from herald.flows.engine import began_sending, build_early, stop_on_signals
    from herald.flows.progress import watching

    watcher = LiveReport(err)
    try:
        with stop_on_signals(sending=False):
            # a signal while the audience is built or Prefect starts stops the command
            # like any other
            early = None
            if not resend_render_errors:
                # Prefect is imported (1 s) and its temporary server, if any, gets ready
                # (2-3 s more) while the audience is built
                held = "prefect.main" not in sys.modules  # Prefect's logging not set up
                importing = _import_prefect()
                try:
                    early = build_early(ws, flow, params, run_key, dry_run, hold=held)
                finally:
                    importing.join()
            from herald.flows import campaign
            prefect_console(verbose)
            if early is not None:
                early.show()
            try:
                server.attach()
            except BaseException as exc:
                if early is not None:
                    early.close_unused(ws, exc)
                raise
            with server.serving():
                if as_json or verbose:
                    summary = campaign.run(ws, flow, params, run_key, dry_run, runner,
                                           resend_render_errors, early)
                else:
                    with watching(watcher):
                        summary = campaign.run(ws, flow, params, run_key, dry_run,
                                               runner, resend_render_errors, early)
    except (HeraldError, DBAPIError):
        raise  # the CLI names the file or the database in one line
    except KeyboardInterrupt as exc:
        if began_sending():
            raise  # a second signal while sending: stopped at once
        again = f"herald run {flow}" + (f" --run-key {run_key}" if run_key else "")
        raise RunError(f"stopped by {exc or 'Ctrl-C'} before sending: nothing was sent; "
                       f"to send, run it again: {again}") from None
    except Exception as exc:  # reported in one line; --debug shows the traceback
        if state.debug:
            raise
        raise RunError(f"run of {flow} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        watcher.end_quietly()
    if as_json:
        print_json(summary)
    elif summary.get("status") == "nothing_to_do":  # completed meanwhile by another run
        out.print(summary["message"])
    else:
        print_summary(summary)


def _import_prefect() -> threading.Thread:
    """Import Prefect's package in a thread of its own while the audience is built (the
    build mostly waits for its database). Not ``prefect.main``, which sets up logging:
    that is left to the command's thread, once the build's records are kept."""
    def load() -> None:
        with contextlib.suppress(BaseException):  # the command's own import says why
            import prefect.flows
            import prefect.tasks  # noqa: F401

    thread = threading.Thread(target=load, name="herald-import-prefect", daemon=True)
    thread.start()
    return thread


def _runner(ws: Workspace, kind: str | None, address: str | None) -> TaskRunnerSpec | None:
    if kind is None and address is None:
        return None
    if kind not in (None, "threads", "processes", "dask"):
        raise typer.BadParameter(f"'{kind}' (use threads, processes or dask)",
                                 param_hint="--task-runner")
    if kind in ("threads", "processes") and address:
        raise typer.BadParameter("--dask-address needs --task-runner dask",
                                 param_hint="--dask-address")
    base = ws.config.task_runner
    if kind == "threads":
        return TaskRunnerSpec(type="threads")
    if kind == "processes":
        return TaskRunnerSpec(type="processes", workers=base.workers)
    return TaskRunnerSpec(type="dask", address=address or base.address, workers=base.workers)


@app.command()
def serve(flows: Annotated[list[str] | None, typer.Argument(help="Flows (default: all)")]
          = None,
          limit: Annotated[int | None, typer.Option(
              "--limit", min=1, help="At most this many runs at once")] = None,
          workspace: WorkspaceOpt = None) -> None:
    """Serve flows as Prefect deployments, with their schedules, until stopped."""
    ws = open_workspace(workspace)
    prefect_env()
    require_server("serve")
    from herald.flows import deploy

    deploy.serve(ws, flows or None, limit)


@app.command()
def deploy(flows: Annotated[list[str] | None, typer.Argument(help="Flows (default: all)")]
           = None,
           pool: Annotated[str, typer.Option("--pool", help="Work pool whose workers run "
                                             "the flows")] = ...,  # type: ignore[assignment]
           workspace: WorkspaceOpt = None) -> None:
    """Register flows as deployments on the Prefect server, for a work pool's workers."""
    ws = open_workspace(workspace)
    prefect_env()
    require_server("deploy")
    from herald.flows import deploy as deploying

    names = flows or ws.flow_names()
    for name, deployment_id in zip(names, deploying.deploy(ws, pool, flows or None),
                                   strict=True):
        out.print(f"[green]✓[/] herald-campaign/{name} → pool {pool} ({deployment_id})")
