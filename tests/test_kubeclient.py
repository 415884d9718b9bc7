"""netisolate's own Kubernetes API client, against a scripted API server on loopback (real HTTP/1.1,
keep-alive, chunked watch streams): what kmock cannot be made to do on cue — pages, 410 Gone, a
server that closes an idle connection, a silent watch, rotating credentials. The agent, the
webhook and the commands meet the client through kmock in their own tests."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from netisolate.agent.watch import ListWatch
from netisolate.kube import api_client
from netisolate.kubeclient import ApiError, Client, KubeError
from netisolate.kubeconfig import Endpoint

pytestmark = pytest.mark.timeout(60)


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Reply:
    status: int = 200
    body: object = None  # JSON; for a watch, the events (one JSON line each)
    stream: bool = False
    hold: float = 0.0  # a watch: stay silent this long after the events, then end the stream
    close: bool = False  # close the connection after answering, without saying so (a dying server)


@dataclass
class Server:
    answer: Callable[[Seen], Reply]
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and chunked, as the API server

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                seen = Seen(
                    self.command,
                    url.path,
                    dict(urllib.parse.parse_qsl(url.query)),
                    dict(self.headers.items()),
                    self.rfile.read(length),
                )
                outer.seen.append(seen)
                reply = outer.answer(seen)
                if reply.stream:
                    self._stream(reply)
                else:
                    data = (
                        json.dumps(reply.body).encode() if not isinstance(reply.body, bytes) else reply.body
                    )
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                self.close_connection = reply.close

            def _stream(self, reply: Reply) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for event in reply.body or []:  # type: ignore[attr-defined]
                    line = json.dumps(event).encode() + b"\n"
                    half = len(line) // 2  # a line split over two chunks, as a real server may
                    for part in (line[:half], line[half:]):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.flush()
                time.sleep(reply.hold)
                self.wfile.write(b"0\r\n\r\n")
                self.close_connection = True

            do_GET = do_POST = do_PATCH = _any  # noqa: N815 - http.server's names

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}"

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[Seen], Reply]], Server]]:
    servers: list[Server] = []

    def start(answer: Callable[[Seen], Reply]) -> Server:
        servers.append(Server(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def status(code: int, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "message": message}


def pod(name: str, version: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "shop", "resourceVersion": version}}


def test_a_list_is_read_page_by_page_with_its_selector(serve: Any) -> None:
    pages = {
        "": {"items": [pod("a", "1"), pod("b", "1")], "metadata": {"continue": "t1", "resourceVersion": "7"}},
        "t1": {"items": [pod("c", "1")], "metadata": {"resourceVersion": "7"}},
    }
    server = serve(lambda seen: Reply(body=pages[seen.query.get("continue", "")]))
    listing = Client(Endpoint(server.url)).list("/api/v1/pods", field_selector="spec.nodeName=n1")
    assert [p["metadata"]["name"] for p in listing.items] == ["a", "b", "c"]
    assert listing.resource_version == "7"  # where the watch starts
    assert [s.query for s in server.seen] == [
        {"limit": "500", "fieldSelector": "spec.nodeName=n1"},
        {"limit": "500", "continue": "t1", "fieldSelector": "spec.nodeName=n1"},
    ]


def test_an_error_carries_the_status_and_the_servers_message(serve: Any) -> None:
    answers = {
        "/api/v1/pods": Reply(403, status(403, 'pods is forbidden: User "dev" cannot list resource "pods"')),
        "/api/v1/namespaces/x": Reply(502, b"<html>bad gateway</html>"),
        "/api/v1/namespaces/y": Reply(200, b"{not json"),
        "/api/v1/namespaces/z": Reply(200, {"items": {"a": 1}}),
    }
    server = serve(lambda seen: answers[seen.path])
    client = Client(Endpoint(server.url))
    with pytest.raises(ApiError) as refused:
        client.list("/api/v1/pods")
    assert refused.value.status == 403
    assert refused.value.message == 'pods is forbidden: User "dev" cannot list resource "pods"'
    assert str(refused.value).startswith("GET /api/v1/pods?limit=500: HTTP 403: pods is forbidden")
    with pytest.raises(ApiError, match="HTTP 502: <html>bad gateway</html>"):
        client.get("/api/v1/namespaces/x")
    with pytest.raises(KubeError, match="not JSON"):
        client.get("/api/v1/namespaces/y")
    with pytest.raises(KubeError, match="not a Kubernetes list"):
        client.list("/api/v1/namespaces/z")
    with pytest.raises(KubeError, match="Connection refused"):
        Client(Endpoint("http://127.0.0.1:9")).get("/api/v1/namespaces")  # the discard port


def test_writes_send_json_and_the_patch_is_a_json_patch(serve: Any) -> None:
    server = serve(lambda seen: Reply(201 if seen.method == "POST" else 200, {"kind": "Thing"}))
    client = Client(Endpoint(server.url, token="t0ken"), user_agent="netisolate-test")
    client.create("/api/v1/namespaces/shop/events", {"reason": "Applied"})
    client.patch("/apis/x/v1/things/a", [{"op": "add", "path": "/a", "value": 1}])
    post, patch = server.seen
    assert (post.headers["Content-Type"], json.loads(post.body)) == (
        "application/json",
        {"reason": "Applied"},
    )
    assert patch.headers["Content-Type"] == "application/json-patch+json"
    assert json.loads(patch.body) == [{"op": "add", "path": "/a", "value": 1}]
    assert {s.headers["Authorization"] for s in server.seen} == {"Bearer t0ken"}
    assert {s.headers["User-Agent"] for s in server.seen} == {"netisolate-test"}


def test_the_service_account_token_is_read_anew_as_it_rotates(serve: Any, tmp_path: Path) -> None:
    """Bound service-account tokens expire: the kubelet rewrites the file, the next request uses it."""
    token = tmp_path / "token"
    token.write_text("first\n")
    server = serve(lambda seen: Reply(body={"kind": "Namespace"}))
    client = Client(Endpoint(server.url, token_file=token))
    client.get("/api/v1/namespaces/a")
    token.write_text("second\n")
    client.get("/api/v1/namespaces/a")
    assert [s.headers["Authorization"] for s in server.seen] == ["Bearer first", "Bearer second"]


def test_a_401_renews_the_credentials_once(serve: Any) -> None:
    """An exec plugin's token expired: the plugin runs again and the request is sent again, once."""
    server = serve(
        lambda seen: (
            Reply(body={"kind": "Pod"})
            if seen.headers.get("Authorization") == "Bearer fresh"
            else Reply(401, status(401, "Unauthorized"))
        )
    )
    renewed: list[str] = []

    def renew(token: str) -> Endpoint:
        renewed.append(token)
        return Endpoint(server.url, token=token, renew=lambda: renew("stale"))

    assert Client(Endpoint(server.url, token="stale", renew=lambda: renew("fresh"))).get("/p") == {
        "kind": "Pod"
    }
    assert renewed == ["fresh"]
    with pytest.raises(ApiError, match="HTTP 401: Unauthorized"):  # renewed, still refused: no loop
        Client(Endpoint(server.url, token="stale", renew=lambda: renew("stale"))).get("/p")
    assert renewed == ["fresh", "stale"]


def test_a_connection_the_server_dropped_while_idle_is_replaced(serve: Any) -> None:
    """Keep-alive: the second request goes out on the first one's connection, which the server
    has closed without saying so; it is sent again on a new one."""
    server = serve(lambda seen: Reply(body={"path": seen.path}, close=True))
    client = Client(Endpoint(server.url))
    assert client.get("/a") == {"path": "/a"}
    time.sleep(0.2)  # the server's close arrives before the next request
    assert client.get("/b") == {"path": "/b"}  # without the retry: RemoteDisconnected
    assert [s.path for s in server.seen] == ["/a", "/b"]


class Recorder:
    def __init__(self) -> None:
        self.lists: list[list[str]] = []
        self.events: list[tuple[str, str]] = []
        self.changed = threading.Event()

    def on_list(self, items: list[dict[str, Any]]) -> None:
        self.lists.append([i["metadata"]["name"] for i in items])
        self.changed.set()

    def on_event(self, kind: str, obj: dict[str, Any]) -> None:
        self.events.append((kind, obj["metadata"]["name"]))
        self.changed.set()


def watch_loop(server: Server, timeout_seconds: int = 240) -> tuple[ListWatch, Recorder, threading.Event]:
    recorder, stop = Recorder(), threading.Event()
    loop = ListWatch(
        "pods",
        Client(Endpoint(server.url)),
        "/api/v1/pods",
        recorder.on_list,
        recorder.on_event,
        stop=stop,
        timeout_seconds=timeout_seconds,
        field_selector="spec.nodeName=n1",
    )
    loop.start()
    return loop, recorder, stop


def until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_the_watch_resumes_after_bookmarks_and_relists_on_410(serve: Any) -> None:
    """List at 1; a watch from 1 brings b (2) and a bookmark (5) and ends; the next starts at 5 and
    is told 410 Gone (an event, as the server says it mid-stream); a relist, a watch from 9 that
    the server refuses with 410 outright; a relist again; then quiet."""
    lists = iter([("1", ["a"]), ("9", ["a", "b"]), ("11", ["b"])])
    watches = iter(
        [
            Reply(
                stream=True,
                body=[
                    {"type": "ADDED", "object": pod("b", "2")},
                    {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "5"}}},
                ],
            ),
            Reply(
                stream=True,
                body=[{"type": "ERROR", "object": status(410, "too old resource version: 5 (8)")}],
            ),
            Reply(410, status(410, "too old resource version: 9 (10)")),
        ]
    )

    def answer(seen: Seen) -> Reply:
        if seen.query.get("watch") == "true":
            return next(watches, Reply(stream=True, body=[], hold=5.0))
        version, names = next(lists)
        return Reply(
            body={"items": [pod(n, version) for n in names], "metadata": {"resourceVersion": version}}
        )

    server = serve(answer)
    loop, recorder, stop = watch_loop(server)
    try:
        until(lambda: len(recorder.lists) == 3, "the third list")
        until(lambda: sum(1 for s in server.seen if s.query.get("watch")) == 4, "the fourth watch")
    finally:
        stop.set()
    assert recorder.lists == [["a"], ["a", "b"], ["b"]]
    assert recorder.events == [("ADDED", "b")]  # bookmarks move the resourceVersion, nothing else
    watched = [s.query for s in server.seen if s.query.get("watch")]
    assert [w["resourceVersion"] for w in watched] == ["1", "5", "9", "11"]
    assert all(
        w["allowWatchBookmarks"] == "true" and w["fieldSelector"] == "spec.nodeName=n1" for w in watched
    )
    assert not loop.failing, "a 410 is the protocol, not a failure"


def test_a_watch_silent_past_its_timeout_is_reconnected_from_the_same_version(serve: Any) -> None:
    """The server should end a watch after timeoutSeconds; one silent for longer is a dead
    connection (a NAT dropped it): a new watch from the last resourceVersion, no relist, no error."""
    listed = threading.Event()

    def answer(seen: Seen) -> Reply:
        if seen.query.get("watch") == "true":
            return Reply(stream=True, body=[], hold=30.0)  # says nothing, ends nothing
        listed.set()
        return Reply(body={"items": [], "metadata": {"resourceVersion": "3"}})

    server = serve(answer)
    loop, recorder, stop = watch_loop(server, timeout_seconds=1)  # read timeout: 1 + 2 s
    try:
        until(lambda: sum(1 for s in server.seen if s.query.get("watch")) == 2, "the second watch")
    finally:
        stop.set()
    assert [s.query.get("resourceVersion") for s in server.seen] == [None, "3", "3"]
    assert len(recorder.lists) == 1 and not loop.failing


def test_a_failing_list_is_reported_and_retried(serve: Any) -> None:
    calls: list[int] = []

    def answer(seen: Seen) -> Reply:
        if seen.query.get("watch") == "true":
            return Reply(stream=True, body=[], hold=5.0)
        calls.append(1)
        if len(calls) == 1:
            return Reply(500, status(500, "etcdserver: request timed out"))
        return Reply(body={"items": [pod("a", "1")], "metadata": {"resourceVersion": "1"}})

    server = serve(answer)
    loop, recorder, stop = watch_loop(server)
    try:
        until(lambda: bool(loop.failing), "the failure")
        assert loop.failing == "API error 500: etcdserver: request timed out"
        until(lambda: recorder.lists == [["a"]], "the list after the backoff")
        until(lambda: not loop.failing, "recovery")
    finally:
        stop.set()


def test_a_proxy_url_is_reached_with_connect(serve: Any) -> None:
    """kubeconfig `proxy-url`: the client opens a CONNECT tunnel through the proxy and speaks to
    the API server inside it (TLS, where the server is https, also inside)."""
    server = serve(lambda seen: Reply(body={"kind": "Namespace"}))
    asked: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))

    def relay(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        sink.close()

    def proxy() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                head = b""
                while b"\r\n\r\n" not in head:
                    head += conn.recv(4096)
                asked.append(head.split(b"\r\n")[0])
                host, _, port = head.split()[1].decode().rpartition(":")
                upstream = socket.create_connection((host, int(port)))
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                threading.Thread(target=relay, args=(upstream, conn), daemon=True).start()
                threading.Thread(target=relay, args=(conn, upstream), daemon=True).start()

    threading.Thread(target=proxy, daemon=True).start()
    try:
        proxied = Endpoint(server.url, proxy=f"http://127.0.0.1:{listener.getsockname()[1]}")
        assert Client(proxied).get("/api/v1/namespaces/a") == {"kind": "Namespace"}
        assert [line.rpartition(b" ")[0] for line in asked] == [
            f"CONNECT 127.0.0.1:{server.http.server_address[1]}".encode()
        ]
        assert [s.path for s in server.seen] == ["/api/v1/namespaces/a"]
        with pytest.raises(KubeError, match="only http:// proxies"):
            Client(Endpoint(server.url, proxy="socks5://127.0.0.1:1080"))
    finally:
        listener.close()


def test_an_exec_plugins_expired_token_is_replaced_by_running_it_again(serve: Any, tmp_path: Path) -> None:
    """The kubeconfig's exec plugin is run again when the server refuses its token (401)."""
    server = serve(
        lambda seen: (
            Reply(body={"kind": "Pod"})
            if seen.headers.get("Authorization") == "Bearer token-2"
            else Reply(401, status(401, "Unauthorized"))
        )
    )
    runs = tmp_path / "runs"
    plugin = tmp_path / "credential"
    credential = '{"kind": "ExecCredential", "status": {"token": "token-%s"}}'  # token-<run>
    plugin.write_text(f"#!/bin/sh\necho x >> {runs}\nprintf '{credential}' $(wc -l < {runs})\n")
    plugin.chmod(0o755)
    config = tmp_path / "kubeconfig"
    config.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server.url}}],
                "users": [{"name": "u", "user": {"exec": {"apiVersion": "v1", "command": str(plugin)}}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    assert api_client(str(config)).get("/api/v1/namespaces/shop/pods/web") == {"kind": "Pod"}
    assert [s.headers["Authorization"] for s in server.seen] == ["Bearer token-1", "Bearer token-2"]
