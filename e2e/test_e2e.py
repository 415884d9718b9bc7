"""End-to-end on a kind cluster with netisolate installed (e2e/run.sh sets it up). The connectivity
scenarios are the shared data in netisolate/scenarios/ — the same ones tests/test_scenarios_local.py
runs on the local node harness in CI.

Skipped unless E2E_KUBECONFIG points at such a cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from netisolate import scenarios
from netisolate.policy import parse_grants

KUBECONFIG = os.environ.get("E2E_KUBECONFIG", "")
ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.skipif(
    not KUBECONFIG, reason="E2E_KUBECONFIG is not set: run e2e/run.sh (needs Docker + kind)"
)


def kubectl(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["kubectl", "--kubeconfig", KUBECONFIG, *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=180,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr}")
    return result


def apply(obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return kubectl("apply", "-f", "-", stdin=json.dumps(obj), check=False)


# Protected namespace labels are set as a member of an exempt group. kind's admin (kubeadm >= 1.29)
# is in kubeadm:cluster-admins, not system:masters, so it is not exempt itself.
PLATFORM = ("--as=e2e-platform", "--as-group=netisolate:platform", "--as-group=system:authenticated")


@pytest.fixture(scope="session", autouse=True)
def platform_team() -> None:
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "e2e-platform"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [
            {"kind": "Group", "name": "netisolate:platform", "apiGroup": "rbac.authorization.k8s.io"}
        ],
    }
    assert apply(binding).returncode == 0


def namespace(name: str, labels: dict[str, str]) -> None:
    kubectl("create", "namespace", name, check=False)
    if labels:
        pairs = [f"{key}={value}" for key, value in labels.items()]
        kubectl("label", "namespace", name, "--overwrite", *PLATFORM, *pairs)


def run_scenario_pod(name: str) -> tuple[scenarios.Scenario, str, str]:
    scenario = scenarios.load(name)
    ns = f"e2e-{name}"
    namespace(ns, scenario.namespace_labels)
    pod = dict(scenario.pod)
    pod["metadata"] = {**pod["metadata"], "namespace": ns}
    result = apply(pod)
    assert result.returncode == 0, result.stderr
    pod_name = pod["metadata"]["name"]
    kubectl("wait", "-n", ns, f"pod/{pod_name}", "--for=condition=Ready", "--timeout=120s")
    client = next(iter(scenario.expect_open))
    deadline = time.monotonic() + 30
    while reach(ns, pod_name, client, "127.0.0.1", SENTINEL_PORT) != "unreachable":  # rules are live
        assert time.monotonic() < deadline, f"{ns}/{pod_name}: the agent's sentinel never answered"
        time.sleep(0.5)
    return scenario, ns, pod_name


SENTINEL_PORT = 9  # daemonset/base/config.yaml: answered with ICMP admin-prohibited once rules hold


def reach(ns: str, pod: str, client: str, address: str, port: int) -> str:
    """open (the listener answered "ok"), refused (a reset: our reject, or no listener), unreachable
    (the sentinel); anything else fails the test rather than passing for "blocked"."""
    probe = f"nc -w 2 {address} {port} </dev/null"
    result = kubectl("exec", "-n", ns, pod, "-c", client, "--", "sh", "-c", probe, check=False)
    if result.returncode == 0 and "ok" in result.stdout:
        return "open"
    for said, answer in (("Connection refused", "refused"), ("No route to host", "unreachable")):
        if said in result.stderr:
            return answer
    raise AssertionError(f"{client} -> {address}:{port} in {ns}/{pod}: {result.stdout!r} {result.stderr!r}")


def listening(ns: str, pod: str, client: str) -> set[int]:
    """TCP ports something listens on in the pod (read from /proc/net/tcp*, no privilege needed)."""
    out = kubectl("exec", "-n", ns, pod, "-c", client, "--", "netstat", "-ltn").stdout
    rows = [line.split() for line in out.splitlines()]
    return {int(row[3].rsplit(":", 1)[1]) for row in rows if row[:1] in (["tcp"], ["tcp6"])}


@pytest.mark.parametrize("name", scenarios.names())
def test_scenario_matrix(name: str) -> None:
    scenario, ns, pod = run_scenario_pod(name)
    pod_ip = kubectl("get", "pod", "-n", ns, pod, "-o", "jsonpath={.status.podIP}").stdout
    tcp = [
        (owner, grant)
        for owner, ports in scenario.listeners.items()
        for (grant,) in map(parse_grants, ports)
        if grant.protocol == "tcp"
    ]  # busybox nc cannot tell a UDP reply from silence: the local harness covers UDP
    # every listener is up, so a refusal below is the rules' and not an empty port's
    assert {grant.low for _, grant in tcp} <= listening(ns, pod, next(iter(scenario.expect_open)))
    wrong = {}
    for client in scenario.expect_open:
        for owner, grant in tcp:
            target = f"{owner}:{grant}"
            expected = "open" if scenario.expected(client, target) == "open" else "refused"
            for address in ("127.0.0.1", "127.0.0.53", "::1", pod_ip):
                got = reach(ns, pod, client, address, grant.low)
                if got != expected:
                    wrong[f"{client}->{target}@{address}"] = got
    assert not wrong, wrong


def test_injected_privileged_sidecar_is_denied() -> None:
    """What a compromised injector returns (examples/rogue-injected.yaml: a privileged, root, unknown-image
    container) is what our validating webhook sees, since validation runs after every mutation."""
    namespace("demo", {})
    result = kubectl("apply", "-f", str(ROOT / "examples" / "rogue-injected.yaml"), check=False)
    assert result.returncode != 0
    assert "netisolate denied" in result.stderr and "[privileged] container telemetry" in result.stderr


def test_kubectl_debug_as_root_is_denied() -> None:
    _, ns, pod = run_scenario_pod("app-proxy-rogue")
    result = kubectl(
        "debug", "-n", ns, pod, "--image=busybox:1.36", "-c", "debugger", "--", "sleep", "60", check=False
    )
    assert result.returncode != 0 and "netisolate denied" in result.stderr


def test_namespace_label_change_by_a_developer_is_denied() -> None:
    namespace("e2e-labels", {"istio-injection": "enabled"})
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "e2e-ns-editor"},
        "rules": [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "patch", "update"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "e2e-ns-editor"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "e2e-ns-editor"},
        "subjects": [{"kind": "User", "name": "dev", "apiGroup": "rbac.authorization.k8s.io"}],
    }
    assert apply(role).returncode == 0 and apply(binding).returncode == 0
    result = kubectl(
        "label",
        "namespace",
        "e2e-labels",
        "istio-injection=disabled",
        "--overwrite",
        "--as=dev",
        "--as-group=developers",
        check=False,
    )
    assert result.returncode != 0 and "namespace-label-protected" in result.stderr
    kubectl("label", "namespace", "e2e-labels", "team=shop", "--as=dev", "--as-group=developers")


def test_agent_restart_keeps_enforcement() -> None:
    scenario, ns, pod = run_scenario_pod("app-proxy-rogue")
    node = kubectl("get", "pod", "-n", ns, pod, "-o", "jsonpath={.spec.nodeName}").stdout
    agents = kubectl(
        "get",
        "pods",
        "-n",
        "netisolate-system",
        "-l",
        "app.kubernetes.io/name=netisolate-agent",
        "--field-selector",
        f"spec.nodeName={node}",
        "-o",
        "name",
    ).stdout.split()
    assert agents, f"no agent on {node}"
    # Keep the agents away (a deleted pod would be back within seconds), and see the rules hold.
    away = '{"spec":{"template":{"spec":{"nodeSelector":{"e2e-no-such-node":"true"}}}}}'
    back = '{"spec":{"template":{"spec":{"nodeSelector":{"e2e-no-such-node":null}}}}}'
    kubectl("-n", "netisolate-system", "patch", "daemonset/netisolate-agent", "--type=merge", "-p", away)
    try:
        kubectl("-n", "netisolate-system", "wait", "--for=delete", *agents, "--timeout=120s")
        for _ in range(3):  # while no agent runs on the node
            assert reach(ns, pod, "rogue", "127.0.0.1", 8080) == "refused"
            assert reach(ns, pod, "app", "127.0.0.1", 15001) == "open"
            time.sleep(1)
    finally:
        kubectl("-n", "netisolate-system", "patch", "daemonset/netisolate-agent", "--type=merge", "-p", back)
    kubectl("-n", "netisolate-system", "rollout", "status", "daemonset/netisolate-agent", "--timeout=120s")
    assert reach(ns, pod, "rogue", "127.0.0.1", 8080) == "refused"
    assert reach(ns, pod, "app", "127.0.0.1", 15001) == "open"
    assert scenario.expected("app", "proxy:15001") == "open"


def test_audit_finds_a_wide_scope_webhook() -> None:
    hook = yaml.safe_load("""
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {name: e2e-wide-injector}
webhooks:
  - name: inject.e2e.example.com
    admissionReviewVersions: [v1]
    sideEffects: None
    failurePolicy: Ignore
    objectSelector: {matchLabels: {e2e-never-matches: "true"}}
    clientConfig: {service: {name: nowhere, namespace: default, path: /inject}}
    rules: [{apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [pods]}]
""")
    assert apply(hook).returncode == 0
    result = subprocess.run(
        [sys.executable, "-m", "netisolate", "audit", "--kubeconfig", KUBECONFIG, "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    found = {(f["rule"], f["object"]) for f in json.loads(result.stdout)["findings"]}
    wide = "MutatingWebhookConfiguration e2e-wide-injector/inject.e2e.example.com"
    assert {("webhook-cluster-wide", wide), ("webhook-reaches-kube-system", wide)} <= found
