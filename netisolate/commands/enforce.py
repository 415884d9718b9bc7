"""`netisolate enforce` and `netisolate verify`: one pod's ruleset in one network namespace."""

from __future__ import annotations

import argparse
import sys

from netisolate.backends import BACKENDS, Backend, EnforceError, select_backend
from netisolate.commands.common import add_command, add_namespace_labels, add_rule_settings, rule_settings
from netisolate.inputs import load_pods, read_text
from netisolate.model import InputError
from netisolate.netns import NetNS, NetNSError
from netisolate.policy import PodPolicy, pod_policy
from netisolate.rules import RuleSet, build_ruleset

ENFORCE_DETAILS = """\
Installs the ruleset `netisolate render` prints into the network namespace at PATH
(/run/netns/NAME, /proc/PID/ns/net), in one transaction per table: atomic, and a second run
changes nothing. Exit 0 ok, 1 failed.

  netisolate enforce -f pod.yaml --netns /run/netns/mypod
"""
VERIFY_DETAILS = """\
Checks that the namespace holds exactly the pod's ruleset: a missing or extra rule, a missing
table or chain, or our jump not first in OUTPUT is drift. Counters are not. Exit 0 intact,
1 missing or drifted (each difference is printed).

  netisolate verify -f pod.yaml --netns /run/netns/mypod
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f", "--filename", required=True, metavar="FILE", help="the pod's manifest, or - for stdin"
    )
    parser.add_argument("--netns", required=True, metavar="PATH", help="the pod's network namespace")
    parser.add_argument(
        "--backend",
        choices=("auto", *BACKENDS),
        default="auto",
        help="auto: iptables where the node has legacy iptables rules, else nftables",
    )
    add_namespace_labels(parser)
    add_rule_settings(parser)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    enforce = add_command(sub, "enforce", "install a pod's ruleset into a network namespace", ENFORCE_DETAILS)
    _common(enforce)
    enforce.set_defaults(run=run_enforce)
    verify = add_command(
        sub, "verify", "check that a network namespace holds exactly a pod's ruleset", VERIFY_DETAILS
    )
    _common(verify)
    verify.set_defaults(run=run_verify)


def _prepare(args: argparse.Namespace) -> tuple[str, PodPolicy, Backend]:
    pods = load_pods(read_text(args.filename), "stdin" if args.filename == "-" else args.filename)
    if len(pods) != 1:
        raise EnforceError(f"{args.filename} holds {len(pods)} pods: give exactly one")
    name, pod = pods[0]
    policy = pod_policy(pod, args.namespace_labels)
    for problem in policy.problems:
        print(f"{name}: fail closed, no grants: {problem}", file=sys.stderr)
    return name, policy, select_backend(args.backend)


def _ruleset(policy: PodPolicy, ns: NetNS, args: argparse.Namespace) -> RuleSet:
    ruleset = build_ruleset(policy, rule_settings(args), ns.user_namespaced())
    assert ruleset is not None  # isolated
    return ruleset


def run_enforce(args: argparse.Namespace) -> int:
    try:
        name, policy, backend = _prepare(args)
        if not policy.isolated:
            print(f"{name}: isolation is off, nothing to install")
            return 0
        with NetNS.open(args.netns) as ns:
            ruleset = _ruleset(policy, ns, args)
            backend.apply(ns, ruleset)
    except (EnforceError, NetNSError, InputError) as err:  # DESIGN: exit 1 for any failure
        print(f"netisolate enforce: {err}", file=sys.stderr)
        return 1
    print(f"{name}: enforced ({ruleset.mode}, {backend.name}) in {args.netns}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    try:
        name, policy, backend = _prepare(args)
        if not policy.isolated:
            print(f"{name}: isolation is off, no ruleset expected")
            return 0
        with NetNS.open(args.netns) as ns:
            drift = backend.verify(ns, _ruleset(policy, ns, args))
    except (EnforceError, NetNSError, InputError) as err:  # DESIGN: exit 1 for any failure
        print(f"netisolate verify: {err}", file=sys.stderr)
        return 1
    if drift:
        print(f"{name}: DRIFTED in {args.netns} ({backend.name}):")
        print("\n".join(f"  {line}" for line in drift))
        return 1
    print(f"{name}: intact in {args.netns} ({backend.name})")
    return 0
