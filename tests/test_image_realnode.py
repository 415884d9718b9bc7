"""The image (scripts/build-image.sh) on the real node, run exactly as daemonset/ describes it: the
CRI requests are built from the rendered manifests (hostPID, UID, capabilities, read-only root,
seccomp, volumes, env, args), so manifest and test cannot drift.

What this machine makes the test add, and nothing else: the API stand-in's address (a kubeconfig,
where a cluster gives a service account), `--host-netns` (PID 1 here is not the node's init and its
namespace cannot be opened: the test process's is the node's), and for the agent `--backend`
(the manifest's `auto` picks one; both are run).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from netisolate import scenarios
from netisolate.backends import run_tool
from netisolate.backends.guarded import reserved
from netisolate.netns import NetNS
from tests.agent_process import kubeconfig as agent_kubeconfig
from tests.kube_standin import put
from tests.realnode import cri_pb2 as pb
from tests.realnode import pods
from tests.realnode.kubelet import Kubelet, RunningPod
from tests.realnode.node import BRIDGE, RealNode
from tests.realnode.probe import matrix, wait_listening
from tests.test_manifests import find
from tests.test_realnode import exec_out, start
from tests.test_webhook import GOOD, review
from tests.test_webhook import ROOT as ROOT_POD

GATEWAY = "198.18.0.1"  # the bridge's address: pods reach the API stand-in there
IMAGE = "ghcr.io/netisolate/netisolate:0.1.0"
ROOT = Path(__file__).parent.parent
VWC = "admissionregistration.k8s.io/v1/validatingwebhookconfigurations"

pytestmark = [
    pytest.mark.realnode,
    pytest.mark.image,
    pytest.mark.timeout(900),
    pytest.mark.kmock(host=GATEWAY),
]


@pytest.fixture(scope="module")
def image(node: RealNode) -> Iterator[str]:
    """The image built by the README's command (cached base and layers make a rebuild quick),
    imported into the node's containerd."""
    started = time.monotonic()
    built = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-image.sh")], capture_output=True, text=True, check=False
    )
    assert built.returncode == 0, built.stderr[-3000:]
    archive = Path(built.stdout.split()[-1])
    node.import_image(archive)
    assert IMAGE in node.images, node.images
    took, size = time.monotonic() - started, archive.stat().st_size >> 20
    print(f"\nimage: built and imported in {took:.1f} s, {size} MiB compressed")
    yield IMAGE


@pytest.fixture(scope="module")
def bridge(node: RealNode) -> None:
    """The CNI bridge with its gateway address before the first pod (the API stand-in listens
    there); the bridge plugin takes it as it finds it, the node's teardown removes it."""
    for argv in (
        ["ip", "link", "add", BRIDGE, "type", "bridge"],
        ["ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE],
        ["ip", "link", "set", BRIDGE, "up"],
    ):
        subprocess.run(argv, check=True, capture_output=True)


@pytest_asyncio.fixture
async def cluster(
    kubelet: Kubelet, kmock: Any, bridge: None, image: str, tmp_path: Path
) -> AsyncIterator[Kubelet]:
    """The kubelet, with what a cluster gives every pod to reach the API (here a kubeconfig for
    the stand-in), and the objects daemonset/ creates that the pods read."""
    kubeconfig = agent_kubeconfig(str(kmock.url), tmp_path, user={"token": "stand-in"})
    kubelet.api_env = {"KUBECONFIG": "/var/run/secrets/stand-in/kubeconfig"}
    kubelet.api_mounts = [
        pb.Mount(
            container_path="/var/run/secrets/stand-in/kubeconfig", host_path=str(kubeconfig), readonly=True
        )
    ]
    for ns in (NAMESPACE, "demo"):
        put(kmock, "v1/namespaces", {"metadata": {"name": ns, "labels": {}}})
    put(kmock, "v1/configmaps", find("ConfigMap", "netisolate-config"))
    put(kmock, VWC, find("ValidatingWebhookConfiguration", "netisolate"))
    yield kubelet
    kubelet.node.write_conflist([])  # the agent chained its plugin into the node's conflist


NAMESPACE = find("DaemonSet", "netisolate-agent")["metadata"]["namespace"]


def from_manifest(kind: str, name: str) -> dict[str, Any]:
    """One pod of that workload, as its controller would create it for this node."""
    template = json.loads(json.dumps(find(kind, name)["spec"]["template"]))
    return {
        "metadata": {
            "name": f"{name}-{uuid.uuid4().hex[:5]}",
            "namespace": NAMESPACE,
            "uid": str(uuid.uuid4()),
            **template["metadata"],
        },
        "spec": {**template["spec"], "nodeName": pods.NODE_NAME},
    }


def on_this_machine(pod: dict[str, Any], backend: str | None = None) -> dict[str, Any]:
    """The module docstring's additions, and only those."""
    (container,) = pod["spec"]["containers"]
    args = [a for a in container["args"] if not (backend and a.startswith("--backend"))]
    container["args"] = [*args, *([f"--backend={backend}"] if backend else [])]
    if args[0] == "agent":
        container["args"].append(f"--host-netns=/proc/{os.getpid()}/ns/net")
    return pod


def get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as reply:
            return int(reply.status), bytes(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError:
        return 0, b""


async def wait_ready(
    kubelet: Kubelet, pod: RunningPod, url: str, context: ssl.SSLContext | None = None
) -> float:
    """Seconds from now until the readiness probe answers 200 (the kubelet's probe, from the node);
    fails with the container's log when it exits or never gets there."""
    started = time.monotonic()
    (cid,) = pod.containers.values()
    while time.monotonic() - started < 30:
        if (await asyncio.to_thread(get, url, context))[0] == 200:
            return time.monotonic() - started
        status, _ = kubelet.cri.container_status(cid)
        if status.state == pb.CONTAINER_EXITED:
            break
        await asyncio.sleep(0.05)
    status, _ = kubelet.cri.container_status(cid)
    raise AssertionError(
        f"{pod.name} not ready at {url} (exit code {status.exit_code}):\n{container_log(kubelet, pod)}"
    )


def container_log(kubelet: Kubelet, pod: RunningPod) -> str:
    logs = Path(pod.sandbox.log_directory).rglob("*.log")
    return "\n".join(p.read_text()[-4000:] for p in logs)


async def run_agent(cluster: Kubelet, kmock: Any, pod: dict[str, Any]) -> tuple[RunningPod, float]:
    started = time.monotonic()
    agent = await start(cluster, kmock, pod)
    await wait_ready(cluster, agent, f"http://{agent.ips[0]}:9808/readyz")
    return agent, time.monotonic() - started


async def enforced(cluster: Kubelet, agent: RunningPod, pod: RunningPod, timeout: float = 15.0) -> str:
    """The agent's /status state of `pod` once it is no longer pending (or `pending`)."""
    deadline = time.monotonic() + timeout
    state = "pending"
    while time.monotonic() < deadline:
        code, body = await asyncio.to_thread(get, f"http://{agent.ips[0]}:9808/status")
        states = {p.get("uid"): p.get("state") for p in json.loads(body)["pods"]} if code == 200 else {}
        state = states.get(pod.uid) or "pending"
        if state != "pending":
            return str(state)
        await asyncio.sleep(0.1)
    return state


async def scenario_mismatches(cluster: Kubelet, kmock: Any, name: str, backend: str) -> dict[str, Any]:
    """Every cell of the scenario's matrix, measured from inside its containers, that is not as
    the scenario expects (on `backend`: a cgroup scenario under iptables gets no grants)."""
    scenario = scenarios.load(name)
    manifest = pods.scenario_pod(name, f"{name}-{uuid.uuid4().hex[:5]}")
    namespace = manifest["metadata"]["namespace"]
    put(kmock, "v1/namespaces", {"metadata": {"name": namespace, "labels": scenario.namespace_labels}})
    pod = await start(cluster, kmock, manifest)
    await asyncio.to_thread(wait_listening, pod, scenario.listeners)
    clients = [c["name"] for c in manifest["spec"]["containers"]]
    got = await asyncio.to_thread(matrix, cluster, pod, scenario.listeners, clients)
    await asyncio.to_thread(cluster.delete, pod)
    return pods.mismatches(scenario, got, pods.fails_closed(scenario, backend))


def agent_pod(backend: str, without: str = "") -> dict[str, Any]:
    """The DaemonSet's pod for this machine, optionally without one of its capabilities or hostPID."""
    pod = on_this_machine(from_manifest("DaemonSet", "netisolate-agent"), backend)
    if without == "hostPID":
        del pod["spec"]["hostPID"]
    elif without:
        pod["spec"]["containers"][0]["securityContext"]["capabilities"]["add"].remove(without)
    return pod


@pytest.mark.asyncio
@pytest.mark.parametrize("backend", ["nftables", "iptables"])
async def test_the_agent_from_the_image_enforces_every_scenario(
    cluster: Kubelet, kmock: Any, backend: str
) -> None:
    _, ready = await run_agent(cluster, kmock, agent_pod(backend))
    print(f"\nagent ({backend}) start-to-ready from the image: {ready:.2f} s")
    for name in scenarios.names():
        assert await scenario_mismatches(cluster, kmock, name, backend) == {}, name


@pytest.mark.asyncio
async def test_the_agent_from_the_image_serves_a_pod_with_its_socket_guard(
    cluster: Kubelet, kmock: Any
) -> None:
    """--socket-guard in the agent's container (its /proc/sys read-only, only the manifest's
    capabilities): the shared-uid pod is judged by the guard alone — its table gone, its declared
    ports reserved in its namespace — and each container reaches exactly its grants."""
    pod = agent_pod("nftables")
    pod["spec"]["containers"][0]["args"].append("--socket-guard")
    agent, _ = await run_agent(cluster, kmock, pod)
    scenario = scenarios.load("shared-uid")
    manifest = pods.scenario_pod("shared-uid", f"guard-{uuid.uuid4().hex[:5]}")
    put(kmock, "v1/namespaces", {"metadata": {"name": manifest["metadata"]["namespace"], "labels": {}}})
    target = await start(cluster, kmock, manifest)
    state = await enforced(cluster, agent, target)
    assert state == "enforce", container_log(cluster, agent)[-3000:]
    with NetNS.open(f"/proc/{target.pid}/ns/net") as ns:
        deadline = time.monotonic() + 15
        while run_tool(ns, ["nft", "list", "table", "inet", "netisolate"]).returncode == 0:
            assert time.monotonic() < deadline, f"the table stayed: {container_log(cluster, agent)[-2000:]}"
            await asyncio.sleep(0.1)
        assert {8080, 15000, 15001} <= reserved(ns)
    await asyncio.to_thread(wait_listening, target, scenario.listeners)
    got = await asyncio.to_thread(matrix, cluster, target, scenario.listeners, list(scenario.expect_open))
    await asyncio.to_thread(cluster.delete, target)
    assert pods.mismatches(scenario, got) == {}


AGENT = find("DaemonSet", "netisolate-agent")["spec"]["template"]["spec"]
GRANTED = [*AGENT["containers"][0]["securityContext"]["capabilities"]["add"], "hostPID"]


async def what_the_agent_does(cluster: Kubelet, kmock: Any, pod: dict[str, Any]) -> str:
    """`enforced` when the agent got ready and enforced an isolated pod; else what went wrong."""
    try:
        agent, _ = await run_agent(cluster, kmock, pod)
    except AssertionError as err:
        return f"agent never ready: {str(err)[-600:]}"
    manifest = pods.scenario_pod("app-proxy-rogue", f"probe-{uuid.uuid4().hex[:5]}")
    put(kmock, "v1/namespaces", {"metadata": {"name": manifest["metadata"]["namespace"], "labels": {}}})
    try:
        target = await start(cluster, kmock, manifest)
    except Exception as err:  # the CNI plugin refused the sandbox: fail-closed
        cluster.pods.pop(manifest["metadata"]["uid"], None)
        return f"sandbox refused: {str(err)[-600:]}"
    state = await enforced(cluster, agent, target)
    return "enforced" if state == "enforce" else f"pod state {state}"


@pytest.mark.asyncio
@pytest.mark.parametrize("without", GRANTED)
async def test_each_privilege_the_manifest_grants_the_agent_is_needed(
    cluster: Kubelet, kmock: Any, without: str
) -> None:
    """With everything the manifest grants the agent enforces; without any one of it, it does not
    (NET_RAW is the legacy iptables tools' raw socket: taken away under that backend)."""
    backend = "iptables" if without == "NET_RAW" else "nftables"
    outcome = await what_the_agent_does(cluster, kmock, agent_pod(backend, without))
    print(f"\nwithout {without} ({backend}): {outcome}")
    assert outcome != "enforced"


@pytest.mark.asyncio
async def test_the_agent_with_what_the_manifest_grants_enforces(cluster: Kubelet, kmock: Any) -> None:
    """The control for the test above: the same check passes with nothing taken away."""
    assert await what_the_agent_does(cluster, kmock, agent_pod("iptables")) == "enforced"


def post_over_tls(address: str, port: int, ca: bytes, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """A POST as the API server makes it: TLS verified against the caBundle, for the Service's
    name (connected to the pod's address: there is no Service here)."""
    context = ssl.create_default_context(cadata=ca.decode())
    data = json.dumps(body).encode()
    with socket.create_connection((address, port), timeout=5) as raw:
        host = f"netisolate-webhook.{NAMESPACE}.svc"
        with context.wrap_socket(raw, server_hostname=host) as tls:
            head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            tls.sendall(f"{head}Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
            reply = b""
            while chunk := tls.recv(65536):
                reply += chunk
    status, _, payload = reply.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200"), status
    return dict(json.loads(payload))


@pytest.mark.asyncio
async def test_the_webhook_from_the_image_serves_over_tls(cluster: Kubelet, kmock: Any) -> None:
    put(
        kmock,
        "v1/namespaces",
        {"metadata": {"name": "shop", "labels": {"netisolate.io/isolation": "enforce"}}},
    )
    pod = from_manifest("Deployment", "netisolate-webhook")
    (container,) = pod["spec"]["containers"]
    webhook = await start(cluster, kmock, pod)
    # the kubelet's probes: HTTPS to the named port, the certificate not checked
    (port,) = (p["containerPort"] for p in container["ports"] if p["name"] == "https")
    probe = container["readinessProbe"]["httpGet"]
    insecure = ssl.create_default_context()
    insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
    ready = await wait_ready(cluster, webhook, f"https://{webhook.ips[0]}:{port}{probe['path']}", insecure)
    print(f"\nwebhook start-to-ready from the image: {ready:.2f} s")

    # who it runs as, seen from inside: the manifest's UID, no capabilities, a read-only root
    seen = await exec_out(
        cluster, webhook, "webhook", "id -u; grep CapEff /proc/self/status; touch /x 2>&1 || echo read-only"
    )
    uid, caps, *rest = seen.splitlines()
    assert uid == str(container["securityContext"]["runAsUser"]) == "65532"
    assert caps.split()[1] == "0000000000000000"
    assert rest[-1] == "read-only", rest

    # the CA it put into our ValidatingWebhookConfiguration verifies it; it judges for real
    stored = dict(kmock.objects[VWC, None, "netisolate"].raw)
    (hook, *_) = stored["webhooks"]
    ca = base64.b64decode(hook["clientConfig"]["caBundle"])
    path = hook["clientConfig"]["service"]["path"]
    for obj, allowed in ((GOOD, True), (ROOT_POD, False)):
        answer = await asyncio.to_thread(post_over_tls, webhook.ips[0], port, ca, path, review("Pod", obj))
        assert answer["response"]["allowed"] is allowed, answer


def test_check_from_the_image_reads_a_manifest_piped_in(image: str) -> None:
    """`cat pod.yaml | docker run -i IMAGE check -f -`, here by buildah (the image's user, its
    entrypoint): the example a compromised injector made is denied, with the reasons. (containerd
    1.6's `ctr run` is not used: it lost the end of the piped input here and waited forever.)"""
    container = subprocess.run(
        ["buildah", "from", image], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        argv = ["buildah", "run", "--isolation", "chroot", container, "--", "netisolate", "check", "-f", "-"]
        manifest = (ROOT / "examples" / "rogue-injected.yaml").read_text()
        result = subprocess.run(argv, input=manifest, capture_output=True, text=True, check=False, timeout=60)
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True, check=False)
    assert "Pod demo/shop: DENIED" in result.stdout, result.stderr
    assert "deny  privileged                 container telemetry" in result.stdout
    assert "exited with status 1" in result.stderr  # check's exit code for a denial
