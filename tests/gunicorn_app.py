"""The app the gunicorn tests serve: `gunicorn tests.gunicorn_app:create_app -k <ztmw's or aiohttp's worker>`.

An async factory, as aiohttp's gunicorn worker calls it in each worker process; it protects the worker test
app with `ztmw.setup` and the configuration file named by ZTMW_TEST_CONFIG.
"""

from __future__ import annotations

import os

from aiohttp import web

import ztmw

from .factories import create_worker_app


async def create_app() -> web.Application:
    app = create_worker_app()
    ztmw.setup(app, ztmw.load_config(os.environ["ZTMW_TEST_CONFIG"]))
    return app
