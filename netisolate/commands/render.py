"""`netisolate render`: the exact ruleset the agent would install for a pod."""

from __future__ import annotations

import argparse
import sys

from netisolate.commands.common import add_command, add_namespace_labels, add_rule_settings, rule_settings
from netisolate.inputs import load_pods, read_text
from netisolate.policy import format_grants, pod_policy, preset_grants
from netisolate.presets import PRESET_KEY, PRESETS
from netisolate.rules import DEFAULT_CGROUP_LEVEL, PodCgroups, build_ruleset, iptables, nft, without_cgroups

DETAILS = """\
Prints, per pod, the nftables script (`nft -f`) or the iptables-restore documents (IPv4 and IPv6,
for `iptables-restore --noflush`) that `netisolate enforce` and the agent load. Pods whose
isolation is off get no rules. What a `netisolate.io/preset` annotation grants each container is
printed first; `--list-presets` prints every preset.

Identity (annotation netisolate.io/identity, else --identity):
  uid         containers are known by their UID: one UID each, never root
  cgroup      known by their cgroup v2 (`socket cgroupv2 level N`): UIDs may be shared, root is
              allowed; declared ports are also received only by their owners' cgroups (input hook)
  uid+cgroup  both must match
With cgroup identity each container has a set of its own (`c-<container>`) and the pod one
(`pod`): the agent puts each cgroup's ID in as the container starts, so they are empty here, and
it adds the runtime exception (`meta skuid 0 accept`, unless --deny-port-forward) once it knows the
pod's cgroup. The level shown is the kubelet's layout (--cgroup-level; the agent uses what it sees).
Under --backend iptables a cgroup pod gets what the agent loads there: no grants (fail closed).

  netisolate render -f examples/app-with-proxy.yaml
  netisolate render -f examples/app-with-proxy.yaml --backend iptables
  netisolate render --list-presets
  netisolate render -f examples/app-with-proxy.yaml --identity cgroup
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(sub, "render", "print the ruleset the agent would install", DETAILS)
    parser.add_argument("-f", "--filename", metavar="FILE", help="manifest file, or - for stdin (required)")
    parser.add_argument(
        "--list-presets",
        action="store_true",
        help=f"print the presets {PRESET_KEY} can name, and their grants",
    )
    parser.add_argument("--backend", choices=("nftables", "iptables"), default="nftables")
    add_namespace_labels(parser)
    add_rule_settings(parser)
    parser.add_argument(
        "--cgroup-level",
        type=int,
        default=DEFAULT_CGROUP_LEVEL,
        metavar="N",
        help="depth of containers' cgroups below the cgroup v2 root, for cgroup identity "
        f"(default {DEFAULT_CGROUP_LEVEL}: kubepods/<qos>/pod<uid>/<container>; 3 for Guaranteed pods)",
    )
    parser.set_defaults(run=run)


def list_presets() -> None:
    for name, preset in PRESETS.items():
        print(f"{PRESET_KEY}: {name}")
        print(f"  every other container -> {preset.sidecar}: {preset.capture}")
        print(f"  {preset.sidecar} -> itself: {preset.own or 'nothing'}; -> the others' declared ports")
        print(f"  why: {preset.why}")


def run(args: argparse.Namespace) -> int:
    if args.list_presets:
        list_presets()
        return 0
    if args.filename is None:
        print("netisolate render: give -f FILE (or - for stdin), or --list-presets", file=sys.stderr)
        return 2
    settings = rule_settings(args)
    for name, pod in load_pods(read_text(args.filename), "stdin" if args.filename == "-" else args.filename):
        policy, pod_settings = pod_policy(pod, args.namespace_labels, settings.identity), settings
        if policy.identity.by_cgroup and args.backend == "iptables":
            reason = "the iptables backend cannot match cgroups"
            policy, pod_settings = without_cgroups(policy, settings, reason)
        print(f"# {name}: isolation {policy.level}, identity {policy.identity}")
        for container, ranges in sorted(preset_grants(pod)[0].items()):
            print(f"# {PRESET_KEY} grants {container}: {format_grants(ranges) or 'nothing'}")
        for problem in policy.problems:
            print(f"# fail closed, no grants: {problem}")
        ruleset = build_ruleset(policy, pod_settings, cgroups=PodCgroups(args.cgroup_level))
        if ruleset is None:
            continue
        if ruleset.cgroups is not None:  # the grant sets fill as the agent names cgroups
            for member in ruleset.cgroups.usable():
                ranges = tuple(p for _, ports in member.grants for p in ports)
                print(f"# grants {member.name}, by its cgroup: {format_grants(ranges) or 'nothing'}")
        if args.backend == "nftables":
            print(nft.replace(ruleset), end="")
        else:
            for family in (4, 6):
                print(f"# {'ip6tables' if family == 6 else 'iptables'}-restore --noflush")
                print(iptables.document(ruleset, family), end="")
    return 0
