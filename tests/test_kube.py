"""The Protocols in netisolate.kube are what netisolate's own client does: mypy --strict (which CI
runs over tests too) checks the assignments below structurally, so a call a consumer makes that
the client lacks fails type checking rather than in a cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from netisolate.kube import AgentApi, EventReader, Lister, WebhookApi, resource_path
from netisolate.kubeclient import Client
from netisolate.kubeconfig import Endpoint

CLIENT = Client(Endpoint("http://127.0.0.1:9"))
AGENT: AgentApi = CLIENT  # type-checked: the client is every consumer's API
WEBHOOK: WebhookApi = CLIENT
SUGGEST: EventReader = CLIENT
AUDIT: Lister = CLIENT


def test_resource_paths_are_the_api_servers() -> None:
    assert resource_path("v1", "pods") == "/api/v1/pods"
    assert resource_path("v1", "events", "shop") == "/api/v1/namespaces/shop/events"
    assert resource_path("v1", "namespaces", name="shop") == "/api/v1/namespaces/shop"
    assert resource_path("v1", "pods", "shop", "web-0") == "/api/v1/namespaces/shop/pods/web-0"
    hooks = resource_path("admissionregistration.k8s.io/v1", "validatingwebhookconfigurations", name="n")
    assert hooks == "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/n"
    assert resource_path("v1", "pods", "a/b", "c?d") == "/api/v1/namespaces/a%2Fb/pods/c%3Fd"


def test_what_the_image_runs_never_imports_the_kubernetes_client(tmp_path: Path) -> None:
    """The agent and the webhook, up to their first request: the kubernetes client is not in the
    image (an optional extra) and cost ~1 s of their start when it was."""
    config = tmp_path / "kubeconfig"
    config.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: x\n"
        "clusters: [{name: c, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "users: [{name: u, user: {tokenFile: token}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u}}]\n"
    )
    script = (
        "import sys; import netisolate.commands.agent, netisolate.agent.node, netisolate.agent.cni, "
        "netisolate.commands.webhook, netisolate.webhook.server, netisolate.webhook.tls; "
        "from netisolate.kube import api_client; api_client(sys.argv[1]); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kubernetes', 'urllib3')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(config)], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert done.stdout.strip() == "[]", done.stdout
