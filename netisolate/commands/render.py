"""`netisolate render`: the exact ruleset the agent would install for a pod."""

from __future__ import annotations

import argparse

from netisolate.commands.common import add_command, add_namespace_labels, add_rule_settings, rule_settings
from netisolate.inputs import load_pods, read_text
from netisolate.policy import pod_policy
from netisolate.rules import build_ruleset, iptables, nft

DETAILS = """\
Prints, per pod, the nftables script (`nft -f`) or the iptables-restore documents (IPv4 and IPv6,
for `iptables-restore --noflush`) that `netisolate enforce` and the agent load. Pods whose
isolation is off get no rules.

  netisolate render -f examples/app-with-proxy.yaml
  netisolate render -f examples/app-with-proxy.yaml --backend iptables
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(sub, "render", "print the ruleset the agent would install", DETAILS)
    parser.add_argument(
        "-f", "--filename", required=True, metavar="FILE", help="manifest file, or - for stdin"
    )
    parser.add_argument("--backend", choices=("nftables", "iptables"), default="nftables")
    add_namespace_labels(parser)
    add_rule_settings(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = rule_settings(args)
    for name, pod in load_pods(read_text(args.filename), "stdin" if args.filename == "-" else args.filename):
        policy = pod_policy(pod, args.namespace_labels)
        print(f"# {name}: isolation {policy.level}")
        for problem in policy.problems:
            print(f"# fail closed, no grants: {problem}")
        ruleset = build_ruleset(policy, settings)
        if ruleset is None:
            continue
        if args.backend == "nftables":
            print(nft.replace(ruleset), end="")
        else:
            for family in (4, 6):
                print(f"# {'ip6tables' if family == 6 else 'iptables'}-restore --noflush")
                print(iptables.document(ruleset, family), end="")
    return 0
