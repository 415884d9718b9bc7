"""The agent's HTTP endpoints, for the kubelet's probes, Prometheus and `netisolate status`:
/metrics, /healthz (the timer loop still turns), /readyz (the start-up verification is done and
the namespace labels are known; else 503 and why) and /status (every tracked pod and its state, JSON)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from netisolate.agent.state import NodeStatus


class Observed(Protocol):
    """What the endpoints report on (the Agent)."""

    def alive(self) -> bool: ...
    def unready(self) -> str: ...  # why not ready; "" when ready
    def status(self) -> NodeStatus: ...


def _text(ok: bool, failing: str) -> tuple[int, bytes, str]:
    return (200, b"ok", "text/plain") if ok else (503, failing.encode(), "text/plain")


def answer(observed: Observed, path: str) -> tuple[int, bytes, str]:
    """(status code, body, content type) for a GET of path."""
    if path == "/metrics":
        return 200, generate_latest(), CONTENT_TYPE_LATEST
    if path == "/healthz":
        return _text(observed.alive(), "timer loop stalled")
    if path == "/readyz":
        reason = observed.unready()
        return _text(not reason, reason)
    if path == "/status":
        return 200, json.dumps(observed.status()).encode(), "application/json"
    return 404, b"not found", "text/plain"


def serve(observed: Observed, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serves on a daemon thread until the returned server's shutdown()."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code, body, kind = answer(observed, self.path)
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:  # probes every few seconds: not worth a log line
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
