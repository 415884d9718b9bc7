"""AdmissionReview in, AdmissionReview out — pure. Every malformed body becomes a BadReviewError with a
4xx status and a message saying what is wrong; nothing here can produce a 500."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from netisolate.admission import Finding
from netisolate.model import AdmissionRequest, AdmissionReview, describe_validation_error

MAX_BODY = 3 * 1024 * 1024  # the API server's own request limit is ~3 MiB
MAX_WARNINGS = 10
MAX_WARNING_CHARS = 200  # warnings travel as HTTP headers: keep them short

# path -> (kind, subResource) it serves; the same paths as daemonset/'s ValidatingWebhookConfiguration
PATHS: dict[str, tuple[str, str | None]] = {
    "/validate/pods": ("Pod", None),
    "/validate/pods-ephemeralcontainers": ("Pod", "ephemeralcontainers"),
    "/validate/namespaces": ("Namespace", None),
}


@dataclass(frozen=True)
class BadReviewError(Exception):
    status: int
    message: str


def parse_review(path: str, body: bytes) -> AdmissionRequest:
    if path not in PATHS:
        raise BadReviewError(404, f"no webhook at {path}; served: {', '.join(PATHS)}")
    if len(body) > MAX_BODY:
        raise BadReviewError(413, f"request body of {len(body)} bytes exceeds {MAX_BODY}")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadReviewError(400, f"body is not JSON: {err}") from None
    except RecursionError:
        raise BadReviewError(400, "body is not a Kubernetes object: JSON nested too deeply") from None
    if not isinstance(data, dict) or data.get("kind") != "AdmissionReview":
        raise BadReviewError(
            400, "body is not an AdmissionReview (kind: AdmissionReview, apiVersion: admission.k8s.io/v1)"
        )
    try:
        review = AdmissionReview.model_validate(data)
    except ValidationError as err:
        raise BadReviewError(400, describe_validation_error(err, "AdmissionReview")) from None
    if review.request is None:
        raise BadReviewError(400, "AdmissionReview has no request")
    kind, subresource = PATHS[path]
    request = review.request
    if request.kind.kind != kind or (request.sub_resource or None) != subresource:
        got = f"{request.kind.kind}{'/' + request.sub_resource if request.sub_resource else ''}"
        raise BadReviewError(
            400, f"{path} reviews {kind}{'/' + subresource if subresource else ''}, not {got}"
        )
    return request


def _fix(finding: Finding) -> str:
    where = f"container {finding.container}" if finding.container else "pod"
    return f"[{finding.rule}] {where}: {finding.message}"


def _short(text: str) -> str:
    return text if len(text) <= MAX_WARNING_CHARS else text[: MAX_WARNING_CHARS - 1] + "…"


def response(request: AdmissionRequest, findings: list[Finding]) -> dict[str, Any]:
    """Deny findings → allowed: false with every one of them and its fix; warn findings → warnings."""
    denies = [f for f in findings if f.severity == "deny"]
    warns = [f for f in findings if f.severity == "warn"]
    answer: dict[str, Any] = {"uid": request.uid, "allowed": not denies}
    if denies:
        subject = f"{request.kind.kind.lower()} {request.namespace + '/' if request.namespace else ''}"
        subject += request.name or "(generated name)"
        answer["status"] = {
            "code": 403,
            "reason": "Forbidden",
            "message": f"netisolate denied {subject}: " + "; ".join(_fix(f) for f in denies),
        }
    if warns:
        shown = [_short(f"netisolate: {_fix(f)}") for f in warns[:MAX_WARNINGS]]
        if len(warns) > MAX_WARNINGS:
            shown.append(f"netisolate: {len(warns) - MAX_WARNINGS} more warnings: run `netisolate check`")
        answer["warnings"] = shown
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": answer}


def refusal(uid: str, message: str) -> dict[str, Any]:
    """A readable review whose objects cannot be judged (or whose namespace cannot be read): deny."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {
            "uid": uid,
            "allowed": False,
            "status": {"code": 400, "reason": "BadRequest", "message": f"netisolate: {message}"},
        },
    }
