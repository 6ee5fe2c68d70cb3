"""Entry point `ztmw.verifiers: broken-import`: a module that cannot be imported (a missing dependency)."""

from __future__ import annotations

import ztmw_sample_plugin_missing_dependency  # noqa: F401  (does not exist, on purpose)


def create(settings: object, deps: object) -> object:  # pragma: no cover - never reached
    raise AssertionError("unreachable")
