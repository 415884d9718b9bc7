"""The chained CNI plugin for real: the static binary exec'd as the runtime execs it, with real
network namespaces (netisolate.localpod), against the agent's socket and the API stand-in.

The stand-in's gaps (tests/kube_standin.py) do not matter here: the agent reads pods and
namespaces by name on ADD, which it serves like the real API server.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_asyncio
from kubernetes import client

from netisolate.agent.cni import CniHandler
from netisolate.agent.reconcile import Handover
from netisolate.agent.state import PodState
from netisolate.backends import EnforceError, run_tool
from netisolate.cni.protocol import PodRef
from netisolate.localpod import LocalPod
from netisolate.model import parse_pod
from netisolate.netns import NetNS
from netisolate.rules import RuleSet
from tests.agent_harness import close_all, pod_manifest
from tests.agent_process import free_port
from tests.agent_process import kubeconfig as agent_kubeconfig
from tests.cni_harness import PREV_RESULT, CniNode, call, runtime_config
from tests.kube_standin import api_client, declare, put

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(180)]


@pytest_asyncio.fixture
async def core(kmock: Any) -> AsyncIterator[client.CoreV1Api]:
    declare(kmock)
    for name, labels in (
        ("shop", {}),
        ("kube-system", {}),
        ("locked", {"netisolate.io/isolation": "enforce"}),
    ):
        put(kmock, "v1/namespaces", {"metadata": {"name": name, "labels": labels}})
    yield client.CoreV1Api(api_client(kmock))


@pytest_asyncio.fixture(params=["nftables", "iptables"])
async def node(
    core: client.CoreV1Api, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[CniNode]:
    cni = await asyncio.to_thread(CniNode, core, tmp_path, request.param)
    yield cni
    await asyncio.to_thread(cni.close)


async def new_pod(
    core: client.CoreV1Api, name: str, namespace: str = "shop", annotations: dict[str, str] | None = None
) -> LocalPod:
    """A pod in the API and its sandbox's network namespace, with no container yet."""
    manifest = pod_manifest(name, "node-a", annotations)
    manifest["metadata"]["namespace"] = namespace
    if annotations is not None and not annotations:
        manifest["metadata"]["annotations"] = {}
    await asyncio.to_thread(core.create_namespaced_pod, namespace, cast(Any, manifest))
    return await asyncio.to_thread(LocalPod(parse_pod(manifest)).create)


async def add(node: CniNode, pod: LocalPod, **kw: Any) -> Any:
    assert pod.ns is not None
    meta = pod.pod.metadata
    return await asyncio.to_thread(
        call,
        node.binary,
        kw.pop("command", "ADD"),
        namespace=meta.namespace,
        name=meta.name or "",
        uid=meta.uid or "",
        netns=pod.ns.path,
        config=runtime_config(node.entry, **kw),
    )


def first_attempt(pod: LocalPod) -> str:
    """The app starts listening; the rogue container connects the moment it can."""
    pod.listen("app", ["8080"])
    return pod.probe(pod.uid("rogue"), [("127.0.0.1", 8080, "tcp")])[0]


@pytest.mark.asyncio
async def test_add_enforces_before_any_container_and_passes_the_result_through(
    node: CniNode, core: client.CoreV1Api
) -> None:
    pods = [await new_pod(core, f"web-{i}") for i in range(5)]
    try:
        for pod in pods:
            result = await add(node, pod)
            assert result.code == 0, result.stdout
            assert json.loads(result.stdout) == PREV_RESULT, "prevResult handed on unchanged"
            assert await asyncio.to_thread(first_attempt, pod) == "refused"
            assert await asyncio.to_thread(pod.probe, pod.uid("proxy"), [("::1", 8080, "tcp")]) == ["open"]
        tracked = node.agent.reconciler.pods[pods[0].pod.metadata.uid or ""]
        assert tracked.state == "enforce" and tracked.ns is not None and tracked.ns.inode == pods[0].ns.inode  # type: ignore[union-attr]
        check = await add(node, pods[0], command="CHECK")
        assert check.code == 0 and check.stdout == ""
        run_tool(
            pods[0].ns,
            ["nft", "flush", "ruleset"]
            if node.backend == "nftables"
            else ["iptables-legacy", "-F", "OUTPUT"],
        )
        check = await add(node, pods[0], command="CHECK")
        assert check.error["code"] == 11 and "web-0" in check.error["msg"]
    finally:
        close_all(pods)


@pytest.mark.asyncio
async def test_the_result_is_handed_on_byte_for_byte_in_every_supported_version(
    node: CniNode, core: client.CoreV1Api
) -> None:
    pod = await new_pod(core, "versions")
    try:
        assert pod.ns is not None
        for version in ("0.3.1", "0.4.0", "1.0.0"):
            prev = f'{{"cniVersion":"{version}","ips":[{{"address":"198.18.0.7/24"}}],"x":"\\u00e9\\"}}"}}'
            entry = json.dumps(node.entry)[1:-1]
            stdin = f'{{"cniVersion": "{version}", "name": "n", {entry}, "prevResult": {prev}}}'
            meta = pod.pod.metadata
            result = await asyncio.to_thread(
                call,
                node.binary,
                "ADD",
                name=meta.name or "",
                uid=meta.uid or "",
                netns=pod.ns.path,
                stdin=stdin,
            )
            assert (result.code, result.stdout) == (0, prev + "\n")
        empty = await add(node, pod, prev_result=None)
        assert (empty.code, json.loads(empty.stdout)) == (0, {"cniVersion": "1.0.0"})
    finally:
        pod.close()


@pytest.mark.asyncio
async def test_agent_down_fails_closed_then_the_retry_is_enforced(
    node: CniNode, core: client.CoreV1Api
) -> None:
    pod = await new_pod(core, "while-down")
    system = await new_pod(core, "coredns", namespace="kube-system", annotations={})
    try:
        await asyncio.to_thread(node.agent_down)
        refused = await add(node, pod)
        assert refused.error["code"] == 11 and refused.error["cniVersion"] == "1.0.0"
        message = refused.error["msg"]
        assert (
            "shop/while-down" in message and "Start the netisolate agent" in message and "cni.sock" in message
        )
        exempt = await add(node, system)
        assert (exempt.code, json.loads(exempt.stdout)) == (0, PREV_RESULT), "exempt namespaces always start"
        deleted = await add(node, pod, command="DEL")
        assert (deleted.code, deleted.stdout) == (0, ""), "DEL never fails"
        await asyncio.to_thread(node.agent_up)
        retried = await add(node, pod)
        assert retried.code == 0, retried.stdout
        assert await asyncio.to_thread(first_attempt, pod) == "refused"
    finally:
        close_all([pod, system])


@pytest.mark.asyncio
async def test_del_for_a_pod_the_agent_never_saw_succeeds(node: CniNode, core: client.CoreV1Api) -> None:
    result = await asyncio.to_thread(
        call, node.binary, "DEL", name="ghost", config=runtime_config(node.entry)
    )
    assert (result.code, result.stdout) == (0, "")
    pod = await new_pod(core, "torn-down")
    try:
        assert (await add(node, pod)).code == 0
        uid = pod.pod.metadata.uid or ""
        assert (await add(node, pod, command="DEL")).code == 0
        tracked = node.agent.reconciler.pods.get(uid)  # None: the DEL came before the takeover
        assert tracked is None or tracked.ns is None, "the torn-down sandbox's namespace is let go"
        assert uid not in node.agent.reconciler.handovers
    finally:
        pod.close()


@pytest.mark.asyncio
async def test_pods_that_are_not_isolated_start_and_labels_isolate(
    node: CniNode, core: client.CoreV1Api
) -> None:
    plain = await new_pod(core, "plain", annotations={})
    labelled = await new_pod(core, "by-label", namespace="locked", annotations={})
    try:
        assert (await add(node, plain)).code == 0
        assert not node.agent.reconciler.backend.installed(plain.ns)  # type: ignore[arg-type]
        assert (await add(node, labelled)).code == 0
        assert await asyncio.to_thread(first_attempt, labelled) == "refused", "the namespace label isolates"
    finally:
        close_all([plain, labelled])


@pytest.mark.asyncio
async def test_a_pod_the_api_does_not_know_fails_with_the_reason(
    node: CniNode, core: client.CoreV1Api
) -> None:
    with LocalPod(parse_pod(pod_manifest("unknown", "node-a"))) as pod:
        result = await add(node, pod)
        assert result.error["code"] == 11 and "not found on the API server" in result.error["msg"]
        meta = pod.pod.metadata
        await asyncio.to_thread(
            core.create_namespaced_pod,
            "shop",
            cast(Any, pod_manifest("unknown", "node-a", uid=str(uuid.uuid4()))),
        )
        other = await add(node, pod)
        assert "another pod shop/unknown" in other.error["msg"] and (meta.uid or "") in other.error["msg"]


@pytest.mark.asyncio
async def test_malformed_calls_are_refused_and_the_socket_keeps_serving(
    node: CniNode, core: client.CoreV1Api
) -> None:
    import socket

    def raw(data: bytes, fd: int | None = None) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(node.options.socket))
            socket.send_fds(s, [data], [fd] if fd is not None else [])
            s.shutdown(socket.SHUT_WR)
            return s.makefile("rb").read()

    assert raw(b"GET / HTTP/1.1\r\n\r\n").startswith(b"fail\n")
    with open("/dev/null") as null:
        reply = await asyncio.to_thread(raw, b"x", null.fileno())
    assert b"not a network namespace" in reply
    pod = await new_pod(core, "after-junk")
    try:
        assert (await add(node, pod)).code == 0
    finally:
        pod.close()


@pytest.mark.asyncio
async def test_only_root_reaches_the_agent(node: CniNode, core: client.CoreV1Api) -> None:
    pod = await new_pod(core, "not-root")
    try:
        assert pod.ns is not None
        result = await asyncio.to_thread(
            call,
            node.binary,
            "ADD",
            name="not-root",
            netns="/proc/self/ns/net",
            config=runtime_config(node.entry),
            run_as=["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "--"],
        )
        assert result.error["code"] == 11 and "Permission denied" in result.error["msg"]
    finally:
        pod.close()


def test_version_needs_no_agent(tmp_path: Path) -> None:
    from tests.cni_harness import plugin_binary

    result = call(plugin_binary(), "VERSION", stdin='{"cniVersion": "1.0.0"}')
    assert result.code == 0
    assert json.loads(result.stdout) == {
        "cniVersion": "1.0.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"],
    }


@pytest.mark.asyncio
async def test_the_agent_process_chains_serves_keeps_the_chain_on_exit_and_uninstalls(
    core: client.CoreV1Api, kmock: Any, tmp_path: Path
) -> None:
    """`netisolate agent --cni-*` as the DaemonSet runs it, against the API stand-in."""
    import signal
    import subprocess
    import sys

    from netisolate.cni import conflist
    from tests.cni_harness import PRIMARY, plugin_binary

    conf, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    bin_dir.mkdir()
    (conf / "10-bridge.conflist").write_text(json.dumps(PRIMARY))
    kubeconfig = agent_kubeconfig(str(kmock.url), tmp_path)
    port = free_port()
    argv = [
        sys.executable, "-m", "netisolate", "agent", "--node-name", "node-a", "--kubeconfig", str(kubeconfig),
        "--host-netns", "/proc/self/ns/net", "--metrics-port", str(port),
        "--cni-conf-dir", str(conf), "--cni-bin-dir", str(bin_dir), "--cni-plugin", str(plugin_binary()),
        "--cni-socket", str(tmp_path / "run" / "cni.sock"),
    ]  # fmt: skip
    agent = subprocess.Popen(
        argv, stderr=subprocess.PIPE, text=True, env={**os.environ, "POD_NAMESPACE": "ops"}
    )
    pod = await new_pod(core, "via-process")
    try:
        deadline = time.monotonic() + 20
        while (
            not (tmp_path / "run" / "cni.sock").exists()
            or "netisolate-cni" not in (conf / "10-bridge.conflist").read_text()
        ):
            assert agent.poll() is None and time.monotonic() < deadline, (
                agent.stderr.read() if agent.stderr else ""
            )
            await asyncio.sleep(0.05)
        entry = json.loads((conf / "10-bridge.conflist").read_text())["plugins"][-1]
        assert entry["exemptNamespaces"] == ["kube-system", "netisolate-system", "ops"], (
            "its own namespace too"
        )
        assert pod.ns is not None
        meta = pod.pod.metadata
        plugin, config = bin_dir / "netisolate-cni", runtime_config(entry)
        result = await asyncio.to_thread(
            call, plugin, "ADD", name="via-process", uid=meta.uid or "", netns=pod.ns.path, config=config
        )
        assert result.code == 0, result.stdout
        assert await asyncio.to_thread(first_attempt, pod) == "refused"
    finally:
        agent.send_signal(signal.SIGTERM)
        await asyncio.to_thread(agent.wait, 20)
        pod.close()
    chain = json.loads((conf / "10-bridge.conflist").read_text())["plugins"]
    assert chain[-1]["type"] == conflist.PLUGIN_TYPE, "an agent going down keeps pods waiting"
    uninstall = subprocess.Popen([*argv, "--cni-uninstall"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while (bin_dir / "netisolate-cni").exists():
            assert uninstall.poll() is None and time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert json.loads((conf / "10-bridge.conflist").read_text()) == PRIMARY
    finally:
        uninstall.send_signal(signal.SIGTERM)
        await asyncio.to_thread(uninstall.wait, 20)


@pytest.mark.asyncio
async def test_the_answer_waits_for_the_rules_not_for_the_lock(node: CniNode, core: client.CoreV1Api) -> None:
    """The rules go into a new sandbox's namespace before the reconciler's lock is taken, and the
    answer follows them: with the lock held elsewhere (another pod's apply, a verification round,
    a /proc scan), the sandbox starts all the same, enforced; the bookkeeping follows the lock."""
    pod = await new_pod(core, "in-parallel")
    await asyncio.to_thread(node.agent.reconciler.set_namespace, "shop", {})  # known: no API read
    uid = pod.pod.metadata.uid or ""
    try:
        assert pod.ns is not None
        node.agent.reconciler.lock.acquire()
        try:
            result = await asyncio.wait_for(add(node, pod), 20)
            assert result.code == 0, result.stdout
            assert await asyncio.to_thread(node.agent.reconciler.backend.installed, pod.ns)
            assert uid not in node.agent.reconciler.pods, "taken over only once the lock is free"
        finally:
            node.agent.reconciler.lock.release()
        deadline = time.monotonic() + 10
        while uid not in node.agent.reconciler.pods or node.agent.reconciler.pods[uid].state != "enforce":
            assert time.monotonic() < deadline, "the handed-over sandbox was never taken over"
            await asyncio.sleep(0.01)
        assert node.agent.reconciler.pods[uid].ns is not None and not node.agent.reconciler.handovers
    finally:
        pod.close()


@pytest.mark.asyncio
async def test_a_del_before_the_takeover_lets_the_namespace_go(
    node: CniNode, core: client.CoreV1Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sandbox torn down between the answer and the bookkeeping (its DEL reached the reconciler
    first) is not adopted afterwards: the agent holds no handle to a namespace the runtime has
    deleted."""
    pod = await new_pod(core, "torn-down")
    await asyncio.to_thread(node.agent.reconciler.set_namespace, "shop", {})
    uid, reconciler, taken = pod.pod.metadata.uid or "", node.agent.reconciler, threading.Event()
    take_over = reconciler.take_over

    def observed(handover: Handover) -> tuple[PodState, str]:
        try:
            return take_over(handover)
        finally:
            taken.set()

    monkeypatch.setattr(reconciler, "take_over", observed)
    try:
        assert pod.ns is not None
        reconciler.lock.acquire()
        try:
            assert (await add(node, pod)).code == 0
            assert uid in reconciler.handovers  # its takeover waits for the lock
            # a DEL without K8S_POD_UID finds the pod by name among the handed-over ones too
            handler = cast(CniHandler, node.server.handler)
            assert handler._cached_uid(PodRef("shop", "torn-down", "")) == uid
            reconciler.release_sandbox(uid, "c0ffee" * 10, pod.ns.inode)  # the DEL, first (same thread)
        finally:
            reconciler.lock.release()
        assert await asyncio.to_thread(taken.wait, 20)
        tracked = reconciler.pods.get(uid)
        assert tracked is None or tracked.ns is None, "a torn-down sandbox's namespace was adopted"
        assert not reconciler.handovers
    finally:
        pod.close()


@pytest.mark.asyncio
async def test_rules_that_fail_to_load_are_retried_before_the_answer(
    node: CniNode, core: client.CoreV1Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed: when the first load fails, the answer waits for the retry under the lock, and
    the sandbox starts only once that one holds (it fails, and is retried, when that fails too)."""
    pod = await new_pod(core, "first-load-fails")
    await asyncio.to_thread(node.agent.reconciler.set_namespace, "shop", {})
    backend, calls = node.agent.reconciler.backend, list[int]()
    apply = backend.apply

    def flaky(ns: NetNS, ruleset: RuleSet) -> None:
        calls.append(1)
        if len(calls) == 1 or failing:
            raise EnforceError("injected: the load fails")
        apply(ns, ruleset)

    failing = False
    monkeypatch.setattr(backend, "apply", flaky)
    try:
        assert pod.ns is not None
        assert (await add(node, pod)).code == 0
        assert len(calls) == 2 and await asyncio.to_thread(backend.installed, pod.ns)
        failing = True
        again = await new_pod(core, "every-load-fails")
        try:
            result = await add(node, again)
            assert result.code != 0 and "could not be installed" in result.error["msg"]
        finally:
            again.close()
    finally:
        pod.close()


@pytest.mark.asyncio
async def test_an_unreadable_namespace_holds_back_only_pods_whose_label_could_matter(
    node: CniNode, core: client.CoreV1Api
) -> None:
    """The namespace's label can only raise a pod's level: a pod that asks for enforce itself is
    enforced without it; any other pod waits until the namespace can be read."""
    enforced = await new_pod(core, "asks-itself", namespace="unlisted")
    plain = await new_pod(core, "asks-nothing", namespace="unlisted", annotations={})
    try:
        result = await add(node, enforced)
        assert result.code == 0, result.stdout
        assert await asyncio.to_thread(first_attempt, enforced) == "refused"
        waiting = await add(node, plain)
        assert waiting.error["code"] == 11
        assert "namespace unlisted is unreadable" in waiting.error["msg"], waiting.error
    finally:
        close_all([enforced, plain])
