"""`netisolate check`: every admission rule, offline, on the objects of a file."""

from __future__ import annotations

import argparse
import json

from netisolate.admission import Finding, allowed, review_request
from netisolate.commands.common import add_command, add_namespace_labels
from netisolate.config import load_config
from netisolate.inputs import load_subjects, read_text

DETAILS = """\
Runs the checks the validating webhook runs, on a Pod, a workload's pod template (Deployment,
StatefulSet, DaemonSet, ReplicaSet, Job, CronJob), a Namespace, an AdmissionReview, or each
document of a multi-document YAML. Offline there is no requester, so nobody is exempt.

Exit status: 0 allowed (warnings may be present), 1 denied, 2 unreadable input.

  netisolate check -f examples/rogue-injected.yaml
  kubectl get deploy api -o yaml | netisolate check -f - --namespace-labels netisolate.io/isolation=enforce
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(sub, "check", "run the admission checks on manifests, offline", DETAILS)
    parser.add_argument(
        "-f", "--filename", required=True, metavar="FILE", help="manifest file, or - for stdin"
    )
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="admission config (the netisolate-config ConfigMap's "
        "config.yaml); default: the built-in defaults",
    )
    add_namespace_labels(parser)
    parser.set_defaults(run=run)


def _text(name: str, findings: list[Finding]) -> str:
    verdict = "allowed" if allowed(findings) else "DENIED"
    lines = [f"{name}: {verdict}" + ("" if findings else " (no findings)")]
    for f in sorted(findings, key=lambda f: (f.severity != "deny", f.rule, f.container or "")):
        where = f"container {f.container}" if f.container else "pod"
        lines.append(f"  {f.severity:<4}  {f.rule:<26} {where}: {f.message}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    subjects = load_subjects(read_text(args.filename), "stdin" if args.filename == "-" else args.filename)
    results = [(s.name, review_request(s.request, args.namespace_labels, config)) for s in subjects]
    ok = all(allowed(findings) for _, findings in results)
    if args.output == "json":
        many = len(results) > 1
        print(
            json.dumps(
                {
                    "allowed": ok,
                    "findings": [
                        {**f.as_dict(), "object": name} if many else f.as_dict()
                        for name, findings in results
                        for f in findings
                    ],
                },
                indent=2,
            )
        )
    else:
        print("\n".join(_text(name, findings) for name, findings in results))
    return 0 if ok else 1
