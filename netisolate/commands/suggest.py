"""`netisolate suggest`: the grants that would allow what the agents saw, and how to apply them."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from netisolate.commands.common import add_command, port
from netisolate.kube import EventReader, api_client, resource_path
from netisolate.learning import EVENT_REASON, Observed, commands, parse_summary, suggested, workload
from netisolate.model import InputError, parse_pod
from netisolate.policy import Protocol, pod_policy

METRICS_PORT = 9808  # the agent's default --metrics-port
DETAILS = f"""\
The agent records, per pod, which container opened which loopback port that no grant allows: at
`audit` what enforcement would refuse, at `enforce` what was refused. This prints, for each pod
where something was seen, the `allow.netisolate.io/*` annotations that allow exactly that on top of
its current grants, the `kubectl annotate` that applies them to the running pod (the agent acts on
it at once) and, for a pod made by a workload, the `kubectl patch` of its template.

Sources:
  --from agent    this node's agent (/status on 127.0.0.1:--metrics-port): run it on the node
  --from events   the agents' {EVENT_REASON} events, cluster-wide (or -n NAMESPACE); the
                  newest event of each pod counts. Credentials as kubectl finds them
  --from metrics  a Prometheus text page (--url: an agent's /metrics, or a federation endpoint
                  that carries netisolate_observed_connections); the pods' current grants are read
                  from the API server

  netisolate suggest                          # on a node
  netisolate suggest --from events --enforce  # and switch the pods to enforce
"""


@dataclass(frozen=True)
class Suggestion:
    pod: str  # namespace/name
    annotations: dict[str, str]
    owner: str
    seen: str  # what was observed, as the source tells it


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(sub, "suggest", "print the grants that allow what a pod was seen doing", DETAILS)
    parser.add_argument("--from", dest="source", choices=("agent", "events", "metrics"), default="agent")
    parser.add_argument(
        "--metrics-port", type=port, default=METRICS_PORT, help="the agent's (default %(default)s)"
    )
    parser.add_argument("--url", help="--from metrics: the page to read (default: this node's agent)")
    parser.add_argument("--kubeconfig", metavar="FILE", help="--from events/metrics: credentials")
    parser.add_argument("-n", "--namespace", help="only this namespace (default: all)")
    parser.add_argument(
        "--enforce", action="store_true", help="also switch the pods to netisolate.io/isolation: enforce"
    )
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    parser.set_defaults(run=run)


def _get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body: bytes = response.read()
            return body
    except (urllib.error.URLError, OSError) as err:
        raise InputError(f"cannot read {url}: {err}; is the agent running (netisolate status)?") from None


def from_agent(port_: int) -> list[Suggestion]:
    status = json.loads(_get(f"http://127.0.0.1:{port_}/status"))
    return [
        Suggestion(
            pod["pod"],
            pod["suggest"],
            pod.get("owner", ""),
            ", ".join(
                f"{o['container']}→{o['port']}/{o['protocol']} x{o['connections']}" for o in pod["observed"]
            ),
        )
        for pod in status["pods"]
        if pod.get("suggest")
    ]


def _api(kubeconfig: str | None) -> EventReader:
    return api_client(kubeconfig, "netisolate-suggest")


def from_events(kubeconfig: str | None, namespace: str | None) -> list[Suggestion]:
    path = resource_path("v1", "events", namespace)
    listed = _api(kubeconfig).list(path, field_selector=f"reason={EVENT_REASON}")
    newest: dict[str, dict[str, Any]] = {}
    for event in listed.items:
        obj = event.get("involvedObject") or {}
        if event.get("reason") != EVENT_REASON or obj.get("kind") != "Pod":
            continue  # a server that ignores the field selector (and the API stand-in) sends all
        key = f"{obj.get('namespace')}/{obj.get('name')}"
        when = str(event.get("lastTimestamp") or event.get("eventTime") or "")
        if key not in newest or when >= str(newest[key].get("lastTimestamp") or ""):
            newest[key] = event
    found = []
    for key, event in sorted(newest.items()):
        message = str(event.get("message", ""))
        annotations, owner = parse_summary(message)
        if annotations:
            found.append(Suggestion(key, annotations, owner, message.partition("; to allow: ")[0]))
    return found


def _samples(text: str) -> Iterable[tuple[dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.name == "netisolate_observed_connections":
            for sample in family.samples:
                yield sample.labels, sample.value


def from_metrics(url: str, kubeconfig: str | None, namespace: str | None) -> list[Suggestion]:
    seen: dict[str, dict[Observed, int]] = {}
    for labels, value in _samples(_get(url).decode()):
        if namespace and labels.get("namespace") != namespace:
            continue
        protocol: Protocol = "udp" if labels.get("protocol") == "udp" else "tcp"
        o = Observed(labels.get("container", ""), protocol, int(labels.get("port", "0")))
        seen.setdefault(f"{labels.get('namespace')}/{labels.get('pod')}", {})[o] = int(value)
    api = _api(kubeconfig) if seen else None
    found = []
    for key, observed in sorted(seen.items()):
        ns, _, name = key.partition("/")
        assert api is not None
        pod = parse_pod(api.get(resource_path("v1", "pods", ns, name)), key)
        current = {c.name: c.grants for c in pod_policy(pod, {}).containers}
        owner = workload(pod)
        found.append(
            Suggestion(
                key,
                suggested(current, observed),
                f"{owner[0]}/{owner[1]}" if owner else "",
                ", ".join(f"{o} x{n}" for o, n in sorted(observed.items())),
            )
        )
    return found


def run(args: argparse.Namespace) -> int:
    if args.source == "agent":
        found = from_agent(args.metrics_port)
    elif args.source == "events":
        found = from_events(args.kubeconfig, args.namespace)
    else:
        found = from_metrics(
            args.url or f"http://127.0.0.1:{args.metrics_port}/metrics", args.kubeconfig, args.namespace
        )
    if args.namespace:
        found = [s for s in found if s.pod.startswith(f"{args.namespace}/")]
    rows = [
        {
            "pod": s.pod,
            "seen": s.seen,
            "annotations": s.annotations,
            "commands": commands(
                *s.pod.split("/", 1), annotations=s.annotations, owner=s.owner, enforce=args.enforce
            ),
        }
        for s in found
    ]
    if args.output == "json":
        print(json.dumps({"pods": rows}, indent=2))
        return 0
    if not rows:
        print("nothing observed that the grants do not allow", file=sys.stderr)
    for row in rows:
        print(f"# {row['pod']}: {row['seen']}")
        for command in row["commands"]:
            print(command)
    return 0
