"""`netisolate check`: every admission rule, offline, on the objects of files and directories."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from netisolate.admission import Finding, allowed, review_request
from netisolate.commands.common import add_command, add_namespace_labels
from netisolate.config import Config, load_config
from netisolate.inputs import Skipped, load_objects, manifest_files, read_text
from netisolate.model import InputError

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


@dataclass
class Report:
    results: list[tuple[str, list[Finding]]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def allowed(self) -> bool:
        return not self.errors and all(allowed(findings) for _, findings in self.results)

    @property
    def exit_code(self) -> int:
        return 2 if self.errors else 0 if self.allowed else 1


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _sources(paths: list[str]) -> Iterator[tuple[str, str, bool]]:
    """(path, name for messages, found by walking a directory) for every file to read."""
    for path in paths:
        files = manifest_files(path)
        for file in files:
            yield file, "stdin" if file == "-" else file, file != path


def _judge(paths: list[str], config: Config, labels: Mapping[str, str], report: Report) -> None:
    sources = list(_sources(paths))
    for path, name, walked in sources:
        try:
            objects = load_objects(read_text(path), name)
        except InputError as err:
            report.errors.append(_one_line(str(err)))
            continue
        if not objects.documents:
            # An empty file met in a directory is a placeholder; an empty file or stdin named on the
            # command line is a broken pipeline (`helm template` failed): that is not "allowed".
            if walked:
                report.skipped.append(Skipped(name, "no document in it"))
            else:
                report.errors.append(f"{name}: no Kubernetes object in it")
        prefix = f"{name}: " if len(sources) > 1 else ""
        report.errors += [_one_line(e) for e in objects.errors]
        report.skipped += [Skipped(prefix + s.name, s.reason) for s in objects.skipped]
        for subject in objects.subjects:
            try:
                report.results.append(
                    (prefix + subject.name, review_request(subject.request, labels, config))
                )
            except InputError as err:
                report.errors.append(_one_line(f"{prefix}{subject.name}: {err}"))


def _text(name: str, findings: list[Finding]) -> str:
    verdict = "allowed" if allowed(findings) else "DENIED"
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
    report = Report()
    try:
        _judge(args.filename, load_config(args.config), args.namespace_labels, report)
    except InputError as err:
        report.errors.append(_one_line(str(err)))
    except Exception as err:  # last resort: a bug of ours is exit 2 with a reason, never a traceback
        report.errors.append(_one_line(f"internal error: {type(err).__name__}: {err} (please report it)"))
    (_print_json if args.output == "json" else _print_text)(report)
    return report.exit_code
