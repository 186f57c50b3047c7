"""The backend conformance kit: every operator a backend implements, checked against cpu_ref.

From the command line: ``dsv3 conformance --backend NAME [--quick] [--json FILE]``.
From pytest: ``pytest --pyargs dsv3.conformance --dsv3-backend NAME [--dsv3-quick]``.
From Python::

    from dsv3.conformance import run_conformance
    report = run_conformance("my_backend", quick=True)   # a name, a Backend or a plugin object
    print(report.format_table()); assert report.ok

Cases come from ``CASE_GENERATORS`` (one generator per operator of the contract), tolerances
from ``TOLERANCES`` (one per numeric format, each with the reason for its size).
"""

from .cases import CASE_GENERATORS, Case, CaseData, Spec, cases_for, uncovered_ops
from .compare import Outcome
from .runner import Item, Plan, Report, Row, Unit, iter_items, load_backend, plan, run_case, run_conformance
from .tolerances import TOLERANCES, Tolerance, tolerance_for

__all__ = [
    "CASE_GENERATORS",
    "TOLERANCES",
    "Case",
    "CaseData",
    "Item",
    "Outcome",
    "Plan",
    "Report",
    "Row",
    "Spec",
    "Tolerance",
    "Unit",
    "cases_for",
    "iter_items",
    "load_backend",
    "plan",
    "run_case",
    "run_conformance",
    "tolerance_for",
    "uncovered_ops",
]
