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


def node_exec(node: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """A command on a kind node (a Docker container named as the Kubernetes node)."""
    result = subprocess.run(
        ["docker", "exec", node, *argv], capture_output=True, text=True, check=False, timeout=60
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{node}: {' '.join(argv)}: {result.stderr}")
    return result


def nodes() -> list[str]:
    return kubectl("get", "nodes", "-o", "jsonpath={.items[*].metadata.name}").stdout.split()


def chain(node: str) -> list[str]:
    """The plugin types of the node's primary conflist (kindnet's)."""
    text = node_exec(node, "cat", "/etc/cni/net.d/10-kindnet.conflist").stdout
    return [plugin["type"] for plugin in json.loads(text)["plugins"]]


def test_the_cni_plugin_is_chained_last_on_every_node_and_put_back_when_rewritten() -> None:
    for node in nodes():
        assert chain(node)[-1] == "netisolate-cni", f"{node}: {chain(node)}"
        node_exec(node, "test", "-x", "/opt/cni/bin/netisolate-cni")
    node = nodes()[-1]
    # what kindnet would write again: its chain without ours, replaced by rename
    conf = "/etc/cni/net.d/10-kindnet.conflist"
    original = json.loads(node_exec(node, "cat", conf).stdout)
    original["plugins"] = [p for p in original["plugins"] if p["type"] != "netisolate-cni"]
    subprocess.run(
        [
            "docker",
            "exec",
            "-i",
            node,
            "sh",
            "-c",
            f"cat > /etc/cni/net.d/.e2e.tmp && mv /etc/cni/net.d/.e2e.tmp {conf}",
        ],
        input=json.dumps(original),
        text=True,
        check=True,
        timeout=60,
    )
    started = time.monotonic()
    while chain(node)[-1] != "netisolate-cni":
        assert time.monotonic() - started < 2.0, "the plugin was not back in the chain within 2 s"
        time.sleep(0.1)


def test_the_first_connection_of_a_new_container_is_already_refused() -> None:
    """No gate: the rogue container connects to the app's port the moment the app listens, once.
    The CNI plugin had the rules in before either container started."""
    namespace("e2e-first", {})
    scenario = scenarios.load("app-proxy-rogue")
    pod = json.loads(json.dumps(scenario.pod))
    pod["metadata"] = {**pod["metadata"], "name": "first", "namespace": "e2e-first"}
    wait_then_connect = (
        "until netstat -ltn | grep -q ':8080 '; do :; done; "
        "if nc -w 2 127.0.0.1 8080 </dev/null; then echo FIRST=open; else echo FIRST=refused; fi; "
        "sleep 1000000"
    )
    for container in pod["spec"]["containers"]:
        if container["name"] == "rogue":
            container["command"] = ["sh", "-c", wait_then_connect]
    assert apply(pod).returncode == 0
    kubectl("wait", "-n", "e2e-first", "pod/first", "--for=condition=Ready", "--timeout=120s")
    deadline = time.monotonic() + 30
    while "FIRST=" not in (log := kubectl("logs", "-n", "e2e-first", "first", "-c", "rogue").stdout):
        assert time.monotonic() < deadline, "the rogue container never tried"
        time.sleep(0.5)
    assert "FIRST=refused" in log, log


def pinned(name: str, ns: str, node: str, isolated: bool) -> dict[str, Any]:
    annotations = {"netisolate.io/isolation": "enforce"} if isolated else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "annotations": annotations},
        "spec": {
            "nodeName": node,
            "tolerations": [{"operator": "Exists"}],
            "containers": [
                {
                    "name": "c",
                    "image": "busybox:1.36",
                    "command": ["sleep", "1000000"],
                    "securityContext": {
                        "runAsUser": 1000,
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def sandbox_errors(ns: str, name: str) -> str:
    return kubectl(
        "get",
        "events",
        "-n",
        ns,
        "--field-selector",
        f"involvedObject.name={name},reason=FailedCreatePodSandBox",
        "-o",
        "jsonpath={.items[*].message}",
    ).stdout


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
        # New pods while the agent is away: an isolated one waits (fail closed) with a CNI error
        # that says why, one in an exempt namespace starts; DEL of the waiting one's sandboxes
        # (the kubelet cleans up each failed attempt) never fails.
        assert apply(pinned("while-away", ns, node, isolated=True)).returncode == 0
        assert apply(pinned("while-away", "kube-system", node, isolated=False)).returncode == 0
        kubectl("wait", "-n", "kube-system", "pod/while-away", "--for=condition=Ready", "--timeout=120s")
        deadline = time.monotonic() + 60
        while "netisolate" not in (errors := sandbox_errors(ns, "while-away")):
            assert time.monotonic() < deadline, "no FailedCreatePodSandBox event from netisolate"
            time.sleep(1)
        assert "may be isolated and cannot be checked" in errors and "Start the netisolate agent" in errors
        phase = kubectl("get", "pod", "-n", ns, "while-away", "-o", "jsonpath={.status.phase}").stdout
        assert phase == "Pending"
    finally:
        kubectl("-n", "netisolate-system", "patch", "daemonset/netisolate-agent", "--type=merge", "-p", back)
        kubectl("delete", "pod", "-n", "kube-system", "while-away", "--wait=false", check=False)
    kubectl("-n", "netisolate-system", "rollout", "status", "daemonset/netisolate-agent", "--timeout=120s")
    assert reach(ns, pod, "rogue", "127.0.0.1", 8080) == "refused"
    assert reach(ns, pod, "app", "127.0.0.1", 15001) == "open"
    assert scenario.expected("app", "proxy:15001") == "open"
    # the kubelet's retry goes through once the agent is back, and the pod is enforced
    # (the kubelet retries a failed sandbox with a backoff that grows to a few minutes)
    for attempt in range(6):
        ready = kubectl(
            "wait", "-n", ns, "pod/while-away", "--for=condition=Ready", "--timeout=60s", check=False
        )
        if ready.returncode == 0:
            break
        assert attempt < 5, f"the waiting pod never started: {ready.stderr}"
    assert reach(ns, "while-away", "c", "127.0.0.1", SENTINEL_PORT) == "unreachable"


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
