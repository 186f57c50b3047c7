"""The ``dsv3`` command line. Each subcommand lives in ``dsv3.commands.<name>``.

A subcommand module defines ``add_parser(subparsers)`` and ``main(args) -> int``. User errors
(Dsv3Error) print one line on stderr and exit 2; nothing is written half-way.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import Dsv3Error

COMMANDS = ("run", "backends", "convert", "conformance", "parity", "eval", "serve", "bench", "export")


class HelpFormatter(argparse.HelpFormatter):
    """Ends each option's help with its default, like argparse.ArgumentDefaultsHelpFormatter, except
    where the default says nothing: None (the help says what happens instead), a switch (store_true,
    store_false: its default is just "not given"), or help that places ``%(default)s`` itself.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every parser below it (subcommands, and theirs)."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                found += _subparsers(child)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsv3",
        description="Run DeepSeek-V3-class models on any hardware. Every operator of the model graph is answered "
        "by a backend plugin (`dsv3 backends` lists them); the commands that load a model use the small "
        "model shipped inside dsv3 unless given --ckpt-path. `dsv3 COMMAND --help` explains each command and "
        "its options.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"dsv3.commands.{name}")
        p = module.add_parser(sub)
        p.set_defaults(_main=module.main)
    for p in _subparsers(parser):  # one formatter for every command, however deep
        p.formatter_class = HelpFormatter
    return parser


#: Exit status when stdout's reader closed early (``dsv3 backends | head -1``): 128 + SIGPIPE, what a shell
#: reports for a program that a closed pipe ended.
EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not as "Exception ignored" at interpreter exit
    except BrokenPipeError:
        # nothing more can reach the reader; stdout onto devnull so the interpreter's flush at exit succeeds
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout with no file descriptor (a test's StringIO): nothing to redirect
            pass
        return EXIT_BROKEN_PIPE


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._main(args) or 0)
    except Dsv3Error as exc:
        rank = os.environ.get("RANK", "0")
        if rank == "0":  # under torchrun every rank raises the same error: say it once
            print(f"dsv3: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsv3: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
