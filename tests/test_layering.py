"""The layers, enforced: the functional core (pod model → policy → rules) never imports the parts
that touch the kernel, the API server, the network or the command line, and admission never
imports the backends. Every import statement counts (inside functions and `if TYPE_CHECKING:`
too), read from each module's syntax tree, so an import added anywhere breaks this test.

A layer is a module (`rules.py`) or a package (`rules/`): both are checked the same way."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "netisolate"
SHELL = ("backends", "agent", "webhook", "commands")
FORBIDDEN = {
    "model": SHELL,
    "policy": SHELL,
    "rules": SHELL,
    "presets": SHELL,
    "learning": SHELL,
    "admission": ("backends",),
}


def _files(layer: str) -> list[Path]:
    module, package = PACKAGE / f"{layer}.py", PACKAGE / layer
    return [module] if module.is_file() else sorted(package.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool = False) -> Iterator[str]:
    """Every module the source of `module` imports, absolute: `from . import x` and
    `from netisolate import x` also name netisolate.x, which may be a module."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source, module)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{anchor}.{base}" if base else anchor
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _file_imports(path: Path) -> Iterator[str]:
    return imports(path.read_text(), _module_name(path), path.name == "__init__.py")


def _violations(layer: str, forbidden: tuple[str, ...]) -> list[str]:
    banned = tuple(f"netisolate.{part}" for part in forbidden)
    return [
        f"{path.relative_to(PACKAGE.parent)} imports {target}"
        for path in _files(layer)
        for target in _file_imports(path)
        if any(target == b or target.startswith(f"{b}.") for b in banned)
    ]


@pytest.mark.parametrize(("layer", "forbidden"), FORBIDDEN.items())
def test_layer_never_imports_upward(layer: str, forbidden: tuple[str, ...]) -> None:
    assert _files(layer), f"netisolate/{layer}(.py) is gone: update the layering table"
    assert _violations(layer, forbidden) == []


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("import netisolate.backends.nftables", ["netisolate.backends.nftables"]),
        ("from netisolate import agent", ["netisolate", "netisolate.agent"]),
        ("def f():\n    from netisolate.webhook.server import serve", ["netisolate.webhook.server"]),
        ("from ..backends import Backend", ["netisolate.backends", "netisolate.backends.Backend"]),
        ("from . import iptables", ["netisolate.rules", "netisolate.rules.iptables"]),
    ],
)
def test_every_kind_of_import_is_seen(source: str, found: list[str]) -> None:
    """The checker itself: absolute, from-package, function-local and relative imports, in a module
    of a package (`rules/` on its way to being one)."""
    seen = list(imports(source, "netisolate.rules.nft"))
    assert all(name in seen for name in found), seen


def test_a_package_s_own_relative_imports_resolve_to_it() -> None:
    seen = imports("from .nft import render", "netisolate.rules", is_package=True)
    assert next(seen) == "netisolate.rules.nft"
