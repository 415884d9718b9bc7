"""What every backend is, and how it runs the kernel's tools inside a pod's namespace.

Both backends take the text `netisolate.rules` renders and load it with the kernel's own tools from
a thread inside the pod's namespace (`NetNS.run`), in one transaction per table, so a reader never
sees half a ruleset and a second apply changes nothing.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from netisolate.netns import NetNS
from netisolate.rules import RuleSet


class EnforceError(RuntimeError):
    """Rules could not be installed or read; the message says which tool failed and why."""


@dataclass(frozen=True)
class Inspection:
    """One read of a namespace's rules: what drifted ([] when intact) and the refused-packet counters."""

    drift: list[str]
    refused: dict[str, int]


class Backend(Protocol):
    name: str

    def apply(self, ns: NetNS, ruleset: RuleSet) -> None:
        """Install atomically and idempotently; raises EnforceError."""

    def verify(self, ns: NetNS, ruleset: RuleSet) -> list[str]:
        """[] when the namespace holds exactly `ruleset`, else what drifted. Counters never count."""

    def installed(self, ns: NetNS) -> bool:
        """Whether the namespace holds any netisolate ruleset."""

    def deny_counters(self, ns: NetNS) -> dict[str, int]:
        """Refused (in audit: would-be refused) packets by container names; "" for unknown UIDs."""

    def inspect(self, ns: NetNS, ruleset: RuleSet) -> Inspection:
        """verify() and deny_counters() from a single read, for the agent's periodic round."""


def run_tool(ns: NetNS | None, argv: Sequence[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run a netfilter tool inside `ns` (or here); raises EnforceError when it is missing."""
    if shutil.which(argv[0]) is None:
        raise EnforceError(f"{argv[0]} is not installed: install the nftables and iptables packages")

    def call() -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False)

    return ns.run(call) if ns is not None else call()


def checked(result: subprocess.CompletedProcess[str], what: str) -> str:
    if result.returncode != 0:
        raise EnforceError(f"{what} failed ({' '.join(result.args)}): {result.stderr.strip()}")
    return result.stdout
