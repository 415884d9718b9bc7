"""`netisolate check` and `render` as a user runs them: input forms, output shapes, exit codes."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netisolate import inputs
from netisolate.admission import review_request
from netisolate.cli import COMMANDS, build_parser, main
from netisolate.config import Config
from netisolate.inputs import load_subjects
from netisolate.model import InputError

EXAMPLES = Path(__file__).parent.parent / "examples"

POD_SPEC = {
    "securityContext": {"runAsUser": 1000},
    "containers": [
        {
            "name": "app",
            "image": "app:1",
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        }
    ],
}


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, *docs: Any) -> str:
    path = tmp_path / "in.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return str(path)


def test_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "check", "-f", str(EXAMPLES / "app-with-proxy.yaml"))[0] == 0
    code, out, _ = run(capsys, "check", "-f", str(EXAMPLES / "dapr-sidecar.yaml"))
    assert code == 0 and "sidecar-digest" in out
    code, out, _ = run(capsys, "check", "-f", str(EXAMPLES / "rogue-injected.yaml"))
    assert code == 1
    assert "DENIED" in out and "container telemetry" in out and "uid-shared" in out


def test_json_shape_is_exactly_the_documented_one(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check", "-f", str(EXAMPLES / "rogue-injected.yaml"), "-o", "json")
    result = json.loads(out)
    assert code == 1
    assert set(result) == {"allowed", "findings", "skipped", "errors"} and result["allowed"] is False
    assert result["skipped"] == [] and result["errors"] == []
    for finding in result["findings"]:
        assert set(finding) == {"rule", "severity", "container", "message"}
        assert finding["severity"] in ("deny", "warn")


def test_multi_document_names_each_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = {"kind": "Pod", "metadata": {"name": "good"}, "spec": POD_SPEC}
    bad = {
        "kind": "Pod",
        "metadata": {"name": "bad", "annotations": {"netisolate.io/isolation": "enforce"}},
        "spec": {"containers": [{"name": "x", "image": "x"}]},
    }
    code, out, _ = run(capsys, "check", "-f", write(tmp_path, good, None, bad), "-o", "json")
    result = json.loads(out)
    assert code == 1 and result["allowed"] is False
    assert {f["object"] for f in result["findings"]} == {"Pod bad"}
    assert all(set(f) == {"rule", "severity", "container", "message", "object"} for f in result["findings"])


WORKLOADS: dict[str, dict[str, Any]] = {
    "Deployment": {"spec": {"template": {"spec": POD_SPEC}}},
    "StatefulSet": {"spec": {"template": {"spec": POD_SPEC}}},
    "DaemonSet": {"spec": {"template": {"spec": POD_SPEC}}},
    "ReplicaSet": {"spec": {"template": {"spec": POD_SPEC}}},
    "Job": {"spec": {"template": {"spec": POD_SPEC}}},
    "CronJob": {"spec": {"jobTemplate": {"spec": {"template": {"spec": POD_SPEC}}}}},
}


@pytest.mark.parametrize("kind", WORKLOADS)
def test_workload_templates(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = {"kind": kind, "metadata": {"name": "w", "namespace": "ns"}, **WORKLOADS[kind]}
    assert run(capsys, "check", "-f", write(tmp_path, doc))[0] == 0
    code, out, _ = run(
        capsys,
        "check",
        "-f",
        write(tmp_path, doc),
        "--namespace-labels",
        "netisolate.io/isolation=enforce,team=x",
    )
    assert code == 0, out  # the template is hardened: allowed even under enforce
    doc_root = json.loads(json.dumps(doc))
    node = doc_root["spec"]["jobTemplate"]["spec"] if kind == "CronJob" else doc_root["spec"]
    node["template"]["spec"]["securityContext"] = {}
    code, out, _ = run(
        capsys,
        "check",
        "-f",
        write(tmp_path, doc_root),
        "--namespace-labels",
        "netisolate.io/isolation=enforce",
    )
    assert code == 1 and f"{kind} ns/w: DENIED" in out and "uid-missing" in out


def test_stdin_and_admission_review(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "abc",
            "kind": {"kind": "Namespace"},
            "operation": "UPDATE",
            "userInfo": {"username": "dev", "groups": ["developers"]},
            "object": {"metadata": {"name": "n", "labels": {}}},
            "oldObject": {"metadata": {"name": "n", "labels": {"istio-injection": "enabled"}}},
        },
    }
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(review)))
    code, out, _ = run(capsys, "check", "-f", "-")
    assert code == 1 and "namespace-label-protected" in out


def test_list_kind_expands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    items = [{"kind": "Pod", "metadata": {"name": f"p{i}"}, "spec": POD_SPEC} for i in range(3)]
    code, out, _ = run(capsys, "check", "-f", write(tmp_path, {"kind": "List", "items": items}))
    assert code == 0 and out.count("allowed") == 3


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        ("{not yaml", "not valid YAML"),
        ("", "no Kubernetes object"),
        ("- a\n- b\n", "expected a Kubernetes object"),
        (
            "kind: Pod\nspec: {containers: [{name: a, securityContext: {runAsUser: '1000'}}]}\n",
            r"spec.containers[0].securityContext.runAsUser",
        ),
        ("kind: Pod\nspec: {containers: [{name: 'Bad_Name'}]}\n", "spec.containers[0].name"),
        ("kind: Deployment\nmetadata: {name: d}\nspec: {}\n", "no pod template"),
        ("kind: AdmissionReview\napiVersion: admission.k8s.io/v1\n", "has no request"),
    ],
)
def test_unreadable_input_exits_2_with_a_message(
    content: str, complaint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    code, _, err = run(capsys, "check", "-f", str(path))
    assert code == 2
    assert complaint in err and len(err.strip().splitlines()) == 1


def test_missing_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "check", "-f", "/nonexistent/pod.yaml")
    assert code == 2 and "cannot read" in err


def test_bad_namespace_labels_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["check", "-f", "x", "--namespace-labels", "novalue"])
    assert exc.value.code == 2


def test_render_both_backends(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "render", "-f", str(EXAMPLES / "app-with-proxy.yaml"))
    assert code == 0 and "table inet netisolate {" in out and 'comment "istio-proxy"' in out
    code, out, _ = run(capsys, "render", "-f", str(EXAMPLES / "app-with-proxy.yaml"), "--backend", "iptables")
    assert code == 0 and out.count("*filter") == 2 and "icmp6-adm-prohibited" in out
    code, out, _ = run(capsys, "render", "-f", str(EXAMPLES / "app-with-proxy.yaml"), "--deny-port-forward")
    assert "skuid 0" not in out


def test_render_fail_closed_is_visible(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pod = {
        "kind": "Pod",
        "metadata": {"name": "p", "annotations": {"allow.netisolate.io/app": "http"}},
        "spec": POD_SPEC,
    }
    code, out, _ = run(capsys, "render", "-f", write(tmp_path, pod))
    assert code == 0
    assert "fail closed" in out and "isolation enforce" in out
    grants = out.split("set grants {")[1].split("}")[0]
    assert "elements" not in grants, "no grant may be rendered for a pod that fails closed"


def test_help_teaches_the_annotation_format(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["--help"], ["check", "--help"], ["render", "--help"]):
        with pytest.raises(SystemExit):
            main(args)
        out = capsys.readouterr().out
        assert "allow.netisolate.io/<container>" in out and "15001" in out


# --- fuzz: whatever arrives, the offline path answers or says why -----------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
review_like = st.fixed_dictionaries(
    {"apiVersion": st.just("admission.k8s.io/v1"), "kind": st.just("AdmissionReview")},
    optional={
        "request": st.fixed_dictionaries(
            {},
            optional={
                "uid": json_values,
                "kind": st.one_of(json_values, st.just({"kind": "Pod"}), st.just({"kind": "Namespace"})),
                "operation": json_values,
                "object": json_values,
                "oldObject": json_values,
                "userInfo": json_values,
                "subResource": st.one_of(json_values, st.just("ephemeralcontainers")),
            },
        )
    },
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(review_like, json_values))
def test_reviews_never_raise_anything_but_input_error(doc: Any) -> None:
    try:
        for subject in load_subjects(json.dumps(doc), "fuzz"):
            review_request(subject.request, {}, Config())
    except InputError as err:
        assert str(err).startswith("fuzz") or "(" in str(err)


def test_pods_as_the_api_server_returns_them(capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(__file__).parent / "fixtures" / "pod-from-api.yaml"
    code, out, _ = run(capsys, "check", "-f", str(path))
    assert code == 0, out
    code, out, _ = run(capsys, "render", "-f", str(path))
    assert '1000 . tcp . 15001 comment "app"' in out


# --- issue 16: whole install files, every pod-carrying kind, no tracebacks --------------------

DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "api", "namespace": "shop"},
    "spec": {"template": {"metadata": {"labels": {"app": "api"}}, "spec": POD_SPEC}},
}
SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": "shop"}}
CONFIGMAP = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"a": "b"}}
CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "things.example.com"},
    "spec": {"group": "example.com", "names": {"kind": "Thing"}},
}


def denied_deployment() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(json.dumps(DEPLOYMENT))
    doc["spec"]["template"]["metadata"]["annotations"] = {"netisolate.io/isolation": "enforce"}
    doc["spec"]["template"]["spec"]["securityContext"] = {}
    return doc


def test_install_files_judge_the_workloads_and_name_what_they_skip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, SERVICE, DEPLOYMENT, CONFIGMAP, CRD)
    code, out, err = run(capsys, "check", "-f", path)
    assert code == 0 and err == ""
    assert "Deployment shop/api: allowed" in out
    assert "Service shop/api: skipped (carries no pod)" in out
    assert "ConfigMap cfg: skipped" in out and "CustomResourceDefinition things.example.com: skipped" in out
    code, out, _ = run(capsys, "check", "-f", write(tmp_path, SERVICE, denied_deployment()), "-o", "json")
    result = json.loads(out)
    assert code == 1 and result["allowed"] is False and result["errors"] == []
    assert result["skipped"] == [{"object": "Service shop/api", "reason": "carries no pod"}]
    assert {f["rule"] for f in result["findings"]} >= {"uid-missing"}


def test_a_file_with_no_workload_has_nothing_to_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "check", "-f", write(tmp_path, SERVICE, CONFIGMAP))
    assert code == 0 and "nothing to check" in out
    code, out, _ = run(capsys, "check", "-f", write(tmp_path, SERVICE), "-o", "json")
    assert code == 0 and json.loads(out) == {
        "allowed": True,
        "findings": [],
        "skipped": [{"object": "Service shop/api", "reason": "carries no pod"}],
        "errors": [],
    }


@pytest.mark.parametrize("kind", ["List", "PodList", "DeploymentList", "ConfigMapList"])
def test_every_list_kind_is_read_item_by_item(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items: list[Any] = [
        {"kind": "Pod", "metadata": {"name": "p"}, "spec": POD_SPEC},
        denied_deployment(),
        CONFIGMAP,
    ]
    code, out, _ = run(
        capsys, "check", "-f", write(tmp_path, {"apiVersion": "v1", "kind": kind, "items": items})
    )
    assert code == 1 and "Pod p: allowed" in out and "Deployment shop/api: DENIED" in out
    assert "ConfigMap cfg: skipped" in out
    code, out, _ = run(capsys, "check", "-f", write(tmp_path, {"kind": kind, "items": None}))
    assert code == 0 and "nothing to check" in out


TEMPLATED: dict[str, dict[str, Any]] = {
    "ReplicationController": {"spec": {"template": {"spec": POD_SPEC}}},
    "DeploymentConfig": {"apiVersion": "apps.openshift.io/v1", "spec": {"template": {"spec": POD_SPEC}}},
    "PodTemplate": {"template": {"spec": POD_SPEC}},
    "Rollout": {"apiVersion": "argoproj.io/v1alpha1", "spec": {"template": {"spec": POD_SPEC}}},
}


@pytest.mark.parametrize("kind", TEMPLATED)
def test_more_pod_templates(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc: dict[str, Any] = {"kind": kind, "metadata": {"name": "w", "namespace": "ns"}, **TEMPLATED[kind]}
    code, out, _ = run(capsys, "check", "-f", write(tmp_path, doc))
    assert code == 0 and f"{kind} ns/w" in out and "allowed" in out, out
    template = doc["template"] if kind == "PodTemplate" else doc["spec"]["template"]
    template["spec"] = {**POD_SPEC, "hostNetwork": True}
    code, out, _ = run(
        capsys, "check", "-f", write(tmp_path, doc), "--namespace-labels", "netisolate.io/isolation=enforce"
    )
    assert code == 1 and "host-namespaces" in out


def test_an_empty_helm_block_is_absent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: api
  annotations:
spec:
  template:
    metadata:
      annotations:
      labels:
    spec:
      securityContext:
        runAsUser: 1000
      nodeSelector:
      initContainers:
      volumes:
        - name: scratch
      containers:
        - name: app
          image: app:1
          command:
          ports:
          volumeMounts:
            - {name: scratch, mountPath: /tmp}
          securityContext:
            allowPrivilegeEscalation: false
            capabilities:
              add:
              drop: [ALL]
"""
    path = tmp_path / "helm.yaml"
    path.write_text(text)
    code, _, err = run(capsys, "check", "-f", str(path))
    assert code == 0 and err == "", err


DEEP = 5000


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        ("[" * DEEP + "]" * DEEP, "nest"),
        ('{"a":' * DEEP + "1" + "}" * DEEP, "nest"),
        ("a:\n" + "".join(" " * (i + 1) + "b:\n" for i in range(DEEP)), "nest"),
        ("kind: [Pod]\nspec: {}\n", "kind must be a string"),
        ("kind: Pod\nmetadata: {name: 7}\nspec: {containers: []}\n", "metadata.name must be a string"),
        (
            "kind: Pod\nmetadata: {namespace: [a]}\nspec: {containers: []}\n",
            "metadata.namespace must be a string",
        ),
        ("kind: Pod\nmetadata: [a]\n", "metadata must be a mapping"),
        (
            "kind: Deployment\nmetadata: {name: d}\n"
            "spec: {template: {metadata: [x], spec: {containers: []}}}\n",
            "the pod template's metadata must be a mapping",
        ),
        ("apiVersion: v1\nmetadata: {name: x}\n", "has no kind"),
        ("kind: List\nitems: {a: b}\n", "must be a list"),
        ("kind: Pod\nmetadata:\n  name: x\n bad: indent\n", "line 4"),
    ],
)
def test_bad_input_is_exit_2_with_one_line_never_a_traceback(
    content: str, complaint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    code, out, err = run(capsys, "check", "-f", str(path))
    assert code == 2 and complaint in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in out + err
    code, out, _ = run(capsys, "check", "-f", str(path), "-o", "json")
    result = json.loads(out)
    assert code == 2 and result["allowed"] is False and complaint in result["errors"][0]["message"]


def test_deep_nesting_with_the_pure_python_loader(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inputs, "_LOADER", yaml.SafeLoader)
    path = tmp_path / "deep.json"
    path.write_text("[" * DEEP + "]" * DEEP)
    code, _, err = run(capsys, "check", "-f", str(path))
    assert code == 2 and "nested too deeply" in err


def test_the_c_loader_is_used_where_available() -> None:
    assert not yaml.__with_libyaml__ or inputs._LOADER.__name__ == "CSafeLoader"


def test_anything_unexpected_is_exit_2_with_a_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("netisolate.offline.review_request", broken)
    path = write(tmp_path, DEPLOYMENT)
    code, _, err = run(capsys, "check", "-f", path)
    assert (
        code == 2
        and err.strip()
        == "netisolate check: internal error: RuntimeError: boom second line (please report it)"
    )
    code, out, _ = run(capsys, "check", "-f", path, "-o", "json")
    assert code == 2 and "RuntimeError: boom" in json.loads(out)["errors"][0]["message"]


def test_unreadable_documents_do_not_hide_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, denied_deployment(), {"kind": "Pod", "metadata": {"name": 3}})
    code, out, err = run(capsys, "check", "-f", path)
    assert code == 2 and "Deployment shop/api: DENIED" in out and "document 2" in err


def test_directories_are_read_recursively(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "svc.yaml").write_text(yaml.safe_dump(SERVICE))
    (tmp_path / "a" / "b" / "deploy.yml").write_text(yaml.safe_dump(DEPLOYMENT))
    (tmp_path / "a" / "b" / "pod.json").write_text(
        json.dumps({"kind": "Pod", "metadata": {"name": "p"}, "spec": POD_SPEC})
    )
    (tmp_path / "a" / "empty.yaml").write_text("# placeholder\n")
    (tmp_path / "a" / "README.md").write_text("kind: Pod\n")  # not a manifest suffix
    code, out, _ = run(capsys, "check", "-f", str(tmp_path / "a"), "-o", "json")
    result = json.loads(out)
    assert code == 0 and result["errors"] == []
    assert {s["object"] for s in result["skipped"]} == {
        f"{tmp_path}/a/svc.yaml: Service shop/api",
        f"{tmp_path}/a/empty.yaml",
    }
    (tmp_path / "a" / "b" / "deploy.yml").write_text(yaml.safe_dump(denied_deployment()))
    (tmp_path / "a" / "broken.yaml").write_text("{nope")
    code, out, err = run(capsys, "check", "-f", str(tmp_path / "a"), "-f", str(tmp_path / "a" / "svc.yaml"))
    assert code == 2 and "broken.yaml: not valid YAML" in err
    assert f"{tmp_path}/a/b/deploy.yml: Deployment shop/api: DENIED" in out


# --- fuzz: text that is almost YAML, objects that are almost workloads ------------------------

yaml_ish = st.lists(
    st.sampled_from([*"kind: Pod\n-[]{}&*!|>'\"#%@`,?~0x1.", "  ", "---\n", "spec:", "metadata:"]),
    max_size=60,
).map("".join)
almost_workloads = st.fixed_dictionaries(
    {"kind": st.sampled_from([*TEMPLATED, *WORKLOADS, "Pod", "Namespace", "List", "PodList", "Service"])},
    optional={
        "metadata": json_values,
        "spec": st.one_of(
            json_values,
            st.fixed_dictionaries(
                {}, optional={"template": st.dictionaries(st.sampled_from(["metadata", "spec"]), json_values)}
            ),
        ),
        "template": json_values,
        "items": json_values,
    },
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    text=st.one_of(
        yaml_ish,
        almost_workloads.map(json.dumps),
        st.lists(almost_workloads, max_size=3).map(yaml.safe_dump_all),
    )
)
def test_check_on_anything_answers_with_an_exit_code(
    text: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "in.yaml"
    path.write_text(text)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["check", "-f", str(path), "-o", "json"])
    assert code in (0, 1, 2)
    result = json.loads(out.getvalue())
    assert (code == 2) == bool(result["errors"])
    assert "internal error" not in out.getvalue()


# --- start-up: `check` loads only what it uses (issue 15; bench/bench_check.py measures it) ----

_MODULES_AFTER = """
import sys
from netisolate.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(" ".join(sorted(sys.modules)))
"""


def _modules_after(*args: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", _MODULES_AFTER, *args], capture_output=True, text=True, check=True
    ).stdout
    return set(out.strip().splitlines()[-1].split())


HEAVY = {"aiohttp", "kubernetes", "cryptography", "prometheus_client", "pyroute2", "netisolate.backends"}


def test_check_imports_no_client_server_or_backend_code() -> None:
    loaded = _modules_after("check", "-f", str(EXAMPLES / "app-with-proxy.yaml"))
    assert "netisolate.admission" in loaded
    assert not HEAVY & loaded


def test_check_help_does_not_even_load_pydantic() -> None:
    loaded = _modules_after("check", "--help")
    assert not ({"pydantic", "yaml", "netisolate.model"} | HEAVY) & loaded


# --- the reader builds exactly what PyYAML's safe loader builds --------------------------------


def _built(text: str) -> list[Any]:
    loader = inputs._LOADER(text)
    try:
        nodes: list[yaml.Node] = []
        while loader.check_node():
            node = loader.get_node()
            assert node is not None
            nodes.append(node)
        return [inputs._build(loader, node, {}) for node in nodes]
    finally:
        loader.dispose()


def test_the_fast_builder_matches_the_safe_loader_on_every_corpus_file() -> None:
    corpus = Path(__file__).parent / "corpus"
    for path in sorted(corpus.rglob("*.y*ml")):
        text = path.read_text()
        assert _built(text) == list(yaml.load_all(text, Loader=inputs._LOADER)), path


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(json_values, max_size=3))
def test_the_fast_builder_matches_the_safe_loader(docs: list[Any]) -> None:
    for text in (yaml.safe_dump_all(docs), yaml.safe_dump_all(docs, default_flow_style=True)):
        assert _built(text) == list(yaml.safe_load_all(text))


def test_aliases_merge_keys_and_bombs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = "base: &b {runAsUser: 1000}\nsc: {<<: *b, runAsNonRoot: true}\nsame: *b\n"
    (built,) = _built(text)
    assert built == yaml.safe_load(text) and built["base"] is built["same"]
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8)
    )
    (bomb,) = _built(laughs)  # 10^9 leaves if expanded: shared, as the safe loader shares them
    assert bomb["i"][0] is bomb["i"][1]
    path = tmp_path / "bomb.yaml"
    path.write_text("kind: ConfigMap\nmetadata: {name: x}\ndata:\n  " + laughs.replace("\n", "\n  "))
    assert run(capsys, "check", "-f", str(path))[0] == 0


def test_the_top_level_help_lists_every_command_as_its_module_registers_it() -> None:
    def summaries(parser: argparse.ArgumentParser) -> dict[str, str | None]:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return {action.dest: action.help for action in sub._choices_actions}

    registered = summaries(build_parser())
    assert registered == {name: summary for name, (_, summary) in COMMANDS.items()}
    assert summaries(build_parser(every=False)) == registered
    assert list(registered) == list(COMMANDS)  # the same order


def test_top_level_help_imports_no_command_module() -> None:
    loaded = _modules_after("--help")
    assert not {
        m for m in loaded if m.startswith("netisolate.commands.") and m != "netisolate.commands.common"
    }
    assert not ({"pydantic"} | HEAVY) & loaded


@pytest.mark.parametrize(
    "text",
    [
        # duplicate keys: the last one counts, for the safe loader as for the API server
        "kind: Service\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a, image: a}]}\n",
        # a merge key may bring in what makes it a workload
        "base: &b {spec: {template: {spec: {containers: [{name: a, image: a}]}}}}\n"
        "kind: Rollout\nmetadata: {name: r}\n<<: *b\n",
    ],
)
def test_what_is_skipped_unbuilt_is_what_the_built_document_says(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sneaky.yaml"
    path.write_text(text)
    code, out, _ = run(
        capsys, "check", "-f", str(path), "--namespace-labels", "netisolate.io/isolation=enforce"
    )
    assert code == 1 and "DENIED" in out and "skipped" not in out, out
