"""``dsv3 conformance``: check every operator a backend implements itself against cpu_ref."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import Dsv3Error
from ..hookspecs import OP_NAMES
from ..runtime.loading import DTYPES
from ..tools.output_files import write_atomically


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "conformance",
        help="check a backend's operators against cpu_ref (exit 1 on any failure or when nothing was checked)",
        description="Run generated cases (tiny to the 671B model's real shapes, awkward sizes, edge values) "
        "for every operator, weight format and activation mode the backend implements itself, "
        "against cpu_ref with per-format tolerances. What it declines falls back to cpu_ref and is listed.",
    )
    p.add_argument("--backend", help="backend to check (see `dsv3 backends`); required unless --explain")
    p.add_argument("--quick", action="store_true", help="leave out the expensive cases (large weights): for CI")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    p.add_argument("--op", action="append", choices=OP_NAMES, help="check only this operator (repeatable)")
    p.add_argument(
        "--dtype",
        action="append",
        choices=sorted(DTYPES),
        help="compute dtype (repeatable; default float32 and bfloat16)",
    )
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="exit 0 when the backend implements none of the operators asked for (0 cases); default: exit 1",
    )
    p.add_argument("--verbose", action="store_true", help="print each case as it runs (on stderr)")
    p.add_argument("--explain", action="store_true", help="print the tolerance table and its reasons, then exit")
    return p


def main(args) -> int:
    from ..conformance import TOLERANCES, run_conformance

    if args.explain:
        for t in TOLERANCES:
            print(f"{t.name:<28} rtol {t.rtol:<7g} {t.why}")
        return 0
    if not args.backend:
        raise Dsv3Error("give --backend NAME (see `dsv3 backends`)")
    dtypes = tuple(DTYPES[d] for d in dict.fromkeys(args.dtype)) if args.dtype else None
    progress = (lambda msg: print(f"  {msg}", file=sys.stderr, flush=True)) if args.verbose else None
    kwargs = {"dtypes": dtypes} if dtypes else {}
    report = run_conformance(
        args.backend, quick=args.quick, ops=tuple(args.op) if args.op else None, progress=progress, **kwargs
    )
    print(report.format_table(), flush=True)
    if args.json:
        write_atomically(Path(args.json), report.to_json() + "\n")
    if report.checked_nothing and not args.allow_empty:
        print(f"dsv3: {_nothing_checked(args.backend)} (pass --allow-empty to accept that)", file=sys.stderr)
        return 1
    return 0 if report.ok else 1


def _nothing_checked(backend: str) -> str:
    from .. import registry

    line = f"nothing was checked: backend {backend} implements none of the operators asked for itself"
    if registry.get_backend(backend).info.whole_model is not None:
        line += f"; it runs a whole exported graph: compare it with dsv3 eval perplexity --backend {backend} --against cpu_ref"
    return line
