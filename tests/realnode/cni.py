"""netisolate's CNI plugin chained on the real node: the agent serving it (its own conf dir is the
node's), pods made to race their own rules, and a kubelet that starts containers as soon as the
sandbox is up (no wait for IPv6 DAD: these pods are probed over 127.0.0.1 only).

Used by tests/test_realnode_cni.py and bench/bench_cni.py --real-node.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, cast

from netisolate.agent.cni import CniService, start
from netisolate.agent.cni_conf import uninstall
from netisolate.agent.node import Agent
from netisolate.backends import select_backend
from netisolate.cni import conflist
from netisolate.cni.options import CniOptions
from netisolate.rules import Settings
from tests.agent_harness import HARDENED
from tests.cni_harness import plugin_binary
from tests.kube_standin import ours
from tests.realnode.kubelet import Kubelet, RunningPod
from tests.realnode.node import NodeError, RealNode

EXEMPT = ("kube-system", "netisolate-system")
# The rogue container connects once, the moment the app listens, and keeps the outcome.
RACE = (
    "until netstat -ltn | grep -q ':8080 '; do :; done; "
    "if nc -w 2 127.0.0.1 8080 </dev/null >/dev/null 2>&1; then echo open; else echo refused; fi "
    "> /tmp/first; "
    "exec sleep 1000000"
)


class EagerKubelet(Kubelet):
    """Containers start right after RunPodSandbox returns, as the kubelet starts them."""

    def _wait_addresses(self, pod: RunningPod, timeout: float = 10.0) -> None:
        pass


def race_pod(name: str, node_name: str, namespace: str = "shop", isolated: bool = True) -> dict[str, Any]:
    annotations = (
        {"netisolate.io/isolation": "enforce", "allow.netisolate.io/proxy": "8080"} if isolated else {}
    )
    containers = [
        ("app", 1000, ["sh", "-c", "while true; do nc -l -p 8080 -e echo ok; done"]),
        ("proxy", 1001, ["sleep", "1000000"]),
        ("rogue", 1002, ["sh", "-c", RACE]),
    ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "annotations": annotations,
        },
        "spec": {
            "nodeName": node_name,
            "containers": [
                {
                    "name": n,
                    "image": "busybox",
                    "command": cmd,
                    "securityContext": {"runAsUser": u, **HARDENED},
                }
                for n, u, cmd in containers
            ],
        },
    }


def first_attempt(kubelet: Kubelet, pod: RunningPod, timeout: float = 20.0) -> str:
    """What the rogue container's first connection got: open or refused."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = kubelet.exec(pod, "rogue", ["cat", "/tmp/first"])
        if result.exit_code == 0 and result.stdout.strip():
            return result.stdout.strip()
        time.sleep(0.05)
    raise NodeError(f"pod {pod.name}: the rogue container never tried")


def new_agent(core: Any, backend: str) -> Agent:
    """An agent of the API server the kubernetes client `core` drives (None: no API server)."""
    api = None if core is None else ours(core)
    agent = Agent("real-node", select_backend(backend), Settings(), api, host_netns="/proc/self/ns/net")
    agent.namespaces_known.set()
    return agent


def loaded_chain(node: RealNode) -> list[str]:
    """The plugin types containerd has loaded for the node's network."""
    assert node.cri is not None
    with contextlib.suppress(ValueError):
        loaded = json.loads(node.cri.cni_config() or "{}")
        return [p["Network"]["type"] for n in loaded.get("Networks") or [] for p in n["Config"]["Plugins"]]
    return []


def until_loaded(node: RealNode, chained: bool, timeout: float = 10.0) -> float:
    """Seconds until containerd has loaded a chain with (or without) our plugin last."""
    started = time.monotonic()
    while (loaded_chain(node)[-1:] == [conflist.PLUGIN_TYPE]) != chained:
        if time.monotonic() - started > timeout:
            raise NodeError(f"containerd's CNI chain is {loaded_chain(node)}")
        time.sleep(0.01)
    return time.monotonic() - started


def options(node: RealNode) -> CniOptions:
    return CniOptions(
        node.cni_conf, node.cni_bin, plugin_binary(), node.dir / "netisolate" / "cni.sock", EXEMPT
    )


def serve(node: RealNode, agent: Agent, core: Any, stop: threading.Event) -> CniService:
    """The agent's CNI side on the node: plugin installed and chained, containerd reloaded."""
    service = start(options(node), agent.reconciler, cast(Any, core and ours(core)), stop)
    until_loaded(node, chained=True)
    return service


def unchain(node: RealNode, service: CniService, stop: threading.Event) -> None:
    """Stop serving and take the plugin out again (the node's next user gets a plain chain)."""
    stop.set()
    service.chain.join(timeout=5)
    service.close()
    uninstall(node.cni_conf, node.cni_bin, grace=0.0)
    until_loaded(node, chained=False)
    Path(options(node).socket).unlink(missing_ok=True)
