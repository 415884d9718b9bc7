"""Each deliberate catch-all says why: an `except Exception` (or BaseException, or a bare
`except:`) in the package, the tests or the benchmarks carries a comment on its line. A catch-all
hides bugs unless the reason it is safe is written where it happens. A handler that ends by
raising (clean up and re-raise, or translate into our own error) hides nothing and is exempt."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BROAD = {"Exception", "BaseException"}


def _swallows(handler: ast.ExceptHandler) -> bool:
    if isinstance(handler.body[-1], ast.Raise):
        return False
    kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(kind is None or (isinstance(kind, ast.Name) and kind.id in BROAD) for kind in kinds)


def uncommented(source: str) -> list[int]:
    """Lines of catch-all handlers without a comment."""
    lines = source.splitlines()
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ExceptHandler) and _swallows(node) and "#" not in lines[node.lineno - 1]
    ]


def test_every_catch_all_says_why() -> None:
    files = [p for part in ("netisolate", "tests", "bench", "e2e") for p in (ROOT / part).rglob("*.py")]
    found = [f"{path.relative_to(ROOT)}:{line}" for path in files for line in uncommented(path.read_text())]
    assert found == []


def test_the_check_sees_every_form() -> None:
    source = "\n".join(
        [
            "try: pass",
            "except Exception: pass",
            "try: pass",
            "except: pass",
            "try: pass",
            "except (OSError, BaseException) as err: pass",
            "try: pass",
            "except Exception:  # said why",
            "    pass",
            "try: pass",
            "except OSError: pass",
            "try: pass",
            "except BaseException:",
            "    raise",
        ]
    )
    assert uncommented(source) == [2, 4, 6]
