"""The agent's answers to the CNI plugin, and the plugin's set-up on the node.

ADD: the pod is taken from the watch's cache (or read from the API server when the watch has not
delivered it yet), its namespace's labels likewise, and the reconciler enforces the sandbox's
network namespace at once; the answer is `ok` only once the rules hold, or the pod is not
isolated. Whatever stands in the way (the pod cannot be read, the rules cannot be installed)
fails the ADD with what to do: the runtime retries the sandbox, and none of the pod's containers
has run. DEL always succeeds. CHECK reads the rules back.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from netisolate.agent.cni_conf import Chain, install_binary
from netisolate.agent.cni_server import Answer, CniServer, Then
from netisolate.agent.discovery import MIRROR_ANNOTATION
from netisolate.agent.reconcile import Reconciler
from netisolate.agent.state import PodState
from netisolate.cni import conflist, protocol
from netisolate.cni.options import CniOptions
from netisolate.kube import Reader, resource_path
from netisolate.model import InputError, Pod, parse_pod
from netisolate.netns import NetNS
from netisolate.policy import Level, pod_policy

log = logging.getLogger(__name__)
REQUESTS = Counter("netisolate_cni_requests_total", "CNI calls answered", ["command", "outcome"])
SECONDS = Histogram(
    "netisolate_cni_seconds",
    "Time from a CNI call's arrival to the agent's answer",
    ["command"],
    buckets=(0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
API_TIMEOUT_S = 5.0


class RefusalError(Exception):
    """An ADD that must fail: the CNI code and the message the runtime shows."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class CniHandler:
    def __init__(self, reconciler: Reconciler, core: Reader, api_timeout: float = API_TIMEOUT_S) -> None:
        self.reconciler, self.core, self.api_timeout = reconciler, core, api_timeout

    def __call__(self, request: protocol.Request, ns: NetNS | None) -> Answer:
        started, then = time.perf_counter(), None
        try:
            reply, then = self._answer(request, ns)
        except RefusalError as refusal:
            log.warning("sandbox refused", extra={"pod": str(request.pod), "reason": str(refusal)})
            reply = protocol.failure(refusal.code, str(refusal), request.cni_version)
        except Exception as err:  # whatever it is, the runtime gets an answer and the pod waits
            log.exception("CNI call failed", extra={"pod": str(request.pod)})
            reply = protocol.failure(
                protocol.E_TRY_AGAIN,
                f"netisolate: pod {request.pod}: the agent failed ({err}); the runtime retries; "
                "see the agent's log on this node",
                request.cni_version,
            )
        if request.command == "DEL":
            reply = protocol.OK  # DEL never fails
        REQUESTS.labels(request.command, "ok" if reply == protocol.OK else "fail").inc()
        SECONDS.labels(request.command).observe(time.perf_counter() - started)
        return Answer(reply, then)

    def _answer(self, request: protocol.Request, ns: NetNS | None) -> tuple[bytes, Then | None]:
        """The reply, and what is left to do once it is sent."""
        ref = request.pod
        if request.command == "DEL":
            uid = ref.uid or self._cached_uid(ref)
            self.reconciler.release_sandbox(uid, request.container_id, ns.inode if ns else None)
            return protocol.OK, None
        if ns is None:
            raise RefusalError(protocol.E_ENV, f"netisolate: pod {ref}: the plugin sent no network namespace")
        if request.command == "CHECK":
            problems = self.reconciler.check_sandbox(ref.uid or self._cached_uid(ref), ns.inode)
            if problems:
                raise RefusalError(protocol.E_TRY_AGAIN, f"netisolate: pod {ref}: " + "; ".join(problems[:5]))
            return protocol.OK, None
        pod = self._pod(ref)
        self._namespace_labels(pod, ref)
        handover = self.reconciler.hand_over(pod, ns.dup(), request.container_id)
        if handover.ready:  # the rules hold (or none are due): answer now, bookkeeping after
            return protocol.OK, lambda: self._admitted(ref, *self.reconciler.take_over(handover))
        state, detail = self.reconciler.take_over(handover)
        if state is not PodState.PENDING and state is not PodState.FAILED:
            self._admitted(ref, state, detail)
            return protocol.OK, None
        raise RefusalError(
            protocol.E_TRY_AGAIN,
            f"netisolate: pod {ref}: its rules could not be installed ({detail or state}), so its "
            "sandbox does not start; the runtime retries. See the pod's events and the agent's log",
        )

    @staticmethod
    def _admitted(ref: protocol.PodRef, state: PodState, detail: str) -> None:
        log.info("sandbox admitted", extra={"pod": str(ref), "state": state, "detail": detail})

    def _cached_uid(self, ref: protocol.PodRef) -> str:
        """The UID of the pod by that name the agent holds (or was handed, not taken over yet)."""
        with self.reconciler.lock:
            held = [(uid, t.pod) for uid, t in self.reconciler.pods.items()]
            held += [(uid, h.pod) for uid, h in self.reconciler.handovers.items()]
            for uid, pod in held:
                meta = pod.metadata
                if (meta.namespace or "default", meta.name) == (ref.namespace, ref.name):
                    return uid
        return ""

    def _pod(self, ref: protocol.PodRef) -> Pod:
        """The pod the sandbox is for: the watch's copy, else the API server's."""
        tracked = self.reconciler.pods.get(ref.uid) if ref.uid else None
        if tracked is not None:
            return tracked.pod
        try:
            path = resource_path("v1", "pods", ref.namespace, ref.name)
            pod = parse_pod(self.core.get(path, timeout=self.api_timeout), f"pod {ref}")
        except InputError as err:
            raise RefusalError(protocol.E_TRY_AGAIN, f"netisolate: {err}") from None
        except Exception as err:
            status = getattr(err, "status", None)
            what = "not found" if status == 404 else f"unreadable ({status or err})"
            raise RefusalError(
                protocol.E_TRY_AGAIN,
                f"netisolate: pod {ref} is {what} on the API server, so whether it is isolated is "
                "unknown and its sandbox does not start; the runtime retries. Check the agent's API "
                "access (its log on this node)",
            ) from None
        uids = {pod.metadata.uid, pod.metadata.annotations.get(MIRROR_ANNOTATION)}
        if ref.uid and ref.uid not in uids:
            raise RefusalError(
                protocol.E_TRY_AGAIN,
                f"netisolate: the API server holds another pod {ref} (uid {pod.metadata.uid}) than the "
                f"one this sandbox is for (uid {ref.uid}); the runtime retries",
            )
        return pod

    def _namespace_labels(self, pod: Pod, ref: protocol.PodRef) -> None:
        """The namespace's labels may raise the pod's isolation: known before deciding, unless the
        pod's own annotation already asks for the most (no label can lower it)."""
        name = pod.metadata.namespace or "default"
        if name in self.reconciler.namespaces or pod_policy(pod, {}).level is Level.ENFORCE:
            return
        try:
            namespace = self.core.get(resource_path("v1", "namespaces", name=name), timeout=self.api_timeout)
            labels = (namespace.get("metadata") or {}).get("labels") or {}
        except Exception as err:
            raise RefusalError(
                protocol.E_TRY_AGAIN,
                f"netisolate: pod {ref}: namespace {name} is unreadable on the API server "
                f"({getattr(err, 'status', None) or err}); its label may isolate the pod, so the "
                "sandbox does not start; the runtime retries",
            ) from None
        self.reconciler.set_namespace(name, {str(k): str(v) for k, v in labels.items()})


@dataclass
class CniService:
    server: CniServer
    chain: threading.Thread

    def close(self) -> None:
        """Stop answering (the chain's thread ends with the agent's stop event)."""
        self.server.shutdown()
        self.server.server_close()


def start(options: CniOptions, reconciler: Reconciler, core: Reader, stop: threading.Event) -> CniService:
    """Serve first, then install the binary, then chain it: the plugin never runs before the
    agent can answer it."""
    server = CniServer(options.socket, CniHandler(reconciler, core))
    server.start()
    install_binary(options.plugin, options.bin_dir)
    entry = conflist.plugin_entry(str(options.socket), options.exempt_namespaces, options.timeout_seconds)
    chain = Chain(options.conf_dir, entry)
    chain.ensure()  # at once where the node's CNI is there already; the watch keeps it so
    log.info("CNI plugin served", extra={"socket": str(options.socket), "conf_dir": str(options.conf_dir)})
    return CniService(server, chain.start(stop))
