"""``dsv3 backends``: every discovered backend, whether it is usable here, and its op x format coverage."""

from __future__ import annotations

import argparse

from .. import registry
from ..weights import FORMATS


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("backends", help="list backends, their usability and operator coverage")
    p.add_argument("--brief", action="store_true", help="one line per backend, no coverage table")
    return p


def main(args) -> int:
    backends = registry.discover()
    for name in sorted(backends, key=lambda n: (n != registry.REFERENCE, n)):
        b = backends[name]
        status = "usable" if b.unusable_reason is None else f"NOT usable: {b.unusable_reason}"
        desc = b.info.description if b.info else ""
        where = f" [{b.distribution}]" if b.distribution and b.distribution != "dsv3" else ""
        print(f"{name}{where}: {status}")
        if b.info is not None and not args.brief:
            print(f"  {desc}; device {b.info.device}, communication {b.info.dist_backend}")
            print(f"  weight formats: {', '.join(b.info.formats)}")
            if b.info.convert_formats:
                conv = "; ".join(f"{src} -> {' or '.join(dst)}" for src, dst in b.info.convert_formats.items())
                print(f"  converts at load: {conv}")
            if "whole_model" in b.info.extra:
                print("  operators: runs whole exported graphs (no per-operator hooks)")
                continue
            cov = registry.coverage(b, FORMATS)
            if not cov:
                print("  operators: none of its own (everything falls back to cpu_ref)")
            for op, fmts in cov.items():
                print(f"    {op:<22} {' '.join(fmts)}")
    return 0
