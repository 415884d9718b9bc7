"""Read-only lists from the Kubernetes API, for `netisolate audit`, in the standard library.

Importing the kubernetes client loads every API model it has (0.3 s on a warm machine, 2.5 s on a
cold one) before the first request; the audit only lists three kinds of object. So it reads the
credentials kubectl would (`--kubeconfig`, else the in-cluster service account, else $KUBECONFIG
or ~/.kube/config) and sends plain GETs. What it does not read itself — legacy `auth-provider`
plugins, basic auth, `tls-server-name`, `proxy-url`, several files in $KUBECONFIG — goes through
the kubernetes client (`via_client`). Like that client (and unlike kubectl), neither reads
HTTPS_PROXY from the environment: give the kubeconfig a `proxy-url`.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml

from netisolate.model import InputError

Get = Callable[[str], bytes]  # an API path with its query → the response body
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
PAGE = 500


class KubeReadError(RuntimeError):
    """The API server could not be reached, or refused or garbled a list."""


class NeedsClientError(Exception):
    """Credentials only the kubernetes client knows how to use."""


@dataclass(frozen=True)
class Endpoint:
    server: str
    ca_pem: bytes | None = None
    insecure: bool = False
    token: str | None = None
    client_pem: tuple[bytes, bytes] | None = None  # certificate, key


def _data(entry: Mapping[str, Any], field: str, base: Path) -> bytes | None:
    """`<field>-data` (base64) or `<field>` (a file, relative to the kubeconfig's directory)."""
    if entry.get(f"{field}-data"):
        return base64.b64decode(str(entry[f"{field}-data"]))
    if entry.get(field):
        return (base / str(entry[field])).expanduser().read_bytes()
    return None


def _named(config: Mapping[str, Any], kind: str, name: object) -> dict[str, Any]:
    for item in config.get(f"{kind}s") or []:
        if isinstance(item, dict) and item.get("name") == name and isinstance(item.get(kind), dict):
            return dict(item[kind])
    raise InputError(f"the kubeconfig has no {kind} named {name!r}")


def _exec(spec: Mapping[str, Any], server: str) -> tuple[str | None, tuple[bytes, bytes] | None]:
    """An exec credential plugin (client.authentication.k8s.io), as kubectl runs it."""
    info = {"apiVersion": spec.get("apiVersion"), "kind": "ExecCredential", "spec": {"interactive": False}}
    env = {**os.environ, "KUBERNETES_EXEC_INFO": json.dumps(info)}
    env.update(
        {str(e.get("name")): str(e.get("value")) for e in spec.get("env") or [] if isinstance(e, dict)}
    )
    command = [str(spec.get("command")), *(str(a) for a in spec.get("args") or [])]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=True)
        status = json.loads(done.stdout)["status"]
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError) as err:
        raise InputError(
            f"the kubeconfig's exec credential plugin {command[0]!r} failed for {server}: {err}"
        ) from None
    cert, key = status.get("clientCertificateData"), status.get("clientKeyData")
    return status.get("token"), (cert.encode(), key.encode()) if cert and key else None


def _from_kubeconfig(path: Path, config: Mapping[str, Any]) -> Endpoint:
    context = _named(config, "context", config.get("current-context"))
    cluster = _named(config, "cluster", context.get("cluster"))
    user = _named(config, "user", context.get("user")) if context.get("user") else {}
    if any(user.get(k) for k in ("auth-provider", "username")) or any(
        cluster.get(k) for k in ("tls-server-name", "proxy-url")
    ):
        raise NeedsClientError
    base, server = path.parent, str(cluster.get("server") or "")
    token = str(user["token"]) if user.get("token") else None
    if user.get("tokenFile"):
        token = (base / str(user["tokenFile"])).read_text().strip()
    cert, key = _data(user, "client-certificate", base), _data(user, "client-key", base)
    client_pem = (cert, key) if cert and key else None
    if isinstance(user.get("exec"), dict):
        token, client_pem = _exec(user["exec"], server)
    return Endpoint(
        server=server.rstrip("/"),
        ca_pem=_data(cluster, "certificate-authority", base),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        token=token,
        client_pem=client_pem,
    )


def _kubeconfig_path() -> Path:
    paths = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    if len(paths) > 1:  # kubectl merges them: the kubernetes client does that too
        raise NeedsClientError
    return Path(paths[0] if paths else "~/.kube/config").expanduser()


def load_endpoint(kubeconfig: str | None) -> Endpoint:
    """The API server and credentials: `kubeconfig`, else in-cluster, else $KUBECONFIG or
    ~/.kube/config. Raises InputError naming what is missing, NeedsClientError."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if not kubeconfig and host and port and (SERVICE_ACCOUNT / "token").exists():
        return Endpoint(
            server=f"https://{host}:{port}" if ":" not in host else f"https://[{host}]:{port}",
            ca_pem=(SERVICE_ACCOUNT / "ca.crt").read_bytes(),
            token=(SERVICE_ACCOUNT / "token").read_text().strip(),
        )
    path = Path(kubeconfig).expanduser() if kubeconfig else _kubeconfig_path()
    where = kubeconfig or f"the in-cluster service account, $KUBECONFIG or {path}"
    try:
        config = yaml.safe_load(path.read_text())
        if not isinstance(config, dict):
            raise InputError("it is not a kubeconfig (a mapping)")
        return _from_kubeconfig(path, config)
    except (OSError, yaml.YAMLError, ValueError, InputError) as err:
        raise InputError(
            f"cannot load Kubernetes credentials from {where}: {err}; pass --kubeconfig"
        ) from None


def _context(endpoint: Endpoint) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if endpoint.ca_pem:
        context.load_verify_locations(cadata=endpoint.ca_pem.decode())
    if endpoint.insecure:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if endpoint.client_pem:
        # ssl reads a key pair only from files: a private directory, gone once they are loaded
        with tempfile.TemporaryDirectory(prefix="netisolate-kube-") as tmp:
            cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            cert.write_bytes(endpoint.client_pem[0])
            key.write_bytes(endpoint.client_pem[1])
            context.load_cert_chain(cert, key)
    return context


def http_get(endpoint: Endpoint, timeout: float = 30) -> Get:
    headers = {"Accept": "application/json", "User-Agent": "netisolate-audit"}
    if endpoint.token:
        headers["Authorization"] = f"Bearer {endpoint.token}"
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if endpoint.server.startswith("https:"):
        handlers.append(urllib.request.HTTPSHandler(context=_context(endpoint)))
    opener = urllib.request.build_opener(*handlers)

    def get(path: str) -> bytes:
        request = urllib.request.Request(endpoint.server + path, headers=headers)
        try:
            with opener.open(request, timeout=timeout) as response:
                body: bytes = response.read()
                return body
        except urllib.error.HTTPError as err:
            raise KubeReadError(f"GET {path}: HTTP {err.code}: {_status_message(err.read())}") from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise KubeReadError(f"GET {endpoint.server}{path}: {getattr(err, 'reason', err)}") from None

    return get


def _status_message(body: str | bytes) -> str:
    """The message of the Status the API server answers an error with, else the body's start."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    try:
        message = json.loads(text).get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message) if message else text[:200]


def via_client(kubeconfig: str | None) -> Get:
    """The same GETs through the kubernetes client's configuration and connection pool, for the
    credentials only it reads. Its REST layer alone: what it has in common across client versions
    (29 raises on an error status and preloads the body, 37 does neither)."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    from netisolate.kube import api_clients

    core, _ = api_clients(kubeconfig)
    client = cast(Any, core).api_client  # the CoreV1Api's own ApiClient: outside the calls kube.py types
    configuration = client.configuration
    headers = {"Accept": "application/json", "User-Agent": "netisolate-audit"}

    def get(path: str) -> bytes:
        for auth in configuration.auth_settings().values():
            if auth.get("in") == "header" and auth.get("value"):
                headers[auth["key"]] = auth["value"]
        try:
            response = client.rest_client.request("GET", configuration.host + path, headers=headers)
            body: bytes = response.data if response.data is not None else response.read()
        except ApiException as err:
            raise KubeReadError(f"GET {path}: HTTP {err.status}: {_status_message(err.body or '')}") from None
        except (HTTPError, OSError) as err:
            raise KubeReadError(f"GET {path}: {err}") from None
        if not 200 <= response.status < 300:
            raise KubeReadError(f"GET {path}: HTTP {response.status}: {_status_message(body)}")
        return body

    return get


def getter(kubeconfig: str | None) -> Get:
    try:
        return http_get(load_endpoint(kubeconfig))
    except NeedsClientError:
        return via_client(kubeconfig)


def list_items(get: Get, path: str) -> list[object]:
    """Every item of a list, page by page (limit/continue, as kubectl pages)."""
    items: list[object] = []
    token = ""
    while True:
        query = urllib.parse.urlencode({"limit": PAGE, **({"continue": token} if token else {})})
        body = get(f"{path}?{query}")
        try:
            page = json.loads(body)
            if not isinstance(page["items"] or [], list):
                raise TypeError
            items += page["items"] or []
            token = str((page.get("metadata") or {}).get("continue") or "")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise KubeReadError(f"GET {path}: not a Kubernetes list: {body[:120]!r}") from None
        if not token:
            return items
