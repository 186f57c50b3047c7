"""The nvidia backend plugin. Until its kernels land it reports itself unusable; it never pretends."""

from __future__ import annotations

from dsv3.hookspecs import BackendInfo, hookimpl


@hookimpl
def dsv3_backend_info() -> BackendInfo:
    return BackendInfo(
        name="nvidia",
        description="nvidia backend",
        unusable_reason="not implemented yet",
    )
