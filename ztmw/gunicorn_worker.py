"""aiohttp's gunicorn worker on `ParserSafeAppRunner`: `gunicorn -k ztmw.gunicorn_worker.GunicornWebWorker`.

`aiohttp.GunicornWebWorker` serves through aiohttp's own runner, whose answer to a request its parser refuses
quotes the offending line (an `Authorization` line, token included) to the client, and whose log record of it,
written through gunicorn's error log, carries the same line. This worker builds the runner the same way
(gunicorn's logger, keep-alive, access log and graceful timeout), as a `ParserSafeAppRunner`
(`ztmw.parser_rejection`). An app factory that returns a runner of its own keeps it, as in aiohttp's worker;
only a `ParserSafeAppRunner` is safe there.

Importing this module needs gunicorn (aiohttp's worker imports it); `ztmw` itself does not.
"""

from __future__ import annotations

import inspect
from typing import Any

from aiohttp import web
from aiohttp.worker import GunicornWebWorker as _AiohttpWorker

from .parser_rejection import ParserSafeAppRunner


class GunicornWebWorker(_AiohttpWorker):
    """`aiohttp.GunicornWebWorker`, except that the app is served by a `ParserSafeAppRunner`."""

    wsgi: Any  # the app, or its async factory: what gunicorn loaded (aiohttp's worker reads it in `_run`)

    async def _run(self) -> None:
        made = self.wsgi
        if not isinstance(made, web.Application) and inspect.iscoroutinefunction(made):
            made = await made()
        if isinstance(made, web.Application):
            self.wsgi = self._safe_runner_factory(made)
        else:  # a runner of the factory's own, or something aiohttp's worker refuses with its own error
            if isinstance(made, web.AppRunner) and not isinstance(made, ParserSafeAppRunner):
                self.log.warning("the app factory returned its own %s: requests aiohttp's parser refuses are "
                                 "answered with their bytes quoted; return a ztmw.ParserSafeAppRunner",
                                 type(made).__name__)
            self.wsgi = _returning(made)
        await super()._run()

    def _safe_runner_factory(self, app: web.Application) -> Any:
        """What aiohttp's worker would build for `app` (its arguments, read off gunicorn's settings), safe."""
        cfg = self.cfg
        runner = ParserSafeAppRunner(
            app,
            logger=self.log,
            keepalive_timeout=cfg.keepalive,
            access_log=self.log.access_log if cfg.accesslog else None,
            access_log_format=self._get_valid_log_format(cfg.access_log_format),
            shutdown_timeout=cfg.graceful_timeout / 100 * 95,
        )
        return _returning(runner)


def _returning(value: Any) -> Any:
    """An async factory for aiohttp's worker, which awaits the app factory it was given."""

    async def factory() -> Any:
        return value

    return factory
