"""What every backend is, and how it runs the kernel's tools inside a pod's namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from netisolate.netns import NetNS
from netisolate.rules import RuleSet


class EnforceError(RuntimeError):
    """Rules could not be installed or read; the message says which tool failed and why."""


@dataclass(frozen=True)
class Inspection:
    """One read of a namespace's rules: what drifted ([] when intact), the refused-packet counters,
    and what the kernel recorded as not granted: (identity, protocol, port, packets)."""

    drift: list[str]
    refused: dict[str, int]
    observed: list[tuple[str, str, int, int]] = field(default_factory=list)


class Backend(Protocol):
    name: str
    cgroups: bool  # whether it can enforce cgroup identity
    wants_pod_cgroup: bool  # whether UID identity pods' rulesets need their pod's cgroup too (the guard's)

    def apply(self, ns: NetNS, ruleset: RuleSet) -> None:
        """Install atomically and idempotently; raises EnforceError."""

    def update_cgroups(self, ns: NetNS, ruleset: RuleSet, installed: RuleSet) -> None:
        """Turn the table in ns, which holds `installed`, into `ruleset`, which differs from it in
        its cgroups only (cgroup identity); raises EnforceError."""

    def verify(self, ns: NetNS, ruleset: RuleSet) -> list[str]:
        """[] when the namespace holds exactly `ruleset`, else what drifted. Counters never count."""

    def installed(self, ns: NetNS) -> bool:
        """Whether the namespace holds any netisolate ruleset."""

    def deny_counters(self, ns: NetNS) -> dict[str, int]:
        """Refused (in audit: would-be refused) packets by container names; "" for unknown UIDs."""

    def inspect(self, ns: NetNS, ruleset: RuleSet) -> Inspection:
        """verify() and deny_counters() from a single read, for the agent's periodic round."""


def tool_command(argv: Sequence[str], user_ns: int | None = None) -> tuple[list[str], tuple[int, ...]]:
    """The command line that runs a netfilter tool (inside the user namespace `user_ns`, an fd,
    as its root, when given) and the fds it must inherit; raises EnforceError when a tool is
    missing."""
    if shutil.which(argv[0]) is None:
        raise EnforceError(f"{argv[0]} is not installed: install the nftables and iptables packages")
    if user_ns is None:
        return list(argv), ()
    if shutil.which("nsenter") is None:
        raise EnforceError("nsenter is not installed: install util-linux")
    return ["nsenter", f"--user=/proc/self/fd/{user_ns}", "--", *argv], (user_ns,)


def run_tool(
    ns: NetNS | None,
    argv: Sequence[str],
    stdin: str = "",
    *,
    user_ns: int | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a netfilter tool inside `ns` (or here), and inside the user namespace `user_ns` (an fd)
    when given, as its root; raises EnforceError when a tool is missing."""
    command, fds = tool_command(argv, user_ns)
    environment = {**os.environ, **env} if env else None

    def call() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, input=stdin, capture_output=True, text=True, check=False, pass_fds=fds, env=environment
        )

    return ns.run(call) if ns is not None else call()


def checked(result: subprocess.CompletedProcess[str], what: str) -> str:
    if result.returncode != 0:
        raise EnforceError(f"{what} failed ({' '.join(result.args)}): {result.stderr.strip()}")
    return result.stdout
