"""Fixtures shared by the test modules: the real containerd node and its kubelet stand-in (see
tests/realnode/__init__.py for how to use them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
from kubernetes import client

from tests.kube_standin import api_client, declare
from tests.realnode.kubelet import Kubelet
from tests.realnode.node import RealNode, real_node
from tests.realnode.pods import NODE_NAME


@pytest.fixture(scope="module")
def node() -> Iterator[RealNode]:
    """containerd + runc + CNI on this machine, one per test module, under the machine-wide lock;
    torn down after the module (the machine left as it was)."""
    with real_node() as started:
        yield started


@pytest_asyncio.fixture
async def kubelet(node: RealNode, kmock: Any) -> AsyncIterator[Kubelet]:
    """The kubelet of `node`, named NODE_NAME (tests/realnode/pods.py), running the pods kmock
    holds for it; their sandboxes are removed after the test."""
    declare(kmock)
    standin = Kubelet(node, client.CoreV1Api(api_client(kmock)), NODE_NAME)
    try:
        yield standin
    finally:
        await asyncio.to_thread(standin.close)
