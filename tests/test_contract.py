"""docs/design.md is the contract: the command line it documents is the one `netisolate` parses.

The CLI table's first column names each command with every flag it takes; a flag the contract
promises and the parser lacks (or a command the parser has and the contract omits) fails here, so
the two cannot drift apart silently.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from netisolate.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"


def _contract_commands() -> dict[str, set[str]]:
    """Command → the flags its row in the CLI table names."""
    section = DESIGN.read_text().split("## Command line", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, set[str]] = {}
    for match in re.finditer(r"^\| `([a-z]+)([^`]*)` \|", section, re.MULTILINE):
        rows[match.group(1)] = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", match.group(2)))
    return rows


def _parser_commands() -> dict[str, set[str]]:
    """Command → every option string its sub-parser accepts."""
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: {opt for action in sub._actions for opt in action.option_strings}
        for name, sub in subs.choices.items()
    }


def test_every_command_is_in_the_contract_and_every_contract_command_exists() -> None:
    assert set(_contract_commands()) == set(_parser_commands())


def test_every_flag_the_contract_names_is_parsed() -> None:
    parsed = _parser_commands()
    missing = {
        command: sorted(flags - parsed[command])
        for command, flags in _contract_commands().items()
        if flags - parsed[command]
    }
    assert not missing, f"docs/design.md names flags the CLI does not parse: {missing}"


def test_the_readme_links_the_contract_inside_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "(docs/design.md)" in readme
    assert "../shared/" not in readme
