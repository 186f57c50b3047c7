"""``dsv3 backends``: every discovered backend, whether it is usable here, and its op x format coverage."""

from __future__ import annotations

import argparse

from .. import registry
from ..weights import FORMATS

#: What the cells of the operator table mean, printed once after the table.
LEGEND = (
    "Legend (operator rows): each backend lists only the operators it implements itself; any other operator",
    "runs cpu_ref's. A cell names what the backend's implementation accepts:",
    "  -            implemented; the operator has no weights, so no weight format applies (it runs in the",
    "               compute dtype)",
    "  FMT/ACT      implemented for weights held in FMT with activations ACT: none = the compute dtype,",
    "               dynamic = quantized per token at run time (--act-quant dynamic)",
    "  FMT          (dequantize) turns weights held in FMT back into the compute dtype",
    "Weight formats: hp = high precision (bf16/fp16/fp32), fp8_block = FP8 e4m3 with 128x128 block scales",
    "(the released DeepSeek-V3 format), int8_w8a8 = int8 per output channel (activations may be quantized),",
    "int8_wo = int8 weights only (activations stay in the compute dtype).",
)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "backends",
        help="list backends, their usability and operator coverage",
        description="List every installed backend plugin (the ones shipped with dsv3 and any pip-installed "
        "package registered in the dsv3.backends entry-point group), whether it can run on this machine and, if "
        "not, why; its device, weight formats and the operators it implements itself, per weight format and "
        "activation mode (every other operator runs cpu_ref's). A legend after the table explains the cells. "
        "Set DSV3_DISABLE_PLUGIN_AUTOLOAD=1 to load only the backends shipped with dsv3.",
    )
    p.add_argument("--brief", action="store_true", help="one line per backend, no coverage table")
    return p


def describe_backend(b: registry.Backend, brief: bool = False) -> list[str]:
    """The lines ``dsv3 backends`` prints for one backend (one line with ``brief``)."""
    where = f" [{b.distribution}]" if b.distribution and b.distribution != "dsv3" else ""
    status = "usable" if b.unusable_reason is None else f"NOT usable: {b.unusable_reason}"
    lines = [f"{b.name}{where}: {status}"]
    info = b.info
    if info is None or brief:
        return lines
    lines += [
        f"  description: {info.description}",
        f"  runs on device {info.device}, communication {info.dist_backend} (collective operations)",
        f"  weight formats: {', '.join(info.formats)}",
    ]
    if info.convert_formats:
        conv = "; ".join(f"{src} -> {' or '.join(dst)}" for src, dst in info.convert_formats.items())
        lines.append(f"  converts at load: {conv}")
    if info.whole_model is not None:
        return [*lines, "  operators: runs whole exported graphs (no per-operator hooks)"]
    cov = registry.coverage(b, FORMATS)
    if not cov:
        return [*lines, "  operators: none of its own (everything falls back to cpu_ref)"]
    lines.append("  operators it implements (the rest fall back to cpu_ref):")
    lines += [f"    {op:<22} {' '.join(fmts)}" for op, fmts in cov.items()]
    return lines


def main(args) -> int:
    backends = registry.discover()
    for name in sorted(backends, key=lambda n: (n != registry.REFERENCE, n)):
        print("\n".join(describe_backend(backends[name], args.brief)))
    if not args.brief:
        print("\n" + "\n".join(LEGEND))
    return 0
