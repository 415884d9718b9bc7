"""The webhook's serving certificate: files that are reloaded when they change (cert-manager or a
mounted Secret rotating them), and a bootstrap for clusters without cert-manager."""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import os
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from netisolate.kube import Secrets, WebhookConfigurations, resource_path
from netisolate.kubeclient import ApiError

log = logging.getLogger(__name__)
ADMISSION = "admissionregistration.k8s.io/v1"


class ReloadingCert:
    """An SSLContext whose certificate follows its files: new handshakes get the new certificate."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file, self.key_file = cert_file, key_file
        self.context = _server_context()
        self._stamp = self._mtimes()
        self._load()

    def _mtimes(self) -> tuple[float, float]:
        return os.stat(self.cert_file).st_mtime, os.stat(self.key_file).st_mtime

    def _load(self) -> None:
        """One read of the pair, checked in a scratch context before the live one takes it: loading
        the live context straight from files that rotate under it could leave it holding a
        certificate without its key, and every new handshake would fail."""
        cert, key = Path(self.cert_file).read_bytes(), Path(self.key_file).read_bytes()
        with tempfile.TemporaryDirectory(prefix="netisolate-tls-") as scratch:
            cert_copy, key_copy = Path(scratch, "tls.crt"), Path(scratch, "tls.key")
            cert_copy.write_bytes(cert)
            key_copy.touch(mode=0o600)
            key_copy.write_bytes(key)
            _server_context().load_cert_chain(cert_copy, key_copy)  # raises unless they match
            self.context.load_cert_chain(cert_copy, key_copy)

    def reload_if_changed(self) -> bool:
        stamp = self._mtimes()
        if stamp == self._stamp:
            return False
        self._load()
        self._stamp = stamp
        log.info("serving certificate reloaded", extra={"cert_file": self.cert_file})
        return True

    async def watch(self, interval: float = 5.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.reload_if_changed()
            except (OSError, ssl.SSLError) as err:  # mid-rotation: keep the old one, try again
                log.warning("certificate reload failed, keeping the current one", extra={"error": str(err)})


def _server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@dataclass(frozen=True)
class CertBundle:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def generate(service: str, namespace: str, days: int = 3650) -> CertBundle:
    """A CA and a serving certificate for the webhook Service's DNS names."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("netisolate-webhook-ca"))
        .issuer_name(_name("netisolate-webhook-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[2]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return CertBundle(ca.public_bytes(pem), cert.public_bytes(pem), key_pem)


def write_files(bundle: CertBundle, directory: Path) -> tuple[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert_file.write_bytes(bundle.cert_pem)
    key_file.touch(mode=0o600)
    key_file.write_bytes(bundle.key_pem)
    return str(cert_file), str(key_file)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class CertificateError(RuntimeError):
    """The bootstrap Secret cannot serve: the message says how to get a new one."""


def bootstrap(
    core: Secrets,
    admission: WebhookConfigurations,
    *,
    namespace: str,
    secret: str,
    service: str,
    webhook_config: str,
) -> CertBundle:
    """First writer wins: read the Secret; if absent, create it (a replica that loses the race reads
    the winner's). Then point our own ValidatingWebhookConfiguration — and only it — at the CA."""
    bundle = _secret_bundle(core, namespace=namespace, secret=secret, service=service)
    patch_ca_bundle(admission, webhook_config, bundle.ca_pem)
    return bundle


def _secret_bundle(core: Secrets, *, namespace: str, secret: str, service: str) -> CertBundle:
    path = resource_path("v1", "secrets", namespace)
    try:
        data = core.get(f"{path}/{secret}").get("data")
    except ApiError as err:
        if err.status != 404:
            raise
        bundle = generate(service, namespace)
        created = {
            "tls.crt": _b64(bundle.cert_pem),
            "tls.key": _b64(bundle.key_pem),
            "ca.crt": _b64(bundle.ca_pem),
        }
        body = {"metadata": {"name": secret}, "type": "kubernetes.io/tls", "data": created}
        try:
            core.create(path, body)
            log.info("created the webhook's TLS secret", extra={"secret": f"{namespace}/{secret}"})
            data = created
        except ApiError as race:
            if race.status != 409:
                raise
            data = core.get(f"{path}/{secret}").get("data")
    renew = f"delete Secret {namespace}/{secret} and restart the webhook to have a new one created"
    data = data or {}
    missing = [key for key in ("ca.crt", "tls.crt", "tls.key") if key not in data]
    if missing:
        raise CertificateError(f"Secret {namespace}/{secret} lacks {', '.join(missing)}: {renew}")
    bundle = CertBundle(*(base64.b64decode(data[k]) for k in ("ca.crt", "tls.crt", "tls.key")))
    _check_serving(bundle.cert_pem, f"{service}.{namespace}.svc", renew)
    return bundle


def _check_serving(cert_pem: bytes, name: str, renew: str) -> None:
    cert = x509.load_pem_x509_certificate(cert_pem)
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    if left <= datetime.timedelta(0):
        expired = f"{cert.not_valid_after_utc:%Y-%m-%d}"
        raise CertificateError(f"the webhook's certificate expired on {expired}: {renew}")
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = x509.SubjectAlternativeName([])
    if name not in names.get_values_for_type(x509.DNSName):
        raise CertificateError(f"the webhook's certificate does not name {name}: {renew}")
    if left < datetime.timedelta(days=30):
        log.warning("the webhook's certificate expires soon", extra={"days_left": left.days, "todo": renew})


def patch_ca_bundle(admission: WebhookConfigurations, webhook_config: str, ca_pem: bytes) -> int:
    """Set our CA on every webhook of our own configuration that lacks it; how many were patched."""
    path = resource_path(
        "admissionregistration.k8s.io/v1", "validatingwebhookconfigurations", name=webhook_config
    )
    config = admission.get(path)
    ca = _b64(ca_pem)
    patch: list[dict[str, Any]] = [
        {"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": ca}
        for i, hook in enumerate(config.get("webhooks") or [])
        if (hook.get("clientConfig") or {}).get("caBundle") != ca
    ]
    if patch:
        admission.patch(path, patch)
        log.info("patched caBundle", extra={"webhook_configuration": webhook_config, "webhooks": len(patch)})
    return len(patch)


async def keep_ca_bundle(
    admission: WebhookConfigurations, webhook_config: str, ca_pem: bytes, interval: float = 60.0
) -> None:
    """Put our CA back when the configuration is re-created without it (GitOps re-applying the
    manifests): with failurePolicy Fail, an empty caBundle would deny every pod."""
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(patch_ca_bundle, admission, webhook_config, ca_pem)
        except Exception as err:  # the API server away or RBAC broken: try again next round
            log.warning("could not check the caBundle", extra={"error": str(err)})
