"""The unsubscribe endpoint as a small ASGI app (Starlette; ``herald unsubscribe-server``
runs it with uvicorn, or mount ``make_app(ws)`` in your own ASGI server).

- ``GET /u/TOKEN``: a page saying what the link does, with a button that POSTs (link
  scanners that fetch every URL of an e-mail do not unsubscribe anyone);
- ``POST /u/TOKEN``: the button, or RFC 8058's one-click POST that mail clients send
  (``List-Unsubscribe=One-Click``): the recipient is added to the suppression list (every
  channel), and later runs do not contact them;
- an unknown or forged token: 404; nothing is written.
"""

from __future__ import annotations

from html import escape

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse
from starlette.routing import Route

from herald.core.workspace import Workspace
from herald.delivery import unsubscribe

_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>
</head><body style="font-family: sans-serif; max-width: 32rem; margin: 3rem auto">
<h1>{title}</h1><p>{text}</p>{form}</body></html>"""


def make_app(ws: Workspace) -> Starlette:
    """The ASGI app honouring the unsubscribe links of workspace ``ws``."""
    spec = ws.config.unsubscribe
    if spec is None:
        raise ValueError("config/herald.yaml sets no unsubscribe section")
    secret = spec.secret

    def found(request: Request) -> unsubscribe.Unsubscribe | None:
        return unsubscribe.read_token(secret, str(request.path_params["token"]))

    async def confirm(request: Request) -> HTMLResponse:
        who = found(request)
        if who is None:
            return _page("Link not valid", "This unsubscribe link is not valid.", 404)
        form = (f'<form method="post" action="{escape(request.url.path)}">'
                '<button type="submit">Unsubscribe</button></form>')
        return _page("Unsubscribe", "Stop receiving our messages?", form=form)

    async def apply(request: Request) -> HTMLResponse:
        who = found(request)
        if who is None:
            return _page("Link not valid", "This unsubscribe link is not valid.", 404)
        await run_in_threadpool(unsubscribe.honour, ws.store, who)
        return _page("Unsubscribed", "You will not receive our messages any more.")

    async def health(_: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/u/{token}", confirm, methods=["GET"]),
                             Route("/u/{token}", apply, methods=["POST"]),
                             Route("/health", health, methods=["GET"])])


def _page(title: str, text: str, status: int = 200, form: str = "") -> HTMLResponse:
    return HTMLResponse(_PAGE.format(title=escape(title), text=text, form=form),
                        status_code=status)
