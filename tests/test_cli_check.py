"""`netisolate check` and `render` as a user runs them: input forms, output shapes, exit codes."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netisolate.admission import review_request
from netisolate.cli import main
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
    assert set(result) == {"allowed", "findings"} and result["allowed"] is False
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
        ("kind: Service\nmetadata: {name: s}\n", "cannot check kind 'Service'"),
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
    assert complaint in err


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
    assert "fail closed" in out and "isolation enforce" in out and "dport" not in out.split("skuid 0")[1]


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
    assert 'meta skuid 1000 tcp dport 15001 accept comment "app"' in out
