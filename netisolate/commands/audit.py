"""`netisolate audit`: cluster-wide risks, from the current kubeconfig."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from netisolate.audit import AuditFinding, audit
from netisolate.commands.common import add_command
from netisolate.config import load_config
from netisolate.kube import AdmissionApi, Listings, api_clients, decoded

DETAILS = """\
Lists mutating webhooks, namespaces and pods, and reports (finding IDs are stable):
  webhook-cluster-wide, webhook-reaches-kube-system (deny), webhook-no-cabundle, webhook-failure-ignore,
  pod-opt-out, pod-violates-admission (deny for enforced pods), namespace-label-invalid (deny),
  namespace-label-unexpected (deny; the config's expectedNamespaceLabels says what to expect).
Exit status: 0 nothing at deny severity, 1 something at deny severity (gate a pipeline on it),
2 the cluster could not be read.

  netisolate audit --kubeconfig ~/.kube/config -o json
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(sub, "audit", "report cluster-wide isolation and injection risks", DETAILS)
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    parser.add_argument("--kubeconfig", metavar="FILE", help="default: in-cluster configuration")
    parser.add_argument("--config", metavar="FILE", help="admission config (default: built-in defaults)")
    parser.set_defaults(run=run)


def _items(response: object) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = decoded(response)["items"]
    return items


def fetch(
    core: Listings, admission: AdmissionApi
) -> tuple[list[dict[str, Any]], dict[str, dict[str, str]], list[dict[str, Any]]]:
    """Raw API JSON (camelCase, as admission sees it) of webhooks, namespace labels and pods."""
    webhooks = _items(admission.list_mutating_webhook_configuration(_preload_content=False))
    namespaces = {
        n["metadata"]["name"]: n["metadata"].get("labels") or {}
        for n in _items(core.list_namespace(_preload_content=False))
    }
    pods = _items(core.list_pod_for_all_namespaces(_preload_content=False))
    return webhooks, namespaces, pods


def _text(findings: list[AuditFinding]) -> str:
    if not findings:
        return "no findings"
    ordered = sorted(findings, key=lambda f: (f.severity != "deny", f.rule, f.object))
    return "\n".join(f"{f.severity:<4}  {f.rule:<28} {f.object}: {f.message}" for f in ordered)


def run(args: argparse.Namespace) -> int:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    core, admission = api_clients(args.kubeconfig)
    try:
        webhooks, namespaces, pods = fetch(core, admission)
    except (ApiException, HTTPError, OSError) as err:
        print(f"netisolate audit: cannot read the cluster: {err}", file=sys.stderr)
        return 2
    findings = audit(webhooks, namespaces, pods, load_config(args.config))
    denied = any(f.severity == "deny" for f in findings)
    if args.output == "json":
        print(json.dumps({"denied": denied, "findings": [f.as_dict() for f in findings]}, indent=2))
    else:
        print(_text(findings))
    return 1 if denied else 0
