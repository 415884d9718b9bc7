"""The offline check: manifest files and directories → one report of what was judged, skipped and
unreadable. `netisolate check` prints it; the rules are the webhook's (admission.review_request)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from netisolate.admission import Finding, allowed, review_request
from netisolate.config import Config
from netisolate.inputs import Skipped, load_objects, manifest_files, read_text
from netisolate.model import InputError


@dataclass
class Report:
    results: list[tuple[str, list[Finding]]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one line each

    @property
    def allowed(self) -> bool:
        return not self.errors and all(allowed(findings) for _, findings in self.results)

    @property
    def exit_code(self) -> int:
        """0 allowed, 1 denied, 2 something could not be read (what could was still judged)."""
        return 2 if self.errors else 0 if self.allowed else 1

    def error(self, message: str) -> None:
        self.errors.append(" ".join(message.split()))


def _sources(paths: list[str]) -> Iterator[tuple[str, str, bool]]:
    """(path, name for messages, found by walking a directory) for every file to read."""
    for path in paths:
        for file in manifest_files(path):
            yield file, "stdin" if file == "-" else file, file != path


def judge(paths: list[str], config: Config, labels: Mapping[str, str], report: Report) -> None:
    """Every object of every file into `report`; reading goes on past an unreadable file."""
    sources = list(_sources(paths))
    for path, name, walked in sources:
        try:
            objects = load_objects(read_text(path), name)
        except InputError as err:
            report.error(str(err))
            continue
        if not objects.documents:
            # An empty file met in a directory is a placeholder; an empty file or stdin named on the
            # command line is a broken pipeline (`helm template` failed): that is not "allowed".
            if walked:
                report.skipped.append(Skipped(name, "no document in it"))
            else:
                report.error(f"{name}: no Kubernetes object in it")
        prefix = f"{name}: " if len(sources) > 1 else ""
        for message in objects.errors:
            report.error(message)
        report.skipped += [Skipped(prefix + s.name, s.reason) for s in objects.skipped]
        for subject in objects.subjects:
            where = prefix + subject.name
            try:
                report.results.append((where, review_request(subject.request, labels, config, where)))
            except InputError as err:
                report.error(str(err))
