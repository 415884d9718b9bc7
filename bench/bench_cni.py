"""CNI plugin benchmark on this machine: prints one JSON object per scenario.

    sudo .venv/bin/python bench/bench_cni.py [--pods 50] [--backend nftables|iptables|both]

add-latency    what the plugin adds to sandbox creation for an isolated pod: the runtime's exec of
               netisolate-cni (ADD, prevResult in and out) until it exits, the agent's answer
               (rules installed) included; p50/p99 over N pods. Baselines from the same run: the
               same exec for a pod in an exempt namespace (the process alone, no agent), and the
               backend's own apply of the same rules.
first-attempt  a container starts listening and another container of the pod connects to it the
               moment it is listening, once: how many of N first attempts are refused, with the
               plugin (rules in before any container) and without (the agent finds the sandbox in
               /proc, as it does without CNI). Containers are busybox processes under the
               containers' UIDs in the pod's cgroup (tests/agent_harness.py), so they start as
               fast as real ones do.

With --real-node the same two questions are asked of containerd 1.6 + runc + the CNI bridge
(tests/realnode/, issue 10's node), per backend:

realnode-sandbox  RunPodSandbox's duration for N isolated pods with the plugin chained, next to
                  the plain runtime's (no plugin in the chain), alternating pod by pod in the
                  same run: what the plugin adds to sandbox creation.
realnode-first    the same race with real containers (busybox, the containers' UIDs): the rogue
                  container connects the moment the app listens; refused first attempts of N,
                  with the plugin and without it (the agent finds the sandbox in /proc), for a
                  new pod and again once its sandbox is recreated (a new network namespace,
                  the containers started anew in it).

Pods reach the agent's cache as its watch delivers them (before the sandbox); the API server is
not what is measured here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from netisolate.cni import conflist
from netisolate.model import parse_pod
from netisolate.policy import pod_policy
from netisolate.rules import Settings, build_ruleset
from tests.agent_harness import SimulatedPod, pod_manifest
from tests.cni_harness import CniNode, call, runtime_config

BUSYBOX = "/bin/busybox"
P = ParamSpec("P")
R = TypeVar("R")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(values) * 1000, 2),
        "p99_ms": round(percentile(values, 0.99) * 1000, 2),
        "max_ms": round(max(values) * 1000, 2),
    }


def plugin_add(node: CniNode, sim: SimulatedPod, namespace: str | None = None) -> float:
    assert sim.local.ns is not None
    meta = sim.local.pod.metadata
    started = time.perf_counter()
    result = call(
        node.binary,
        "ADD",
        namespace=namespace or meta.namespace,
        name=meta.name or "",
        uid=meta.uid or "",
        netns=sim.local.ns.path,
        config=runtime_config(node.entry),
    )
    elapsed = time.perf_counter() - started
    if result.code != 0:
        raise RuntimeError(f"ADD failed: {result.stdout}")
    return elapsed


def cached_node(backend: str, tmp: Path) -> CniNode:
    """An agent whose watches have delivered the namespaces (pods come one by one)."""
    node = CniNode(None, tmp, backend)
    node.agent.on_namespace_list([{"metadata": {"name": "shop", "labels": {}}}])
    return node


def add_latency(backend: str, pods: int, tmp: Path) -> dict[str, Any]:
    node = cached_node(backend, tmp)
    isolated, exempt, raw = [], [], []
    try:
        for i in range(pods):
            manifest = pod_manifest(f"lat-{i}", "node-a")
            sim = SimulatedPod(manifest)
            try:
                sim.local.create()
                node.agent.on_pod_event("ADDED", manifest)
                exempt.append(plugin_add(node, sim, namespace="kube-system"))
                isolated.append(plugin_add(node, sim))
                policy = pod_policy(parse_pod(manifest), {})
                ruleset = build_ruleset(policy, Settings(), False)
                assert ruleset is not None and sim.local.ns is not None
                fresh = SimulatedPod(pod_manifest(f"raw-{i}", "node-a"))
                try:
                    fresh.local.create()
                    assert fresh.local.ns is not None
                    started = time.perf_counter()
                    node.agent.reconciler.backend.apply(fresh.local.ns, ruleset)
                    raw.append(time.perf_counter() - started)
                finally:
                    fresh.close()
                node.agent.on_pod_event("DELETED", manifest)
            finally:
                sim.close()
    finally:
        node.close()
    return {
        "scenario": "add-latency",
        "backend": backend,
        "pods": pods,
        "isolated_pod": summary(isolated),
        "baseline_exempt_pod_exec": summary(exempt),
        "baseline_backend_apply": summary(raw),
        "target_p99_ms": 30,
    }


def listening(sim: SimulatedPod, port: int) -> bool:
    assert sim.local.ns is not None

    def read() -> bool:
        tables = (
            Path("/proc/thread-self/net/tcp").read_text(),
            Path("/proc/thread-self/net/tcp6").read_text(),
        )
        return any(
            f":{port:04X} " in line and line.split()[3] == "0A" for t in tables for line in t.splitlines()
        )

    return sim.local.ns.run(read)


def first_attempt(sim: SimulatedPod) -> str:
    """app listens (busybox nc), rogue connects once the moment it does."""
    sim.run_as("app", [BUSYBOX, "nc", "-ll", "-p", "8080", "-e", "/bin/true"])
    deadline = time.monotonic() + 5
    while not listening(sim, 8080):
        if time.monotonic() > deadline:
            raise RuntimeError("the listener never listened")
    probe = sim.run_as("rogue", [BUSYBOX, "nc", "-w", "2", "127.0.0.1", "8080"])
    probe.communicate(timeout=10)
    return "open" if probe.returncode == 0 else "refused"


def first_attempts(backend: str, pods: int, tmp: Path, with_plugin: bool) -> dict[str, Any]:
    node = cached_node(backend, tmp)
    loop = threading.Thread(target=node.agent.loop, args=(_listed(),), daemon=True)
    loop.start()
    results: dict[str, int] = {"refused": 0, "open": 0}
    try:
        for i in range(pods):
            manifest = pod_manifest(f"first-{i}", "node-a")
            sim = SimulatedPod(manifest)
            try:
                node.agent.on_pod_event("ADDED", manifest)  # the watch delivers the pod first
                sim.local.create()
                if with_plugin:
                    plugin_add(node, sim)  # the runtime runs the chain before the sandbox starts
                sim._run_in_cgroup("sandbox", ["sleep", "infinity"])
                results[first_attempt(sim)] += 1
                node.agent.on_pod_event("DELETED", manifest)
            finally:
                sim.close()
    finally:
        node.agent.stop.set()
        node.close()
    return {
        "scenario": "first-attempt",
        "backend": backend,
        "plugin": with_plugin,
        "pods": pods,
        "first_attempt_refused": results["refused"],
        "first_attempt_open": results["open"],
    }


class _StatusSink:
    """The API calls the kubelet stand-in makes, answered and forgotten (no API server here)."""

    def patch_namespaced_pod_status(self, *args: Any, **kwargs: Any) -> None:
        pass

    def delete_namespaced_pod(self, *args: Any, **kwargs: Any) -> None:
        pass


def real_node_run(node: Any, backend: str, pods: int, with_plugin: bool) -> list[dict[str, Any]]:
    from tests.realnode import cni as realcni

    agent = realcni.new_agent(None, backend)
    agent.on_namespace_list([{"metadata": {"name": "shop", "labels": {}}}])
    stop = threading.Event()
    service = realcni.serve(node, agent, None, stop) if with_plugin else None
    loop = threading.Thread(target=agent.loop, args=(_listed(),), daemon=True)
    loop.start()
    kubelet = realcni.EagerKubelet(node, _StatusSink(), "real-node")
    results = {"new": {"refused": 0, "open": 0}, "recreated": {"refused": 0, "open": 0}}
    try:
        for i in range(pods):
            manifest = realcni.race_pod(f"bench-{i}", "real-node")
            agent.on_pod_event("ADDED", manifest)
            pod = kubelet.run(manifest)
            results["new"][realcni.first_attempt(kubelet, pod)] += 1
            # the sandbox dies: a new one, a new network namespace, the containers started anew
            kubelet.recreate_sandbox(pod)
            results["recreated"][realcni.first_attempt(kubelet, pod)] += 1
            kubelet.delete(pod)
            agent.on_pod_event("DELETED", manifest)
    finally:
        kubelet.close()
        agent.stop.set()
        if service is not None:
            realcni.unchain(node, service, stop)
        agent.host.close()
    return [
        {
            "scenario": "realnode-first",
            "backend": backend,
            "plugin": with_plugin,
            "sandbox": kind,
            "pods": pods,
            "first_attempt_refused": counts["refused"],
            "first_attempt_open": counts["open"],
        }
        for kind, counts in results.items()
    ]


def timed_plugin(real: Path, bin_dir: Path, log: Path) -> Path:
    """bench/cni_timer.c installed as the plugin, the real one next to it: each exec's duration
    as the runtime sees it goes to `log`."""
    timed = bin_dir / f"{conflist.PLUGIN_TYPE}.timed"
    shutil.copy2(real, timed)
    shim = bin_dir / conflist.PLUGIN_TYPE
    cc = ["cc", "-O2", "-static", f'-DPLUGIN="{timed}"', f'-DLOG="{log}"', "-o", str(shim)]
    subprocess.run([*cc, str(Path(__file__).with_name("cni_timer.c"))], check=True)
    return shim


class Stopwatch:
    """Calls to a function: (start, end) on the monotonic clock, in the order they ended."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, float]] = []

    @property
    def seconds(self) -> list[float]:
        return [end - start for start, end in self.calls]

    def wrap(self, fn: Callable[P, R]) -> Callable[P, R]:
        def timed(*args: P.args, **kwargs: P.kwargs) -> R:
            started = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls.append((started, time.monotonic()))

        return timed


def real_node_latency(node: Any, backend: str, pods: int) -> dict[str, Any]:
    """RunPodSandbox of an isolated pod's sandbox, the plugin chained or not, alternating pod by
    pod so that both see the same machine (this VM's load moves by the second). The agent runs
    as on a node (its timers too: pods waiting for their sandbox are looked for in /proc every
    20 ms) and knows each pod with its three containers, whose rules go in; the kubelet creates
    the sandbox alone, which is what is timed."""
    from netisolate.agent.cni import CniHandler
    from netisolate.agent.cni_conf import install_binary, write_atomically
    from netisolate.agent.cni_server import CniServer
    from tests.cni_harness import plugin_binary
    from tests.realnode import cni as realcni

    agent = realcni.new_agent(None, backend)
    agent.on_namespace_list([{"metadata": {"name": "shop", "labels": {}}}])
    answer, rules_in = Stopwatch(), Stopwatch()
    reconciler = agent.reconciler
    reconciler.hand_over = rules_in.wrap(reconciler.hand_over)  # type: ignore[method-assign]
    untimed = CniHandler(reconciler, cast(Any, None))
    handler = answer.wrap(untimed)  # ADDs only: a DEL waits for the lock (the sandbox is gone)
    loop = threading.Thread(target=agent.loop, args=(_listed(),), daemon=True)
    loop.start()
    socket = realcni.options(node).socket
    server = CniServer(socket, lambda rq, ns: (handler if rq.command == "ADD" else untimed)(rq, ns))
    server.start()
    times = node.dir / "plugin-times"
    real = install_binary(plugin_binary(), node.cni_bin)
    shim = timed_plugin(real, node.cni_bin, times)
    path = node.cni_conf / "10-netisolate.conflist"
    plain = path.read_text()
    edit = conflist.chained(path.name, plain, conflist.plugin_entry(str(socket), realcni.EXEMPT))
    assert edit is not None
    load = os.getloadavg()
    try:
        seconds = _alternating(node, agent, pods, {True: edit.text, False: plain})
    finally:
        agent.stop.set()
        write_atomically(path, plain.encode())
        realcni.until_loaded(node, False)
        server.shutdown()
        server.server_close()
        for binary in (shim, real.with_name(f"{conflist.PLUGIN_TYPE}.timed")):
            binary.unlink(missing_ok=True)
        socket.unlink(missing_ok=True)
        agent.host.close()
    lines = [line.split() for line in times.read_text().splitlines()]
    execs = [(float(start), float(end)) for command, start, end in lines if command == "ADD"]
    times.unlink()
    assert len(execs) == len(answer.calls) == pods, "one answer per exec"
    with_plugin, plain_runtime = summary(seconds[True]), summary(seconds[False])
    paired = [w - p for w, p in zip(seconds[True], seconds[False], strict=True)]
    return {
        "scenario": "realnode-sandbox",
        "backend": backend,
        "pods": pods,
        "load_average": [round(x, 2) for x in (*load, *os.getloadavg())],  # 1/5/15 min, before, after
        # what the plugin adds: its exec in the chain, as containerd runs it (timed from outside)
        "added_plugin_exec": summary([end - start for start, end in execs]),
        # inside it: from the exec to the agent holding the request (the process starting, its
        # connect and send, the agent's accept, thread and read) ...
        "plugin_to_agent": summary([a[0] - e[0] for e, a in zip(execs, answer.calls, strict=True)]),
        # ... the agent's answer (pod looked up, rules installed) ...
        "agent_answer": summary(answer.seconds),
        # ... and from the answer to the plugin's exit (reply sent and read, output, exit)
        "agent_to_exit": summary([e[1] - a[1] for e, a in zip(execs, answer.calls, strict=True)]),
        # inside the answer, the rules going in (policy, ruleset, the backend's write)
        "rules_in": summary(rules_in.seconds),
        "run_pod_sandbox_with_plugin": with_plugin,
        "run_pod_sandbox_plain_runtime": plain_runtime,
        # each pod's sandbox against its neighbour in time: the same question from the outside,
        # through the runtime's own spread
        "added_paired": {
            "p50_ms": round(statistics.median(paired) * 1000, 2),
            "p90_ms": round(percentile(paired, 0.9) * 1000, 2),
        },
        "target_added_p99_ms": 30,
    }


def _alternating(node: Any, agent: Any, pods: int, conflists: dict[bool, str]) -> dict[bool, list[float]]:
    """RunPodSandbox's seconds for `pods` sandboxes with the plugin chained (True) and as many
    without, one of each in turn."""
    from netisolate.agent.cni_conf import write_atomically
    from tests.realnode import cni as realcni

    path = node.cni_conf / "10-netisolate.conflist"
    kubelet = realcni.EagerKubelet(node, _StatusSink(), "real-node")
    seconds: dict[bool, list[float]] = {True: [], False: []}
    try:
        for i in range(pods):
            for chained in (True, False) if i % 2 else (False, True):
                write_atomically(path, conflists[chained].encode())
                realcni.until_loaded(node, chained)
                manifest = realcni.race_pod(f"lat-{i}-{chained}", "real-node")
                agent.on_pod_event("ADDED", manifest)  # the watch delivers the pod before its sandbox
                sandbox_only = {**manifest, "spec": {**manifest["spec"], "containers": []}}
                started = time.perf_counter()
                pod = kubelet.run(sandbox_only)
                seconds[chained].append(time.perf_counter() - started)
                if chained:
                    _until_enforced(agent, pod.uid)
                kubelet.delete(pod)
                agent.on_pod_event("DELETED", manifest)
    finally:
        kubelet.close()
    return seconds


def _listed() -> threading.Event:
    """The pod list the agent's timers wait for: here pods come through the callbacks."""
    listed = threading.Event()
    listed.set()
    return listed


def _until_enforced(agent: Any, uid: str, timeout: float = 10.0) -> None:
    """The answer comes before the bookkeeping (it follows on the socket's thread)."""
    deadline = time.monotonic() + timeout
    while (tracked := agent.reconciler.pods.get(uid)) is None or tracked.state != "enforce":
        if time.monotonic() > deadline:
            raise RuntimeError(f"pod {uid}: not enforced after its ADD: {tracked and tracked.detail}")
        time.sleep(0.005)


def real_node(backends: tuple[str, ...], pods: int, only: str) -> None:
    from tests.realnode.node import real_node as started

    with started() as node:
        for backend in backends:
            if only in ("all", "latency"):
                print(json.dumps(real_node_latency(node, backend, pods)), flush=True)
            for plugin in (True, False) if only in ("all", "first") else ():
                for result in real_node_run(node, backend, pods, plugin):
                    print(json.dumps(result), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pods", type=int, default=50)
    parser.add_argument("--backend", choices=("nftables", "iptables", "both"), default="both")
    parser.add_argument("--real-node", action="store_true", help="on containerd + runc (tests/realnode)")
    parser.add_argument("--only", choices=("all", "latency", "first"), default="all")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the agent's events (WildcardListener for nc's wildcard bind)
    if subprocess.run([BUSYBOX, "true"], check=False).returncode != 0:
        print(f"{BUSYBOX} is missing: apt-get install busybox-static", file=sys.stderr)
        return 2
    backends = ("nftables", "iptables") if args.backend == "both" else (args.backend,)
    if args.real_node:
        real_node(backends, args.pods, args.only)
        return 0
    for backend in backends:
        for scenario in ("add-latency", "with-plugin", "without-plugin"):
            with tempfile.TemporaryDirectory(prefix="ni-bench-cni-") as tmp:
                if scenario == "add-latency":
                    result = add_latency(backend, args.pods, Path(tmp))
                else:
                    result = first_attempts(backend, args.pods, Path(tmp), scenario == "with-plugin")
                print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
