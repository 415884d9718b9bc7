"""Enforcement benchmark: prints one JSON object per scenario, each with its baseline from the same run.

    sudo .venv/bin/python bench/bench_enforce.py [--quick] [--backend nftables|iptables]
    sudo .venv/bin/python bench/bench_enforce.py --guard     # loopback: nftables vs the socket guard

apply-new / apply-update  per-namespace apply of a 3-container x 4-port policy, per backend, median
                          and p95, next to the same change loaded by the raw tool (`nft -f`,
                          `iptables-restore`) from the same kind of thread: for nftables an update
                          is the element delta (and, for scale, the whole-table replace it was);
                          and the CPU each of our updates took
apply-100                 changing the policy of 100 pod namespaces (serial and with apply_many's
                          8 workers), next to the raw tool loading the same change with 8 workers
loopback                  connection rate from app to proxy (50 grants per container) with and
                          without rules: many short A B B A rounds of one C client
                          (bench/connloop.c, built with gcc) against a C server, pinned to one CPU,
                          test rounds (B with rules) alternating with A/A control rounds (B without
                          them too); the median of the rounds' own ratios with its 95 % interval,
                          quartiles and extremes, next to the control's (the benchmark's resolution),
                          by wall time and per CPU-second of client and server; with --guard
                          a UID and a cgroup identity pod, each with nftables' rules and the socket
                          guard (cgroup BPF, netisolate.rules.sockaddr) in the same rounds
guard-apply (--guard)     the guard's new install and policy change next to the table's, one pod
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from netisolate.backends import Backend, apply_many, bpf, checked, run_tool, select_backend
from netisolate.localpod import LocalPod, as_uid
from netisolate.model import Pod, parse_pod
from netisolate.netns import NetNS
from netisolate.policy import pod_policy
from netisolate.rules import RuleSet, Settings, build_ruleset, iptables, nft, sockaddr

UIDS = {"app": 1000, "proxy": 1001, "worker": 1002}


def bench_pod(
    extra_port: int = 0, identity: str = "uid", grants: int = 4, declared_extra: int | None = None
) -> Pod:
    """Each container is granted `grants` ports, which the next one declares it serves (so the
    loopback connections, app → proxy on 8000, pass the SYN-ACK ownership rules too). The
    declared ports move with the grants by `extra_port`, or by `declared_extra` (a running pod's
    policy change moves its grants alone: its containers' ports are fixed)."""
    annotations = {"netisolate.io/isolation": "enforce", "netisolate.io/identity": identity}
    names = list(UIDS)
    served: dict[str, list[dict[str, int]]] = {}
    moved = extra_port if declared_extra is None else declared_extra
    for i, name in enumerate(names):
        ports = [8000 + 100 * i + extra_port + p for p in range(grants)]
        annotations[f"allow.netisolate.io/{name}"] = ", ".join(map(str, ports))
        declared = [8000 + 100 * i + moved + p for p in range(grants)]
        served[names[(i + 1) % len(names)]] = [{"containerPort": port} for port in declared]
    containers = [
        {"name": n, "securityContext": {"runAsUser": u}, "ports": served[n]} for n, u in UIDS.items()
    ]
    return parse_pod(
        {"metadata": {"name": "bench", "annotations": annotations}, "spec": {"containers": containers}}
    )


def ruleset(extra_port: int = 0, grants: int = 4) -> RuleSet:
    rs = build_ruleset(pod_policy(bench_pod(extra_port, grants=grants), {}), Settings())
    assert rs is not None
    return rs


def ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 2),
        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 2),
    }


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


@contextmanager
def namespaces(count: int) -> Iterator[list[NetNS]]:
    names = [f"ni-bench-{i}-{time.monotonic_ns() % 100000}" for i in range(count)]
    with ExitStack() as stack:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
            stack.callback(subprocess.run, ["ip", "netns", "del", name], check=False)
        opened = [NetNS.open(f"/run/netns/{name}") for name in names]
        for ns in opened:
            stack.callback(ns.close)
        yield opened


def raw_loader(
    backend: Backend, rs: RuleSet, new: bool, before: RuleSet | None = None
) -> Callable[[NetNS], object]:
    """The same change our backend makes, by the raw tool from the same kind of thread: for an
    nftables update from `before`, its element delta (None: the whole-table replace); for iptables
    the document, our jumps being in place already (the backend reads OUTPUT to know that)."""
    if backend.name == "nftables":
        delta = nft.update(rs, nft.parse(nft.table(before))) if before is not None else None
        doc = nft.create(rs) if new else delta or nft.replace(rs)
        return lambda ns: checked(run_tool(ns, ["nft", "-f", "-"], doc), "raw nft -f")
    families: tuple[tuple[iptables.Family, str], ...] = (
        (4, "iptables-legacy-restore"),
        (6, "ip6tables-legacy-restore"),
    )
    docs = [
        (tool, iptables.document(rs, family, () if new else iptables.jumps(family)))
        for family, tool in families
    ]

    def load(ns: NetNS) -> None:
        for tool, text in docs:
            run_tool(ns, [tool, "--noflush", "--wait"], text)

    return load


def bench_apply(backend: Backend, rounds: int) -> Iterator[dict[str, object]]:
    rs, changed = ruleset(), ruleset(extra_port=50)
    load_new, load_change = raw_loader(backend, rs, True), raw_loader(backend, changed, False, rs)
    load_replace = raw_loader(backend, changed, False)
    with namespaces(rounds) as ours, namespaces(rounds) as raw, namespaces(rounds) as replaced:
        new = [timed(lambda ns=ns: backend.apply(ns, rs)) for ns in ours]  # type: ignore[misc]
        raw_new = [timed(lambda ns=ns: load_new(ns)) for ns in [*raw, *replaced]]  # type: ignore[misc]
        cpu = time.process_time()
        update = [timed(lambda ns=ns: backend.apply(ns, changed)) for ns in ours]  # type: ignore[misc]
        cpu_ms = (time.process_time() - cpu) / len(ours) * 1000
        raw_update = [timed(lambda ns=ns: load_change(ns)) for ns in raw]  # type: ignore[misc]
        raw_replace = [timed(lambda ns=ns: load_replace(ns)) for ns in replaced]  # type: ignore[misc]
        drift = [backend.verify(ns, changed) for ns in [*ours, *raw]]
    assert not any(drift), f"an update left drift: {next(d for d in drift if d)}"
    for scenario, samples, baseline in (("apply-new", new, raw_new), ("apply-update", update, raw_update)):
        ours_ms, raw_ms = ms(samples), ms(baseline)
        result: dict[str, object] = {
            "scenario": scenario,
            "backend": backend.name,
            "policy": "3 containers x 4 ports, IPv4+IPv6"
            + ("; all 12 ports changed" if "update" in scenario else ""),
            "namespaces": rounds,
            **ours_ms,
            "raw_median_ms": raw_ms["median_ms"],
            "raw_p95_ms": raw_ms["p95_ms"],
            "ratio_to_raw": round(ours_ms["median_ms"] / raw_ms["median_ms"], 2),
        }
        if scenario == "apply-update":
            result["cpu_ms_each"] = round(cpu_ms, 2)  # this process's CPU: what load cannot inflate much
            if backend.name == "nftables":
                result["raw_whole_table_replace_median_ms"] = ms(raw_replace)["median_ms"]
        yield result


def bench_many(backend: Backend, count: int) -> dict[str, object]:
    rs, changed = ruleset(), ruleset(extra_port=50)
    load_change = raw_loader(backend, changed, False, rs)
    with namespaces(count) as opened, namespaces(count) as raw:
        apply_many(backend, [(ns, rs) for ns in opened])
        serial = timed(lambda: apply_many(backend, [(ns, changed) for ns in opened], workers=1))
        parallel = timed(lambda: apply_many(backend, [(ns, rs) for ns in opened], workers=8))
        apply_many(backend, [(ns, rs) for ns in raw])
        with ThreadPoolExecutor(max_workers=8) as pool:
            raw_parallel = timed(lambda: list(pool.map(load_change, raw)))
    return {
        "scenario": "apply-100",
        "backend": backend.name,
        "namespaces": count,
        "update_serial_s": round(serial, 3),
        "update_8_workers_s": round(parallel, 3),
        "raw_update_8_workers_s": round(raw_parallel, 3),
    }


LOOPBACK_GRANTS = 50  # grants in the loopback pod: the lookups a connection's SYN meets


@contextmanager
def connloop() -> Iterator[str]:
    """bench/connloop.c, built into a directory the benchmark's UIDs can read."""
    source = Path(__file__).resolve().parent / "connloop.c"
    with tempfile.TemporaryDirectory(prefix="ni-bench-") as directory:
        os.chmod(directory, 0o755)
        binary = f"{directory}/connloop"
        subprocess.run(["gcc", "-O2", "-o", binary, str(source)], check=True)
        yield binary


def connections_per_s(pod: LocalPod, binary: str, seconds: float, container: str | None = None) -> float:
    """One measurement by a client of its own (bench_cgroup's rounds)."""
    argv = as_uid(UIDS["app"], [binary, "client", "8000"])
    client = pod.spawn(argv, stdin=True, container=container)
    out, err = client.communicate(f"{seconds}\n", timeout=seconds * 3 + 10)
    pod.processes.remove(client)
    rate, failed, _ = out.split()
    if client.returncode != 0 or int(failed):
        raise RuntimeError(f"connloop client: {failed} connections failed {err}")
    return float(rate)


def _without_rules(ns: NetNS, backend: str = "nftables") -> None:
    """The backend's rules out of the packet path: our table deleted (nftables; none there is
    fine), or OUTPUT's jumps flushed (iptables: the kernel keeps a legacy table, and its hooks, once
    it is made, so that baseline leaves the hook's own cost out). Only the backend's own tool runs:
    an iptables call would make a legacy table, whose hooks would then weigh on both sides."""
    if backend == "nftables":
        result = run_tool(ns, ["nft", "delete", "table", "inet", nft.TABLE])
        if result.returncode != 0 and "No such file" not in result.stderr:
            checked(result, "nft delete")
        return
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        checked(run_tool(ns, [tool, "-F", "OUTPUT"]), f"{tool} -F OUTPUT")


class Client:
    """One connloop client for the whole run (no process start between measurements), with the
    server it connects to, in the app's and the proxy's containers; both pinned to `cpu` when it
    is >= 0."""

    def __init__(self, pod: LocalPod, binary: str, cpu: int) -> None:
        server = as_uid(UIDS["proxy"], [binary, "server", "8000", str(cpu)])
        self.server = pod.spawn(server, container="proxy")
        assert self.server.stdout is not None and self.server.stdout.readline().strip() == "ready"
        client = as_uid(UIDS["app"], [binary, "client", "8000", str(cpu)])
        self.client = pod.spawn(client, stdin=True, container="app")

    def measure(self, seconds: float) -> tuple[float, float]:
        """(connections per second of wall time, per second of CPU the client and the server ran
        for): the second leaves out the time other processes held the CPU."""
        assert self.client.stdin is not None and self.client.stdout is not None
        ran = _runtime_ns(self.client.pid) + _runtime_ns(self.server.pid)
        self.client.stdin.write(f"{seconds}\n")
        self.client.stdin.flush()
        line = self.client.stdout.readline()
        ran = _runtime_ns(self.client.pid) + _runtime_ns(self.server.pid) - ran
        rate, failed, count = line.split()
        if int(failed):
            raise RuntimeError(f"connloop client: {failed} connections failed")
        return float(rate), int(count) / (ran / 1e9)


def _runtime_ns(pid: int) -> int:
    """The time the process ran on a CPU (the kernel charges a packet's softirq work to the process
    that sends it: this kernel has no IRQ time accounting)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def _spread(values: list[float]) -> dict[str, float]:
    """Median, quartiles, extremes, and the median's 95 % confidence interval (order statistics:
    ranks n/2 ± 0.98 √n), which is what the benchmark can resolve."""
    ordered = sorted(values)
    n = len(ordered)
    quartiles = statistics.quantiles(ordered, n=4)
    half = 0.98 * n**0.5
    low, high = max(0, int(n / 2 - half)), min(n - 1, int(n / 2 + half + 0.5))
    return {
        "median": round(statistics.median(ordered), 4),
        "ci95_low": round(ordered[low], 4),
        "ci95_high": round(ordered[high], 4),
        "q1": round(quartiles[0], 4),
        "q3": round(quartiles[2], 4),
        "min": round(ordered[0], 4),
        "max": round(ordered[-1], 4),
    }


SETTLE_S = 0.03  # after each change of the rules, before measuring: the kernel frees what was removed
WARMUP_ROUNDS = 4  # discarded: caches, the first connections' allocations, the first apply


class Rules(Protocol):
    """A way of putting rules into the loopback pod and taking them out again."""

    @property
    def name(self) -> str: ...

    def put(self) -> None: ...

    def take(self) -> None: ...


@dataclass
class BackendRules:
    backend: Backend
    ns: NetNS
    rs: RuleSet

    @property
    def name(self) -> str:
        return self.backend.name

    def put(self) -> None:
        self.backend.apply(self.ns, self.rs)

    def take(self) -> None:
        _without_rules(self.ns, self.backend.name)


@dataclass
class GuardRules:
    """The socket guard (cgroup BPF, netisolate.rules.sockaddr) on the pod's cgroup."""

    pod: LocalPod
    rs: RuleSet
    installed: bpf.Installed | None = None
    name: str = "guard"

    def put(self) -> None:
        assert self.pod.cgroup is not None and self.pod.ns is not None
        v4, v6 = bpf.local_addresses(self.pod.ns)
        self.installed = bpf.install(str(self.pod.cgroup), sockaddr.guard(self.rs), v4, v6)

    def take(self) -> None:
        assert self.installed is not None
        self.installed.detach()


Variant = Callable[[LocalPod, RuleSet], Rules]


def bench_loopback(
    variants: list[Variant], identity: str, rounds: int, seconds: float, cpu: int
) -> dict[str, object]:
    """app (granted 8000 among 50 ports) -> proxy (which declares them) on 127.0.0.1:8000;
    TCP-only grants, so no conntrack. Rounds cycle through a test round of each variant and a
    control round, each four short measurements of the same client in the order A B B A (so a
    linear drift of a shared machine cancels): A without rules, B with the variant's rules (test)
    or without them as well (control, the A/A: its spread is the benchmark's own resolution). A
    round's ratio is B/A of its sums; the result is the median of the rounds' ratios with its
    confidence interval, both for the wall-time rate and for connections per CPU-second of client
    and server (immune to other processes taking the CPU, the same as the wall rate on a quiet
    machine with both pinned to one CPU)."""
    ratios: dict[str, list[float]] = {}
    rates: dict[str, list[float]] = {}
    load = os.getloadavg()
    pod_spec = bench_pod(identity=identity, grants=LOOPBACK_GRANTS)
    with connloop() as binary, LocalPod(pod_spec, with_cgroups=True) as pod:  # (the guard's place)
        rs = build_ruleset(pod_policy(pod.pod, {}), Settings(), cgroups=pod.cgroups())
        assert rs is not None
        rules: list[Rules | None] = [make(pod, rs) for make in variants]
        kinds = [r.name for r in rules if r is not None] + ["control"]
        rules.append(None)
        client, current = Client(pod, binary, cpu), None

        def measured(wanted: Rules | None) -> tuple[float, float]:
            nonlocal current
            if wanted is not current:
                if current is not None:
                    current.take()
                if wanted is not None:
                    wanted.put()
                current = wanted
            time.sleep(SETTLE_S)
            return client.measure(seconds)

        try:
            for i in range(len(kinds) * (rounds + WARMUP_ROUNDS)):
                kind, variant = kinds[i % len(kinds)], rules[i % len(kinds)]
                a1, b1, b2, a2 = (measured(variant if b else None) for b in (False, True, True, False))
                if i < len(kinds) * WARMUP_ROUNDS:
                    continue
                ratios.setdefault(kind, []).append((b1[0] + b2[0]) / (a1[0] + a2[0]))
                ratios.setdefault(f"{kind}_cpu", []).append((b1[1] + b2[1]) / (a1[1] + a2[1]))
                rates.setdefault("without", []).extend([a1[0], a2[0]])
                rates.setdefault(kind, []).extend([b1[0], b2[0]])
        finally:
            measured(None)
    return {
        "scenario": "loopback",
        "identity": identity,
        "grants_in_pod": LOOPBACK_GRANTS * len(UIDS),
        "rounds_each": rounds,
        "warm_up_discarded": len(kinds) * WARMUP_ROUNDS,
        "seconds_each": seconds,
        "pinned_cpu": cpu,
        "conn_per_s_without_median": round(statistics.median(rates["without"])),
        "control_ratio_paired": _spread(ratios["control"]),
        "control_per_cpu_s_ratio_paired": _spread(ratios["control_cpu"]),
        **{
            kind: {
                "conn_per_s_with_median": round(statistics.median(rates[kind])),
                "conn_rate_ratio_paired": _spread(ratios[kind]),
                "conn_per_cpu_s_ratio_paired": _spread(ratios[f"{kind}_cpu"]),
            }
            for kind in kinds[:-1]
        },
        "load_average_before": [round(x, 2) for x in load],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def bench_guard_apply(rounds: int) -> dict[str, object]:
    """The socket guard's own costs on one cgroup identity pod (3 containers x 4 ports), next to
    nftables' for the same pod in the same rounds: a new guard (7 maps made and filled, 7
    programs verified and attached) against a new table, and a changed policy (all 12 grants
    moved: map elements) against the table's element update."""
    times: dict[str, list[float]] = {"guard_new": [], "guard_update": [], "table_new": [], "table_update": []}
    backend = select_backend("nftables")
    with LocalPod(bench_pod(identity="cgroup")) as pod:
        assert pod.ns is not None and pod.cgroup is not None
        ns = pod.ns
        policies = [pod_policy(bench_pod(extra, "cgroup", declared_extra=0), {}) for extra in (0, 50)]
        first, changed = (build_ruleset(p, Settings(), cgroups=pod.cgroups()) for p in policies)
        assert first is not None and changed is not None
        local = bpf.local_addresses(ns)
        for _ in range(rounds):
            started = time.perf_counter()
            installed = bpf.install(str(pod.cgroup), sockaddr.guard(first), *local)
            times["guard_new"].append(time.perf_counter() - started)
            times["guard_update"].append(timed(lambda: installed.update(sockaddr.guard(changed), *local)))  # noqa: B023
            installed.detach()
            _without_rules(ns)
            times["table_new"].append(timed(lambda: backend.apply(ns, first)))
            times["table_update"].append(timed(lambda: backend.apply(ns, changed)))
        _without_rules(ns)
    return {
        "scenario": "guard-apply",
        "rounds": rounds,
        **{name: ms(samples) for name, samples in times.items()},
    }


def _backend_rules(backend: Backend) -> Variant:
    def make(pod: LocalPod, rs: RuleSet) -> Rules:
        assert pod.ns is not None
        return BackendRules(backend, pod.ns, rs)

    return make


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few samples: a smoke run, not numbers to quote")
    parser.add_argument(
        "--loopback-only", action="store_true", help="only the loopback connection rate and throughput"
    )
    parser.add_argument(
        "--loopback-rounds", type=int, default=0, metavar="N", help="rounds of the loopback scenario"
    )
    parser.add_argument(
        "--loopback-seconds",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds of each loopback measurement (on a busy machine: more, shorter rounds)",
    )
    parser.add_argument(
        "--loopback-cpu",
        type=int,
        default=max(os.sched_getaffinity(0)),
        metavar="N",
        help="the CPU the loopback client and server are pinned to (-1: not pinned; default the last)",
    )
    parser.add_argument(
        "--backend", choices=("nftables", "iptables"), action="append", help="only this backend (repeatable)"
    )
    parser.add_argument(
        "--guard",
        action="store_true",
        help="only the socket guard: its apply, and the loopback rate of a UID and a cgroup identity "
        "pod with nftables' rules and with the guard (cgroup BPF) in the same rounds",
    )
    args = parser.parse_args()
    rounds, many, loop_rounds, seconds = (5, 10, 4, 0.1) if args.quick else (40, 100, 100, 0.1)
    loopback = (args.loopback_rounds or loop_rounds, args.loopback_seconds or seconds, args.loopback_cpu)
    if args.guard:
        print(json.dumps(bench_guard_apply(rounds)), flush=True)
        guarded = [_backend_rules(select_backend("nftables")), GuardRules]
        for identity in ("uid", "cgroup"):
            print(json.dumps(bench_loopback(guarded, identity, *loopback)), flush=True)
        return
    for name in args.backend or ("nftables", "iptables"):
        backend = select_backend(name)
        if not args.loopback_only:
            for result in bench_apply(backend, rounds):
                print(json.dumps(result), flush=True)
            print(json.dumps(bench_many(backend, many)), flush=True)
        print(json.dumps(bench_loopback([_backend_rules(backend)], "uid", *loopback)), flush=True)


if __name__ == "__main__":
    main()
