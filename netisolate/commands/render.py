"""`netisolate render`: the exact ruleset the agent would install for a pod."""

from __future__ import annotations

import argparse

from netisolate.commands.common import add_command, add_namespace_labels, add_rule_settings, rule_settings
from netisolate.inputs import load_pods, read_text
from netisolate.policy import pod_policy
from netisolate.rules import DEFAULT_CGROUP_LEVEL, PodCgroups, build_ruleset, iptables, nft, without_cgroups

DETAILS = """\
Prints, per pod, the nftables script (`nft -f`) or the iptables-restore documents (IPv4 and IPv6,
for `iptables-restore --noflush`) that `netisolate enforce` and the agent load. Pods whose
isolation is off get no rules.

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
  netisolate render -f examples/app-with-proxy.yaml --identity cgroup
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(sub, "render", "print the ruleset the agent would install", DETAILS)
    parser.add_argument(
        "-f", "--filename", required=True, metavar="FILE", help="manifest file, or - for stdin"
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


def run(args: argparse.Namespace) -> int:
    settings = rule_settings(args)
    for name, pod in load_pods(read_text(args.filename), "stdin" if args.filename == "-" else args.filename):
        policy, pod_settings = pod_policy(pod, args.namespace_labels, settings.identity), settings
        if policy.identity.by_cgroup and args.backend == "iptables":
            reason = "the iptables backend cannot match cgroups"
            policy, pod_settings = without_cgroups(policy, settings, reason)
        print(f"# {name}: isolation {policy.level}, identity {policy.identity}")
        for problem in policy.problems:
            print(f"# fail closed, no grants: {problem}")
        ruleset = build_ruleset(policy, pod_settings, cgroups=PodCgroups(args.cgroup_level))
        if ruleset is None:
            continue
        if args.backend == "nftables":
            print(nft.replace(ruleset), end="")
        else:
            for family in (4, 6):
                print(f"# {'ip6tables' if family == 6 else 'iptables'}-restore --noflush")
                print(iptables.document(ruleset, family), end="")
    return 0
