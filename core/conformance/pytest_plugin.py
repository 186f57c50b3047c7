"""pytest plugin of the conformance kit: ``pytest --pyargs dsv3.conformance --dsv3-backend NAME``.

dsv3 registers this module under the ``pytest11`` entry-point group, so installing dsv3 is enough;
with ``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1`` add ``-p dsv3.conformance.pytest_plugin``. It only adds
options and a fixture; nothing runs unless the tests in ``dsv3.conformance`` are collected.
"""

from __future__ import annotations

import pytest

_KIT = pytest.StashKey[object]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dsv3", "dsv3 backend conformance")
    group.addoption(
        "--dsv3-backend", default="cpu_ref", help="backend the dsv3.conformance tests check (default cpu_ref)"
    )
    group.addoption("--dsv3-quick", action="store_true", help="leave out the expensive conformance cases")
    group.addoption(
        "--dsv3-dtype",
        action="append",
        choices=("float32", "bfloat16", "float16"),
        help="compute dtype to check (repeatable; default float32 and bfloat16)",
    )


class Kit:
    """The backend under test, its plan (what it implements, what falls back) and its items."""

    def __init__(self, config: pytest.Config):
        import torch

        from .runner import DEFAULT_DTYPES, iter_items, load_backend, plan

        name = config.getoption("dsv3_backend", default="cpu_ref")
        dtypes = config.getoption("dsv3_dtype", default=None)
        self.backend = load_backend(name)
        self.plan = plan(self.backend, tuple(getattr(torch, d) for d in dtypes) if dtypes else DEFAULT_DTYPES)
        self.items = list(iter_items(self.backend, self.plan, bool(config.getoption("dsv3_quick", default=False))))


def kit_for(config: pytest.Config) -> Kit:
    """One Kit per pytest session (the plan asks the backend once)."""
    if _KIT not in config.stash:
        from ..errors import Dsv3Error

        try:
            config.stash[_KIT] = Kit(config)
        except Dsv3Error as exc:
            raise pytest.UsageError(f"dsv3 conformance: {exc}") from None
    return config.stash[_KIT]


@pytest.fixture(scope="session")
def dsv3_kit(request: pytest.FixtureRequest) -> Kit:
    """The conformance plan of the backend named by ``--dsv3-backend``."""
    return kit_for(request.config)
