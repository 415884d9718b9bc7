"""Agent benchmark on the real containerd node (tests/realnode/): prints one JSON object per scenario.

    sudo .venv/bin/python bench/bench_realnode.py [--pods 30] [--backend nftables|iptables] [--quick]

plain-runtime     baseline, no agent: RunPodSandbox's own duration (p50/p99) over N pods
agent-start       N real pods running without rules: `netisolate agent` started → every one enforced;
                  of that, exec → the agent running (interpreter, imports, set-up; its log says when)
footprint         the agent's RSS, and its CPU while idle with those N pods (verify every 30 s)
sandbox-to-rules  the agent running: RunPodSandbox returns → the new pod's rules hold (p50/p99 over N
                  more pods; 0 when they held before it returned, and rules_minus_return signed),
                  and RunPodSandbox's duration meanwhile, against the plain-runtime one

Pods are the app-proxy-rogue scenario's (3 containers), run by the kubelet stand-in through CRI;
the API server is the kmock stand-in on loopback. "Rules hold" is the end of the agent's apply
as its log stamps it (so nothing polls the agent meanwhile), each confirmed by reading the rules
back from the pod's namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kmock

from netisolate.backends import select_backend
from netisolate.model import parse_pod
from netisolate.netns import NetNS
from netisolate.policy import pod_policy
from netisolate.rules import Settings, build_ruleset
from tests.agent_process import AgentProcess
from tests.kube_standin import api_client, declare, put
from tests.realnode.kubelet import Kubelet, RunningPod
from tests.realnode.node import real_node
from tests.realnode.pods import NODE_NAME, scenario_pod


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 1),
        "min_ms": round(ordered[0] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


def sandbox_seconds(running: list[RunningPod]) -> list[float]:
    return [p.sandbox_ready - p.sandbox_called for p in running]


def states(agent: AgentProcess) -> dict[str, str]:
    return {uid: row["state"] for uid, row in agent.pods().items()}


def confirm_rules(pod: RunningPod, manifest: dict[str, Any], backend: str) -> None:
    """The agent's word checked against the kernel: the pod's namespace holds exactly its rules."""
    ruleset = build_ruleset(pod_policy(parse_pod(manifest), {}), Settings())
    assert ruleset is not None
    with NetNS.open(pod.pid) as ns:
        drift = select_backend(backend).verify(ns, ruleset)
    assert drift == [], f"{pod.name}: {drift}"


def pods_for(prefix: str, count: int) -> list[dict[str, Any]]:
    return [scenario_pod("app-proxy-rogue", f"{prefix}-{i}", namespace="bench") for i in range(count)]


def logged_at(agent: AgentProcess, message: str, pod: str | None = None) -> float | None:
    """When the agent's log first says message (of pod, "namespace/name"), on the wall clock (ms
    precision). Read from the log, so nothing polls the agent."""
    for line in agent.logs[-1].read_text(errors="replace").splitlines():
        if f'"{message}"' in line and (pod is None or f'"pod": "{pod}"' in line):
            stamp = json.loads(line)["time"]
            return (
                datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")
                .replace(tzinfo=datetime.UTC)
                .timestamp()
            )
    return None


def applied_at(agent: AgentProcess, pod: str) -> float | None:
    """When the agent's log says it installed pod's rules: the end of the (first) apply."""
    return logged_at(agent, "rules applied", pod)


def sandbox_to_rules(
    agent: AgentProcess, kubelet: Kubelet, manifest: dict[str, Any]
) -> tuple[RunningPod, float]:
    """Creates the pod through the API (a watch event), waits until the agent tracks it (pending:
    no sandbox yet), runs it, and returns when its rules were installed."""
    uid, ref = manifest["metadata"]["uid"], f"bench/{manifest['metadata']['name']}"
    kubelet.core.create_namespaced_pod("bench", manifest, _preload_content=False)
    agent.wait(lambda: states(agent).get(uid) == "pending", 10, "the pod tracked")
    pod = kubelet.run(manifest)
    agent.wait(lambda: applied_at(agent, ref) is not None, 10, f"{ref}'s rules")
    return pod, applied_at(agent, ref) or 0.0


def bench(standin: Any, count: int, backend: str, idle_s: float) -> None:
    with real_node() as node:
        from kubernetes import client

        kubelet = Kubelet(node, client.CoreV1Api(api_client(standin)), NODE_NAME)
        agent = AgentProcess(str(standin.url), NODE_NAME, backend, verify_interval=30.0)
        try:
            manifests = pods_for("before", count)
            for manifest in manifests:
                put(standin, "v1/pods", manifest)
            running = kubelet.sync()
            plain = sandbox_seconds(running)
            report({"scenario": "plain-runtime", "pods": count, "run_pod_sandbox": percentiles(plain)})

            started = time.time()
            agent.start()
            up = agent.wait(lambda: bool(agent.status()), 60, "the agent's endpoints")
            refs = [f"bench/{m['metadata']['name']}" for m in manifests]
            agent.wait(lambda: all(applied_at(agent, r) for r in refs), 60, "all enforced")
            took = max(applied_at(agent, r) or 0.0 for r in refs) - started
            until_running = (logged_at(agent, "agent running") or started) - started
            for pod, manifest in zip(running, manifests, strict=True):
                confirm_rules(pod, manifest, backend)
            report(
                {
                    "scenario": "agent-start",
                    "pods": count,
                    "backend": backend,
                    "all_enforced_s": round(took, 3),
                    "of_which_interpreter_and_imports_s": round(up, 3),  # exec → /status answers
                    "of_which_until_the_agent_runs_s": round(until_running, 3),  # exec → its log says so
                }
            )

            agent.wait(lambda: agent.status().get("ready") is True, 30, "readiness")
            cpu_before, idle_started = agent.cpu_seconds(), time.monotonic()
            time.sleep(idle_s)
            cpu = agent.cpu_seconds() - cpu_before
            report(
                {
                    "scenario": "footprint",
                    "pods": count,
                    "rss_mib": round(agent.rss_mib(), 1),
                    "idle_cpu_percent_of_a_core": round(100 * cpu / (time.monotonic() - idle_started), 2),
                    "idle_seconds": idle_s,
                    "verify_interval_s": 30.0,
                }
            )

            latencies, signed, with_agent, before_return = [], [], [], 0
            for manifest in pods_for("after", count):
                pod, enforced = sandbox_to_rules(agent, kubelet, manifest)
                confirm_rules(pod, manifest, backend)
                before_return += enforced <= pod.sandbox_ready
                latencies.append(max(0.0, enforced - pod.sandbox_ready))
                signed.append(enforced - pod.sandbox_ready)
                with_agent.append(pod.sandbox_ready - pod.sandbox_called)
            report(
                {
                    "scenario": "sandbox-to-rules",
                    "pods": count,
                    "backend": backend,
                    "after_run_pod_sandbox_returns": percentiles(latencies),
                    "enforced_before_it_returned": before_return,
                    "rules_minus_return": percentiles(signed),  # negative: in place before it returned
                    "run_pod_sandbox_with_agent": percentiles(with_agent),
                    "run_pod_sandbox_plain": percentiles(plain),
                }
            )
        finally:
            agent.close()
            kubelet.close()


def report(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pods", type=int, default=30)
    parser.add_argument("--backend", choices=("nftables", "iptables"), default="nftables")
    parser.add_argument(
        "--quick", action="store_true", help="5 pods, 5 s idle: a smoke run, not numbers to quote"
    )
    args = parser.parse_args()
    count, idle = (5, 5.0) if args.quick else (args.pods, 60.0)
    async with kmock.KubernetesEmulator() as standin, kmock.Server(standin):
        declare(standin)
        put(standin, "v1/namespaces", {"metadata": {"name": "bench", "labels": {}}})
        await asyncio.to_thread(bench, standin, count, args.backend, idle)


if __name__ == "__main__":
    asyncio.run(main())
