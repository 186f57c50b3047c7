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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3", description="Run DeepSeek-V3-class models on any hardware.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"dsv3.commands.{name}")
        p = module.add_parser(sub)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
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
