"""Options shared by the commands that turn a pod file into rules."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the rules (and pydantic under them) load only for the commands that build rules
    from netisolate.rules import Settings

ANNOTATION_HELP = """\
Annotations (on the pod; the isolation level may also be a namespace label):
  netisolate.io/isolation: enforce|audit|off   stricter of pod annotation and namespace label wins
  netisolate.io/identity: uid|cgroup|uid+cgroup  what containers are known by (default: the
                                               agent's --identity, uid unless set)
  allow.netisolate.io/<container>: "PORTS"     loopback ports <container> may open connections to:
                                               comma list of PORT or LOW-HIGH, each optionally
                                               /tcp or /udp (default tcp); empty = nothing
  netisolate.io/preset: istio|linkerd|dapr     the grants a mesh or sidecar runtime needs
                                               (`netisolate render --list-presets`)

Example: the app may reach its proxy on 15001, the proxy may reach the app on 8080 and a
DNS cache on 53/udp, anything else in the pod may reach nothing over loopback:

  metadata:
    annotations:
      netisolate.io/isolation: enforce
      allow.netisolate.io/app: "15001"
      allow.netisolate.io/proxy: "8080, 53/udp"

Under uid identity each container needs its own non-root runAsUser: the rules are keyed on it.
Under cgroup identity they are keyed on each container's cgroup: UIDs may be shared, root allowed.
"""


def add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str, details: str = ""
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=summary,
        description=f"{summary}\n\n{details}".rstrip(),
        epilog=ANNOTATION_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def parse_labels(text: str) -> dict[str, str]:
    """`k=v,k2=v2` → mapping; an item without `=` is an error, not an empty label."""
    labels = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE")
        labels[key] = value
    return labels


def add_namespace_labels(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--namespace-labels",
        type=parse_labels,
        default={},
        metavar="K=V,...",
        help="labels of the pod's namespace (e.g. netisolate.io/isolation=enforce), which set the "
        "isolation floor",
    )


def port(text: str) -> int:
    """An argparse type: a TCP/UDP port, 1-65535. The one check every port flag goes through."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give a number from 1 to 65535")
    return value


def seconds(text: str) -> float:
    """An argparse type: a duration in seconds, above 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return value


def add_rule_settings(parser: argparse.ArgumentParser) -> None:
    """The settings a ruleset is built with, named as the agent names them (`rule_settings`)."""
    from netisolate.policy import IdentityMode
    from netisolate.rules import DEFAULT_SENTINEL_PORT

    parser.add_argument(
        "--sentinel-port",
        type=port,
        default=DEFAULT_SENTINEL_PORT,
        metavar="PORT",
        help="the loopback port every pod's rules answer with ICMP admin-prohibited, which is how "
        f"`netisolate gate` (its --port) knows they are live (default {DEFAULT_SENTINEL_PORT})",
    )
    parser.add_argument(
        "--deny-port-forward",
        action="store_true",
        help="also deny UID 0 (the runtime: kubectl port-forward), which is allowed by default",
    )
    parser.add_argument(
        "--identity",
        type=IdentityMode,
        choices=list(IdentityMode),
        default=IdentityMode.UID,
        help="what containers are known by, for pods without a netisolate.io/identity annotation: "
        "uid (each container needs a UID of its own, not root), cgroup (its cgroup v2: containers "
        "may share a UID or run as root; nftables only) or uid+cgroup (both must match) "
        "(default uid)",
    )


def rule_settings(args: argparse.Namespace) -> Settings:
    from netisolate.rules import Settings

    return Settings(
        sentinel_port=args.sentinel_port, allow_root=not args.deny_port_forward, identity=args.identity
    )
