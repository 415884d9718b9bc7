"""`netisolate audit`: cluster-wide risks, from the current kubeconfig."""

from __future__ import annotations

import argparse
import json
import sys

from netisolate.audit import DEFAULT_NETISOLATE_NAMESPACE, AuditFinding, audit
from netisolate.commands.common import add_command
from netisolate.config import load_config
from netisolate.kube import Lister, api_client
from netisolate.kubeclient import KubeError
from netisolate.model import InputError

DETAILS = f"""\
Lists mutating and validating webhook configurations, namespaces and pods (read-only: list on
those four), and reports:
  webhooks   webhook-cluster-wide, webhook-reaches-kube-system (deny), webhook-reaches-netisolate
             (deny), webhook-no-cabundle, webhook-failure-ignore
  pods       every pod netisolate's installed webhook reviews (its namespaceSelector; without it,
             all but kube-system's and netisolate's own): pod-violates-admission (deny: admission
             would refuse it today), pod-enforce-would-deny (an `audit`-level pod enforce would
             refuse), pod-admission-warn, pod-opt-out (only where an installed injector would act
             on it; exempt control-plane pods with the config's optOutExemptPods)
  namespaces namespace-label-invalid (deny), namespace-label-unexpected (deny; the config's
             expectedNamespaceLabels, Linkerd's linkerd.io/inject read as the annotation it is),
             namespace-missing
  anything   object-unreadable (deny): an object the audit cannot read is reported, not skipped
A finding that hangs on a webhook's matchConditions the audit cannot decide says so ("uncertain").
Exit status: 0 nothing at deny, 1 something at deny (gate a pipeline on it), 2 the audit could not
run (cluster unreachable, list refused, bad config); with -o json exit 2 prints {{"error": "..."}}.

  netisolate audit --kubeconfig ~/.kube/config -o json
  netisolate audit --config netisolate-config.yaml --netisolate-namespace {DEFAULT_NETISOLATE_NAMESPACE}
"""

PATHS = (
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
    "/api/v1/namespaces",
    "/api/v1/pods",
    "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations",  # which pods ours reviews
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(sub, "audit", "report cluster-wide isolation and injection risks", DETAILS)
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    parser.add_argument(
        "--kubeconfig", metavar="FILE", help="default: in-cluster, $KUBECONFIG, ~/.kube/config"
    )
    parser.add_argument("--config", metavar="FILE", help="admission config (default: built-in defaults)")
    parser.add_argument(
        "--netisolate-namespace",
        default=DEFAULT_NETISOLATE_NAMESPACE,
        metavar="NS",
        help=f"where netisolate's agent and webhook run (default {DEFAULT_NETISOLATE_NAMESPACE}): "
        "no injector may reach it, and its pods are not judged",
    )
    parser.set_defaults(run=run)


def fetch(api: Lister) -> tuple[list[object], ...]:
    """The raw API JSON (camelCase, as admission sees it) of mutating webhook configurations,
    namespaces, pods and validating webhook configurations."""
    return tuple(list[object](api.list(path).items) for path in PATHS)


def _text(findings: list[AuditFinding]) -> str:
    if not findings:
        return "no findings"
    ordered = sorted(findings, key=lambda f: (f.severity != "deny", f.rule, f.object))
    return "\n".join(f"{f.severity:<4}  {f.rule:<28} {f.object}: {f.message}" for f in ordered)


def _failed(args: argparse.Namespace, message: str) -> int:
    print(f"netisolate audit: {message}", file=sys.stderr)
    if args.output == "json":
        print(json.dumps({"error": message}))
    return 2


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        webhooks, namespaces, pods, validating = fetch(api_client(args.kubeconfig, "netisolate-audit"))
        findings = audit(
            webhooks,
            namespaces,
            pods,
            config,
            netisolate_namespace=args.netisolate_namespace,
            validating=validating,
        )
    except KubeError as err:
        return _failed(args, f"cannot read the cluster: {err}")
    except InputError as err:
        return _failed(args, str(err))
    except Exception as err:  # a traceback's exit 1 would read as "deny": this is "could not judge"
        return _failed(args, f"internal error, please report it: {type(err).__name__}: {err}")
    denied = any(f.severity == "deny" for f in findings)
    if args.output == "json":
        print(json.dumps({"denied": denied, "findings": [f.as_dict() for f in findings]}, indent=2))
    else:
        print(_text(findings))
    return 1 if denied else 0
