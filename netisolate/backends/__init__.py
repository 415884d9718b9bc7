"""Netfilter backends: install, verify and read the counters of a pod's ruleset in its namespace.

Both backends load the documents `netisolate.rules.nft` and `netisolate.rules.iptables` render,
with the kernel's own tools, from a thread inside the pod's namespace (`NetNS.run`), in one
transaction per table, so a reader never sees half a ruleset and a second apply changes nothing.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from netisolate.backends.base import Backend, EnforceError, Inspection, checked, run_tool
from netisolate.backends.guarded import GuardedBackend
from netisolate.backends.iptables import IptablesBackend
from netisolate.backends.nftables import NftablesBackend
from netisolate.netns import NetNS
from netisolate.rules import RuleSet

__all__ = [
    "BACKENDS",
    "Backend",
    "EnforceError",
    "Inspection",
    "apply_many",
    "checked",
    "guarded",
    "run_tool",
    "select_backend",
]
log = logging.getLogger(__name__)
BACKENDS = ("nftables", "iptables")


def _host_has_legacy_rules(host: NetNS | None) -> bool:
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        if shutil.which(tool) is None:
            continue
        result = run_tool(host, [tool])
        if result.returncode != 0:  # unreadable is not "none": guessing wrong mixes backends
            raise EnforceError(
                f"cannot tell the node's backend, {tool} failed: {result.stderr.strip()} "
                "(the agent needs NET_RAW to read legacy tables), or pass --backend explicitly"
            )
        if any(line.startswith("-A ") for line in result.stdout.splitlines()):
            return True
    return False


def select_backend(name: str = "auto", host: NetNS | None = None) -> Backend:
    """`auto` follows the node, as service meshes do: legacy iptables rules in the host's namespace
    mean the node runs legacy iptables (kube-proxy, CNI), so we use it too; otherwise nftables.
    Mixing backends on one node is a known source of mesh bugs, so the choice is made once."""
    if name == "auto":
        name = "iptables" if _host_has_legacy_rules(host) else "nftables"
        log.info(
            "backend chosen",
            extra={
                "backend": name,
                "reason": "legacy iptables rules on the host"
                if name == "iptables"
                else "no legacy iptables rules on the host",
            },
        )
    if name == "nftables":
        return NftablesBackend()
    if name == "iptables":
        return IptablesBackend()
    raise EnforceError(f"unknown backend {name!r}: use auto, nftables or iptables")


def guarded(backend: Backend) -> Backend:
    """The socket guard over nftables (`--socket-guard`); EnforceError over any other backend."""
    if not isinstance(backend, NftablesBackend):
        raise EnforceError(
            f"--socket-guard needs the nftables backend, and this node's is {backend.name}: "
            "pass --backend nftables, or leave --socket-guard out"
        )
    return GuardedBackend(backend)


def apply_many(
    backend: Backend, items: Sequence[tuple[NetNS, RuleSet]], workers: int = 8
) -> list[Exception | None]:
    """Apply to many namespaces at once: most of an nft transaction that replaces rules is kernel
    waiting (RCU grace periods), not CPU, so parallel work hides it. Returns one error or None each."""

    def one(item: tuple[NetNS, RuleSet]) -> Exception | None:
        try:
            backend.apply(*item)
        except Exception as err:  # reported per namespace, one failure must not stop the others
            return err
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, items))
