"""Connections made from inside real containers (CRI ExecSync: the container's namespaces, UID,
capabilities and seccomp profile), to every loopback and pod address: the same matrix the local
harness (netisolate.localpod.matrix) measures with processes it starts itself."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from netisolate.localpod import LOOPBACK_ADDRESSES
from netisolate.policy import parse_grants
from tests.realnode.kubelet import Kubelet, RunningPod
from tests.realnode.node import NodeError

# One socat per attempt; a second attempt 50 ms later, because the scenarios' listeners
# (`while true; do nc -l ...; done`) are briefly away between two connections. Only a refusal
# is retried, so a rule that refuses is never hidden.
_SCRIPT = """p() {
  for i in 1 2; do
    r=$(echo ping | socat -T1 - "$1" 2>/dev/null) && [ -n "$r" ] && { echo open; return; }
    sleep 0.05
  done
  echo blocked
}
"""
_LISTEN_STATES = {"tcp": "0A", "udp": "07"}  # /proc/net: LISTEN; an unconnected UDP socket


def addresses(pod: RunningPod) -> list[str]:
    return [*LOOPBACK_ADDRESSES, *pod.ips]


def _socat_address(address: str, port: int, protocol: str) -> str:
    family, host = ("6", f"[{address}]") if ":" in address else ("4", address)
    return f"{protocol.upper()}{family}:{host}:{port}"


def probe(
    kubelet: Kubelet, pod: RunningPod, client: str, targets: Sequence[tuple[str, int, str]]
) -> list[str]:
    """`open` or `blocked` for each (address, port, protocol), connecting from inside `client`."""
    script = _SCRIPT + "".join(f"p {_socat_address(*t)}\n" for t in targets)
    result = kubelet.exec(pod, client, ["sh", "-c", script], timeout=10 + 3 * len(targets))
    lines = result.stdout.split()
    if result.exit_code != 0 or len(lines) != len(targets):
        raise NodeError(
            f"probe from {pod.name}/{client} failed ({result.exit_code}): {result.stderr.strip()}"
        )
    return lines


def _ports(listeners: Mapping[str, Sequence[str]]) -> list[tuple[str, int, str]]:
    return [
        (owner, r.low, r.protocol)
        for owner, specs in listeners.items()
        for s in specs
        for r in parse_grants(s)
    ]


def wait_listening(pod: RunningPod, listeners: Mapping[str, Sequence[str]], timeout: float = 15.0) -> None:
    """Until every port the containers are meant to serve is bound, read from the pod's /proc/net."""
    deadline = time.monotonic() + timeout
    while True:
        bound = set()
        for protocol, state in _LISTEN_STATES.items():
            for suffix in ("", "6"):
                try:
                    text = Path(f"/proc/{pod.pid}/net/{protocol}{suffix}").read_text()
                except OSError:
                    continue
                for line in text.splitlines()[1:]:
                    fields = line.split()
                    if fields[3] == state:
                        bound.add((int(fields[1].rsplit(":", 1)[1], 16), protocol))
        missing = [
            (port, protocol) for _, port, protocol in _ports(listeners) if (port, protocol) not in bound
        ]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise NodeError(f"pod {pod.name}: nothing listens on {missing} after {timeout} s")
        time.sleep(0.05)


def matrix(
    kubelet: Kubelet, pod: RunningPod, listeners: Mapping[str, Sequence[str]], clients: Sequence[str]
) -> dict[tuple[str, str], list[str]]:
    """{(client, "container:port[/udp]"): [result per address]} for every listener port."""
    out = {}
    targets = _ports(listeners)
    where = addresses(pod)
    for client in clients:
        results = probe(kubelet, pod, client, [(a, port, proto) for _, port, proto in targets for a in where])
        for i, (owner, port, proto) in enumerate(targets):
            cell = f"{owner}:{port}" + ("/udp" if proto == "udp" else "")
            out[(client, cell)] = results[i * len(where) : (i + 1) * len(where)]
    return out
