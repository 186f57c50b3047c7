"""``dsv3 backends``: every line it prints has one of the known shapes, every operator cell is one the legend
explains, the legend is printed, and a backend whose vendor library is missing still reads as a sentence."""

from __future__ import annotations

import contextlib
import io
import re

from dsv3.backends.ascend import npu
from dsv3.backends.ascend import plugin as ascend_plugin
from dsv3.cli import main as dsv3_main
from dsv3.hookspecs import OP_NAMES
from dsv3.weights import ACT_QUANT_MODES, FORMATS

HEADER = re.compile(r"^[a-z0-9_]+( \[[^\]]+\])?: (usable|NOT usable: .+)$")
DETAIL = ("description: ", "runs on device ", "weight formats: ", "converts at load: ", "operators")
CELLS = {"-", *FORMATS, *(f"{f}/{a}" for f in FORMATS for a in ACT_QUANT_MODES)}


def backends_output(*argv: str) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert dsv3_main(["backends", *argv]) == 0
    return out.getvalue().splitlines()


def test_every_line_well_formed_and_legend_explains_the_cells():
    lines = backends_output()
    blank = lines.index("")  # the table, a blank line, then the legend
    table, legend = lines[:blank], lines[blank + 1 :]
    assert table and HEADER.match(table[0]) and table[0].startswith("cpu_ref: usable")
    rows = 0
    for line in table:
        if line.startswith("    "):  # an operator row: a known op, then cells the legend explains
            op, *cells = line.split()
            assert op in OP_NAMES and cells and set(cells) <= CELLS, line
            rows += 1
        elif line.startswith("  "):
            assert line[2:].startswith(DETAIL), line
        else:
            assert HEADER.match(line), line
    assert rows > 0
    text = "\n".join(legend)
    assert legend[0].startswith("Legend") and "runs cpu_ref's" in text  # what an unlisted operator does
    for cell in ("-", "FMT/ACT", "FMT"):
        assert any(line.lstrip().startswith(cell + " ") for line in legend), cell
    for fmt in FORMATS:
        assert f"{fmt} = " in text, fmt


def test_brief_is_one_line_per_backend_without_legend():
    lines = backends_output("--brief")
    assert lines and all(HEADER.match(line) for line in lines), lines


def test_ascend_description_reads_when_torch_npu_is_missing(monkeypatch):
    monkeypatch.setattr(npu, "probe", lambda: (None, "torch_npu is not installed"))
    desc = ascend_plugin.dsv3_backend_info().description
    # before: "Huawei Ascend NPU through torch_npu not installed fused operators"
    assert desc == "Huawei Ascend NPU: torch_npu fused operators (torch_npu not installed)"
