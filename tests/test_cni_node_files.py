"""The plugin on the node's disk, for real files and a real inotify watch: installed, chained into
the primary conflist, chained again when the node's CNI rewrites it, taken out on uninstall; and
the C plugin's own reading of its input, fuzzed through the real binary."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netisolate.agent.cni_conf import Chain, CniInstallError, install_binary, uninstall
from netisolate.cni import conflist
from tests.cni_harness import PREV_RESULT, PRIMARY, call, plugin_binary, runtime_config

ENTRY = conflist.plugin_entry("/nonexistent/netisolate/cni.sock", ["kube-system"])


def chain_of(path: Path) -> list[str]:
    return [p["type"] for p in json.loads(path.read_text())["plugins"]]


def rewrite_as_a_cni_installer_does(path: Path, text: str) -> None:
    tmp = path.with_name(".installer.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def until_chained(path: Path, timeout: float = 2.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if chain_of(path)[-1] == conflist.PLUGIN_TYPE:
                return time.monotonic() - started
        except (OSError, ValueError, KeyError, IndexError):
            pass
        time.sleep(0.005)
    raise AssertionError(f"{path.name} not chained within {timeout}s: {path.read_text()}")


def test_the_chain_is_kept_when_the_primary_cni_rewrites_its_file(tmp_path: Path) -> None:
    primary = tmp_path / "10-bridge.conflist"
    primary.write_text(json.dumps(PRIMARY))
    stop = threading.Event()
    chain = Chain(tmp_path, ENTRY)
    chain.start(stop)
    try:
        until_chained(primary)
        delays = []
        for i in range(10):  # replaced by rename, then written in place, as installers do
            text = json.dumps({**PRIMARY, "name": f"rewrite-{i}"})
            if i % 2:
                rewrite_as_a_cni_installer_does(primary, text)
            else:
                primary.write_text(text)
            delays.append(until_chained(primary))
            assert json.loads(primary.read_text())["name"] == f"rewrite-{i}", "the rewrite itself is kept"
        assert max(delays) < 2.0, delays
        # a new file that sorts first becomes the primary: chained too
        (tmp_path / "05-calico.conf").write_text(
            json.dumps({"cniVersion": "0.4.0", "name": "c", "type": "calico"})
        )
        until_chained(tmp_path / "05-calico.conflist")
        assert not (tmp_path / "05-calico.conf").exists()
        assert chain.chained_into == "05-calico.conflist"
        assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")], "no temporary file left"
    finally:
        stop.set()


def test_no_primary_yet_is_waited_for_and_garbage_left_alone(tmp_path: Path) -> None:
    chain = Chain(tmp_path, ENTRY)
    assert not chain.ensure() and "waiting for the node's CNI" in chain.problem
    (tmp_path / "10-half.conflist").write_text('{"plugins": [')
    assert not chain.ensure() and "not JSON" in chain.problem
    assert (tmp_path / "10-half.conflist").read_text() == '{"plugins": ['


def test_install_is_atomic_and_uninstall_takes_the_entry_out_before_the_binary(tmp_path: Path) -> None:
    conf, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    bin_dir.mkdir()
    with pytest.raises(CniInstallError, match="missing or not executable"):
        install_binary(tmp_path / "nope", bin_dir)
    installed = install_binary(plugin_binary(), bin_dir)
    assert installed.read_bytes() == plugin_binary().read_bytes() and os.access(installed, os.X_OK)
    primary = conf / "10-bridge.conflist"
    primary.write_text(json.dumps(PRIMARY))
    assert Chain(conf, ENTRY).ensure()
    seen_broken = []

    def watch() -> None:  # what a runtime loading the conf dir during uninstall could see
        while installed.exists():
            if chain_of(primary)[-1] == conflist.PLUGIN_TYPE and not installed.exists():
                seen_broken.append(True)
        seen_broken.append(conflist.PLUGIN_TYPE in chain_of(primary))

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert uninstall(conf, bin_dir, grace=0.3) == ["10-bridge.conflist"]
    watcher.join()
    assert seen_broken == [False], "the chain never named a missing plugin"
    assert json.loads(primary.read_text()) == PRIMARY


# --- the C plugin reads its stdin and environment: exec'd for real ---------------------------------


def test_exempt_and_non_kubernetes_sandboxes_pass_without_the_agent() -> None:
    config = runtime_config(ENTRY)
    for namespace in ("kube-system", None):
        result = call(plugin_binary(), "ADD", namespace=namespace, netns="/proc/self/ns/net", config=config)
        assert (result.code, json.loads(result.stdout)) == (0, PREV_RESULT)
    refused = call(
        plugin_binary(), "ADD", namespace="kube-system-x", netns="/proc/self/ns/net", config=config
    )
    assert refused.error["code"] == 11, "exemption is by exact name"


@pytest.mark.parametrize(
    ("command", "stdin", "env_namespace", "code", "message"),
    [
        ("ADD", '{"cniVersion": "2.0.0"}', "shop", 1, 'CNI version "2.0.0" is not supported'),
        ("ADD", "{", "shop", 6, "not valid JSON"),
        ("ADD", '{"cniVersion": "1.0.0"} x', "shop", 6, "data after its JSON object"),
        ("ADD", '{"cniVersion": "1.0.0", "exemptNamespaces": "shop"}', "shop", 6, "a list of names"),
        ("ADD", '{"cniVersion": "1.0.0", "socket": "/a", "socket": "/b"}', "shop", 6, "each at most once"),
        (
            "ADD",
            '{"cniVersion": "1.0.0", "exemptNamespaces": ["shop"], "exemptNamespaces": []}',
            "shop",
            6,
            "once",
        ),
        ("ADD", '{"cniVersion": "1.0.0", "prevResult": []}', "shop", 6, "an object"),
        ("ADD", '{"cniVersion": "1.0.0", "timeoutSeconds": 0}', "shop", 6, "1-600"),
        ("ADD", '{"cniVersion": "1.0.0", "exemptNamespaces": ["sh\\u0000op"]}', "shop", 6, "malformed"),
        ("GC", "{}", "shop", 4, "is not one of ADD, DEL, CHECK, VERSION"),
    ],
)
def test_bad_input_is_a_cni_error_that_says_what_to_fix(
    command: str, stdin: str, env_namespace: str, code: int, message: str
) -> None:
    result = call(plugin_binary(), command, namespace=env_namespace, netns="/proc/self/ns/net", stdin=stdin)
    assert result.error["code"] == code and message in result.error["msg"], result.error
    if command == "ADD":
        assert call(plugin_binary(), "DEL", namespace=env_namespace, stdin=stdin).code == 0, "DEL never fails"


def test_cni_args_naming_the_namespace_twice_are_refused() -> None:
    binary = plugin_binary()
    env_args = "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=a;K8S_POD_NAMESPACE=shop"
    result = call(binary, "ADD", namespace=None, name=f"x;{env_args}", config=runtime_config(ENTRY))
    assert result.error["code"] == 4 and "twice" in result.error["msg"]


def test_add_without_a_namespace_to_enforce_fails() -> None:
    result = call(plugin_binary(), "ADD", netns="/nonexistent/ns", config=runtime_config(ENTRY))
    assert result.error["code"] == 4 and "/nonexistent/ns" in result.error["msg"]


json_text = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
).map(json.dumps)
mangled = st.tuples(json_text, st.integers(0, 200), st.text(max_size=4)).map(
    lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_text, mangled, st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
def test_any_stdin_gets_a_cni_answer_never_a_crash(stdin: str) -> None:
    for command in ("ADD", "CHECK", "DEL"):
        result = call(plugin_binary(), command, netns="/proc/self/ns/net", stdin=stdin)
        assert result.code in (0, 1), (result.code, result.stderr)  # a signal would be negative
        if command == "DEL":
            assert (result.code, result.stdout) == (0, "")
        elif result.code == 0:  # only an exempt config could pass: never with no agent for "shop"
            raise AssertionError(f"{command} passed without the agent: {stdin!r} -> {result.stdout}")
        else:
            error = json.loads(result.stdout)
            assert set(error) == {"cniVersion", "code", "msg"} and error["code"] in (1, 4, 6, 11)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(max_size=8), json_text.map(json.loads), max_size=4))
def test_exempt_pods_get_exactly_the_chains_result_back(prev: dict[str, object]) -> None:
    text = json.dumps(prev, ensure_ascii=False)
    stdin = '{"cniVersion": "1.0.0", "exemptNamespaces": ["kube-system"], "prevResult": ' + text + "}"
    result = call(plugin_binary(), "ADD", namespace="kube-system", stdin=stdin)
    assert (result.code, result.stdout) == (0, text + "\n")
