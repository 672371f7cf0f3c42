"""A real HTTP server on loopback that answers the way a script says.

Each request is recorded (path, headers, body). Answers are looked up by a key taken
from the request (the JSON body's ``recipient`` by default) and consumed in order:
``("ok", body)``, ``("status", code, headers)``, ``("timeout", seconds[, action])``
(answers late, with ``action`` or ``ok``), ``("reset",)`` (closes the connection
without an answer), ``("raw", bytes)`` (writes those bytes as the answer, a bad status
line from a load balancer, and closes), ``("trickle", seconds)`` (a 200 whose body
arrives one byte every ``seconds``), ``("gzip", body)`` (a 200 whose JSON body is sent
gzip-compressed with ``Content-Encoding: gzip``). A key with no script left gets ``ok``.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Action = tuple[Any, ...]


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    status: int | None = None  # what the server answered (None: no answer)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Peer:
    key: Callable[[Request], str] = lambda r: str(r.json().get("recipient"))
    scripts: dict[str, list[Action]] = field(default_factory=lambda: defaultdict(list))
    requests: list[Request] = field(default_factory=list)
    ok_body: Callable[[Request], Any] = lambda r: {"id": f"p-{len(r.body)}"}
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def script(self, key: str, *actions: Action) -> None:
        self.scripts[key].extend(actions)

    def next_action(self, request: Request) -> Action:
        with self.lock:
            self.requests.append(request)
            queue = self.scripts.get(self.key(request))
            return queue.pop(0) if queue else ("ok",)

    def delivered(self) -> dict[str, int]:
        """How many requests per key were answered 2xx (what actually got through)."""
        return dict(self._ok)

    def kept(self) -> dict[str, int]:
        """Per key, the messages a receiver keeps: distinct Idempotency-Keys answered 2xx
        (a retry of a request that did arrive carries the same key and is dropped)."""
        keys: dict[str, set[str]] = defaultdict(set)
        for request in self.requests:
            if request.status is not None and 200 <= request.status < 300:
                keys[self.key(request)].add(request.headers.get("idempotency-key", ""))
        return {k: len(v) for k, v in keys.items()}

    _ok: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def serve(peer: Peer) -> tuple[ThreadingHTTPServer, Peer]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            length = int(self.headers.get("Content-Length") or 0)
            request = Request("POST", self.path, {k.lower(): v for k, v in self.headers.items()},
                              self.rfile.read(length))
            action = peer.next_action(request)
            if action[0] == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           b"\x01\x00\x00\x00\x00\x00\x00\x00")
                self.close_connection = True
                self.connection.close()
                return
            if action[0] == "raw":
                request.status = None
                self.close_connection = True
                self.wfile.write(action[1])
                self.wfile.flush()
                return
            if action[0] == "trickle":
                request.status = 200
                body = json.dumps(peer.ok_body(request)).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.flush()
                    for byte in body:
                        time.sleep(action[1])
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    request.status = None  # the client gave up before the end
                    return
                with peer.lock:
                    peer._ok[peer.key(request)] += 1
                return
            if action[0] == "timeout":
                time.sleep(action[1])
                action = action[2] if len(action) > 2 else ("ok",)
            if action[0] == "json":  # ("json", status, body[, headers])
                status, body_obj = action[1], action[2]
                request.status = status
                if 200 <= status < 300:
                    with peer.lock:
                        peer._ok[peer.key(request)] += 1
                self._answer(status, json.dumps(body_obj).encode(),
                             action[3] if len(action) > 3 else {})
                return
            if action[0] == "gzip":
                with peer.lock:
                    peer._ok[peer.key(request)] += 1
                request.status = 200
                self._answer(200, gzip.compress(json.dumps(action[1]).encode()),
                             {"Content-Encoding": "gzip"})
                return
            if action[0] == "ok":
                body = json.dumps(action[1] if len(action) > 1 else peer.ok_body(request))
                with peer.lock:
                    peer._ok[peer.key(request)] += 1
                request.status = 200
                self._answer(200, body.encode(), {})
                return
            _, status, *rest = action
            headers = rest[0] if rest else {}
            request.status = status
            self._answer(status, json.dumps({"error": status}).encode(), headers)

        def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout): what a real server sees too

        def log_message(self, *args: object) -> None:
            return None

    class Server(ThreadingHTTPServer):
        request_queue_size = 256  # a burst of connections is never refused at accept

    server = Server(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    peer.url = f"http://127.0.0.1:{server.server_port}"
    return server, peer
