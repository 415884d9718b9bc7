"""Kubernetes API clients: a kubeconfig file when given, else in-cluster configuration, else the
kubeconfig kubectl would use."""

from __future__ import annotations

from typing import Any

from netisolate.model import InputError


def api_clients(kubeconfig: str | None) -> tuple[Any, Any]:
    """(CoreV1Api, AdmissionregistrationV1Api)."""
    from kubernetes import client, config

    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        else:
            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:  # not in a pod: $KUBECONFIG or ~/.kube/config, as kubectl
                config.load_kube_config()  # type: ignore[no-untyped-call]
    except (config.ConfigException, OSError) as err:
        where = kubeconfig or "the in-cluster service account, $KUBECONFIG or ~/.kube/config"
        raise InputError(
            f"cannot load Kubernetes credentials from {where}: {err}; pass --kubeconfig"
        ) from None
    return client.CoreV1Api(), client.AdmissionregistrationV1Api()
