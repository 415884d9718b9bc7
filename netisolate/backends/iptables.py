"""iptables (legacy tables, IPv4 and IPv6): our own chains, jumped to first from OUTPUT.

The whole filter table is committed in one replace (a reader never sees half a chain), and chains
and policies we do not own are never touched; the jumps are kept unique and first in the same
commit. Written in-process where the table is a new one, else by `iptables-legacy-restore
--noflush`, where declaring our chains flushes only them.

A namespace the runtime has just created holds nothing in its filter table but the built-in
chains' policies. That table is written from this process (`xtables`: the kernel's own
IPT_SO_SET_REPLACE, the entries packed as libiptc packs them), with no exec at all: this is a
sandbox's CNI ADD (but a user-namespaced pod's, below), where two tool execs were most of the
wait. Every other table goes to the tools, which keep everyone's rules: knowing OUTPUT first is
what keeps the jumps unique and first (a re-apply deletes the old ones). The kernel's entries
say, without a tool, whether OUTPUT holds no rule or exactly our jumps first and none after
(`known_outputs`, the usual changed policy); only otherwise does a `-save` run in front.

Both ways, IPv4 commits last (the gate probes the IPv4 sentinel: once it answers, ::1 is guarded
too). With the tools, the two families load at once: iptables-restore is sent all of its document
but the final COMMIT while ip6tables-restore runs, and the COMMIT once IPv6 is in, so the two
execs, their loading and parsing overlap. Each family takes a lock file of ours
(XTABLES_LOCKFILE), not the node's /run/xtables.lock: legacy tables are per network namespace and
only we write a pod's filter table, so the node's lock would only serialise the two families and
put a sandbox's CNI ADD behind whoever writes the node's own tables (kube-proxy's restores of a big
node take seconds). The in-process writer takes the same lock files, with the same timeout.

A user-namespaced pod (`hostUsers: false`) owns its network namespace through its user namespace,
and the kernel's owner match takes UIDs only from a writer inside that user namespace. There the
tools run as its root (`nsenter --user`), never this process; the lock files are readable by it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from netisolate.backends import xtables
from netisolate.backends.base import EnforceError, Inspection, checked, run_tool, tool_command
from netisolate.netns import NetNS, NetNSError
from netisolate.rules import RuleSet
from netisolate.rules.iptables import (
    CHAIN,
    DENY_CHAIN,
    REFUSE_CHAIN,
    Family,
    chain_rules,
    chains,
    document,
    jump_rules,
    jumps,
    jumps_in_place,
)
from netisolate.rules.xtables import (
    HOOKS,
    LOCAL_OUT,
    SUPPORTED,
    VALID_HOOKS,
    LayoutError,
    builtin_policies,
    jumps_first,
    table,
)

log = logging.getLogger(__name__)

_TOOLS: dict[Family, str] = {4: "iptables-legacy", 6: "ip6tables-legacy"}
_DENY_COUNTER = re.compile(rf"^\[(\d+):\d+\] -A {REFUSE_CHAIN} (.*)-g {DENY_CHAIN}$")
_COMMENT = re.compile(r"-m comment --comment (\S+)")
_COUNTERS = re.compile(r"^\[\d+:\d+\] ")
_COMMIT = "COMMIT\n"
# Seconds each tool may take, its lock wait included, before it is killed and the write fails (and
# is retried). Ours, not `--wait=N`: the tool's alarm would also cut IPv4 short while it waits for
# its COMMIT (it is not cancelled once the lock is held, and ends the read of stdin).
_TOOL_TIMEOUT_S = 10.0
_FAMILIES: tuple[Family, ...] = (6, 4)  # the order of the writes: IPv4 last


def _tool(ns: NetNS, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """A tool that only reads (`-save` takes no lock), as the namespace's owner."""
    with _owner(ns, argv[0]) as owner:
        return run_tool(ns, argv, user_ns=owner)


@contextlib.contextmanager
def _owner(ns: NetNS, tool: str) -> Iterator[int | None]:
    """The user namespace (an fd) a tool must run in to write the namespace's rules, or None."""
    try:
        owner = ns.foreign_owner()
    except (NetNSError, OSError) as err:
        raise EnforceError(f"cannot run {tool} in {ns.path}: {err}") from None
    try:
        yield owner
    finally:
        if owner is not None:
            os.close(owner)


def _restore(ns: NetNS, documents: Mapping[Family, str], what: str) -> None:
    """Load each family's `-restore` document, both at once, IPv4's COMMIT only after IPv6's
    tool succeeded (the module's docstring says why); raises EnforceError naming `what`."""
    with _owner(ns, _TOOLS[4]) as owner:
        commands = {
            family: tool_command([f"{_TOOLS[family]}-restore", "--noflush", "--wait"], owner)
            for family in documents
        }
        locks = {family: lock_file(family) for family in documents}
        try:
            failed = ns.run(lambda: _load_in_order(commands, locks, documents))
        except (NetNSError, OSError) as err:
            raise EnforceError(f"cannot run {_TOOLS[4]}-restore in {ns.path}: {err}") from None
    for family, error in failed.items():
        command = " ".join(commands[family][0])
        raise EnforceError(f"loading {what}'s IPv{family} rules failed ({command}): {error}")


def _load_in_order(
    commands: Mapping[Family, tuple[list[str], tuple[int, ...]]],
    locks: Mapping[Family, str],
    documents: Mapping[Family, str],
) -> dict[Family, str]:
    """Run both tools (the caller is inside the namespace); what failed, by family. IPv4 gets no
    COMMIT when IPv6 failed: then it changes nothing."""
    tools: dict[Family, subprocess.Popen[str]] = {}
    expired = threading.Event()

    def expire() -> None:  # a watchdog, not communicate(timeout=): its wait polls, adding ms
        expired.set()
        for tool in list(tools.values()):
            tool.kill()

    watchdog = threading.Timer(_TOOL_TIMEOUT_S, expire)
    watchdog.start()
    try:
        for family in _FAMILIES:  # one by one: if the second cannot start, the first is killed below
            tools[family] = _started(*commands[family], locks[family])
        assert documents[4].endswith(_COMMIT)
        failed: dict[Family, str] = {}
        if not _sent(tools[4], documents[4].removesuffix(_COMMIT)):  # gone already: its stderr says why
            failed[4] = ""
        steps: tuple[tuple[Family, str], ...] = ((6, documents[6]), (4, _COMMIT))
        for family, rest in steps:
            _, err = tools[family].communicate("" if failed else rest)
            if expired.is_set():
                failed[family] = f"no answer within {_TOOL_TIMEOUT_S:.0f} s (waiting for its lock file?)"
                break
            if tools[family].returncode != 0 or family in failed:
                failed[family] = err.strip() or f"exit code {tools[family].returncode}"
        return failed
    finally:
        watchdog.cancel()
        for tool in tools.values():
            if tool.poll() is None:
                tool.kill()
                tool.wait()


def _sent(tool: subprocess.Popen[str], text: str) -> bool:
    """Write to the tool's stdin (a few KiB: the pipe holds it); False when it has exited."""
    assert tool.stdin is not None
    try:
        tool.stdin.write(text)
        tool.stdin.flush()
    except BrokenPipeError:
        return False
    return True


def _started(command: list[str], fds: tuple[int, ...], lock: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=fds,
        env={**os.environ, "XTABLES_LOCKFILE": lock},
    )


def lock_file(family: Family) -> str:
    """The family's lock file, in a directory only we can write to (a shared /tmp must not let
    anyone point our writes elsewhere), readable by the root of a pod's user namespace."""
    directory = os.path.join(tempfile.gettempdir(), "netisolate")
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise EnforceError(
            f"{directory} is not a directory that only this user can write to: remove it and retry"
        )
    os.chmod(directory, 0o755)  # ours (checked above), and the pod's root must reach the file
    path = os.path.join(directory, f"xtables-ipv{family}.lock")
    fd = os.open(path, os.O_CREAT | os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.fchmod(fd, 0o644)  # iptables opens it read-only; whatever the umask, it must be readable
    finally:
        os.close(fd)
    return path


def known_outputs(ns: NetNS) -> dict[Family, list[str]]:
    """What a `-restore` document must know of OUTPUT, for the families where the kernel's table
    says it without a tool: no rule at all (the table info puts OUTPUT's first rule at its
    policy), or our jumps exactly first and none of ours after them (the entries say so), which
    is then all the document needs (`jumps`: nothing to delete or insert). A family left out is
    read by its `-save` tool."""

    def known(family: Family) -> list[str] | None:
        with xtables.opened(family) as raw:
            info = xtables.info(raw, family)
            if info.hook_entry[LOCAL_OUT] == info.underflow[LOCAL_OUT]:
                return []
            entries = xtables.entries(raw, family, info.size)
        try:
            in_place = jumps_first(family, entries, info.hook_entry, info.underflow, jump_rules(family))
        except LayoutError:
            return None
        return jumps(family) if in_place else None

    def both() -> dict[Family, list[str]]:
        found = {}
        for family in _FAMILIES:
            with contextlib.suppress(OSError):
                rules = known(family)
                if rules is not None:
                    found[family] = rules
        return found

    try:
        return ns.run(both)
    except NetNSError:
        return {}


def written_in_process(ns: NetNS, ruleset: RuleSet) -> bool:
    """Write both families' tables from this process when each holds nothing but its built-in
    chains (a new sandbox's), IPv6 first; True once both are in. False leaves the write to the
    tools: a table with anyone's rules in it (the tools keep them), a user-namespaced pod (see the
    module's docstring), or a replace the kernel refused. A lock file held past the tools' timeout
    fails the write (EnforceError), as it would fail theirs."""
    if not SUPPORTED:
        return False
    with _owner(ns, "the in-process writer") as owner:
        if owner is not None:
            return False
    try:
        return ns.run(lambda: all(_replaced_if_pristine(family, ruleset) for family in _FAMILIES))
    except (NetNSError, OSError) as err:  # a table that changed meanwhile (EAGAIN), or refused
        log.warning(
            "pod %s: writing the filter table in-process failed (%s); using the tools", ruleset.pod, err
        )
        return False


def _replaced_if_pristine(family: Family, ruleset: RuleSet) -> bool:
    with xtables.opened(family) as raw:
        if not _may_be_pristine(xtables.info(raw, family)):  # a used table: no lock to wait for
            return False
        path = lock_file(family)
        with xtables.locked(path, _TOOL_TIMEOUT_S) as held:
            if not held:
                raise EnforceError(
                    f"loading {ruleset.pod}'s IPv{family} rules failed (in-process): no answer within "
                    f"{_TOOL_TIMEOUT_S:.0f} s ({path} stayed locked)"
                )
            info = xtables.info(raw, family)  # again, now that no writer of ours can change it
            if not _may_be_pristine(info):
                return False
            try:
                entries = xtables.entries(raw, family, info.size)
                policies = builtin_policies(family, entries, info.hook_entry, info.underflow)
            except LayoutError:
                return False
            new = table(family, policies, jump_rules(family), chain_rules(ruleset, family))
            xtables.replace(raw, family, new, info.num_entries)
    return True


def _may_be_pristine(info: xtables.Info) -> bool:
    """What the table's info alone says: the filter table's hooks, and one entry per built-in
    chain and the closing one (`builtin_policies` reads the rest)."""
    return info.valid_hooks == VALID_HOOKS and info.num_entries == len(HOOKS) + 1


class IptablesBackend:
    """Cgroup identity is nftables' alone: `-m cgroup --path` matches a cgroup by path, but no
    iptables set holds cgroups, so each container restart would be a new ruleset (README)."""

    name = "iptables"
    cgroups = False
    wants_pod_cgroup = False

    def _save(self, ns: NetNS, family: Family, counters: bool = False) -> list[str]:
        argv = [f"{_TOOLS[family]}-save", "-t", "filter", *(["-c"] if counters else [])]
        return checked(_tool(ns, argv), "reading the filter table").splitlines()

    def _output(self, ns: NetNS, family: Family) -> list[str]:
        return _output_rules(self._save(ns, family))

    def update_cgroups(self, ns: NetNS, ruleset: RuleSet, installed: RuleSet) -> None:
        raise EnforceError("cgroup identity needs the nftables backend")

    def apply(self, ns: NetNS, ruleset: RuleSet) -> None:
        if ruleset.cgroups is not None:
            raise EnforceError("cgroup identity needs the nftables backend")
        ns.run(lambda: self._apply_inside(ns, ruleset))  # its steps on one thread (NetNS.run)

    def _apply_inside(self, ns: NetNS, ruleset: RuleSet) -> None:
        if written_in_process(ns, ruleset):
            return
        outputs = known_outputs(ns)
        read = [family for family in _FAMILIES if family not in outputs]
        with ThreadPoolExecutor(max_workers=2) as pool:  # the two `-save` execs at once, too
            outputs |= dict(zip(read, pool.map(lambda family: self._output(ns, family), read), strict=True))
        _restore(ns, {f: document(ruleset, f, outputs[f]) for f in _FAMILIES}, ruleset.pod)

    def verify(self, ns: NetNS, ruleset: RuleSet) -> list[str]:
        return self.inspect(ns, ruleset).drift

    def inspect(self, ns: NetNS, ruleset: RuleSet) -> Inspection:
        drift: list[str] = []
        refused: dict[str, int] = {}
        for family in (4, 6):
            counted = self._save(ns, family, counters=True)
            _count(counted, refused)
            current = [_COUNTERS.sub("", line) for line in counted]
            if not jumps_in_place(_output_rules(current), family):
                expected = ", ".join(f"`{jump}`" for jump in jumps(family))
                drift.append(
                    f"IPv{family}: OUTPUT must start with {expected}, and jump to {CHAIN} nowhere else"
                )
            for chain, rules in chains(ruleset, family).items():
                drift += _chain_drift(current, chain, rules, family)
        return Inspection(drift, refused)

    def installed(self, ns: NetNS) -> bool:
        return any(line.startswith(f":{CHAIN} ") for family in (4, 6) for line in self._save(ns, family))

    def deny_counters(self, ns: NetNS) -> dict[str, int]:
        refused: dict[str, int] = {}
        for family in (4, 6):
            _count(self._save(ns, family, counters=True), refused)
        return refused


def _count(saved: list[str], into: dict[str, int]) -> None:
    for line in saved:
        match = _DENY_COUNTER.match(line)
        if match:
            comment = _COMMENT.search(match[2])
            key = comment[1].strip('"') if comment else ""
            into[key] = into.get(key, 0) + int(match[1])


def _chain_drift(saved: list[str], chain: str, expected: list[str], family: Family) -> list[str]:
    if not any(line.startswith(f":{chain} ") for line in saved):
        return [f"IPv{family}: chain {chain} is missing"]
    prefix = f"-A {chain} "
    actual = [line.removeprefix(prefix) for line in saved if line.startswith(prefix)]
    if actual == expected:
        return []
    drift = [f"IPv{family}: missing in {chain}: {rule}" for rule in expected if rule not in actual]
    drift += [f"IPv{family}: unexpected in {chain}: {rule}" for rule in actual if rule not in expected]
    return drift or [f"IPv{family}: rules of {chain} are out of order"]


def _output_rules(saved: list[str]) -> list[str]:
    return [line.removeprefix("-A OUTPUT ") for line in saved if line.startswith("-A OUTPUT ")]
