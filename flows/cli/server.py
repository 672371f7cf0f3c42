"""Prefect's temporary server for ``herald run`` and ``herald journey tick --prefect``,
started when the command starts.

Without an API address (``PREFECT_API_URL``), Prefect starts a temporary server the
first time a flow needs its API: it imports its server package into the command's
process (1.4 s on the 2-core machine of BENCHMARKS.md), starts ``uvicorn`` with its app
in a child process, and waits while the child imports the same package again and
creates the app (4-5 s more). Herald starts that same child as the command starts, with
Prefect's own command line, so the server gets ready on the other core while the command
checks the flow, builds its audience and imports Prefect; the command then points
Prefect at it and never imports the server package. The child is started in a session
of its own (a terminal's Ctrl-C reaches the command, which stops between batches, not
the server it still needs) and stopped when the command's process exits.

Whether Prefect has an address of its own (the environment, a profile, ``prefect.toml``
or ``.env``) is only known once Prefect's settings are read: a server started early for
a command that turns out not to need it is stopped then.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import typer

from herald.core.errors import RunError

# uvicorn's exit status when its address is taken: another port is tried, as Prefect does
ADDRESS_IN_USE = 3

# The child: uvicorn with the arguments given, and two threads. One stops it once the
# command's process is gone, however it ended (SIGKILL included), so that no server
# outlives its command: SIGTERM (uvicorn's graceful shutdown), and an exit 5 s later if
# that has not ended it (a server still starting finishes its start first). The other
# asks the API for its greeting as soon as the server listens: Prefect's API answers its
# first request (any but /health) 0.4-0.5 s late on the 2-core machine of BENCHMARKS.md
# while it builds its routes, and the command, busy building the audience, need not be
# the one that waits for it.
_CHILD = """\
import os, signal, sys, threading, time, urllib.error, urllib.request
parent, warm = int(sys.argv[1]), sys.argv[2]  # not getppid(): the command may be gone
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    os._exit(1)
def warm_up():
    for _ in range(6000):
        try:
            urllib.request.urlopen(warm, timeout=30).close()
        except urllib.error.HTTPError:
            pass  # it answered (401: the environment sets an API auth string)
        except OSError:  # not listening yet
            time.sleep(0.02)
            continue
        return
threading.Thread(target=watch, daemon=True).start()
threading.Thread(target=warm_up, daemon=True).start()
import uvicorn
uvicorn.main(sys.argv[3:], prog_name="uvicorn")
"""


class TemporaryServer:
    """A Prefect server in a child process, for one command."""

    def __init__(self, command: typer.Context) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.attached: str | None = None  # PREFECT_API_URL before it named this server
        # stopped when the command ends, also when it is called in-process, and failing
        # that at exit; nothing to do unless started
        command.call_on_close(self.stop)
        atexit.register(self.stop)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def _ready_url(self) -> str:
        """Answers once the server can take the run's requests without a first delay:
        its greeting, which the child asks for as soon as it listens (``_CHILD``)."""
        return f"{self.api_url}/hello"

    def start(self) -> None:
        """Start the server now, unless Prefect is told of one: PREFECT_API_URL in the
        environment, or Prefect already imported (a test harness's settings)."""
        if self.process is None and "PREFECT_API_URL" not in os.environ \
                and "prefect.settings" not in sys.modules:
            self._launch()

    def attach(self) -> None:
        """Point Prefect at this server: once its settings are read, and only if they name
        no server of their own and allow a temporary one; otherwise the server started
        early is stopped. Waits until the server answers."""
        import prefect.context
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_SERVER_EPHEMERAL_ENABLED,
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        )

        if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            self.stop()
            return
        if self.process is None:
            self._launch()
        self._wait(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        self.attached = os.environ.get("PREFECT_API_URL", "")  # an empty one, say
        os.environ["PREFECT_API_URL"] = self.api_url  # the run's child processes too
        prefect.context.refresh_global_settings_context()

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Prefect's settings for the command's flow run on this server (once attached):
        no flow-run heartbeats. They tell a watching server that the run's process is
        alive; this server is stopped with the command, so nothing is left to watch, and
        Prefect joins the heartbeat thread at the flow's end while it sleeps out its
        current second (0.4-1 s of every run; BENCHMARKS.md). Against a server of the
        user's own they stay as Prefect sets them."""
        if self.attached is None:
            yield
            return
        from prefect.settings import temporary_settings

        with temporary_settings(updates={"flows.heartbeat_frequency": None}):
            yield

    def _launch(self) -> None:
        prefect_spec = importlib.util.find_spec("prefect")  # not imported: 1.8 s
        assert prefect_spec is not None and prefect_spec.origin is not None
        self.port = _free_port()
        # Prefect's SubprocessASGIServer: its app, no UI, and the services of a
        # temporary server
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(os.getpid()), self._ready_url, "--app-dir",
             str(Path(prefect_spec.origin).parent.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port",
             str(self.port), "--log-level", "error", "--lifespan", "on"],
            env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                 "PREFECT__SERVER_FINAL": "1"},
            start_new_session=True)

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5) as client:
            while True:
                assert self.process is not None
                status = self.process.poll()
                if status == ADDRESS_IN_USE:
                    self._launch()
                elif status is not None:
                    self.process = None
                    raise RunError(f"Prefect's temporary server exited with status {status} "
                                   "before answering (its output is above); or start one "
                                   "with `prefect server start` and set PREFECT_API_URL")
                try:
                    # (401: PREFECT_SERVER_API_AUTH_STRING in the environment)
                    if client.get(self._ready_url).status_code < 500:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RunError(f"Prefect's temporary server did not answer within "
                                   f"{timeout:g} s (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT"
                                   "_SECONDS); or start one with `prefect server start` and "
                                   "set PREFECT_API_URL")
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server; if Prefect was pointed at it, first deliver what Prefect still
        holds for it (task run states travel as events, logs in batches), then point Prefect
        back where it was, so that nothing later in this process (a second command called
        in-process) talks to a server that is gone."""
        process, self.process = self.process, None
        if process is None:
            return
        if self.attached is not None:
            _detach(self.attached)
            self.attached = None
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _detach(api_url: str) -> None:
    import prefect.context
    from prefect.events.worker import EventsWorker

    # Prefect's event and log workers are one family of services: draining it stops
    # them all once their queues are sent; the next flow run starts new ones, with the
    # settings of its time. (Prefect drains them at exit, but that comes after the
    # command's end has stopped this server: "Error logging to API".)
    EventsWorker.drain_all(timeout=30)
    if api_url:
        os.environ["PREFECT_API_URL"] = api_url
    else:
        os.environ.pop("PREFECT_API_URL", None)
    prefect.context.refresh_global_settings_context()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
