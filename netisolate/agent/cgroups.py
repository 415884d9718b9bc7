"""Each container's cgroup (v2) on this node, for cgroup identity, and a watch that says at once
when a pod's cgroups change (a restarted container gets a new one).

Where cgroup v2 is: the first cgroup2 mount of the agent's mount namespace that shows the whole
hierarchy (netisolate.agent.hierarchy). A process's cgroup is found under it by taking the mount's
root from the process's cgroup path, and its level is its depth below the hierarchy's root.

Which cgroup is whose: a pod's containers' cgroups are the children of the pod's cgroup (the
sandbox's parent), each named after its container's ID (`<id>`, `cri-containerd-<id>.scope`,
`crio-<id>.scope`). Two sources say which ID is which container:

- the runtime's own record, at once: the OCI bundle of the container, whose annotations name the
  container and its pod (`io.kubernetes.cri.container-name` and `…sandbox-uid` for containerd,
  `io.kubernetes.container.name` and `io.kubernetes.pod.uid` for CRI-O). It is found from the
  first process of the new cgroup: its parent (`runc`, then the shim or conmon once runc exits)
  runs in the bundle, or next to it (containerd's shim serves a whole pod from the sandbox's
  bundle, beside which each container's lies). The files are the runtime's, out of the
  containers' reach; the pod UID in them must be the pod's.
- the pod's `containerStatuses`, which the kubelet posts a moment (or seconds) later.

The watch fires when a container's cgroup appears and again when its first process joins it
(`cgroup.events` changes), which is before the runtime starts the container's command: a
restarted container's grants are usually in place when it starts. A cgroup neither source names
yet belongs to nobody: its container is refused until the agent knows it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable

from netisolate.agent.discovery import MIRROR_ANNOTATION
from netisolate.agent.hierarchy import IN_CREATE, IN_DELETE, IN_MODIFY, Mount, Watch, below, v2_mounts
from netisolate.backends.blind import CGROUP_ROOT
from netisolate.model import Pod
from netisolate.rules import Cgroup, PodCgroups

log = logging.getLogger(__name__)


def v2_path(proc_cgroup: str) -> str | None:
    """The cgroup v2 path of a /proc/PID/cgroup file (its `0::` line)."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def container_ids(pod: Pod) -> dict[str, str]:
    """{container name: runtime ID} from the pod's statuses (`containerd://<id>`)."""
    status = pod.status
    if status is None:
        return {}
    every = [
        *status.init_container_statuses,
        *status.container_statuses,
        *status.ephemeral_container_statuses,
    ]
    return {s.name: s.container_id.split("://", 1)[-1] for s in every if s.container_id}


def named(entries: list[str], ids: dict[str, str]) -> dict[str, str]:
    """{container name: its cgroup directory's name} for the IDs a directory name carries whole."""
    found = {}
    for name, cid in ids.items():
        if len(cid) < 12:  # a short or empty ID could name someone else's cgroup
            continue
        for entry in entries:
            if entry == cid or entry.endswith((f"-{cid}.scope", f"-{cid}")):
                found[name] = entry
    return found


_RUNTIME_ID = re.compile(r"^(?:[a-z-]+-)?([0-9a-f]{64})(?:\.scope)?$")
_NAME_KEYS = ("io.kubernetes.cri.container-name", "io.kubernetes.container.name")
_POD_KEYS = ("io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid")


def runtime_id(entry: str) -> str | None:
    """The container ID a cgroup directory is named after (`<id>`, `cri-containerd-<id>.scope`)."""
    match = _RUNTIME_ID.match(entry)
    return match[1] if match else None


def bundle_name(annotations: dict[str, object], pod_uids: set[str]) -> str | None:
    """The container a bundle's annotations name, when they name one of the given pod."""
    name = next((a for k in _NAME_KEYS if isinstance(a := annotations.get(k), str)), None)
    pod = next((a for k in _POD_KEYS if isinstance(a := annotations.get(k), str)), None)
    return name if name and pod in pod_uids else None


def _parent(proc: str, pid: int) -> int | None:
    try:
        with open(f"{proc}/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def runtime_name(cgroup_dir: str, pod_uids: set[str], proc: str = "/proc") -> str | None:
    """The container a new cgroup holds, from its runtime bundle (see above): None while its first
    process has not joined it yet or no bundle is found, "" when its bundle names no container of
    the pod (the sandbox's own cgroup)."""
    cid = runtime_id(os.path.basename(cgroup_dir))
    try:
        with open(os.path.join(cgroup_dir, "cgroup.procs")) as procs:
            pids = [int(line) for line in procs.read().split() if line.isdigit()]
    except OSError:
        return None
    if cid is None:
        return ""
    for first in pids:  # runc's intermediate processes come and go: try each
        pid: int | None = first
        for _ in range(3):  # runc, then the shim (or conmon)
            pid = _parent(proc, pid) if pid else None
            if not pid:
                break
            found = _bundle(proc, pid, cid, pod_uids)
            if found is not None:
                return found
    return None  # no bundle found (yet): the statuses may still say


def _bundle(proc: str, pid: int, cid: str, pod_uids: set[str]) -> str | None:
    """What the bundle of container `cid` in or beside process pid's working directory says."""
    for candidate in (f"{proc}/{pid}/cwd/config.json", f"{proc}/{pid}/cwd/../{cid}/config.json"):
        try:
            with open(candidate) as bundle:
                config = json.load(bundle)
        except (OSError, ValueError):
            continue
        annotations = config.get("annotations") if isinstance(config, dict) else None
        same = isinstance(config, dict) and cid in str(config.get("linux", {}).get("cgroupsPath", ""))
        if isinstance(annotations, dict) and same:
            return bundle_name(annotations, pod_uids) or ""
    return None


class NodeCgroups:
    """The node's cgroup v2 hierarchy as the agent sees it, and the watch on pods' cgroups."""

    def __init__(
        self,
        sandbox_cgroup: Callable[[Pod], str | None],
        mountinfo: str = "/proc/self/mountinfo",
        proc_root: str = "/proc",
    ) -> None:
        self.sandbox_cgroup = sandbox_cgroup  # the pod's sandbox's cgroup path, from /proc
        self.proc_root = proc_root
        self._named: dict[str, str] = {}  # cgroup directory -> container, as its bundle says
        self._unnamed: set[str] = set()  # pod UIDs with a cgroup in use that nobody names yet
        self.mount: Mount | None = None
        self.reason = ""
        try:
            with open(mountinfo) as info:
                mounts = v2_mounts(info.read())
        except OSError as err:
            mounts, self.reason = [], f"cannot read {mountinfo}: {err.strerror}"
        self.mount = next((mount for mount in mounts if mount.whole), None)
        if self.mount is None and not self.reason:
            self.reason = (
                "no cgroup v2 hierarchy is mounted whole in the agent's mount namespace "
                f"(cgroup2 mounts: {[m.point for m in mounts] or 'none'}); mount the node's "
                "/sys/fs/cgroup (or /sys/fs/cgroup/unified) into the agent"
            )
        self._watch = Watch("cgroup-watch")

    def unavailable(self) -> str | None:
        return None if self.mount else self.reason

    def on_change(self, callback: Callable[[str], None]) -> None:
        """callback(pod UID) whenever a watched pod's container cgroups come or go."""
        self._watch.callback = callback

    def seen(self, pod: Pod) -> PodCgroups | None:
        """The pod's cgroups, or None when its sandbox's cgroup is not in the hierarchy we see.
        Starts watching the pod's cgroup."""
        sandbox_cgroup = self.sandbox_cgroup(pod)
        if self.mount is None or sandbox_cgroup is None:
            return None
        parts = below(sandbox_cgroup, self.mount.root)
        if not parts or len(parts) < 2:
            return None
        pod_dir = os.path.join(self.mount.point, *parts[:-1])
        uid = pod.metadata.uid or pod.ref
        self._watch.add(uid, pod_dir, IN_CREATE | IN_DELETE)
        try:
            entries = [e.name for e in os.scandir(pod_dir) if e.is_dir(follow_symlinks=False)]
            pod_cgroup = self.cgroup_of(pod_dir)
            statuses = named(entries, container_ids(pod))
            by_name = {name: os.path.join(pod_dir, entry) for name, entry in statuses.items()}
            by_name.update(self._from_bundles(pod, uid, pod_dir, entries))
            self._note_unnamed(uid, pod_dir, entries, set(by_name.values()))
            containers = {name: self.cgroup_of(directory) for name, directory in by_name.items()}
        except FileNotFoundError:
            return None
        return PodCgroups(len(parts), pod_cgroup, tuple(sorted(containers.items())))

    def _from_bundles(self, pod: Pod, uid: str, pod_dir: str, entries: list[str]) -> dict[str, str]:
        """{container: cgroup directory} as the runtime's bundles say; a new cgroup is watched until
        its first process joins (only then can its bundle be found)."""
        names = {c.name for c in pod.all_containers()}
        pod_uids = {u for u in (pod.metadata.uid, pod.metadata.annotations.get(MIRROR_ANNOTATION)) if u}
        found = {}
        directories = [os.path.join(pod_dir, entry) for entry in entries]
        for directory in directories:
            name = self._named.get(directory)
            if name is None and (name := runtime_name(directory, pod_uids, self.proc_root)) is not None:
                self._named[directory] = name
            if name is None:
                self._watch.add(uid, directory, IN_MODIFY)  # cgroup.events: its first process joined
            elif name in names:  # "" (nobody) is never a container's name
                found[name] = directory
        gone = [d for d in self._named if os.path.dirname(d) == pod_dir and d not in directories]
        for directory in gone:  # removed cgroups (restarted containers)
            del self._named[directory]
        return found

    def _note_unnamed(self, uid: str, pod_dir: str, entries: list[str], known: set[str]) -> None:
        """Whether some cgroup of the pod has processes but no name yet (its bundle was not found
        in the instant its first process joined): then the pod is looked at again shortly."""
        for entry in entries:
            directory = os.path.join(pod_dir, entry)
            if directory not in known and self._named.get(directory) is None and _populated(directory):
                self._unnamed.add(uid)
                return
        self._unnamed.discard(uid)

    def unnamed(self, pod: Pod) -> bool:
        return (pod.metadata.uid or pod.ref) in self._unnamed

    def forget(self, uid: str) -> None:
        self._unnamed.discard(uid)
        self._watch.remove(uid)
        self._named = {d: n for d, n in self._named.items() if os.path.isdir(d)}

    @staticmethod
    def cgroup_of(directory: str) -> Cgroup:
        """A cgroup's ID is its directory's inode number; nft finds it under /sys/fs/cgroup."""
        return Cgroup(os.stat(directory).st_ino, os.path.relpath(directory, CGROUP_ROOT))


def _populated(directory: str) -> bool:
    try:
        with open(os.path.join(directory, "cgroup.procs")) as procs:
            return bool(procs.read(1))
    except OSError:
        return False
