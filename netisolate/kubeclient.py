"""The Kubernetes API over HTTP, in the standard library: get, list (paged), watch, create and JSON
patch of plain JSON objects — all the agent, the webhook and the commands ask of the API server.

Why not the kubernetes client: it is ~55 MB of the image, and importing it (every API model it has)
costs 0.5 s of the agent's start on a quiet machine, 2 s on a busy one, before the first request.

Requests of one thread share a keep-alive connection (one is retried once on a fresh connection if
the server closed it while idle); a watch has a connection of its own. Errors carry the HTTP status
and the message of the Status the API server answered with. Credentials are the Endpoint's
(netisolate.kubeconfig): the token file is read for every request, so a rotated service-account
token is used at once; on a 401 the Endpoint's `renew` (exec plugins) is called once and the
request sent again.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from netisolate.kubeconfig import Endpoint

Obj = dict[str, Any]
PAGE = 500
CONNECT_TIMEOUT = 10.0
# a request sent on a kept-alive connection the server had already closed fails with one of these
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class KubeError(RuntimeError):
    """The API server could not be reached, or answered with what is not the API's JSON."""


class ApiError(KubeError):
    """The API server answered with an error status."""

    def __init__(self, method: str, path: str, status: int, message: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status, self.message = status, message


@dataclass(frozen=True)
class Listing:
    items: list[Obj]
    resource_version: str | None  # where a watch of the same path starts


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK
    object: Obj


class _TLSConnection(http.client.HTTPConnection):
    """HTTPS with our context and the name the certificate must carry (tls-server-name), also
    through a CONNECT proxy (the tunnel is opened first, TLS inside it)."""

    default_port = 443

    def __init__(
        self, host: str, port: int | None, *, timeout: float, tls: ssl.SSLContext, name: str
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self._tls, self._name = tls, name

    def connect(self) -> None:
        super().connect()
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=self._name)


def status_message(body: bytes) -> str:
    """The message of the Status the API server answers an error with, else the body's start."""
    text = body.decode(errors="replace")
    try:
        message = json.loads(text).get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message) if message else text[:200]


def _json(method: str, path: str, body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise KubeError(f"{method} {path}: not JSON: {body[:120]!r}") from None


def _with_query(path: str, query: Mapping[str, object]) -> str:
    given = {k: str(v) for k, v in query.items() if v is not None}
    return f"{path}?{urllib.parse.urlencode(given)}" if given else path


class Client:
    def __init__(self, endpoint: Endpoint, *, timeout: float = 30.0, user_agent: str = "netisolate") -> None:
        self.timeout, self.user_agent = timeout, user_agent
        self._use(endpoint)

    def _use(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        url = urllib.parse.urlsplit(endpoint.server)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise KubeError(f"the API server's address {endpoint.server!r} is not an http(s) URL")
        self._server_host = url.hostname
        self._prefix = url.path.rstrip("/")  # a server behind a path (a cluster proxy)
        self._tls = endpoint.tls_context() if url.scheme == "https" else None
        self._address: tuple[str, int | None] = (url.hostname, url.port)
        self._tunnel: tuple[str, int] | None = None
        if endpoint.proxy:
            proxy = urllib.parse.urlsplit(endpoint.proxy)
            if proxy.scheme != "http" or not proxy.hostname:
                raise KubeError(f"proxy-url {endpoint.proxy!r}: only http:// proxies are supported")
            self._address = (proxy.hostname, proxy.port)
            self._tunnel = (url.hostname, url.port or (443 if self._tls else 80))
        self._local = threading.local()  # each thread's kept-alive connection (made for this endpoint)

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection
        if self._tls is not None:
            name = self.endpoint.server_name or self._server_host
            connection = _TLSConnection(*self._address, timeout=timeout, tls=self._tls, name=name)
        else:
            connection = http.client.HTTPConnection(*self._address, timeout=timeout)
        if self._tunnel:
            connection.set_tunnel(*self._tunnel)
        return connection

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": self.user_agent}
        authorization = self.endpoint.authorization()
        if authorization:
            headers["Authorization"] = authorization
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _send(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = None,
        *,
        timeout: float | None = None,
        stream: float | None = None,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """One request; `stream` (a read timeout) gives it a connection of its own."""
        renewed = False
        while True:
            pooled: http.client.HTTPConnection | None = None if stream else getattr(self._local, "conn", None)
            connection = pooled or self._connection(CONNECT_TIMEOUT if stream else self.timeout)
            try:
                if connection.sock is None:  # new, or closed after a response that said so
                    connection.connect()
                assert connection.sock is not None
                connection.sock.settimeout(stream or timeout or self.timeout)
                connection.request(
                    method, self._prefix + path, body=body, headers=self._headers(content_type)
                )
                response = connection.getresponse()
            except (OSError, http.client.HTTPException) as err:
                self._local.conn = None
                connection.close()
                if pooled is not None and isinstance(err, _STALE):
                    continue  # closed by the server while idle: once more on a fresh connection
                raise KubeError(f"{method} {self.endpoint.server}{path}: {err}") from None
            if not stream:
                self._local.conn = connection
            if response.status == 401 and self.endpoint.renew and not renewed:
                response.read()
                renewed = True
                self._use(self.endpoint.renew())
                continue
            if response.status >= 400:
                message = status_message(response.read())
                if stream:
                    connection.close()
                raise ApiError(method, path, response.status, message)
            return connection, response

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        content_type: str | None = None,
        timeout: float | None = None,
    ) -> Obj:
        data = None if body is None else json.dumps(body).encode()
        content_type = content_type or ("application/json" if data is not None else None)
        _, response = self._send(method, path, data, content_type, timeout=timeout)
        try:
            raw = response.read()
        except (OSError, http.client.HTTPException) as err:
            self._local.conn = None
            raise KubeError(f"{method} {self.endpoint.server}{path}: {err}") from None
        answer = _json(method, path, raw)
        if not isinstance(answer, dict):
            raise KubeError(f"{method} {path}: not a Kubernetes object: {raw[:120]!r}")
        return answer

    def get(self, path: str, *, timeout: float | None = None) -> Obj:
        return self.request("GET", path, timeout=timeout)

    def create(self, path: str, body: Obj) -> Obj:
        return self.request("POST", path, body)

    def patch(self, path: str, operations: list[Obj]) -> Obj:
        """An RFC 6902 JSON patch (as kubectl patch --type=json, and the kubernetes client sends a
        list body): `test` operations make it conditional."""
        return self.request("PATCH", path, operations, "application/json-patch+json")

    def list(self, path: str, *, field_selector: str | None = None) -> Listing:
        """Every item, page by page (limit/continue, as kubectl pages)."""
        items: list[Obj] = []
        token: str | None = None
        while True:
            query = {"limit": PAGE, "continue": token, "fieldSelector": field_selector}
            page = self.get(_with_query(path, query))
            if not isinstance(page.get("items") or [], list):
                raise KubeError(f"GET {path}: not a Kubernetes list: {json.dumps(page)[:120]}")
            items += page.get("items") or []
            metadata = page.get("metadata") or {}
            token = metadata.get("continue") or None
            if not token:
                return Listing(items, metadata.get("resourceVersion"))

    def watch(
        self,
        path: str,
        *,
        resource_version: str | None,
        field_selector: str | None = None,
        timeout_seconds: int = 240,
    ) -> Iterator[WatchEvent]:
        """The changes after `resource_version`, bookmarks included, until the server ends the
        watch after `timeout_seconds` — or until it has been silent for longer than that, which
        means the connection is dead: both simply end the iteration, to be resumed from the last
        resourceVersion. An expired resourceVersion is an ApiError with status 410: relist."""
        query = {
            "watch": "true",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": timeout_seconds,
            "resourceVersion": resource_version,
            "fieldSelector": field_selector,
        }
        full = _with_query(path, query)
        connection, response = self._send("GET", full, stream=timeout_seconds + 2.0)
        try:
            while line := self._line(response, path):
                if not line.strip():
                    continue
                event = _json("GET", path, line)
                kind, obj = event.get("type"), event.get("object")
                if not isinstance(kind, str) or not isinstance(obj, dict):
                    raise KubeError(f"GET {path}: not a watch event: {line[:120]!r}")
                if kind == "ERROR":  # a Status, e.g. 410 Gone once the resourceVersion is compacted
                    raise ApiError("GET", full, int(obj.get("code") or 500), str(obj.get("message")))
                yield WatchEvent(kind, obj)
        finally:
            connection.close()

    def _line(self, response: http.client.HTTPResponse, path: str) -> bytes:
        try:
            return response.readline()
        except TimeoutError:
            return b""  # silent past the server's own timeout: a dead connection
        except (OSError, http.client.HTTPException) as err:
            raise KubeError(f"GET {self.endpoint.server}{path}: watch broken: {err}") from None
