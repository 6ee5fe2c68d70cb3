"""The public surface is deliberate: __all__ lists exactly what `import ztmw` offers."""

from __future__ import annotations

import logging

import ztmw


def test_all_names_exist() -> None:
    for name in ztmw.__all__:
        assert hasattr(ztmw, name), name


def test_public_names_are_exactly_all() -> None:
    public = {n for n in vars(ztmw) if not n.startswith("_") and not isinstance(getattr(ztmw, n), type(ztmw))}
    assert public == set(ztmw.__all__) - {"__version__"}


def test_contract_entry_points() -> None:
    assert callable(ztmw.load_config) and callable(ztmw.setup)
    assert issubclass(ztmw.ConfigurationError, ValueError)
    assert issubclass(ztmw.TokenBindingMismatch, ztmw.InvalidToken)
    assert ztmw.PRINCIPAL is not ztmw.TRUST


def test_server_helpers_for_parser_rejections() -> None:
    # ztmw.run_app / ParserSafeAppRunner replace aiohttp's; the filter is what ztmw.setup puts on aiohttp's logger
    from aiohttp import web

    assert callable(ztmw.run_app)
    assert issubclass(ztmw.ParserSafeAppRunner, web.AppRunner)
    assert isinstance(ztmw.RejectionLogFilter(), logging.Filter)
