"""PluginLifetime: the app's lifetime for a plugin tested alone (hooks in order, cleanup newest first)."""

from __future__ import annotations

import pytest

import ztmw
from ztmw.testing import FakeClock, PluginLifetime

CONFIG = ztmw.load_config({"resource": {"identifier": "https://api.example.com"}})


async def test_hooks_run_in_order_and_cleanup_newest_first_even_after_a_failure() -> None:
    lifetime = PluginLifetime()
    deps = lifetime.deps(CONFIG, clock=FakeClock(5.0))
    ran: list[str] = []

    async def hook(name: str, fail: bool = False) -> None:
        ran.append(name)
        if fail:
            raise RuntimeError(name)

    deps.on_startup(lambda: hook("start-1"))
    deps.on_startup(lambda: hook("start-2"))
    deps.on_cleanup(lambda: hook("stop-1"))
    deps.on_cleanup(lambda: hook("stop-2", fail=True))
    await lifetime.start()
    with pytest.raises(RuntimeError, match="stop-2"):
        await lifetime.stop()
    assert ran == ["start-1", "start-2", "stop-2", "stop-1"]
    assert deps.clock() == 5.0 and deps.config is CONFIG


def test_a_plugin_given_no_http_session_is_told_so() -> None:
    deps = PluginLifetime().deps(CONFIG)
    with pytest.raises(RuntimeError, match="no HTTP session"):
        deps.http()
