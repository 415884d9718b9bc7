"""The `netisolate` entry point: builds the sub-command parsers and maps errors to exit codes.

Only the module of the command being run is imported (a `check` in CI must not pay for aiohttp,
the Kubernetes client and the backends), and none for the top-level help."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from netisolate import __version__
from netisolate.commands.common import ANNOTATION_HELP

# Every command, in the order `--help` lists them: the module under netisolate.commands that
# registers it, and its summary. The top-level help is built from this table and imports no
# command module (tests/test_cli_check.py holds the summaries to what the modules register).
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("check", "run the admission checks on manifests, offline"),
    "render": ("render", "print the ruleset the agent would install"),
    "suggest": ("suggest", "print the grants that allow what a pod was seen doing"),
    "enforce": ("enforce", "install a pod's ruleset into a network namespace"),
    "verify": ("enforce", "check that a network namespace holds exactly a pod's ruleset"),
    "demo": ("demo", "show a pod's loopback connectivity before and after isolation"),
    "agent": ("agent", "run the node agent"),
    "status": ("agent", "list this node's pods and their enforcement state"),
    "gate": ("gate", "wait until this pod's isolation rules are live"),
    "webhook": ("webhook", "run the validating admission webhook"),
    "audit": ("audit", "report cluster-wide isolation and injection risks"),
}


def build_parser(command: str | None = None, *, every: bool = True) -> argparse.ArgumentParser:
    """The parser with every command's own sub-parser (`every`), or with only `command`'s (its
    module's) and a one-line stand-in for each other command."""
    parser = argparse.ArgumentParser(
        prog="netisolate",
        description="Container-level network isolation for Kubernetes pods: each container reaches only "
        "the loopback ports its pod's annotations grant it.",
        epilog=ANNOTATION_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"netisolate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = COMMANDS[command][0] if command in COMMANDS else None
    for name, (module, summary) in COMMANDS.items():
        if name in sub.choices:
            continue  # registered with its module's other command
        if every or module == wanted:
            importlib.import_module(f"netisolate.commands.{module}").register(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command, every=False).parse_args(argv)
    from netisolate.model import InputError

    try:
        code: int = args.run(args)
    except InputError as err:
        print(f"netisolate {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code
