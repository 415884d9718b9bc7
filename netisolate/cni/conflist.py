"""The node's CNI configuration, edited as the runtime reads it: netisolate-cni as the last plugin
of the primary network.

The runtime (containerd, CRI-O, through libcni) takes the files of its conf dir ending in
`.conf`, `.conflist` or `.json`, sorted by name, and uses the first: that is the primary network.
A `.conflist` holds a chain (`plugins`); a `.conf`/`.json` holds one plugin, which we turn into a
`.conflist` of the same name, since only a list can chain.

Pure: text in, text out. Reading, writing (atomically) and watching are `netisolate.agent.cni_conf`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

PLUGIN_TYPE = "netisolate-cni"
EXTENSIONS = (".conf", ".conflist", ".json")


class ConflistError(ValueError):
    """The file is not a CNI configuration we can chain onto; the message says why."""


@dataclass(frozen=True)
class Edit:
    """Write `text` to `name` (in the conf dir); then remove `remove` when set (a `.conf` that
    became a `.conflist`). Write first: the runtime never sees a dir without the network."""

    name: str
    text: str
    remove: str | None = None


def primary(names: Iterable[str]) -> str | None:
    """The file the runtime uses: the first, by name, of those it reads. Hidden files count as
    libcni counts them (by extension only), which is why our own temporary files end in `.tmp`."""
    return min((n for n in names if n.endswith(EXTENSIONS)), default=None)


def plugin_entry(socket: str, exempt_namespaces: Iterable[str], timeout_seconds: int = 30) -> dict[str, Any]:
    """Our plugin's entry; the C plugin reads exactly these keys."""
    return {
        "type": PLUGIN_TYPE,
        "socket": socket,
        "exemptNamespaces": sorted(set(exempt_namespaces)),
        "timeoutSeconds": timeout_seconds,
    }


def _load(name: str, text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError as err:
        raise ConflistError(f"{name} is not JSON ({err}); waiting for its writer to finish it") from None
    if not isinstance(doc, dict):
        raise ConflistError(f"{name} is not a JSON object")
    return doc


def _as_list(name: str, doc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(file name, conflist document) for a .conflist, or a .conf/.json turned into one."""
    if name.endswith(".conflist"):
        if not isinstance(doc.get("plugins"), list) or not all(isinstance(p, dict) for p in doc["plugins"]):
            raise ConflistError(f"{name} has no list of plugins")
        return name, doc
    if not isinstance(doc.get("type"), str):
        raise ConflistError(f"{name} names no plugin type")
    single = {k: v for k, v in doc.items() if k not in ("name", "cniVersion", "disableCheck")}
    listed = {"cniVersion": doc.get("cniVersion", "0.4.0"), "name": doc.get("name", ""), "plugins": [single]}
    return name.rsplit(".", 1)[0] + ".conflist", listed


def _dump(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2) + "\n"


def chained(name: str, text: str, entry: dict[str, Any]) -> Edit | None:
    """The edit that makes `entry` the last plugin, and the only one of its type, of this
    configuration; None when it already is (so our own write never triggers another)."""
    doc = _load(name, text)
    target, listed = _as_list(name, doc)
    plugins = listed["plugins"]
    ours = sum(p.get("type") == PLUGIN_TYPE for p in plugins)
    if target == name and plugins and plugins[-1] == entry and ours == 1:
        return None
    listed = {**listed, "plugins": [p for p in plugins if p.get("type") != PLUGIN_TYPE] + [entry]}
    return Edit(target, _dump(listed), remove=name if target != name else None)


def unchained(name: str, text: str) -> Edit | None:
    """The edit that takes our plugin out of this configuration; None when it is not in it.
    A `.conflist` left with one plugin stays a `.conflist`: the runtime reads it as well."""
    doc = _load(name, text)
    plugins = doc.get("plugins")
    if not name.endswith(".conflist") or not isinstance(plugins, list):
        return None
    kept = [p for p in plugins if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]
    if len(kept) == len(plugins):
        return None
    return Edit(name, _dump({**doc, "plugins": kept}))
