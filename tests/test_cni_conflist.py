"""Editing the node's conflist: our plugin last, once, everything else as it was."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netisolate.cni import conflist
from netisolate.cni.conflist import ConflistError, chained, primary, unchained

ENTRY = conflist.plugin_entry("/var/run/netisolate/cni.sock", ["netisolate-system", "kube-system"])
BRIDGE = {
    "cniVersion": "1.0.0",
    "name": "k8s-pod-network",
    "plugins": [
        {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}


def test_the_primary_is_the_first_file_the_runtime_reads() -> None:
    names = [
        "99-other.conflist",
        "10-calico.conflist",
        "05-x.conf",
        "README",
        ".10-a.conflist.x.tmp",
        "00.txt",
    ]
    assert primary(names) == "05-x.conf"
    assert primary(["a.json", "b.conflist"]) == "a.json"
    assert primary(["README", "x.tmp"]) is None


def test_the_plugin_goes_last_and_the_rest_stays() -> None:
    edit = chained("10-bridge.conflist", json.dumps(BRIDGE), ENTRY)
    assert edit is not None and edit.name == "10-bridge.conflist" and edit.remove is None
    doc = json.loads(edit.text)
    assert doc["plugins"] == [*BRIDGE["plugins"], ENTRY]
    assert {k: v for k, v in doc.items() if k != "plugins"} == {
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
    }
    assert ENTRY["exemptNamespaces"] == ["kube-system", "netisolate-system"]
    assert chained("10-bridge.conflist", edit.text, ENTRY) is None, "a second pass changes nothing"


def test_a_stale_or_misplaced_entry_is_replaced() -> None:
    old = {**ENTRY, "socket": "/old.sock"}
    doc = {**BRIDGE, "plugins": [old, *BRIDGE["plugins"], {**ENTRY}]}
    edit = chained("10-bridge.conflist", json.dumps(doc), ENTRY)
    assert edit is not None and json.loads(edit.text)["plugins"] == [*BRIDGE["plugins"], ENTRY]


def test_a_single_plugin_conf_becomes_a_conflist_of_the_same_name() -> None:
    single = {"cniVersion": "0.4.0", "name": "bridge", "type": "bridge", "ipam": {"type": "host-local"}}
    edit = chained("10-bridge.conf", json.dumps(single), ENTRY)
    assert edit is not None and (edit.name, edit.remove) == ("10-bridge.conflist", "10-bridge.conf")
    assert json.loads(edit.text) == {
        "cniVersion": "0.4.0",
        "name": "bridge",
        "plugins": [{"type": "bridge", "ipam": {"type": "host-local"}}, ENTRY],
    }


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("10.conflist", '{"plugins": [', "not JSON"),
        ("10.conflist", "[]", "not a JSON object"),
        ("10.conflist", '{"plugins": {}}', "no list of plugins"),
        ("10.conflist", '{"plugins": [1]}', "no list of plugins"),
        ("10.conf", '{"name": "x"}', "names no plugin type"),
    ],
)
def test_files_we_cannot_chain_onto_are_left_alone_with_the_reason(
    name: str, text: str, message: str
) -> None:
    with pytest.raises(ConflistError, match=message):
        chained(name, text, ENTRY)


def test_unchaining_restores_the_chain() -> None:
    edit = chained("10-bridge.conflist", json.dumps(BRIDGE), ENTRY)
    assert edit is not None
    back = unchained("10-bridge.conflist", edit.text)
    assert back is not None and json.loads(back.text) == BRIDGE
    assert unchained("10-bridge.conflist", back.text) is None
    assert unchained("10-bridge.conf", json.dumps({"type": "bridge"})) is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
plugins = st.lists(
    st.dictionaries(st.text(max_size=6), json_values, max_size=3).map(
        lambda d: {**d, "type": d.get("type") if isinstance(d.get("type"), str) else "x"}
    )
    | st.just(dict(ENTRY))
    | st.just({**ENTRY, "socket": "/elsewhere"}),
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(plugins, st.dictionaries(st.sampled_from(["cniVersion", "name", "disableCheck"]), json_values))
def test_any_conflist_ends_with_our_plugin_once_and_keeps_the_others_in_order(
    chain: list[dict[str, Any]], top: dict[str, Any]
) -> None:
    doc = {**top, "plugins": chain}
    edit = chained("10.conflist", json.dumps(doc), ENTRY)
    text = edit.text if edit is not None else json.dumps(doc)
    after = json.loads(text)
    others = [p for p in chain if p.get("type") != conflist.PLUGIN_TYPE]
    assert after["plugins"] == [*others, ENTRY]
    assert {k: v for k, v in after.items() if k != "plugins"} == top
    assert chained("10.conflist", text, ENTRY) is None
    removed = unchained("10.conflist", text)
    assert removed is not None and json.loads(removed.text)["plugins"] == others
