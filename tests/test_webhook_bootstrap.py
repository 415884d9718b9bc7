"""TLS bootstrap against the Kubernetes API stand-in (see tests/kube_standin.py for its gaps)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
from cryptography import x509
from kubernetes import client

from netisolate.kubeclient import ApiError, Client
from netisolate.webhook import tls
from tests.kube_standin import api_client, declare, ours, put

VWC = "admissionregistration.k8s.io/v1/validatingwebhookconfigurations"


def webhook_configuration(name: str) -> dict[str, Any]:
    hook = {
        "clientConfig": {"service": {"name": "netisolate-webhook", "namespace": "netisolate-system"}},
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
    }
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{"name": f"pods.{name}.io", **hook}, {"name": f"ns.{name}.io", **hook}],
    }


def _ca_bundles(config: client.V1ValidatingWebhookConfiguration) -> list[bytes]:
    """Each webhook's caBundle, decoded (b"" where it has none)."""
    return [base64.b64decode(h.client_config.ca_bundle or "") for h in config.webhooks or []]


def run_bootstrap(api: client.ApiClient) -> tls.CertBundle:
    """The bootstrap with the webhook's own client, of the stand-in `api` drives."""
    theirs = ours(client.CoreV1Api(api))
    return tls.bootstrap(
        theirs,
        theirs,
        namespace="netisolate-system",
        secret="netisolate-webhook-tls",
        service="netisolate-webhook",
        webhook_config="netisolate",
    )


class LateReader:
    """A replica that read "no Secret" just before another replica created it."""

    def __init__(self, api: Client) -> None:
        self.api, self.missed = api, False

    def get(self, path: str, *, timeout: float | None = None) -> dict[str, Any]:
        if not self.missed:
            self.missed = True
            raise ApiError("GET", path, 404, "secrets not found")
        return self.api.get(path)

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.api.create(path, body)  # the stand-in answers 409


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_first_writer_wins_and_only_our_configuration_is_patched(kmock: Any) -> None:
    declare(kmock)
    put(kmock, VWC, webhook_configuration("netisolate"))
    put(kmock, VWC, webhook_configuration("someone-else"))
    api = api_client(kmock)
    first = await asyncio.to_thread(run_bootstrap, api)
    late = LateReader(ours(kmock))
    second = await asyncio.to_thread(
        tls.bootstrap,
        late,
        ours(kmock),
        namespace="netisolate-system",
        secret="netisolate-webhook-tls",
        service="netisolate-webhook",
        webhook_config="netisolate",
    )
    assert late.missed
    assert first == second, "the replica that lost the race serves the winner's certificate"
    cert = x509.load_pem_x509_certificate(first.cert_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )
    assert "netisolate-webhook.netisolate-system.svc" in names
    # (sync client calls go to a thread: kmock serves from this test's event loop)
    read = client.AdmissionregistrationV1Api(api).read_validating_webhook_configuration
    own = await asyncio.to_thread(read, "netisolate")
    assert _ca_bundles(own) == [first.ca_pem] * 2
    theirs = await asyncio.to_thread(read, "someone-else")
    assert all(h.client_config.ca_bundle is None for h in theirs.webhooks or [])
    patched = {str(r.url.path) for r in kmock if r.method == "PATCH"}
    assert patched == {"/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/netisolate"}


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_a_restart_reuses_the_secret_and_patches_nothing(kmock: Any) -> None:
    declare(kmock)
    put(kmock, VWC, webhook_configuration("netisolate"))
    api = api_client(kmock)
    first = await asyncio.to_thread(run_bootstrap, api)
    patches = sum(1 for r in kmock if r.method == "PATCH")
    again = await asyncio.to_thread(run_bootstrap, api)
    assert again == first
    assert sum(1 for r in kmock if r.method == "PATCH") == patches


def tls_secret(bundle: tls.CertBundle, without: str = "") -> dict[str, Any]:
    data = {"ca.crt": bundle.ca_pem, "tls.crt": bundle.cert_pem, "tls.key": bundle.key_pem}
    return {
        "metadata": {"name": "netisolate-webhook-tls", "namespace": "netisolate-system"},
        "type": "kubernetes.io/tls",
        "data": {k: base64.b64encode(v).decode() for k, v in data.items() if k != without},
    }


SERVICE = ("netisolate-webhook", "netisolate-system")


@pytest.mark.timeout(60)
@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("secret", "says"),
    [
        (tls_secret(tls.generate(*SERVICE), without="ca.crt"), "lacks ca.crt"),
        (tls_secret(tls.generate(*SERVICE, days=0)), "expired"),  # valid until the moment it was made
        (tls_secret(tls.generate("other-service", "netisolate-system")), "does not name"),
    ],
)
async def test_an_unusable_secret_is_refused_with_what_to_do(
    kmock: Any, secret: dict[str, Any], says: str
) -> None:
    declare(kmock)
    put(kmock, VWC, webhook_configuration("netisolate"))
    put(kmock, "v1/secrets", secret)
    todo = "delete Secret netisolate-system/netisolate-webhook-tls"
    with pytest.raises(tls.CertificateError, match=f"{says}.*{todo}"):
        await asyncio.to_thread(run_bootstrap, api_client(kmock))


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_a_configuration_recreated_without_our_ca_gets_it_back(kmock: Any) -> None:
    declare(kmock)
    put(kmock, VWC, webhook_configuration("netisolate"))
    api = api_client(kmock)
    bundle = await asyncio.to_thread(run_bootstrap, api)
    put(kmock, VWC, webhook_configuration("netisolate"))  # GitOps re-applies the manifest: no caBundle
    admission = client.AdmissionregistrationV1Api(api)
    keeper = asyncio.create_task(tls.keep_ca_bundle(ours(kmock), "netisolate", bundle.ca_pem, interval=0.05))
    try:
        for _ in range(100):
            own = await asyncio.to_thread(admission.read_validating_webhook_configuration, "netisolate")
            if all(h.client_config.ca_bundle for h in own.webhooks or []):
                break
            await asyncio.sleep(0.05)
    finally:
        keeper.cancel()
    assert set(_ca_bundles(own)) == {bundle.ca_pem}
