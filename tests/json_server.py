"""A small HTTP(S) server on 127.0.0.1 that answers GETs with JSON, for the tests and benchmarks
that need a real socket but not the API stand-in (kmock): client certificates over TLS, or
thousands of objects served as fast as a socket can."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

NOT_FOUND = b'{"kind": "Status", "code": 404}'


def serve_json(
    answer: Callable[[BaseHTTPRequestHandler], bytes | None], tls: ssl.SSLContext | None = None
) -> ThreadingHTTPServer:
    """A server, already serving on a thread of its own, whose every GET is answered with
    answer(request) (None: 404); `tls` wraps its socket. Shut it down when done."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = answer(self)
            self.send_response(200 if body is not None else 404)
            body = NOT_FOUND if body is None else body
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
