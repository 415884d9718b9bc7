"""Where the Kubernetes API server is and who we are to it: an Endpoint, read from `--kubeconfig`,
else the in-cluster service account, else $KUBECONFIG or ~/.kube/config (as kubectl).

Read in the standard library: importing the kubernetes client costs 0.5 s to 2.5 s before the first
request, more than a whole audit or the agent's first pod. Only what this module does not read —
legacy `auth-provider` plugins, several files in $KUBECONFIG (kubectl merges them) — is loaded by
the kubernetes client when it is installed (`netisolate[kubernetes]`), and turned into an Endpoint
too (`via_client`): every request is still ours. Like that client (and unlike kubectl), we do not
read HTTPS_PROXY from the environment: give the kubeconfig a `proxy-url`.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

from netisolate.model import InputError

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class NeedsClientError(Exception):
    """Credentials only the kubernetes client knows how to read."""


@dataclass(frozen=True)
class Endpoint:
    server: str
    ca_pem: bytes | None = None
    insecure: bool = False
    token: str | None = None
    # re-read for every request: bound service-account tokens expire and the kubelet rotates them
    token_file: Path | None = None
    basic: tuple[str, str] | None = None  # user, password
    client_pem: tuple[bytes, bytes] | None = None  # certificate, key
    server_name: str | None = None  # tls-server-name: the name the certificate must carry
    proxy: str | None = None  # an http:// proxy, reached with CONNECT
    # the full Authorization value from credentials the kubernetes client refreshes (auth-provider)
    refresh: Callable[[], str | None] | None = field(default=None, compare=False)
    # credentials read anew when the server answers 401 (exec plugins hand out expiring tokens)
    renew: Callable[[], Endpoint] | None = field(default=None, compare=False)

    def authorization(self) -> str | None:
        if self.token_file is not None:
            return f"Bearer {self.token_file.read_text().strip()}"
        if self.token:
            return f"Bearer {self.token}"
        if self.basic:
            return "Basic " + base64.b64encode(":".join(self.basic).encode()).decode()
        return self.refresh() if self.refresh else None

    def tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self.ca_pem:
            context.load_verify_locations(cadata=self.ca_pem.decode())
        if self.insecure:
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        if self.client_pem:
            # ssl reads a key pair only from files: a private directory, gone once they are loaded
            with tempfile.TemporaryDirectory(prefix="netisolate-kube-") as tmp:
                cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
                cert.write_bytes(self.client_pem[0])
                key.write_bytes(self.client_pem[1])
                context.load_cert_chain(cert, key)
        return context


def _data(entry: Mapping[str, Any], name: str, base: Path) -> bytes | None:
    """`<name>-data` (base64) or `<name>` (a file, relative to the kubeconfig's directory)."""
    if entry.get(f"{name}-data"):
        return base64.b64decode(str(entry[f"{name}-data"]))
    if entry.get(name):
        return (base / str(entry[name])).expanduser().read_bytes()
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
    if user.get("auth-provider"):
        raise NeedsClientError
    base, server = path.parent, str(cluster.get("server") or "")
    token = str(user["token"]) if user.get("token") else None
    token_file = base / str(user["tokenFile"]) if user.get("tokenFile") and not token else None
    cert, key = _data(user, "client-certificate", base), _data(user, "client-key", base)
    client_pem = (cert, key) if cert and key else None
    renew = None
    if isinstance(user.get("exec"), dict):
        token, client_pem = _exec(user["exec"], server)
        renew = partial(load_endpoint, str(path))
    return Endpoint(
        server=server.rstrip("/"),
        ca_pem=_data(cluster, "certificate-authority", base),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        token=token,
        token_file=token_file,
        basic=(str(user["username"]), str(user.get("password") or "")) if user.get("username") else None,
        client_pem=client_pem,
        server_name=str(cluster["tls-server-name"]) if cluster.get("tls-server-name") else None,
        proxy=str(cluster["proxy-url"]) if cluster.get("proxy-url") else None,
        renew=renew,
    )


def _kubeconfig_path() -> Path:
    paths = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    if len(paths) > 1:  # kubectl merges them: the kubernetes client does that too
        raise NeedsClientError
    return Path(paths[0] if paths else "~/.kube/config").expanduser()


def in_cluster() -> Endpoint | None:
    """The pod's service account, when the kubelet mounted one and the Service is in the env."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if not (host and port and (SERVICE_ACCOUNT / "token").exists()):
        return None
    return Endpoint(
        server=f"https://{host}:{port}" if ":" not in host else f"https://[{host}]:{port}",
        ca_pem=(SERVICE_ACCOUNT / "ca.crt").read_bytes(),
        token_file=SERVICE_ACCOUNT / "token",
    )


def load_endpoint(kubeconfig: str | None) -> Endpoint:
    """The API server and credentials: `kubeconfig`, else in-cluster, else $KUBECONFIG or
    ~/.kube/config. Raises InputError naming what is missing, NeedsClientError."""
    found = None if kubeconfig else in_cluster()
    if found is not None:
        return found
    import yaml  # only here: in a pod (the agent, the webhook) there is no file to parse

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


def via_client(kubeconfig: str | None) -> Endpoint:
    """The Endpoint the kubernetes client's kubeconfig loader makes of what only it reads; its
    token refresh (auth-provider) is called for every request's Authorization header."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise InputError(
            "this kubeconfig needs the kubernetes client (an auth-provider, or several files in "
            "$KUBECONFIG): pip install 'netisolate[kubernetes]', or use an exec plugin or a token"
        ) from None
    configuration = client.Configuration()
    # named here: the client reads $KUBECONFIG once, when it is imported
    files = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    try:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=files, client_configuration=configuration
        )
    except (config.ConfigException, OSError) as err:
        raise InputError(
            f"cannot load Kubernetes credentials from {files}: {err}; pass --kubeconfig"
        ) from None

    def authorization() -> str | None:
        # what the client itself would send (its auth settings call its refresh hook, and differ in
        # shape across client versions: 29 keys the token "authorization", 37 "BearerToken")
        settings = cast(dict[str, dict[str, Any]], configuration.auth_settings())  # TypedDicts by version
        for auth in settings.values():
            if auth.get("in") == "header" and str(auth.get("key")).lower() == "authorization":
                return str(auth["value"]) if auth.get("value") else None
        return None

    def read(name: str | None) -> bytes | None:
        return Path(name).read_bytes() if name else None

    cert, key = read(configuration.cert_file), read(configuration.key_file)
    return Endpoint(
        server=str(configuration.host).rstrip("/"),
        ca_pem=read(configuration.ssl_ca_cert),
        insecure=not configuration.verify_ssl,
        client_pem=(cert, key) if cert and key else None,
        server_name=getattr(configuration, "tls_server_name", None),
        proxy=configuration.proxy,
        refresh=authorization,
    )


def endpoint(kubeconfig: str | None) -> Endpoint:
    try:
        return load_endpoint(kubeconfig)
    except NeedsClientError:
        return via_client(kubeconfig)
