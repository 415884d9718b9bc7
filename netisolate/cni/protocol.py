"""The messages between the plugin and the agent (the plugin's side: `cni/netisolate-cni.c`).

A request is the CNI call as the runtime made it, in length-prefixed fields, so that no value can
be mistaken for framing, whatever bytes it holds:

    netisolate-cni/1\\n
    command 3\\nADD\\n
    containerid 64\\n<id>\\n
    netns <n>\\n<CNI_NETNS>\\n     (the namespace itself arrives as an fd, SCM_RIGHTS)
    ifname <n>\\n<CNI_IFNAME>\\n
    args <n>\\n<CNI_ARGS>\\n
    config <n>\\n<stdin>\\n
    end 0\\n\\n

The reply is `ok\\n` (ADD then prints the chain's prevResult, unchanged) or `fail\\n` and a CNI
error object. Everything the plugin sends is untrusted input: `parse_request` takes bytes and
either returns a Request or raises ProtocolError saying what is wrong, never anything else.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

MAGIC = b"netisolate-cni/1\n"
MAX_REQUEST = (1 << 20) + 64 * 1024  # the plugin's stdin limit plus the environment
FIELDS = ("command", "containerid", "netns", "ifname", "args", "config")
COMMANDS = ("ADD", "DEL", "CHECK")
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
_HEAD = re.compile(rb"([a-z]{1,16}) (0|[1-9][0-9]{0,7})\n")
# The spec's container ID: alphanumeric first, then alphanumerics, '_', '.', '-'.
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")

# Well-known CNI error codes (spec 1.0.0).
E_VERSION, E_ENV, E_DECODE, E_CONFIG, E_TRY_AGAIN = 1, 4, 6, 7, 11


class ProtocolError(ValueError):
    """The request is malformed; the message says how."""


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str
    uid: str  # K8S_POD_UID; "" when the runtime does not pass it

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Request:
    command: str
    container_id: str
    netns: str
    ifname: str
    args: dict[str, str]
    config: dict[str, Any]

    @property
    def cni_version(self) -> str:
        version = self.config.get("cniVersion")
        return version if isinstance(version, str) and version in SUPPORTED_VERSIONS else "1.0.0"

    @property
    def pod(self) -> PodRef:
        return PodRef(
            self.args.get("K8S_POD_NAMESPACE", ""),
            self.args.get("K8S_POD_NAME", ""),
            self.args.get("K8S_POD_UID", ""),
        )


def _fields(data: bytes) -> dict[str, bytes]:
    if not data.startswith(MAGIC):
        raise ProtocolError("not a netisolate-cni/1 request (plugin and agent from different releases?)")
    at, found = len(MAGIC), dict[str, bytes]()
    while True:
        head = _HEAD.match(data, at)
        if head is None:
            raise ProtocolError(f"malformed field header at byte {at}")
        name, length = head[1].decode(), int(head[2])
        start = head.end()
        if name == "end":
            if length != 0 or data[start:] != b"\n":
                raise ProtocolError("data after the end of the request")
            return found
        if name not in FIELDS:
            raise ProtocolError(f"unknown field {name!r}")
        if name in found:
            raise ProtocolError(f"field {name!r} given twice")
        stop = start + length
        if stop >= len(data) or data[stop : stop + 1] != b"\n":
            raise ProtocolError(f"field {name!r} is cut short")
        found[name] = data[start:stop]
        at = stop + 1


def parse_cni_args(text: str) -> dict[str, str]:
    """CNI_ARGS: `KEY=VALUE` pairs separated by `;`. A key given twice is refused: the plugin
    judges exemptions by the first, and both sides must read the same pod."""
    args: dict[str, str] = {}
    for pair in filter(None, text.split(";")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ProtocolError(f"CNI_ARGS entry {pair[:64]!r} is not KEY=VALUE")
        if key in args:
            raise ProtocolError(f"CNI_ARGS gives {key} twice")
        args[key] = value
    return args


def _text(raw: bytes, name: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"field {name!r} is not UTF-8") from None
    if "\0" in text:
        raise ProtocolError(f"field {name!r} holds a NUL byte")
    return text


def parse_request(data: bytes) -> Request:
    if len(data) > MAX_REQUEST:
        raise ProtocolError(f"request larger than {MAX_REQUEST} bytes")
    raw = _fields(data)
    missing = [name for name in FIELDS if name not in raw]
    if missing:
        raise ProtocolError(f"missing fields: {', '.join(missing)}")
    text = {name: _text(value, name) for name, value in raw.items()}
    if text["command"] not in COMMANDS:
        raise ProtocolError(f"command {text['command'][:16]!r} is not one of {', '.join(COMMANDS)}")
    if not _CONTAINER_ID.fullmatch(text["containerid"]):
        raise ProtocolError("CNI_CONTAINERID is empty or not a valid container ID")
    try:
        config = json.loads(text["config"])
    except (ValueError, RecursionError):
        raise ProtocolError("the network configuration is not JSON") from None
    if not isinstance(config, dict):
        raise ProtocolError("the network configuration is not a JSON object")
    request = Request(
        text["command"],
        text["containerid"],
        text["netns"],
        text["ifname"],
        parse_cni_args(text["args"]),
        config,
    )
    if not request.pod.namespace or not request.pod.name:
        raise ProtocolError("CNI_ARGS lacks K8S_POD_NAMESPACE or K8S_POD_NAME")
    return request


OK = b"ok\n"


def failure(code: int, message: str, cni_version: str = "1.0.0", details: str = "") -> bytes:
    """A `fail` reply: the CNI error object the plugin prints for the runtime."""
    error: dict[str, Any] = {"cniVersion": cni_version, "code": code, "msg": message}
    if details:
        error["details"] = details
    return b"fail\n" + json.dumps(error).encode() + b"\n"
