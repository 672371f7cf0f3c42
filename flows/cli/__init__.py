"""The ``herald`` command line.

Each command is thin: it opens the workspace, calls the engine, prints. A HeraldError
becomes one red line on stderr and exit status 1 (a traceback only with ``--debug``);
usage errors exit 2. One module per command group; they register on the app in
``herald.flows.cli.common`` when imported here.
"""

from __future__ import annotations

import sys

import typer
from rich.markup import escape
from sqlalchemy.exc import DBAPIError

from herald.core.db import describe_failure
from herald.core.errors import HeraldError
from herald.flows.cli import (  # noqa: F401
    audience,
    check,
    demo,
    journey,
    recipient,
    report,
    run,
    sendtest,
    suppress,
    unsubscribe,
)
from herald.flows.cli.common import app, err, state

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """Entry point: HeraldError → one line per problem on stderr, exit 1; usage → 2."""
    try:
        code = app(args=argv, prog_name="herald", standalone_mode=False)
    except HeraldError as exc:
        if state.debug:
            raise
        lines = str(exc).splitlines() or [type(exc).__name__]
        if len(lines) > 1:
            err.print(f"[red]error:[/] {len(lines)} problems")
            for line in lines:
                err.print(f"  {line}", markup=False)
        else:
            err.print(f"[red]error:[/] {escape(lines[0])}")
        sys.exit(1)
    except DBAPIError as exc:  # a database failing under a command: one line, exit 1
        if state.debug:
            raise
        err.print(f"[red]error:[/] {escape(describe_failure(exc))}")
        sys.exit(1)
    except typer.Abort:
        err.print("aborted")
        sys.exit(1)
    except typer.TyperException as exc:  # usage errors (click's, vendored by typer): exit 2
        show = getattr(exc, "show", None)
        if show:
            show()
        sys.exit(getattr(exc, "exit_code", 2))
    finally:
        close()
    sys.exit(code if isinstance(code, int) else 0)


def close() -> None:
    while state.opened:
        state.opened.pop().dispose()
