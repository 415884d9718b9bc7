"""Cgroup identity next to UID identity (issue 13), nftables, one run, interleaved: prints one JSON
object per scenario.

    sudo .venv/bin/python bench/bench_cgroup.py [--quick]

apply-new / apply-update  the bench pod's rules (3 containers x 4 ports, declared ports owned) by
                          UID and by cgroup, alternating which goes first in each round; the
                          update moves the grants (a running pod's containers keep their ports)
restart                   a container's new cgroup put in: the element update, next to replacing
                          the whole cgroup ruleset and to a UID pod (where a restart changes no rule)
verify                    reading a pod's rules back and comparing (cgroups listed by ID)
loopback                  connection rate and throughput, app -> proxy on 127.0.0.1:8000, without
                          rules, under UID rules and under cgroup rules, in rotating order each round
All with medians and spread; the ratios are cgroup / UID from the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from bench_enforce import UIDS, _without_rules, bench_pod, connections_per_s, connloop, ms, namespaces, timed

from netisolate.agent.cgroups import NodeCgroups
from netisolate.backends import libnft, select_backend
from netisolate.backends.nftables import NftablesBackend
from netisolate.localpod import LocalPod, as_uid
from netisolate.policy import pod_policy
from netisolate.rules import PodCgroups, RuleSet, Settings, build_ruleset, nft


def rulesets(seen: PodCgroups, extra_port: int = 0) -> dict[str, RuleSet]:
    """The bench pod by UID and by cgroup, its grants moved by `extra_port` (its declared ports
    stay: a running pod's policy change)."""
    out = {}
    for identity in ("uid", "cgroup"):
        pod = bench_pod(extra_port, identity, declared_extra=0)
        rs = build_ruleset(pod_policy(pod, {}), Settings(), cgroups=seen)
        assert rs is not None
        out[identity] = rs
    return out


@contextmanager
def cgroup_tree() -> Iterator[Path]:
    """A pod's cgroup with one child per bench container, as LocalPod lays them out."""
    mount = NodeCgroups(lambda pod: None).mount
    assert mount is not None, "cgroup v2 is needed"
    root = Path(mount.point) / f"ni-bench-{uuid.uuid4().hex[:8]}"
    made = [root, *(root / name for name in UIDS), *(root / f"{name}-2" for name in UIDS)]
    for directory in made:
        directory.mkdir()
    try:
        yield root
    finally:
        for directory in reversed(made):
            directory.rmdir()


def seen_in(root: Path, suffix: str = "") -> PodCgroups:
    return PodCgroups(
        2,
        NodeCgroups.cgroup_of(str(root)),
        tuple((name, NodeCgroups.cgroup_of(str(root / f"{name}{suffix}"))) for name in sorted(UIDS)),
    )


def spread(samples: list[float]) -> list[float]:
    ordered = sorted(samples)
    return [round(ordered[0], 3), round(statistics.median(ordered), 3), round(ordered[-1], 3)]


def bench_apply(root: Path, rounds: int) -> Iterator[dict[str, object]]:
    backend = NftablesBackend()
    first, changed = rulesets(seen_in(root)), rulesets(seen_in(root), extra_port=50)
    times: dict[str, dict[str, list[float]]] = {"apply-new": {}, "apply-update": {}}
    with namespaces(2 * rounds) as opened:
        for i in range(rounds):
            order = ("uid", "cgroup") if i % 2 == 0 else ("cgroup", "uid")
            for identity, ns in zip(order, opened[2 * i : 2 * i + 2], strict=True):
                new = timed(lambda: backend.apply(ns, first[identity]))  # noqa: B023
                update = timed(lambda: backend.apply(ns, changed[identity]))  # noqa: B023
                times["apply-new"].setdefault(identity, []).append(new)
                times["apply-update"].setdefault(identity, []).append(update)
    for scenario, by_identity in times.items():
        uid, cgroup = by_identity["uid"], by_identity["cgroup"]
        yield {
            "scenario": scenario,
            "rounds": rounds,
            "uid": ms(uid),
            "cgroup": ms(cgroup),
            "cgroup_to_uid_ratio": round(statistics.median(cgroup) / statistics.median(uid), 2),
            "ratio_per_round_min_median_max": spread([c / u for c, u in zip(cgroup, uid, strict=True)]),
        }


def bench_restart(root: Path, rounds: int) -> dict[str, object]:
    """A restart by cgroup as the agent does it: the app's set and grants moved to its new cgroup
    in one transaction over the namespace's kept socket; next to the fallback without one (two
    `nft -f` documents by path: the new cgroup added, from when the grants hold, then the old one
    cleared) and to a whole new table (what rules keyed on a cgroup without sets would need).
    Under UID identity a restart changes nothing."""
    backend = NftablesBackend()
    before = rulesets(seen_in(root))["cgroup"]
    moved = seen_in(root)
    app_2 = NodeCgroups.cgroup_of(str(root / "app-2"))
    after = rulesets(replace(moved, containers=(("app", app_2), *moved.containers[1:])))["cgroup"]
    kept: list[float] = []
    added: list[float] = []
    deleted: list[float] = []
    whole: list[float] = []
    states, done = (before, after), 0  # each step moves the app's set to the other cgroup
    with namespaces(1) as (ns,):
        backend.apply(ns, before)
        for i in range(rounds):
            kinds = ("kept", "documents", "whole")
            for kind in kinds[i % 3 :] + kinds[: i % 3]:
                installed, target = states[done % 2], states[(done + 1) % 2]
                done += 1
                if kind == "kept":
                    kept.append(timed(lambda: backend.update_cgroups(ns, target, installed)))  # noqa: B023
                else:  # by `nft -f` documents: the fallback's two, or a whole new table
                    loads = {"documents": nft.elements(target, installed), "whole": (nft.replace(target),)}[
                        kind
                    ]
                    into = {"documents": (added, deleted), "whole": (whole,)}[kind]
                    for document, samples in zip(loads, into, strict=True):
                        started = time.perf_counter()
                        status, _, err = ns.run(lambda doc=document: libnft.load(doc))  # type: ignore[misc]
                        samples.append(time.perf_counter() - started)
                        assert status == 0, err
                    backend.apply(ns, target)  # untimed: the backend reads what changed behind it
                drift = backend.verify(ns, target)
                assert drift == [], drift
    total = [a + d for a, d in zip(added, deleted, strict=True)]
    return {
        "scenario": "restart",
        "rounds": rounds,
        "kept_socket_update": ms(kept),
        "documents_added_grants_hold": ms(added),
        "documents_total": ms(total),
        "whole_table": ms(whole),
        "kept_to_whole_ratio": round(statistics.median(kept) / statistics.median(whole), 3),
        "uid_identity": "no rule changes: a restarted container keeps its UID",
    }


def bench_verify(root: Path, rounds: int) -> dict[str, object]:
    backend = NftablesBackend()
    sets = rulesets(seen_in(root))
    times: dict[str, list[float]] = {"uid": [], "cgroup": []}
    with namespaces(2) as opened:
        for identity, ns in zip(("uid", "cgroup"), opened, strict=True):
            backend.apply(ns, sets[identity])
        pairs = list(zip(("uid", "cgroup"), opened, strict=True))
        for i in range(rounds):
            for identity, ns in pairs if i % 2 == 0 else pairs[::-1]:
                times[identity].append(timed(lambda: backend.verify(ns, sets[identity])))  # noqa: B023
    return {
        "scenario": "verify",
        "rounds": rounds,
        "uid": ms(times["uid"]),
        "cgroup": ms(times["cgroup"]),
        "cgroup_to_uid_ratio": round(statistics.median(times["cgroup"]) / statistics.median(times["uid"]), 2),
    }


def bench_loopback(rounds: int, seconds: float) -> dict[str, object]:
    """The bench pod with cgroups (LocalPod): its processes run in their containers' cgroups under
    their distinct UIDs, so the same pod serves both identities."""
    backend = select_backend("nftables")
    modes = ("none", "uid", "cgroup")
    results: dict[str, list[float]] = {mode: [] for mode in modes}
    with connloop() as binary, LocalPod(bench_pod(identity="cgroup")) as pod:
        assert pod.ns is not None
        sets = rulesets(pod.cgroups())
        argv = as_uid(UIDS["proxy"], [binary, "server", "8000"])
        server = pod.spawn(argv, container="proxy")
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        for i in range(rounds):
            for mode in modes[i % 3 :] + modes[: i % 3]:
                if mode == "none":
                    _without_rules(pod.ns)
                else:
                    backend.apply(pod.ns, sets[mode])
                results[mode].append(connections_per_s(pod, binary, seconds, container="app"))
    out: dict[str, object] = {"scenario": "loopback", "rounds": rounds, "seconds_each": seconds}
    medians = {mode: statistics.median(results[mode]) for mode in modes}
    out |= {f"conn_per_s_{mode}": round(value) for mode, value in medians.items()}
    for a, b in (("cgroup", "uid"), ("uid", "none"), ("cgroup", "none")):
        paired = [x / y for x, y in zip(results[a], results[b], strict=True)]
        out[f"conn_rate_{a}_to_{b}"] = round(medians[a] / medians[b], 3)
        out[f"conn_rate_{a}_to_{b}_per_round_min_median_max"] = spread(paired)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few samples: a smoke run, not numbers to quote")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: it creates network namespaces and cgroups")
    rounds, loop_rounds, seconds = (5, 3, 0.3) if args.quick else (40, 6, 2.0)
    with cgroup_tree() as root:
        for result in bench_apply(root, rounds):
            print(json.dumps(result), flush=True)
        print(json.dumps(bench_restart(root, rounds)), flush=True)
        print(json.dumps(bench_verify(root, rounds * 5)), flush=True)
    print(json.dumps(bench_loopback(loop_rounds, seconds)), flush=True)


if __name__ == "__main__":
    main()
