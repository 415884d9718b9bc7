"""nftables: the project's own `inet netisolate` table, loaded in one transaction.

Our base chain hooks output on its own, so no other table can undo our rejects: an accept
elsewhere ends only that table's chain, and a packet must pass every base chain on the hook.

A changed policy is an element update of the table's sets: one transaction, so no packet meets
half a policy, and nothing is rebuilt. Only a table whose layout changed (another mode, the first
UDP grant, drift in its chains) is replaced by the delete-and-recreate transaction.

Where the time goes, and why it is spent so: the kernel makes whoever *closes* an nftables socket
wait for the RCU grace period of the transactions that deleted something (~10 ms, on any
namespace's close), which was most of every `nft -f` element update. So element updates go over a
netlink socket kept open per namespace (`kept`, `nfnetlink`), computed from what the table is
known to hold: its listing as last read or written, at the ruleset generation it had then. The
batch names that generation, and the kernel refuses it whole if anything committed since, so no
read is needed and the update stays exact; a refusal falls back to reading the table. Cgroup
identity's tables are known the same way, listed by cgroup ID: the kernel keys them by ID, so
the socket adds and deletes exact elements though nft itself takes cgroups only by path. A namespace's
first table is loaded in-process by libnftables (no fork; creating deletes nothing, so its close
waits for nobody's grace period unless another namespace just deleted something); a whole-table
replace by `nft -f`, a process of its own, which runs in parallel across namespaces. Reads go
through libnftables in-process (`nft` without it), and every verification reads the kernel.
"""

from __future__ import annotations

from netisolate.backends import blind, libnft
from netisolate.backends.base import EnforceError, Inspection, run_tool
from netisolate.backends.kept import Kept, KeptSockets
from netisolate.backends.nfnetlink import Change, NetlinkError, SetKey, UnsupportedError
from netisolate.netns import NetNS
from netisolate.rules import RuleSet, nft

KEPT = KeptSockets()


Changes = list[tuple[str, list[str], list[str]]]  # (set, elements to add, elements to delete)


def _encoded(ruleset: RuleSet, changes: Changes) -> list[Change]:
    keys = {s.name: SetKey.of(s.declaration) for s in nft.sets(ruleset)}
    return [
        Change(
            nft.TABLE,
            name,
            keys[name],
            tuple(sorted({nft.element_key(e, keys[name].interval) for e in unexpected})),
            tuple(missing),
        )
        for name, missing, unexpected in changes
        if missing or unexpected
    ]


def _after(listed: nft.Listing, changes: Changes) -> nft.Listing:
    """What the table holds once `changes` to `listed` are committed."""
    elements = dict(listed.elements)
    for name, missing, unexpected in changes:
        elements[name] = tuple(e for e in elements.get(name, ()) if e not in unexpected) + tuple(missing)
    return nft.Listing(listed.layout, elements)


def _generation(kept: Kept | None) -> int | None:
    """The namespace's ruleset generation, if a kept socket can tell it."""
    try:
        return kept.socket.generation() if kept is not None else None
    except OSError:
        return None


class NftablesBackend:
    name = "nftables"
    cgroups = True
    wants_pod_cgroup = False

    def __init__(self, kept: KeptSockets | None = None) -> None:
        self._kept = KEPT if kept is None else kept

    def _run(self, ns: NetNS, command: str) -> tuple[int, str, str]:
        """A read in the namespace: in-process through libnftables (a context of its own each
        time, from a thread inside the namespace), else by `nft`."""
        if libnft.available():
            return ns.run(lambda: libnft.run(command))
        result = run_tool(ns, ["nft", "-f", "-"], command)
        return result.returncode, result.stdout, result.stderr

    def _load(self, ns: NetNS, document: str, what: str, in_process: bool = False) -> tuple[int, str]:
        """A write: `in_process` through libnftables where it can (see libnft.load), else by
        `nft -f` in a process of its own, so writes to many namespaces run in parallel (the RCU
        wait as its socket closes is the process's, and holds no lock of ours)."""
        if in_process and libnft.available():
            try:
                status, _, err = ns.run(lambda: libnft.load(document))
                return status, f"{what} failed: {err.strip()}"
            except libnft.TooManyFilesError:
                pass
        result = run_tool(ns, ["nft", "-f", "-"], document)
        return result.returncode, f"{what} failed: {result.stderr.strip()}"

    def apply(self, ns: NetNS, ruleset: RuleSet) -> None:
        ns.run(lambda: self._apply_inside(ns, ruleset))  # its steps on one thread (NetNS.run)

    def _apply_inside(self, ns: NetNS, ruleset: RuleSet) -> None:
        kept = self._kept.get(ns)
        if kept is None:
            self._apply(ns, ruleset, None)
            return
        with kept.lock:
            if kept.known is None or not self._update(kept, ruleset, *kept.known):
                self._apply(ns, ruleset, kept)

    def _update(self, kept: Kept, ruleset: RuleSet, listed: nft.Listing, generation: int) -> bool:
        """Turn the table, known to be `listed` at `generation`, into `ruleset` by an element update
        over the kept socket (what `nft.update` would load); False, and nothing known any more,
        when that cannot be done."""
        kept.known = None
        if nft.expected(ruleset).layout != listed.layout:
            return False
        changes = [change for change in nft.element_changes(ruleset, listed) if change[1] or change[2]]
        try:
            if not changes:  # done, if nothing changed the table since
                unchanged = kept.socket.generation() == generation
                kept.known = (listed, generation) if unchanged else None
                return unchanged
            after = kept.socket.commit(_encoded(ruleset, changes), generation)
        except (NetlinkError, UnsupportedError, OSError):  # stale, refused, or not ours to encode
            return False
        if after == generation + 1:  # ours was the only transaction since
            kept.known = (_after(listed, changes), after)
        return True

    def _apply(self, ns: NetNS, ruleset: RuleSet, kept: Kept | None) -> None:
        """Read the table, then update it (over the kept socket where there is one), create it
        or replace it."""
        listed = self._read(ns, kept, by_id=ruleset.cgroups is not None)
        if listed is None:
            status, _ = self._write(
                ns, kept, ruleset, nft.create(ruleset), f"loading {ruleset.pod}'s new table", new=True
            )
            if status == 0:
                return
        else:
            if kept is not None and kept.known is not None and self._update(kept, ruleset, *kept.known):
                return
            delta = nft.update(ruleset, listed)
            if delta == "":
                return
            if delta is not None and self._load(ns, delta, f"updating {ruleset.pod}'s set elements")[0] == 0:
                return
        # a layout that changed, or a table that appeared or changed since it was read
        status, err = self._write(ns, kept, ruleset, nft.replace(ruleset), f"loading {ruleset.pod}'s table")
        if status != 0:
            raise EnforceError(err)

    def _read(self, ns: NetNS, kept: Kept | None, by_id: bool) -> nft.Listing | None:
        """The table, parsed (None: there is none); `kept` knows it too when nothing committed
        while it was read. `by_id`: cgroups as IDs, as a cgroup ruleset compares them."""
        before = _generation(kept)
        text = self.listing(ns, by_id)
        listed = nft.parse(text) if text is not None else None
        if kept is not None and listed is not None and before is not None and _generation(kept) == before:
            kept.known = (listed, before)
        return listed

    def _write(
        self, ns: NetNS, kept: Kept | None, ruleset: RuleSet, document: str, what: str, *, new: bool = False
    ) -> tuple[int, str]:
        """Load a whole table (`new`: a first one, in-process); remember it as what the namespace
        holds when ours was the only transaction in between (the generation moved by exactly one)."""
        before = _generation(kept)
        status, err = self._load(ns, document, what, in_process=new)
        if kept is not None and status == 0 and before is not None:
            after = _generation(kept)
            kept.known = (nft.expected(ruleset), before + 1) if after == before + 1 else None
        return status, err

    def update_cgroups(self, ns: NetNS, ruleset: RuleSet, installed: RuleSet) -> None:
        """Turn the sets of `installed` into those of `ruleset` (a restarted container's new cgroup
        in, its old one out). Over the namespace's kept socket: one transaction by cgroup ID
        (~0.4 ms, and no process waits for RCU as it exits), from the table as last known or, when
        that is lost or stale, as read now. Without a kept socket, the two `nft -f` documents of
        `nft.elements`, by path: a cgroup that vanished meanwhile fails that update (retried)."""
        ns.run(lambda: self._update_cgroups_inside(ns, ruleset, installed))

    def _update_cgroups_inside(self, ns: NetNS, ruleset: RuleSet, installed: RuleSet) -> None:
        kept = self._kept.get(ns)
        if kept is not None:
            with kept.lock:
                if kept.known is not None and self._update(kept, ruleset, *kept.known):
                    return
                self._read(ns, kept, by_id=True)
                if kept.known is not None and self._update(kept, ruleset, *kept.known):
                    return
        for document in nft.elements(ruleset, installed):
            if document:
                status, err = self._load(ns, document, f"updating {ruleset.pod}'s cgroups")
                if status != 0:
                    raise EnforceError(err)

    def listing(self, ns: NetNS, by_id: bool = False) -> str | None:
        """The table as nft lists it; `by_id`: cgroups as IDs (listed from the blind namespace, on
        a thread of its own)."""
        command = f"list table inet {nft.TABLE}"

        def read_blind() -> tuple[int, str, str]:
            blind.enter()
            if libnft.available():
                return libnft.run(command)
            result = run_tool(None, ["nft", *command.split()])
            return result.returncode, result.stdout, result.stderr

        try:
            status, out, err = ns.run(read_blind, fresh=True) if by_id else self._run(ns, command)
        except blind.BlindError as error:
            raise EnforceError(f"cannot list cgroup rules by ID: {error}") from None
        if status != 0:
            if "No such file or directory" in err:
                return None
            raise EnforceError(f"cannot list table inet {nft.TABLE}: {err.strip()}")
        return out

    def verify(self, ns: NetNS, ruleset: RuleSet) -> list[str]:
        return self.inspect(ns, ruleset).drift

    def inspect(self, ns: NetNS, ruleset: RuleSet) -> Inspection:
        listed = self.listing(ns, by_id=ruleset.cgroups is not None)
        if listed is None:
            return Inspection([f"table inet {nft.TABLE} is missing"], {})
        return Inspection(nft.drift(ruleset, nft.parse(listed)), nft.refused(listed), nft.observed(listed))

    def installed(self, ns: NetNS) -> bool:
        return self.listing(ns) is not None

    def deny_counters(self, ns: NetNS) -> dict[str, int]:
        return nft.refused(self.listing(ns) or "")
