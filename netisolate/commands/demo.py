"""`netisolate demo`: the whole data plane on one machine, no cluster.

Builds the `app-proxy-rogue` scenario pod (a network namespace, listeners running as the containers'
UIDs), prints who can reach whom over loopback before and after enforcement, and cleans up even on
Ctrl-C. Exit 0 only when the enforced matrix is exactly the expected one.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from types import FrameType

from netisolate import scenarios
from netisolate.backends import BACKENDS, select_backend
from netisolate.commands.common import add_command
from netisolate.localpod import ALL_ADDRESSES, LocalPod, matrix
from netisolate.policy import pod_policy
from netisolate.rules import Settings, build_ruleset, iptables, nft

DETAILS = """\
Needs root on Linux (network namespaces, netfilter, processes under other UIDs) and no cluster.
The pod: `app` (UID 1000) listens on 8080, `proxy` (UID 1001) on 15001 and its admin port 15000,
and `rogue` (UID 1002) is what a compromised injector slipped in. The annotations grant app→15001
and proxy→8080 only. Every cell is tried over 127.0.0.1, 127.0.0.53, ::1 and the pod's own IPv4
and IPv6 addresses.
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        sub, "demo", "show a pod's loopback connectivity before and after isolation", DETAILS
    )
    parser.add_argument("--backend", choices=BACKENDS, default="nftables")
    parser.add_argument("--scenario", choices=scenarios.names(), default="app-proxy-rogue")
    parser.set_defaults(run=run)


def _cell(results: list[str]) -> str:
    if all(r == "open" for r in results):
        return "open"
    if all(r != "open" for r in results):
        return "blocked"
    return "MIXED " + "/".join(results)


def _table(title: str, cells: dict[tuple[str, str], list[str]]) -> str:
    clients = list(dict.fromkeys(c for c, _ in cells))
    targets = list(dict.fromkeys(t for _, t in cells))
    width = max(len(t) for t in targets) + 2
    lines = [title, "  from \\ to".ljust(14) + "".join(t.ljust(width) for t in targets)]
    lines += [
        "  " + c.ljust(12) + "".join(_cell(cells[(c, t)]).ljust(width) for t in targets) for c in clients
    ]
    return "\n".join(lines)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through LocalPod.__exit__, which removes everything


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print(
            "netisolate demo: run as root (it creates network namespaces and processes under other UIDs)",
            file=sys.stderr,
        )
        return 1
    signal.signal(signal.SIGTERM, _terminate)
    scenario = scenarios.load(args.scenario)
    policy = pod_policy(scenario.parsed_pod(), scenario.namespace_labels)
    backend = select_backend(args.backend)
    if policy.identity.by_cgroup and not backend.cgroups:
        print(
            f"netisolate demo: scenario {scenario.name} uses cgroup identity: run it with --backend nftables",
            file=sys.stderr,
        )
        return 1
    print(f"{scenario.name}: {scenario.description.strip()}\n")
    with LocalPod(scenario.parsed_pod()) as pod:
        # a cgroup pod's rules name the cgroups its containers' processes were started in
        ruleset = build_ruleset(policy, Settings(), cgroups=pod.cgroups() if pod.cgroup else None)
        assert ruleset is not None, "demo scenarios are isolated"
        print(
            f"Demo pod: network namespace {pod.name} (its eth0 peer: {pod.peer}), removed on exit\n",
            flush=True,
        )
        for container, ports in scenario.listeners.items():
            pod.listen(container, ports)
        print(_table("Before: every container reaches every port", matrix(pod, scenario.listeners)))
        assert pod.ns is not None
        started = time.perf_counter()
        backend.apply(pod.ns, ruleset)
        took = (time.perf_counter() - started) * 1000
        print(f"\nEnforced with {backend.name} in {took:.1f} ms (`netisolate render` prints these rules):\n")
        print(nft.table(ruleset) if backend.name == "nftables" else iptables.document(ruleset, 4))
        after = matrix(pod, scenario.listeners)
        print(_table("After: only granted connections open", after))
        wrong = [(c, t) for (c, t), results in after.items() if _cell(results) != scenario.expected(c, t)]
        counters = backend.deny_counters(pod.ns)
    print(
        "\nRefused connection attempts by container:",
        ", ".join(f"{k or 'unknown UID'}={v}" for k, v in sorted(counters.items())),
    )
    print(f"Addresses tried for every cell: {', '.join(ALL_ADDRESSES)}")
    if wrong:
        print(f"\nUNEXPECTED: {', '.join(f'{c}→{t}' for c, t in wrong)}", file=sys.stderr)
        return 1
    print("\nThe matrix is exactly what the annotations grant. Cleaned up.")
    return 0
