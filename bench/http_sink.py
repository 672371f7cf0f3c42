"""A local HTTP endpoint that accepts every POST with a small JSON answer (the benchmarks'
peer for HTTP channels). ``GET /arrivals`` answers the arrival time of every POST since
the last such call (``time.monotonic()`` of this process), for measuring a rate.

    python bench/http_sink.py PORT      # prints "ready" once listening
"""

from __future__ import annotations

import sys
import time
from itertools import count

from aiohttp import web

_ids = count(1)
_arrivals: list[float] = []


async def accept(request: web.Request) -> web.Response:
    _arrivals.append(time.monotonic())
    await request.read()
    return web.json_response({"id": f"m{next(_ids)}"})


async def arrivals(_request: web.Request) -> web.Response:
    found = _arrivals[:]
    del _arrivals[:len(found)]
    return web.json_response(found)


def main() -> None:
    app = web.Application()
    app.router.add_get("/arrivals", arrivals)
    app.router.add_post("/{tail:.*}", accept)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=lambda *_: print(
        "ready", flush=True), access_log=None)


if __name__ == "__main__":
    main()
