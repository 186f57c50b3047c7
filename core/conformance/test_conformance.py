"""The conformance kit as pytest tests: one test per operator x format x dtype x case.

Run ``pytest --pyargs dsv3.conformance --dsv3-backend NAME [--dsv3-quick]``.
"""

from __future__ import annotations

import pytest

from dsv3.conformance.pytest_plugin import kit_for


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kit_item" in metafunc.fixturenames:
        items = kit_for(metafunc.config).items
        metafunc.parametrize("kit_item", items, ids=[i.id for i in items])


def test_operator_case(kit_item) -> None:
    """The backend's result for this case matches cpu_ref's within the format's tolerance."""
    outcome = kit_item.run()
    assert outcome.ok, f"{kit_item.unit.id}, case {kit_item.case.name} ({kit_item.case.about}): {outcome.message}"


def test_operators_resolve(dsv3_kit) -> None:
    """Asking the backend for each operator never raises; what it declines is listed as a fallback."""
    assert not dsv3_kit.plan.errors, "; ".join(f"{label}: {msg}" for label, msg in dsv3_kit.plan.errors)
    print(
        f"backend {dsv3_kit.backend.name}: falls back to cpu_ref for: {', '.join(dsv3_kit.plan.fallbacks()) or 'nothing'}"
    )
