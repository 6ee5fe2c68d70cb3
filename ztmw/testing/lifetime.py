"""A stand-in for the app's lifetime when a plugin is tested alone.

A plugin factory receives `PluginDeps` and registers start-up and cleanup hooks through it; inside an app,
`ztmw.setup` runs them with the app. A test that builds the plugin directly needs the same: this collects the
hooks and runs them, in order on start and in reverse on stop.

    lifetime = PluginLifetime()
    verifier = create(settings, lifetime.deps(config, clock=clock, http=lambda: session))
    await lifetime.start()
    ...
    await lifetime.stop()
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

import aiohttp
import structlog

from ..config import Config
from ..typing import Clock, PluginDeps

Hook = Callable[[], Awaitable[None]]


def _no_http() -> aiohttp.ClientSession:
    raise RuntimeError("this test gave the plugin no HTTP session (pass http=...)")


class PluginLifetime:
    def __init__(self) -> None:
        self.startup: list[Hook] = []
        self.cleanup: list[Hook] = []

    def deps(
        self,
        config: Config,
        *,
        clock: Clock = time.time,
        http: Callable[[], aiohttp.ClientSession] = _no_http,
        logger: Any = None,
    ) -> PluginDeps:
        """What a plugin factory is handed; its hooks land on this lifetime."""
        return PluginDeps(config=config, clock=clock, http=http,
                          logger=logger if logger is not None else structlog.get_logger("ztmw.test"),
                          on_startup=self.startup.append, on_cleanup=self.cleanup.append)

    async def start(self) -> None:
        for hook in self.startup:
            await hook()

    async def stop(self) -> None:
        """Every cleanup hook runs, newest first, even when one fails (the first failure is raised after)."""
        failure: BaseException | None = None
        for hook in reversed(self.cleanup):
            try:
                await hook()
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
