"""Where the node's CNI lives and how the plugin is served: the agent's `--cni-*` flags, kept
apart from the machinery so that the command line loads without it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_EXEMPT = ("kube-system", "netisolate-system")


@dataclass(frozen=True)
class CniOptions:
    conf_dir: Path
    bin_dir: Path
    plugin: Path
    socket: Path
    exempt_namespaces: tuple[str, ...] = DEFAULT_EXEMPT
    timeout_seconds: int = 30
