"""The agent's parser of the plugin's requests: untrusted bytes in, a Request or a ProtocolError
out, never anything else."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netisolate.cni import protocol
from netisolate.cni.protocol import ProtocolError, parse_request

CONFIG = {"cniVersion": "1.0.0", "name": "k8s", "type": "netisolate-cni", "prevResult": {"ips": []}}
ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=1f2e-9a"


def encode(fields: list[tuple[str, bytes]], magic: bytes = protocol.MAGIC) -> bytes:
    """As the C plugin frames a request."""
    out = magic
    for name, value in fields:
        out += f"{name} {len(value)}\n".encode() + value + b"\n"
    return out + b"end 0\n\n"


def fields(**override: bytes) -> list[tuple[str, bytes]]:
    base = {
        "command": b"ADD",
        "containerid": b"3f0c9a7e" * 8,
        "netns": b"/var/run/netns/cni-1234",
        "ifname": b"eth0",
        "args": ARGS.encode(),
        "config": json.dumps(CONFIG).encode(),
    }
    base.update(override)
    return list(base.items())


def test_a_request_as_the_plugin_sends_it() -> None:
    request = parse_request(encode(fields()))
    assert request.command == "ADD" and request.ifname == "eth0"
    assert request.pod == protocol.PodRef("shop", "web-0", "1f2e-9a") and str(request.pod) == "shop/web-0"
    assert request.config == CONFIG and request.cni_version == "1.0.0"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a netisolate-cni/1 request"),
        (encode(fields(), magic=b"netisolate-cni/2\n"), "not a netisolate-cni/1 request"),
        (encode(fields())[:-1], "data after the end"),
        (encode(fields()) + b"x", "data after the end"),
        (encode([*fields(), ("command", b"DEL")]), "given twice"),
        (encode([*fields(), ("shell", b"rm -rf /")]), "unknown field"),
        (encode(fields()[:-1]), "missing fields: config"),
        (encode(fields(command=b"GC")), "is not one of"),
        (encode(fields(containerid=b"")), "not a valid container ID"),
        (encode(fields(containerid=b"-rf")), "not a valid container ID"),
        (encode(fields(config=b"{not json")), "not JSON"),
        (encode(fields(config=b"[1]")), "not a JSON object"),
        (encode(fields(config=b"[" * 100000)), "not JSON"),
        (encode(fields(args=b"K8S_POD_NAME=a")), "lacks K8S_POD_NAMESPACE"),
        (encode(fields(args=b"K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;K8S_POD_NAMESPACE=kube-system")), "twice"),
        (encode(fields(args=b"K8S_POD_NAMESPACE")), "not KEY=VALUE"),
        (encode(fields(netns=b"\xff\xfe")), "not UTF-8"),
        (encode(fields(netns=b"a\0b")), "NUL"),
        (protocol.MAGIC + b"command 99999\nADD\n", "cut short"),
        (protocol.MAGIC + b"command 3\nADDX", "cut short"),
        (protocol.MAGIC + b"command -1\n", "malformed field header"),
        (protocol.MAGIC + b"command 007\nADD\n", "malformed field header"),
        (b"x" * (protocol.MAX_REQUEST + 1), "larger than"),
    ],
)
def test_malformed_requests_are_refused_with_the_reason(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_request(data)


def test_the_version_errors_are_reported_in_is_the_configs_when_supported() -> None:
    old = parse_request(encode(fields(config=b'{"cniVersion": "0.4.0"}')))
    assert old.cni_version == "0.4.0"
    assert parse_request(encode(fields(config=b'{"cniVersion": "9.9.9"}'))).cni_version == "1.0.0"
    error = json.loads(protocol.failure(protocol.E_TRY_AGAIN, "why", old.cni_version)[5:])
    assert error == {"cniVersion": "0.4.0", "code": 11, "msg": "why"}


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=2048))
def test_any_bytes_are_a_request_or_a_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_request(data)


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=2048), st.integers(min_value=0, max_value=1000))
def test_any_bytes_behind_a_valid_header_are_a_request_or_a_protocol_error(tail: bytes, cut: int) -> None:
    valid = encode(fields())
    with contextlib.suppress(ProtocolError):
        parse_request(valid[: cut % len(valid)] + tail)


field_names = st.sampled_from([*protocol.FIELDS, "end", "junk"])


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(field_names, st.binary(max_size=64)), max_size=10))
def test_any_sequence_of_well_framed_fields_is_a_request_or_a_protocol_error(
    items: list[tuple[str, bytes]],
) -> None:
    try:
        request = parse_request(encode(items))
    except ProtocolError:
        return
    # what parsed has exactly the fields the framing carried, each once
    assert sorted(name for name, _ in items) == sorted(protocol.FIELDS)
    assert request.command in protocol.COMMANDS


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789", min_size=1, max_size=20),
        st.text(alphabet=st.characters(blacklist_characters=";\0", blacklist_categories=["Cs"]), max_size=30),
        max_size=6,
    )
)
def test_cni_args_round_trip(args: dict[str, str]) -> None:
    text = ";".join(f"{k}={v}" for k, v in args.items())
    assert protocol.parse_cni_args(text) == args


def test_the_command_line_loads_without_the_cni_machinery() -> None:
    """`netisolate check` & co. must start fast: the agent's CNI flags come from a light module."""
    import subprocess
    import sys

    code = "import sys, netisolate.cli as c; c.build_parser(); "
    code += "print(sorted(m for m in sys.modules if 'cni' in m))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['netisolate.cni', 'netisolate.cni.options']"
