"""The admission configuration (mounted from the `netisolate-config` ConfigMap), defaults built in."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from netisolate.model import InputError, describe_validation_error

Severity = Literal["deny", "warn"]

_ISTIO_PROXY = [
    "registry.istio.io/release/proxyv2",  # Istio's default hub since 1.25
    "docker.io/istio/proxyv2",
    "gcr.io/istio-release/proxyv2",
    "istio/proxyv2",
]
_VAULT = ["docker.io/hashicorp/vault", "hashicorp/vault", "registry.connect.redhat.com/hashicorp/vault"]
# Container name → the images its injector puts there. Init containers count: they run before the
# rules hold (linkerd-init, istio-init rewrite the pod's netfilter tables).
DEFAULT_SIDECAR_IMAGES: dict[str, list[str]] = {
    "istio-proxy": _ISTIO_PROXY,
    "istio-init": _ISTIO_PROXY,
    "istio-validation": _ISTIO_PROXY,  # Istio CNI's check that the redirection works
    "linkerd-proxy": ["cr.l5d.io/linkerd/proxy", "ghcr.io/linkerd/proxy"],
    "linkerd-init": ["cr.l5d.io/linkerd/proxy-init", "ghcr.io/linkerd/proxy-init"],
    "linkerd-debug": ["cr.l5d.io/linkerd/debug", "ghcr.io/linkerd/debug"],
    "daprd": [
        "docker.io/daprio/daprd",
        "daprio/daprd",
        "docker.io/daprio/dapr",  # Dapr's image on Docker Hub, as its injector names it
        "daprio/dapr",
        "ghcr.io/dapr/daprd",
        "ghcr.io/dapr/dapr",
    ],
    "vault-agent": _VAULT,
    "vault-agent-init": _VAULT,
    "otc-container": [
        "docker.io/otel/opentelemetry-collector",
        "otel/opentelemetry-collector",
        "ghcr.io/open-telemetry/opentelemetry-collector-releases/",
    ],
}
DEFAULT_OPT_OUTS = {
    "sidecar.istio.io/inject": "false",
    "linkerd.io/inject": "disabled",
    "dapr.io/enabled": "false",
}
DEFAULT_PROTECTED_LABELS = ["netisolate.io/isolation", "istio-injection", "istio.io/rev", "linkerd.io/inject"]
DEFAULT_EXEMPT_GROUPS = ["system:masters", "netisolate:platform"]
DEFAULT_SEVERITIES: dict[str, Severity] = {
    "privileged": "deny",
    "hostpath": "warn",
    "sidecar-image": "warn",
    "sidecar-digest": "warn",
    "injection-opt-out": "warn",
    "namespace-label-protected": "deny",
}
DEFAULT_GATE_IMAGES = ["ghcr.io/netisolate/netisolate"]
# Keys earlier versions shipped: named with where the setting lives now, rather than a bare
# "extra inputs are not permitted".
MOVED_SETTINGS = {
    "sentinelPort": "the sentinel port is the agent's --sentinel-port (the gate's --port must match); "
    "delete the key",
}


def _image_matches(image: str, prefix: str) -> bool:
    if prefix.endswith("/"):
        return image.startswith(prefix)
    return image == prefix or (image.startswith(prefix) and image[len(prefix)] in ":@")


def image_matches(image: str | None, prefixes: list[str]) -> bool:
    """Prefix match on a repository boundary: `istio/proxyv2` allows `istio/proxyv2:1.22` and
    `istio/proxyv2@sha256:…`, never `istio/proxyv2-evil`. A prefix ending in `/` allows a whole path."""
    if not image:
        return False
    return any(_image_matches(image, prefix) for prefix in prefixes)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)

    sidecar_images: dict[str, list[str]] = Field(default_factory=lambda: dict(DEFAULT_SIDECAR_IMAGES))
    opt_out_annotations: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_OPT_OUTS))
    protected_namespace_labels: list[str] = Field(default_factory=lambda: list(DEFAULT_PROTECTED_LABELS))
    exempt_groups: list[str] = Field(default_factory=lambda: list(DEFAULT_EXEMPT_GROUPS))
    severities: dict[str, Severity] = Field(default_factory=dict)
    trusted_init_images: list[str] = Field(default_factory=list)
    gate_required: bool = False
    gate_images: list[str] = Field(default_factory=lambda: list(DEFAULT_GATE_IMAGES))
    # for `netisolate audit`: namespace -> the values its protected labels must have
    expected_namespace_labels: dict[str, dict[str, str]] = Field(default_factory=dict)
    # for `netisolate audit`: `namespace/name` patterns (fnmatch) of control-plane pods whose
    # injection opt-out is intended (istiod's own chart opts it out, for one)
    opt_out_exempt_pods: list[str] = Field(default_factory=list)

    def severity(self, rule: str) -> Severity:
        return self.severities.get(rule, DEFAULT_SEVERITIES[rule])


def load_config(path: str | Path | None) -> Config:
    """The config file's settings over the built-in defaults; no file means the defaults."""
    if path is None:
        return Config()
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise InputError(f"{path}: the config is a mapping of settings, not a {type(data).__name__}")
        moved = sorted(set(data) & set(MOVED_SETTINGS))
        if moved:
            raise InputError(
                f"{path}: {moved[0]} is no longer read from the config: {MOVED_SETTINGS[moved[0]]}"
            )
        severities = data.get("severities") or {}  # not a mapping: the model says so below
        unknown = set(severities) - set(DEFAULT_SEVERITIES) if isinstance(severities, dict) else set()
        if unknown:
            raise InputError(
                f"{path}: severities for unknown rules {sorted(unknown)}; "
                f"configurable: {sorted(DEFAULT_SEVERITIES)}"
            )
        return Config.model_validate(data)
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f"{path}: cannot read the config: {err}") from None
    except ValidationError as err:
        raise InputError(describe_validation_error(err, str(path))) from None
