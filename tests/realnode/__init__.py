"""A real Kubernetes node on this machine, for tests: containerd 1.6 with its CRI plugin, runc and
the CNI bridge plugin, driven as the kubelet drives them. No registry, no cluster: the images are
built here, the API server is the kmock stand-in (tests/kube_standin.py).

Run only these tests:  sudo bash scripts/bootstrap.sh test -m realnode
(bootstrap installs containerd, runc, containernetworking-plugins, busybox-static and gcc, and
generates the CRI stubs from cri.proto; then `sudo .venv/bin/pytest -m realnode` also works.)

Modules:
- node.py     `RealNode`: containerd with its own config, root, state and socket in a temp dir
              (cgroupfs driver, pods' netns mounted under the state dir, runc's Root there too),
              CNI bridge `ni-realnode0` + host-local, dual stack on 198.18.0.0/24 and
              fd00:198:18::/64, no masquerade, no default route in pods; `close()` leaves the
              machine as it was, also after a failure or a SIGKILLed containerd (`MachineState`
              and `leftovers()` say what is left). `real_node()` = start + close under the lock.
- images.py   the `pause` (static C, pause.c) and `toolbox` (busybox + socat) OCI images,
              imported with `ctr -n k8s.io images import`; `RealNode.import_image` takes more.
- cri.py      `RuntimeClient`: the runtime.v1 RuntimeService calls we use (cri.proto holds our
              subset of k8s.io/cri-api's api.proto, with its field numbers).
- kubelet.py  `Kubelet`: runs the pods kmock holds for the node (`sync()`), with each container's
              runAsUser, no_new_privs, capabilities and RuntimeDefault seccomp, writes their
              status back (podIPs, containerd://<id>, restartCount); restarts a container,
              recreates a sandbox, deletes a pod; `exec()` is CRI ExecSync.
- pods.py     the shared scenarios' pods bound to the node (`scenario_pod`), and `mismatches`
              between a measured matrix and a scenario's expectation.
- probe.py    connections from inside containers (ExecSync, as the container's UID) to every
              loopback and pod address: the matrix of the shared scenarios.

In a test (fixtures in tests/conftest.py):

    pytestmark = pytest.mark.realnode

    async def test_it(kubelet: Kubelet, kmock: Any) -> None:   # `node` is the RealNode under it
        put(kmock, "v1/pods", pods.scenario_pod("app-proxy-rogue"))  # bound to pods.NODE_NAME
        [pod] = await asyncio.to_thread(kubelet.sync)
        result = await asyncio.to_thread(kubelet.exec, pod, "app", ["id", "-u"])

`node` is module-scoped: one containerd per test module (about 3 s to start with its images).
To chain another CNI plugin, copy its binary into `node.cni_bin` and call
`node.write_conflist([{"type": "my-plugin", ...}])`: the conflist is replaced atomically and the
call returns once containerd has loaded it.

Only one real node runs on the machine at a time: `real_node()` (and so the fixture) holds an
flock on /run/lock/netisolate-realnode.lock ($NETISOLATE_REALNODE_LOCK) for the node's life; a
concurrent test run waits for it (saying who holds it; the wait is not counted against the test's
timeout). Inside one process a second node is refused (it would share the bridge and the subnet).

Pitfalls found on this machine, handled here: root has no CAP_SYS_RESOURCE (so
`restrict_oom_score_adj`); PID 1 is not systemd (cgroupfs driver) and reaps orphans late (teardown
waits for killed processes to vanish); containerd 1.6 hard-codes /run/containerd/s (shim sockets)
and /var/lib/cni (CNI result cache); the bridge plugin turns on IP forwarding; a pod's IPv6
addresses are `tentative` for a moment after the sandbox starts (the kubelet waits for DAD).
"""

from pathlib import Path


def _generate_stubs() -> None:
    """cri_pb2*.py from cri.proto (scripts/bootstrap.sh does this at set-up; here too when they
    are missing or older than the .proto, so a plain `pytest` after a pull works)."""
    proto = Path(__file__).with_name("cri.proto")
    generated = proto.with_name("cri_pb2_grpc.py")
    if generated.exists() and generated.stat().st_mtime >= proto.stat().st_mtime:
        return
    from grpc_tools import protoc

    root = proto.parents[2]
    outputs = [f"--{kind}_out={root}" for kind in ("python", "pyi", "grpc_python")]
    if protoc.main(["protoc", f"-I{root}", *outputs, str(proto)]) != 0:
        raise ImportError(f"could not compile {proto}: run `sudo bash scripts/bootstrap.sh test`")


_generate_stubs()
