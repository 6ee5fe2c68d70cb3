"""App factories for the CLI tests: sync, async, and one that takes the extra command-line arguments."""

from __future__ import annotations

import os

from aiohttp import web


async def _hello(request: web.Request) -> web.Response:
    return web.json_response({"hello": request.match_info.get("name", "world")})


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/hello/{name}", _hello)
    app.router.add_get("/open", _hello)
    app.router.add_post("/unruled", _hello)
    return app


async def create_app_async() -> web.Application:
    return create_app()


def create_app_with_args(argv: list[str]) -> web.Application:
    app = create_app()
    if "--extra-route" in argv:
        app.router.add_get("/extra", _hello)
    return app


def not_an_app() -> str:
    return "nope"


async def _hello_from(request: web.Request) -> web.Response:
    return web.json_response({"hello": request.match_info.get("name"), "pid": os.getpid()})


def create_worker_app() -> web.Application:
    """The app of the multi-process tests: its answers name the process that served them."""
    app = web.Application()
    app.router.add_get("/hello/{name}", _hello_from)
    app.router.add_get("/open", _hello_from)
    return app


async def _account_data(request: web.Request) -> web.Response:
    return web.json_response({"account": request.match_info["account"], "data": [1, 2, 3]})


async def _account_payment(request: web.Request) -> web.Response:
    return web.json_response({"account": request.match_info["account"], "paid": True}, status=201)


def create_accounts_app() -> web.Application:
    """An account's data (owner rule) and its payments (owner rule plus a bank-ID login): account linking."""
    app = web.Application()
    app.router.add_get("/accounts/{account}/data", _account_data)
    app.router.add_post("/accounts/{account}/payments", _account_payment)
    return app


async def _upload(request: web.Request) -> web.Response:
    return web.json_response({"received": len(await request.read())})


def create_upload_app() -> web.Application:
    """`create_app` plus a route whose handler reads the body (test_parser_rejection: broken chunked framing)."""
    app = create_app()
    app.router.add_post("/upload", _upload)
    return app
