"""The `netisolate` entry point: builds the sub-command parsers and maps errors to exit codes.

Only the module of the command being run is imported (a `check` in CI must not pay for aiohttp,
the Kubernetes client and the backends); the full parser is built for the top-level help."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from netisolate import __version__
from netisolate.commands.common import ANNOTATION_HELP

# Modules under netisolate.commands, in the order `--help` lists them.
COMMANDS = ("check", "render", "enforce", "demo", "agent", "gate", "webhook", "audit")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser, or only those of the module `only` (a name in COMMANDS)."""
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
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    from netisolate.model import InputError

    try:
        code: int = args.run(args)
    except InputError as err:
        print(f"netisolate {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code
