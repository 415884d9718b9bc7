"""Enforcement benchmark: prints one JSON object per scenario, each with its baseline from the same run.

    sudo .venv/bin/python bench/bench_enforce.py [--quick]

apply-new / apply-update  per-namespace apply of a 3-container x 4-port policy, per backend, median
                          and p95, next to the same text loaded by the raw tool from the same thread
apply-100                 updating 100 pod namespaces (serial and with apply_many's 8 workers)
loopback                  connection rate and throughput between two UIDs, without and with rules,
                          in interleaved rounds: medians, and the spread of the per-round ratios,
                          next to a control (without rules twice: the machine's own noise)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from netisolate.backends import Backend, apply_many, run_tool, select_backend
from netisolate.localpod import LocalPod, as_uid
from netisolate.model import Pod, parse_pod
from netisolate.netns import NetNS
from netisolate.policy import pod_policy
from netisolate.rules import RuleSet, Settings, build_ruleset, iptables, nft

UIDS = {"app": 1000, "proxy": 1001, "worker": 1002}


def bench_pod(extra_port: int = 0, identity: str = "uid") -> Pod:
    """Each container is granted 4 ports, which the next one declares it serves (so the loopback
    connections, app → proxy on 8000, pass the SYN-ACK ownership rules too)."""
    annotations = {"netisolate.io/isolation": "enforce", "netisolate.io/identity": identity}
    names = list(UIDS)
    served: dict[str, list[dict[str, int]]] = {}
    for i, name in enumerate(names):
        ports = [8000 + 100 * i + extra_port + p for p in range(4)]
        annotations[f"allow.netisolate.io/{name}"] = ", ".join(map(str, ports))
        served[names[(i + 1) % len(names)]] = [{"containerPort": port} for port in ports]
    containers = [
        {"name": n, "securityContext": {"runAsUser": u}, "ports": served[n]} for n, u in UIDS.items()
    ]
    return parse_pod(
        {"metadata": {"name": "bench", "annotations": annotations}, "spec": {"containers": containers}}
    )


def ruleset(extra_port: int = 0) -> RuleSet:
    rs = build_ruleset(pod_policy(bench_pod(extra_port), {}), Settings())
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


def raw_loader(backend: Backend, rs: RuleSet, new: bool) -> Callable[[NetNS], object]:
    """The same document our backend loads, by the raw tool from the same kind of thread (for an
    update, our jumps are in place already: the backend reads OUTPUT to know that, the raw tool not)."""
    if backend.name == "nftables":
        doc = nft.create(rs) if new else nft.replace(rs)
        return lambda ns: run_tool(ns, ["nft", "-f", "-"], doc)
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
    with namespaces(rounds) as ours, namespaces(rounds) as raw:
        new = [timed(lambda ns=ns: backend.apply(ns, rs)) for ns in ours]  # type: ignore[misc]
        raw_new = [timed(lambda ns=ns: raw_loader(backend, rs, True)(ns)) for ns in raw]  # type: ignore[misc]
        update = [timed(lambda ns=ns: backend.apply(ns, changed)) for ns in ours]  # type: ignore[misc]
        raw_update = [timed(lambda ns=ns: raw_loader(backend, changed, False)(ns)) for ns in raw]  # type: ignore[misc]
    for scenario, samples, baseline in (("apply-new", new, raw_new), ("apply-update", update, raw_update)):
        ours_ms, raw_ms = ms(samples), ms(baseline)
        yield {
            "scenario": scenario,
            "backend": backend.name,
            "policy": "3 containers x 4 ports, IPv4+IPv6",
            "namespaces": rounds,
            **ours_ms,
            "raw_median_ms": raw_ms["median_ms"],
            "ratio_to_raw": round(ours_ms["median_ms"] / raw_ms["median_ms"], 2),
        }


def bench_many(backend: Backend, count: int) -> dict[str, object]:
    rs, changed = ruleset(), ruleset(extra_port=50)
    with namespaces(count) as opened:
        apply_many(backend, [(ns, rs) for ns in opened])
        serial = timed(lambda: apply_many(backend, [(ns, changed) for ns in opened], workers=1))
        parallel = timed(lambda: apply_many(backend, [(ns, rs) for ns in opened], workers=8))
    return {
        "scenario": "apply-100",
        "backend": backend.name,
        "namespaces": count,
        "update_serial_s": round(serial, 3),
        "update_8_workers_s": round(parallel, 3),
    }


SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1024); print("ready", flush=True)
while True:
    c, _ = s.accept()
    while c.recv(1 << 20):
        pass
    c.close()
"""
CLIENT = """
import json, socket, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
n, deadline = 0, time.monotonic() + seconds
while time.monotonic() < deadline:
    s = socket.create_connection(("127.0.0.1", port)); s.close(); n += 1
payload, sent = b"x" * (1 << 20), 0
s = socket.create_connection(("127.0.0.1", port))
started = time.monotonic()
while time.monotonic() - started < seconds:
    s.sendall(payload); sent += len(payload)
s.close()
print(json.dumps({"conn_per_s": n / seconds, "mib_per_s": sent / (1 << 20) / (time.monotonic() - started)}))
"""


def measure(pod: LocalPod, seconds: float, container: str | None = None) -> dict[str, float]:
    """The app's client, in the app container's cgroup when the pod has them."""
    argv = as_uid(UIDS["app"], ["/usr/bin/python3", "-c", CLIENT, "8000", str(seconds)])
    client = pod.spawn(argv, container=container)
    out, err = client.communicate(timeout=seconds * 3 + 10)
    pod.processes.remove(client)
    if client.returncode != 0:
        raise RuntimeError(err)
    result: dict[str, float] = json.loads(out)
    return result


def _without_rules(ns: NetNS) -> None:
    run_tool(ns, ["nft", "delete", "table", "inet", nft.TABLE])
    for family in ("iptables-legacy", "ip6tables-legacy"):
        run_tool(ns, [family, "-F", "OUTPUT"])


def _ratios(ours: list[dict[str, float]], base: list[dict[str, float]], key: str) -> dict[str, object]:
    """The ratio of the medians, and min/median/max of the rounds' own ratios."""
    paired = sorted(o[key] / b[key] for o, b in zip(ours, base, strict=True))
    return {
        "ratio": round(statistics.median(o[key] for o in ours) / statistics.median(b[key] for b in base), 3),
        "per_round_min_median_max": [
            round(paired[0], 3),
            round(statistics.median(paired), 3),
            round(paired[-1], 3),
        ],
    }


def bench_loopback(backend: Backend, rounds: int, seconds: float) -> dict[str, object]:
    """app (UID 1000, granted 8000) → proxy (UID 1001, which declares 8000) on 127.0.0.1:8000;
    TCP-only grants, so no conntrack. Each round measures without rules, with rules, and without
    rules again (a control: what the machine's own noise makes of two identical runs), in an order
    that rotates from round to round, so drift of a shared machine hits all three alike."""
    arms: dict[str, list[dict[str, float]]] = {"without": [], "with": [], "control": []}
    with LocalPod(bench_pod()) as pod:
        ns = pod.ns
        assert ns is not None
        server = pod.spawn(as_uid(UIDS["proxy"], ["/usr/bin/python3", "-c", SERVER, "8000"]))
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        names = list(arms)
        for i in range(rounds):
            for arm in names[i % 3 :] + names[: i % 3]:
                if arm == "with":
                    backend.apply(ns, ruleset())
                else:
                    _without_rules(ns)
                arms[arm].append(measure(pod, seconds))
    result: dict[str, object] = {
        "scenario": "loopback",
        "backend": backend.name,
        "rounds": rounds,
        "seconds_each": seconds,
    }
    for key, name in (("conn_per_s", "conn_rate"), ("mib_per_s", "throughput")):
        result |= {
            f"{key}_without": round(statistics.median(r[key] for r in arms["without"])),
            f"{key}_with": round(statistics.median(r[key] for r in arms["with"])),
            f"{name}": _ratios(arms["with"], arms["without"], key),
            f"{name}_control": _ratios(arms["control"], arms["without"], key),
        }
    return result


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
    args = parser.parse_args()
    rounds, many, loop_rounds, seconds = (5, 10, 2, 0.3) if args.quick else (40, 100, 6, 2.0)
    for name in ("nftables", "iptables"):
        backend = select_backend(name)
        if not args.loopback_only:
            for result in bench_apply(backend, rounds):
                print(json.dumps(result), flush=True)
            print(json.dumps(bench_many(backend, many)), flush=True)
        loopback = bench_loopback(
            backend, args.loopback_rounds or loop_rounds, args.loopback_seconds or seconds
        )
        print(json.dumps(loopback), flush=True)


if __name__ == "__main__":
    main()
