"""The `netisolate` entry point: builds the sub-command parsers and maps errors to exit codes."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from netisolate import __version__
from netisolate.commands.common import ANNOTATION_HELP
from netisolate.model import InputError

# Modules under netisolate.commands, in the order `--help` lists them.
COMMANDS = ("check", "render", "suggest", "enforce", "demo", "agent", "gate", "webhook", "audit")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """only: the one command module to load (its imports are the start-up time of that command)."""
    parser = argparse.ArgumentParser(
        prog="netisolate",
        description="Container-level network isolation for Kubernetes pods: each container reaches only "
        "the loopback ports its pod's annotations grant it.",
        epilog=ANNOTATION_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"netisolate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS if only is None else (only,):
        importlib.import_module(f"netisolate.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = argv[0] if argv else None
    args = build_parser(first if first in COMMANDS else None).parse_args(argv)
    try:
        code: int = args.run(args)
    except InputError as err:
        print(f"netisolate {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code
