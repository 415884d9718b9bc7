"""The nftables backend's fast path: element updates over a netlink socket kept per namespace.

What must hold: the bytes are nft's own (else the kernel would list something the drift check
calls drift), an update computed from a remembered listing is refused when anything changed the
table since, the kept sockets are bounded and closed once their namespaces are let go, and
libnftables is never called where it would abort the agent (fds past FD_SETSIZE).
Namespaces are `LocalPod`s (unique `ni-<hex>-` names, removed on exit, also on failure).
"""

from __future__ import annotations

import errno
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from netisolate.backends import run_tool
from netisolate.backends.kept import KeptSockets
from netisolate.backends.nfnetlink import Change, NetlinkError, SetKey, _element
from netisolate.backends.nftables import NftablesBackend, _encoded
from netisolate.localpod import LocalPod
from netisolate.netns import NetNS
from netisolate.rules import nft
from tests.test_enforcement import GRANTS, make_pod, ruleset_for

ROOT = Path(__file__).resolve().parent.parent
POLICY_A = ruleset_for(make_pod({**GRANTS, "allow.netisolate.io/app": "15001, 16000-16010"}))
POLICY_B = ruleset_for(make_pod({**GRANTS, "allow.netisolate.io/app": "15002, 17000-17010"}))


# nft 1.0.6's own encoding of these elements (`nft --debug=mnl`), one NFTA_LIST_ELEM each
@pytest.mark.parametrize(
    ("declaration", "element", "nft_bytes"),
    [
        (  # an interval set: the UID in network order (nft converts it), the range's end as KEY_END
            ("typeof meta skuid . meta l4proto . th dport", "flags interval"),
            '1000 . tcp . 15001 comment "app"',
            (
                "38000180 14000180 10000100 000003e8 06000000 3a990000 "
                "14000a80 10000100 000003e8 06000000 3a990000 0a000600 "
                "00046170 70000000"
            ),
        ),
        (  # no intervals: the UID in host order
            ("typeof meta skuid . meta l4proto . th sport",),
            '1000 . udp . 53 comment "app"',
            ("24000180 14000180 10000100 e8030000 11000000 00350000 0a000600 00046170 70000000"),
        ),
        (  # a counter of its own
            ("typeof meta skuid", "counter"),
            '1001 counter comment "x"',
            (
                "2c000180 0c000180 08000100 e9030000 08000600 00027800 "
                "14000780 0c000100 636f756e 74657200 04000280"
            ),
        ),
    ],
)
def test_elements_are_encoded_as_nft_encodes_them(
    declaration: tuple[str, ...], element: str, nft_bytes: str
) -> None:
    assert _element(SetKey.of(declaration), element, True).hex() == nft_bytes.replace(" ", "")


@pytest.fixture
def kept() -> Iterator[KeptSockets]:
    sockets = KeptSockets(limit=3, sweep_every_s=3600)  # swept by hand
    yield sockets
    sockets.close()


@pytest.fixture
def pods() -> Iterator[list[LocalPod]]:
    with ExitStack() as stack:
        yield [stack.enter_context(LocalPod(make_pod(GRANTS))) for _ in range(4)]


def ns_of(pod: LocalPod) -> NetNS:
    assert pod.ns is not None
    return pod.ns


def forked_nft(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The documents the backend hands to an `nft -f` process from here on."""
    documents: list[str] = []
    real = run_tool

    def recording(ns: NetNS | None, argv: list[str], stdin: str = "", **kw: object) -> object:
        documents.append(stdin)
        return real(ns, argv, stdin, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr("netisolate.backends.nftables.run_tool", recording)
    return documents


def test_a_changed_policy_is_one_exact_update_over_the_kept_socket(
    kept: KeptSockets, pods: list[LocalPod], monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, ns = NftablesBackend(kept), ns_of(pods[0])
    backend.apply(ns, POLICY_A)
    socket = kept.get(ns)
    assert socket is not None and socket.known is not None
    generation = socket.known[1]
    forks = forked_nft(monkeypatch)
    for policy in (POLICY_B, POLICY_A, POLICY_B):
        backend.apply(ns, policy)
        assert backend.verify(ns, policy) == [], "what the kernel lists is exactly the policy"
    assert forks == [], "no nft process, no table read"
    assert socket.known is not None and socket.known[1] == generation + 3, "one transaction each"
    backend.apply(ns, POLICY_B)
    assert socket.socket.generation() == generation + 3, "nothing to change: no transaction"


def test_a_change_behind_our_back_is_undone_not_built_upon(kept: KeptSockets, pods: list[LocalPod]) -> None:
    """The remembered listing is stale once anything commits: the kernel refuses the update, the
    table is read again, and the result is exactly the policy (here: a grant someone added goes)."""
    backend, ns = NftablesBackend(kept), ns_of(pods[0])
    backend.apply(ns, POLICY_A)
    extra = f'add element inet {nft.TABLE} grants {{ 1002 . tcp . 8080 comment "rogue" }}\n'
    assert run_tool(ns, ["nft", "-f", "-"], extra).returncode == 0
    backend.apply(ns, POLICY_B)
    assert backend.verify(ns, POLICY_B) == []


def test_a_stale_generation_is_refused_whole(kept: KeptSockets, pods: list[LocalPod]) -> None:
    backend, ns = NftablesBackend(kept), ns_of(pods[0])
    backend.apply(ns, POLICY_A)
    socket = kept.get(ns)
    assert socket is not None and socket.known is not None
    listed, generation = socket.known
    changes = _encoded(POLICY_B, nft.element_changes(POLICY_B, listed))
    with pytest.raises(NetlinkError) as refused:
        socket.socket.commit(changes, generation - 1)
    assert refused.value.errno == 85  # ERESTART
    assert backend.verify(ns, POLICY_A) == [], "nothing of it was applied"


def test_kept_sockets_are_bounded_and_go_with_their_namespaces(
    kept: KeptSockets, pods: list[LocalPod]
) -> None:
    backend = NftablesBackend(kept)
    handles = [ns_of(pod).dup() for pod in pods]  # the agent's own handles, closed as pods go
    try:
        for ns in handles:
            backend.apply(ns, POLICY_A)
            backend.apply(ns, POLICY_B)
        assert len(kept) == 3, "bounded: past the limit a namespace is served without one"
        assert all(backend.verify(ns, POLICY_B) == [] for ns in handles)
        sockets = [k for k in map(kept.get, handles[:3]) if k is not None]
        assert kept.sweep() == 0, "every namespace still held"
        for ns in handles[:2]:
            ns.close()
        assert kept.sweep() == 2
        assert len(kept) == 1 and [k.socket.closed for k in sockets] == [True, True, False]
    finally:
        for ns in handles:
            ns.close()
    assert kept.sweep() == 1 and len(kept) == 0


def test_the_sweeper_closes_sockets_in_the_background(pods: list[LocalPod]) -> None:
    kept = KeptSockets(limit=8, sweep_every_s=0.05)
    ns = ns_of(pods[0]).dup()
    NftablesBackend(kept).apply(ns, POLICY_A)
    assert len(kept) == 1
    ns.close()
    deadline = time.monotonic() + 10
    while len(kept) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(kept) == 0


CROWDED = """
import os, sys
from netisolate.backends import libnft
from netisolate.backends.nftables import NftablesBackend, _encoded
from netisolate.netns import NetNS
from tests.test_nftables_kept import POLICY_A
hold = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]  # a node's worth of namespaces
ns = NetNS.current()
try:
    libnft.load("add table inet ni_crowded")
    sys.exit("libnftables was called with fds past FD_SETSIZE")
except libnft.TooManyFilesError:
    pass
backend = NftablesBackend()
backend.apply(ns, POLICY_A)
assert backend.verify(ns, POLICY_A) == [], backend.verify(ns, POLICY_A)
print("ok")
"""


def test_libnftables_is_not_called_where_it_would_abort_the_agent() -> None:
    """libnftables 1.0.6 select()s on its socket when it writes: with that fd at 1024 or more glibc
    aborts the process (what crashed the agent's churn test when contexts were kept per pod). In a
    process holding 1100 files, a new table still loads, by a forked nft."""
    result = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", CROWDED],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_a_new_namespace_gets_its_table_without_a_fork(
    kept: KeptSockets, pods: list[LocalPod], monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, ns = NftablesBackend(kept), ns_of(pods[0])
    forks = forked_nft(monkeypatch)
    backend.apply(ns, POLICY_A)
    assert forks == [] and backend.verify(ns, POLICY_A) == []
    socket = kept.get(ns)
    assert socket is not None and socket.known is not None, "and the next change needs no read"


def test_without_libnftables_tables_load_by_nft_and_updates_still_go_over_the_socket(
    kept: KeptSockets, pods: list[LocalPod], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("netisolate.backends.libnft.available", lambda: False)
    backend, ns = NftablesBackend(kept), ns_of(pods[0])
    forks = forked_nft(monkeypatch)
    backend.apply(ns, POLICY_A)
    assert [doc.split("\n", 1)[0] for doc in forks] == [
        "list table inet netisolate",
        "create table inet netisolate",
    ]
    backend.apply(ns, POLICY_B)
    assert len(forks) == 2, "the change needed neither a read nor nft"
    assert backend.verify(ns, POLICY_B) == []


def test_a_batch_with_one_bad_element_changes_nothing(kept: KeptSockets, pods: list[LocalPod]) -> None:
    """One transaction: an add that would succeed is not applied when a delete in the same batch
    fails (the element is not there), and the error says so."""
    backend, ns = NftablesBackend(kept), ns_of(pods[0])
    backend.apply(ns, POLICY_A)
    socket = kept.get(ns)
    assert socket is not None and socket.known is not None
    key = SetKey.of(next(s.declaration for s in nft.sets(POLICY_A) if s.name == "grants"))
    bad = Change(
        nft.TABLE, "grants", key, delete=("4242 . tcp . 1",), add=('1002 . tcp . 8080 comment "rogue"',)
    )
    with pytest.raises(NetlinkError) as refused:
        socket.socket.commit([bad], socket.known[1])
    assert refused.value.errno == errno.ENOENT
    assert backend.verify(ns, POLICY_A) == []
