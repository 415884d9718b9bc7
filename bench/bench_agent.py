"""Agent benchmark on a simulated node: prints one JSON object per scenario.

    sudo .venv/bin/python bench/bench_agent.py [--quick]

start-to-enforced  a pod's sandbox process appears → its rules hold (median, p99), agent running
restart            an agent starting on a node with N isolated pods already enforced → all verified
footprint          the agent's RSS and CPU while idle with those pods (one verify round included)

Pods reach the agent through the same callbacks its watch uses; the API server is not what is
measured here.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
from multiprocessing.queues import Queue
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from netisolate.agent.node import Agent
from netisolate.backends import select_backend
from netisolate.rules import Settings
from tests.agent_harness import SimulatedPod, close_all, pod_manifest

NODE = "bench-node"
VERIFY_INTERVAL = 30.0  # the agent's default


def new_agent(verify_interval: float = 3600.0) -> Agent:
    agent = Agent(
        NODE,
        select_backend("nftables"),
        Settings(),
        None,
        host_netns="/proc/self/ns/net",
        verify_interval=verify_interval,
    )
    agent.on_namespace_list([{"metadata": {"name": "shop", "labels": {}}}])
    return agent


def listed() -> threading.Event:
    """The pod list the timer loop waits for: here pods come through the callbacks directly."""
    done = threading.Event()
    done.set()
    return done


def start_to_enforced(samples: int) -> dict[str, object]:
    agent = new_agent()
    loop = threading.Thread(target=agent.loop, args=(listed(),), daemon=True)
    loop.start()
    latencies = []
    try:
        for i in range(samples):
            manifest = pod_manifest(f"s{i}", NODE)
            uid = manifest["metadata"]["uid"]
            sim = SimulatedPod(manifest)
            try:
                agent.on_pod_event("ADDED", manifest)  # the pod object comes first, the sandbox after
                sim.local.create()
                sim._run_in_cgroup("sandbox", ["sleep", "infinity"])
                started = time.perf_counter()  # the process is in its pod's cgroup: it has appeared
                while agent.reconciler.pods[uid].state != "enforce":
                    time.sleep(0.001)
                latencies.append(time.perf_counter() - started)
                agent.on_pod_event("DELETED", manifest)
            finally:
                sim.close()
    finally:
        agent.stop.set()
    ordered = sorted(latencies)
    return {
        "scenario": "start-to-enforced",
        "pods": samples,
        "median_ms": round(statistics.median(ordered) * 1000, 1),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 1),
        "pending_interval_ms": agent.pending_interval * 1000,
    }


Measured = tuple[float, int, int, float]  # seconds to verify, pods adopted, RSS bytes, CPU seconds


def _agent_process(manifests: list[dict[str, object]], idle_seconds: float, out: Queue[Measured]) -> None:
    """The restarted agent, alone in a fresh interpreter: its RSS and CPU are the agent's only, not
    the harness's (the simulated pods and the first agent live in the parent)."""
    agent = new_agent(verify_interval=VERIFY_INTERVAL)
    started = time.perf_counter()
    agent.on_pod_list(manifests)  # the watch's first list
    agent.reconciler.verify_all()  # the start-up verification before readiness
    took = time.perf_counter() - started
    adopted = sum(t.detail.startswith("adopted") for t in agent.reconciler.pods.values())
    cpu_before = os.times()
    loop = threading.Thread(target=agent.loop, args=(listed(),), daemon=True)
    loop.start()
    time.sleep(idle_seconds)
    cpu_after = os.times()
    agent.stop.set()
    cpu = sum(cpu_after[:4]) - sum(cpu_before[:4])  # user, system and those of reaped children
    out.put((took, adopted, _rss_bytes(), cpu))


def _rss_bytes() -> int:
    """Resident set size now (statm's second field is in pages), as `ps` and psutil report it."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def restart(count: int, idle_seconds: float) -> list[dict[str, object]]:
    manifests = [pod_manifest(f"r{i}", NODE) for i in range(count)]
    sims = [SimulatedPod(m) for m in manifests]
    try:
        for sim in sims:
            sim.start_sandbox()
        first = new_agent()
        first.on_pod_list(manifests)
        assert all(t.state == "enforce" for t in first.reconciler.pods.values())
        first.stop.set()
        for uid in list(first.reconciler.pods):
            first.reconciler.forget(uid)
        ctx = multiprocessing.get_context("spawn")
        out: Queue[Measured] = ctx.Queue()
        child = ctx.Process(target=_agent_process, args=(manifests, idle_seconds, out))
        child.start()
        took, adopted, rss, cpu = out.get(timeout=idle_seconds + 600)
        child.join()
        return [
            {
                "scenario": "restart",
                "pods": count,
                "verified_s": round(took, 3),
                "adopted_without_reapply": adopted,
            },
            {
                "scenario": "footprint",
                "pods": count,
                "rss_mib": round(rss / 2**20, 1),
                "idle_cpu_percent_of_a_core": round(100 * cpu / idle_seconds, 2),
                "idle_seconds": idle_seconds,
                "verify_interval_s": VERIFY_INTERVAL,
            },
        ]
    finally:
        close_all(sims)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few samples: a smoke run, not numbers to quote")
    args = parser.parse_args()
    print(json.dumps(start_to_enforced(10 if args.quick else 100)), flush=True)
    for count in (10,) if args.quick else (110, 250):
        for result in restart(count, idle_seconds=2.0 if args.quick else 60.0):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
