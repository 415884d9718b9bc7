"""Policy core: isolation levels, effective UIDs and the grant parser (untrusted input: fuzzed)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netisolate.model import parse_pod
from netisolate.policy import (
    ContainerKind,
    Level,
    PolicyError,
    PortRange,
    format_grants,
    parse_grants,
    pod_policy,
)


def make_pod(annotations: dict[str, str] | None = None, **spec: Any) -> Any:
    spec.setdefault(
        "containers",
        [
            {"name": "app", "securityContext": {"runAsUser": 1000}},
            {"name": "proxy", "securityContext": {"runAsUser": 1001}},
        ],
    )
    return parse_pod(
        {"metadata": {"name": "p", "namespace": "ns", "annotations": annotations or {}}, "spec": spec}
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        ("   ", ()),
        ("8080", (PortRange("tcp", 8080, 8080),)),
        ("8080/tcp", (PortRange("tcp", 8080, 8080),)),
        ("53/udp", (PortRange("udp", 53, 53),)),
        ("53/UDP", (PortRange("udp", 53, 53),)),
        ("9000-9100", (PortRange("tcp", 9000, 9100),)),
        (
            " 15001 , 9000 - 9100 / udp ,1",
            (PortRange("tcp", 1, 1), PortRange("tcp", 15001, 15001), PortRange("udp", 9000, 9100)),
        ),
        ("80,80", (PortRange("tcp", 80, 80),)),
        ("65535", (PortRange("tcp", 65535, 65535),)),
    ],
)
def test_grants_parse(text: str, expected: tuple[PortRange, ...]) -> None:
    assert parse_grants(text) == expected


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("0", "outside 1-65535"),
        ("65536", "outside 1-65535"),
        ("80,", "empty item"),
        (",80", "empty item"),
        ("80,,81", "empty item"),
        ("http", "is not PORT"),
        ("80/sctp", "tcp or udp"),
        ("100-90", "starts above its end"),
        ("080", "leading zeros"),
        ("-80", "is not PORT"),
        ("80-", "is not PORT"),
        ("8 0", "is not PORT"),
        ("٨٠", "is not PORT"),  # non-ASCII digits are not ports
        ("80;81", "is not PORT"),
        ("1-2-3", "is not PORT"),
    ],
)
def test_grants_reject(text: str, complaint: str) -> None:
    with pytest.raises(PolicyError, match=complaint):
        parse_grants(text)


@given(st.text(max_size=60))
def test_grant_parser_never_raises_anything_but_its_own_error(text: str) -> None:
    try:
        grants = parse_grants(text)
    except PolicyError as err:
        assert str(err)
    else:
        assert all(1 <= g.low <= g.high <= 65535 and g.protocol in ("tcp", "udp") for g in grants)


_item = st.builds(
    lambda low, span, proto, spaced: (
        f"{low}" + (f"-{low + span}" if span else "") + (f"/{proto}" if proto else ""),
        spaced,
    ),
    st.integers(1, 65000),
    st.integers(0, 500),
    st.sampled_from(["", "tcp", "udp"]),
    st.booleans(),
)


@given(st.lists(_item, max_size=8))
def test_grant_round_trip(items: list[tuple[str, bool]]) -> None:
    text = ",".join(f" {item} " if spaced else item for item, spaced in items)
    grants = parse_grants(text)
    assert parse_grants(format_grants(grants)) == grants
    assert format_grants(parse_grants(format_grants(grants))) == format_grants(grants)


@pytest.mark.parametrize(
    ("namespace", "pod", "level"),
    [
        (None, None, Level.OFF),
        ("enforce", None, Level.ENFORCE),
        (None, "audit", Level.AUDIT),
        ("audit", "enforce", Level.ENFORCE),  # a pod can raise its namespace's level
        ("enforce", "off", Level.ENFORCE),  # ... never lower it
        ("enforce", "audit", Level.ENFORCE),
        ("off", "audit", Level.AUDIT),
    ],
)
def test_effective_level_is_the_stricter(namespace: str | None, pod: str | None, level: Level) -> None:
    labels = {"netisolate.io/isolation": namespace} if namespace else {}
    annotations = {"netisolate.io/isolation": pod} if pod else {}
    policy = pod_policy(make_pod(annotations), labels)
    assert policy.level is level
    assert not policy.problems


@pytest.mark.parametrize(
    ("annotations", "labels"),
    [
        ({"netisolate.io/isolation": "Enforce"}, {}),
        ({"netisolate.io/isolation": "yes"}, {}),
        ({}, {"netisolate.io/isolation": "on"}),
        ({"netisolate.io/isolation": "audit", "allow.netisolate.io/app": "80,http"}, {}),
        ({"netisolate.io/isolation": "off", "allow.netisolate.io/app": "99999"}, {}),
        ({"allow.netisolate.io/ghost": "80"}, {}),
    ],
)
def test_bad_annotations_fail_closed(annotations: dict[str, str], labels: dict[str, str]) -> None:
    pod = make_pod({**annotations, "allow.netisolate.io/proxy": "8080"})
    policy = pod_policy(pod, labels)
    assert policy.level is Level.ENFORCE
    assert policy.problems
    assert all(c.grants == () for c in policy.containers), "a bad annotation must open nothing"


def test_effective_uid_container_over_pod() -> None:
    pod = make_pod(
        securityContext={"runAsUser": 5000},
        containers=[{"name": "a"}, {"name": "b", "securityContext": {"runAsUser": 6000}}],
        initContainers=[{"name": "side", "restartPolicy": "Always"}, {"name": "init"}],
        ephemeralContainers=[{"name": "debug", "securityContext": {"runAsUser": 7000}}],
    )
    policy = pod_policy(pod, {})
    got = {c.name: (c.kind, c.uid) for c in policy.containers}
    assert got == {
        "side": (ContainerKind.SIDECAR, 5000),
        "init": (ContainerKind.INIT, 5000),
        "a": (ContainerKind.REGULAR, 5000),
        "b": (ContainerKind.REGULAR, 6000),
        "debug": (ContainerKind.EPHEMERAL, 7000),
    }


def test_no_uid_anywhere_is_none() -> None:
    pod = make_pod(containers=[{"name": "a"}])
    assert pod_policy(pod, {}).containers[0].uid is None


def test_grants_attach_to_their_container() -> None:
    pod = make_pod({"netisolate.io/isolation": "enforce", "allow.netisolate.io/app": "15001, 53/udp"})
    grants = {c.name: format_grants(c.grants) for c in pod_policy(pod, {}).containers}
    assert grants == {"app": "15001,53/udp", "proxy": ""}
