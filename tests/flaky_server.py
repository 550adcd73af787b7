"""A scripted, flaky HTTP server on 127.0.0.1 for tests: real sockets, an ephemeral port.

Each request takes the next :class:`Reply` of the script (the last one repeats once the script
runs out) and every request is recorded, so tests can count what reached the server.

>>> with FlakyServer([Reply(503), Reply.reset(), Reply(200, body={"ok": True})]) as server:
...     httpx.post(server.url("/jobs"), json={"track_id": 42})  # doctest: +SKIP
...     server.requests[0].json                                   # doctest: +SKIP
{'track_id': 42}
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import struct
import threading
import time
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FlakyServer", "Recorded", "Reply"]


@dataclasses.dataclass(frozen=True)
class Reply:
    """One scripted answer: ``status`` with ``headers`` and ``body`` after ``delay`` seconds.

    ``body`` is sent as JSON unless it is ``str`` or ``bytes``. With ``reset`` the server closes
    the connection abruptly (a TCP RST) instead of answering.
    """

    status: int = 200
    body: Any = None
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    delay: float = 0.0
    reset: bool = False

    @classmethod
    def reset_connection(cls, delay: float = 0.0) -> Reply:
        """Close the connection without answering, as a crashed or unreachable server would."""
        return cls(status=0, delay=delay, reset=True)


@dataclasses.dataclass(frozen=True)
class Recorded:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    """``time.monotonic()`` when the request line and body had been read."""

    @property
    def json(self) -> Any:
        """The body decoded as JSON (``None`` for an empty body)."""
        return json.loads(self.body) if self.body else None


class FlakyServer:
    """A threaded HTTP server answering from a script; use it as a context manager."""

    def __init__(self, script: Iterable[Reply] = ()) -> None:
        self._script = list(script) or [Reply()]
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.requests: list[Recorded] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="flaky-server",
            daemon=True,
        )

    @property
    def port(self) -> int:
        """The ephemeral port the server listens on."""
        return int(self._server.server_address[1])

    def url(self, path: str = "/") -> str:
        """An absolute URL on this server."""
        return f"http://127.0.0.1:{self.port}{path}"

    def script(self, *replies: Reply) -> None:
        """Replace the replies still to come."""
        with self._lock:
            self._script = list(replies) or [Reply()]

    @property
    def count(self) -> int:
        """How many requests arrived so far."""
        with self._lock:
            return len(self.requests)

    def start(self) -> FlakyServer:
        """Start serving in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; delayed replies still waiting are woken and dropped."""
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FlakyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _next(self, recorded: Recorded) -> Reply:
        with self._lock:
            self.requests.append(recorded)
            return self._script.pop(0) if len(self._script) > 1 else self._script[0]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: tests read ``server.requests`` instead."""

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                reply = server._next(
                    Recorded(
                        method=self.command,
                        path=self.path,
                        headers={k.lower(): v for k, v in self.headers.items()},
                        body=body,
                        at=time.monotonic(),
                    )
                )
                # A stop wakes slow replies so that shutdown never waits for them.
                if reply.delay and server._stopping.wait(reply.delay):
                    self.close_connection = True
                    return
                if reply.reset:
                    self._reset()
                    return
                self._answer(reply)

            def _reset(self) -> None:
                # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.close()

            def _answer(self, reply: Reply) -> None:
                if reply.body is None:
                    payload = b""
                    content_type = None
                elif isinstance(reply.body, bytes):
                    payload, content_type = reply.body, "application/octet-stream"
                elif isinstance(reply.body, str):
                    payload, content_type = reply.body.encode(), "text/plain; charset=utf-8"
                else:
                    payload, content_type = json.dumps(reply.body).encode(), "application/json"
                try:
                    self.send_response(reply.status)
                    headers = {k.lower(): v for k, v in reply.headers.items()}
                    if content_type and "content-type" not in headers:
                        self.send_header("Content-Type", content_type)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    self.wfile.flush()
                except OSError:  # the client gave up (timed out) meanwhile
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        return Handler
