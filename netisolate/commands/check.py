"""`netisolate check`: every admission rule, offline, on the objects of files and directories."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from netisolate.commands.common import add_command, add_namespace_labels

if TYPE_CHECKING:
    from netisolate.admission import Finding
    from netisolate.offline import Report

DETAILS = """\
Runs the checks the validating webhook runs on every workload in the files: a Pod, the pod template
of a Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job, CronJob,
PodTemplate or OpenShift DeploymentConfig (or of any kind with a pod spec at spec.template), a
Namespace, an AdmissionReview; `List` and `*List` objects are read item by item. Whole install files
are fine: what carries no pod (Service, ConfigMap, CRD, ...) is skipped and named. A directory is
read recursively (*.yaml, *.yml, *.json). Offline there is no requester, so nobody is exempt.

Exit status: 0 allowed (warnings may be present, or nothing to check), 1 denied, 2 some input could
not be read (the rest is still judged and reported; with -o json the reasons are in "errors").

  netisolate check -f examples/rogue-injected.yaml
  helm template my-release ./chart | netisolate check -f -
  netisolate check -f manifests/ -o json
  kubectl get deploy api -o yaml | netisolate check -f - --namespace-labels netisolate.io/isolation=enforce
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(sub, "check", "run the admission checks on manifests, offline", DETAILS)
    parser.add_argument(
        "-f",
        "--filename",
        required=True,
        action="append",
        metavar="PATH",
        help="manifest file, directory (read recursively), or - for stdin; may be repeated",
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
    verdict = "DENIED" if any(f.severity == "deny" for f in findings) else "allowed"
    lines = [f"{name}: {verdict}" + ("" if findings else " (no findings)")]
    for f in sorted(findings, key=lambda f: (f.severity != "deny", f.rule, f.container or "")):
        where = f"container {f.container}" if f.container else "pod"
        lines.append(f"  {f.severity:<4}  {f.rule:<26} {where}: {f.message}")
    return "\n".join(lines)


def _print_text(report: Report) -> None:
    lines = [_text(name, findings) for name, findings in report.results]
    lines += [f"{s.name}: skipped ({s.reason})" for s in report.skipped]
    if not report.results and not report.errors:
        lines.append(f"nothing to check: no workload in the input ({len(report.skipped)} objects skipped)")
    if lines:
        print("\n".join(lines))
    for error in report.errors:
        print(f"netisolate check: {error}", file=sys.stderr)


def _print_json(report: Report) -> None:
    many = len(report.results) > 1
    document = {
        "allowed": report.allowed,
        "findings": [
            {**f.as_dict(), "object": name} if many else f.as_dict()
            for name, findings in report.results
            for f in findings
        ],
        "skipped": [{"object": s.name, "reason": s.reason} for s in report.skipped],
        "errors": [{"message": message} for message in report.errors],
    }
    print(json.dumps(document, indent=2))


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: `netisolate check --help` then starts without pydantic.
    from netisolate.config import load_config
    from netisolate.model import InputError
    from netisolate.offline import Report, judge

    report = Report()
    try:
        judge(args.filename, load_config(args.config), args.namespace_labels, report)
    except InputError as err:
        report.error(str(err))
    except Exception as err:  # last resort: a bug of ours is exit 2 with a reason, never a traceback
        report.error(f"internal error: {type(err).__name__}: {err} (please report it)")
    (_print_json if args.output == "json" else _print_text)(report)
    return report.exit_code
