"""nftables: the project's own `inet netisolate` table, loaded in one transaction.

Our base chain hooks output on its own, so no other table can undo our rejects: an accept
elsewhere ends only that table's chain, and a packet must pass every base chain on the hook.

A changed policy is an element update of the table's sets: one transaction, so no packet meets
half a policy, and nothing is rebuilt. Only a table whose layout changed (another mode, the first
UDP grant, drift in its chains) is replaced by the delete-and-recreate transaction. Reads go through
libnftables in-process; writes through `nft -f`, which runs in parallel across namespaces. The
kernel makes whoever closes an nftables socket wait for the last transaction's RCU grace period
(~10 ms): a libnftables context kept open per namespace would spare writes that, but with many
contexts alive libnftables 1.0.6 aborted under pod churn, so none is kept.
"""

from __future__ import annotations

from netisolate.backends import blind, libnft
from netisolate.backends.base import EnforceError, Inspection, run_tool
from netisolate.netns import NetNS
from netisolate.rules import RuleSet, nft


class NftablesBackend:
    name = "nftables"
    cgroups = True

    def _run(self, ns: NetNS, command: str) -> tuple[int, str, str]:
        """A read in the namespace: in-process through libnftables (a context of its own each
        time, from a thread inside the namespace), else by `nft`."""
        if libnft.available():
            return ns.run(lambda: libnft.run(command))
        result = run_tool(ns, ["nft", "-f", "-"], command)
        return result.returncode, result.stdout, result.stderr

    def _load(self, ns: NetNS, document: str, what: str) -> tuple[int, str]:
        """A write, by `nft -f` in the namespace: each in a process of its own, so writes to many
        namespaces run in parallel (the RCU wait as the socket closes is the process's, not ours)."""
        result = run_tool(ns, ["nft", "-f", "-"], document)
        return result.returncode, f"{what} failed: {result.stderr.strip()}"

    def apply(self, ns: NetNS, ruleset: RuleSet) -> None:
        listed = self.listing(ns)
        if listed is None:
            status, err = self._load(ns, nft.create(ruleset), f"loading {ruleset.pod}'s new table")
            if status == 0:
                return
        else:
            delta = nft.update(ruleset, nft.parse(listed))
            if delta == "":
                return
            if delta is not None and self._load(ns, delta, f"updating {ruleset.pod}'s set elements")[0] == 0:
                return
        # a layout that changed, or a table that appeared or changed since it was read
        status, err = self._load(ns, nft.replace(ruleset), f"loading {ruleset.pod}'s table")
        if status != 0:
            raise EnforceError(err)

    def update_cgroups(self, ns: NetNS, ruleset: RuleSet, installed: RuleSet) -> None:
        """Turn the sets of `installed` into those of `ruleset` (a restarted container's new cgroup
        in, then its old one out), in-process. A cgroup that vanished
        meanwhile (nft resolves paths as it loads) fails the update, which is retried."""
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
            status, out, err = ns.run(read_blind) if by_id else self._run(ns, command)
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
