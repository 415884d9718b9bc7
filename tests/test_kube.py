"""The Protocols in netisolate.kube describe the real `kubernetes` client: mypy --strict (which CI
runs over tests too) checks the assignments below structurally, and the test checks at run time
that every call the Protocols name exists on the client, so a renamed method fails here rather
than in a cluster."""

from __future__ import annotations

import inspect

import pytest
from kubernetes import client

from netisolate.kube import AdmissionApi, CoreApi

API = client.ApiClient(client.Configuration())
CORE: CoreApi = client.CoreV1Api(API)  # type-checked: the real client is a CoreApi
ADMISSION: AdmissionApi = client.AdmissionregistrationV1Api(API)


def _calls(protocol: type) -> set[str]:
    return {
        name
        for klass in protocol.__mro__
        if klass.__module__ == "netisolate.kube"
        for name, member in vars(klass).items()
        if inspect.isfunction(member) and not name.startswith("_")
    }


@pytest.mark.parametrize(("protocol", "real"), [(CoreApi, CORE), (AdmissionApi, ADMISSION)])
def test_every_call_we_make_exists_on_the_client(protocol: type, real: object) -> None:
    calls = _calls(protocol)
    assert calls, "no calls found: the Protocol was not read"
    missing = sorted(name for name in calls if not callable(getattr(real, name, None)))
    assert missing == []
    for name in calls:
        ours = inspect.signature(getattr(protocol, name)).parameters
        theirs = inspect.signature(getattr(real, name)).parameters
        assert set(ours) - {"self"} <= set(theirs), f"{name}: {set(ours) - set(theirs) - {'self'}}"
