"""Kubernetes API clients: in-cluster configuration, or a kubeconfig file when given."""

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
            config.load_incluster_config()  # type: ignore[no-untyped-call]
    except (config.ConfigException, OSError) as err:
        where = kubeconfig or "the in-cluster service account"
        raise InputError(
            f"cannot load Kubernetes credentials from {where}: {err}; pass --kubeconfig"
        ) from None
    return client.CoreV1Api(), client.AdmissionregistrationV1Api()
