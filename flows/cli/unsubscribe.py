"""``herald unsubscribe-server``: honour unsubscribe links and one-click POSTs."""

from __future__ import annotations

from typing import Annotated

import typer

from herald.core.errors import ConfigError, HeraldError
from herald.flows.cli.common import WorkspaceOpt, app, open_workspace, out


@app.command("unsubscribe-server")
def unsubscribe_server(host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
                       port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8025,
                       workspace: WorkspaceOpt = None) -> None:
    """Serve the unsubscribe links of this workspace's messages until stopped."""
    import uvicorn

    from herald.flows.unsubscribe_server import make_app

    ws = open_workspace(workspace)
    if ws.config.unsubscribe is None:
        raise HeraldError("config/herald.yaml sets no unsubscribe section (unsubscribe: "
                          "{base_url: https://..., secret: \"${HERALD_UNSUBSCRIBE_SECRET}\"})")
    missing = ws.missing_secrets([])
    if missing:
        raise ConfigError(missing)
    out.print(f"unsubscribe links of {ws.root}: serving on http://{host}:{port}/u/TOKEN "
              f"(links point at {ws.config.unsubscribe.base_url}); Ctrl-C stops")
    uvicorn.run(make_app(ws), host=host, port=port, log_level="warning")
