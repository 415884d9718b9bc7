"""Presets: the grants a service mesh or sidecar runtime needs, by name, so that nobody has to
know its ports to isolate a pod that runs it. Pure data; `netisolate.policy` expands them.

    netisolate.io/preset: istio            (or several: "istio, dapr")

A preset names its sidecar container. Every other regular container, and every native sidecar,
may reach the sidecar's `capture` ports; the sidecar may reach its `own` ports (one process of it
calls another over loopback) and every port the other containers declare (`containerPort`), which
is where it delivers inbound traffic. Where the sidecar is not in the pod (not injected), the
preset grants nothing. Preset grants add to the hand-written `allow.netisolate.io/*` ones and are
rendered, checked and enforced exactly like them.
"""

from __future__ import annotations

from dataclasses import dataclass

PRESET_KEY = "netisolate.io/preset"


@dataclass(frozen=True)
class Preset:
    sidecar: str  # the container name the injector gives it
    capture: str  # grant syntax: what the other containers reach on the sidecar
    own: str  # grant syntax: the sidecar's own ports it calls over loopback
    why: str


PRESETS = {
    "istio": Preset(
        "istio-proxy",
        "15001, 15053, 15053/udp",
        "15000, 15090",
        "15001 is where the outbound capture delivers every connection the app opens, 15053 the "
        "agent's DNS proxy (DNS capture); pilot-agent reads Envoy's admin (15000) and stats (15090)",
    ),
    "linkerd": Preset(
        "linkerd-proxy",
        "4140",
        "4191",
        "4140 is the proxy's outbound capture port; linkerd-await, in the proxy, polls its admin port 4191",
    ),
    "dapr": Preset(
        "daprd",
        "3500, 50001",
        "",
        "the app calls daprd's HTTP (3500) and gRPC (50001) APIs; daprd calls the app on the port "
        "it declares (dapr.io/app-port should be a declared containerPort)",
    ),
}
