"""Requests aiohttp's HTTP parser refuses, answered and logged without a byte of the request (SEC-03, RESP-20).

aiohttp refuses what its parser cannot accept (a NUL, bare CR or other control byte in a header, an obs-fold, a
bad header name, an oversize line, too many headers, a bad method or version, broken chunked framing) before any
middleware runs. Its own answer quotes the offending line in the response body, and its `aiohttp.server` log
record carries the same line in the exception text: an `Authorization` or `DPoP` line goes out whole, token
included. ztmw's middleware never sees these requests, so the fix lives where aiohttp builds that answer:

- `ParserSafeRequestHandler.handle_error` answers a parser rejection with a fixed body (the status line's
  phrase) and a status that fits: 431 for a header line over `max_field_size` or too many headers, 414 for a
  request line over `max_line_size`, 400 for everything else, including a body that breaks its chunked
  framing while a handler reads it (aiohttp would say 500). It logs one line naming the peer and the kind
  of rejection, never the exception text.
- `ParserSafeServer` builds that handler for every connection, `ParserSafeAppRunner` builds that server, and
  `run_app` is `aiohttp.web.run_app` on that runner (with the access log off by default: its line carries the
  query string, where a refused `?access_token=` would be).
- `RejectionLogFilter` rewrites the log records aiohttp's own handler writes about such requests; `ztmw.setup`
  puts it on the `aiohttp.server` logger and on gunicorn's error log. That is as far as a library reaches into
  an app that starts its server with `aiohttp.web.run_app` or aiohttp's gunicorn worker: the logs are clean,
  but only this module's runner changes the body (`ztmw.gunicorn_worker` is aiohttp's worker on it).

aiohttp offers no supported switch for the handler class, so `ParserSafeAppRunner` takes the server aiohttp
built and re-creates it with the same arguments (`Server._kwargs`); if a future aiohttp stops keeping them,
start-up fails rather than serving the echoing handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestPayloadError

SERVER_LOGGER = "aiohttp.server"
# where aiohttp's records about requests go under `gunicorn -k aiohttp.GunicornWebWorker` (gunicorn's logger)
GUNICORN_ERROR_LOGGER = "gunicorn.error"
# the parsers' own texts for these rejections (constants in aiohttp, no request bytes in them)
_TOO_MANY_FIELDS = frozenset({"Too many headers received", "Too many trailers received"})


def carries_request_bytes(exc: BaseException | None) -> bool:
    """True when `exc` (or what caused it) is a parser rejection, whose text may quote the request."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (HttpProcessingError, RequestPayloadError)):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def rejection_kind(exc: BaseException | None) -> str:
    """The exception's class names, outermost first: what an operator may know about a rejection."""
    names: list[str] = []
    while exc is not None and len(names) < 8:
        names.append(type(exc).__name__)
        exc = exc.__cause__ or exc.__context__
    return " from ".join(names) or "unknown"


def rejection_status(exc: BaseException | None, *, max_line_size: int, max_field_size: int) -> int:
    """The status for a request the parser refused: 431, 414 or 400 (never 5xx: the client sent it).

    A `LineTooLong` says which limit it hit, not which line: the pure-Python parser checks an unfinished line
    against `max_line_size` even in the header section, so there an oversize header arriving in pieces gets
    414. With the default (C) parser the mapping is exact; with equal limits it cannot tell, and says 400.
    """
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if max_line_size != max_field_size:
            if limit == max_field_size:
                return HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
            if limit == max_line_size:
                return HTTPStatus.REQUEST_URI_TOO_LONG
        return HTTPStatus.BAD_REQUEST
    if isinstance(exc, BadHttpMessage) and exc.message in _TOO_MANY_FIELDS:
        return HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
    return HTTPStatus.BAD_REQUEST


class RejectionLogFilter(logging.Filter):
    """Strips the request bytes from aiohttp's log records about parser rejections; other records pass untouched.

    The record keeps its level and its message (peer address) and gains the rejection's kind; the traceback,
    whose last line quotes the refused header line, is dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if carries_request_bytes(exc):
            record.msg = f"{record.getMessage()}: {rejection_kind(exc)} (request bytes withheld)"
            record.args = None
            record.exc_info = None
            record.exc_text = None
            record.stack_info = None
        return True


REJECTION_LOG_FILTER = RejectionLogFilter()


def install_log_filter(logger: logging.Logger | None = None) -> None:
    """Put the rejection filter on `logger`; by default on aiohttp's server logger and on gunicorn's error log,
    which aiohttp's gunicorn worker hands its server (harmless where gunicorn is not used). Idempotent."""
    for each in [logger] if logger is not None else [logging.getLogger(n) for n in (SERVER_LOGGER,
                                                                                     GUNICORN_ERROR_LOGGER)]:
        each.addFilter(REJECTION_LOG_FILTER)


class ParserSafeRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, except that a rejected request is answered without echoing it."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not carries_request_bytes(exc):  # a handler's own failure (500) or a timeout (504): aiohttp's answer
            return super().handle_error(request, status, exc, message)
        if isinstance(exc, BadHttpMethod):  # what scanners and TLS-on-a-plain-port send all day: as aiohttp does
            self.logger.debug("HTTP parser rejected a request from %s: %s", request.remote, rejection_kind(exc))
        else:
            self.logger.warning("HTTP parser rejected a request from %s: %s", request.remote, rejection_kind(exc))
        if request.writer.output_size > 0:  # a response is under way: the connection can only be dropped
            raise ConnectionError("response already started; cannot answer a rejected request")
        code = rejection_status(exc, max_line_size=self.max_line_size, max_field_size=self.max_field_size)
        response = web.Response(status=code, text=f"{code} {HTTPStatus(code).phrase}\n")
        response.force_close()  # the parser's state is unknown after a rejection: never reuse the connection
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's other paths that log a rejection (a failed answer, an "Unhandled exception") without it."""
        exc = kw.get("exc_info")
        if isinstance(exc, BaseException) and carries_request_bytes(exc):
            message = str(args[0]) if args else "Error"
            with contextlib.suppress(TypeError, ValueError):  # aiohttp's own texts; a bad one stays unformatted
                message = message % args[1:] if len(args) > 1 else message
            self.logger.error("%s: %s (request bytes withheld)", message, rejection_kind(exc))
            return
        super().log_exception(*args, **kw)


class ParserSafeServer(web.Server):
    """aiohttp's low-level server, making a `ParserSafeRequestHandler` for every connection."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        # aiohttp would fall back to a handler without the unknown arguments; a typo must not cost the
        # protection, so the arguments are checked here, at start-up
        inspect.signature(ParserSafeRequestHandler).bind(self, loop=self._loop, **self._kwargs)

    @classmethod
    def replacing(cls, server: web.Server) -> ParserSafeServer:
        """The same server (handler, request factory, connection arguments) with the safe handler."""
        kwargs = getattr(server, "_kwargs", None)
        if not isinstance(kwargs, dict):
            raise RuntimeError("this aiohttp version keeps no Server._kwargs; ztmw cannot replace its handler")
        return cls(server.request_handler, request_factory=server.request_factory,
                   handler_cancellation=server.handler_cancellation, loop=server._loop, **kwargs)

    def __call__(self) -> web.RequestHandler:
        return ParserSafeRequestHandler(self, loop=self._loop, **self._kwargs)


class ParserSafeAppRunner(web.AppRunner):
    """`aiohttp.web.AppRunner` whose server answers parser rejections without echoing the request.

    Use it exactly as `web.AppRunner` (with `web.TCPSite`, `web.SockSite`, `web.UnixSite`).
    """

    __slots__ = ()

    async def _make_server(self) -> web.Server:
        install_log_filter()  # records aiohttp writes itself (the fallback paths) are cleaned as well
        return ParserSafeServer.replacing(await super()._make_server())


def run_app(
    app: web.Application | Awaitable[web.Application],
    *,
    host: str | Iterable[str] | None = None,
    port: int | None = None,
    sock: socket.socket | Iterable[socket.socket] | None = None,
    ssl_context: Any = None,
    backlog: int = 128,
    reuse_address: bool | None = None,
    reuse_port: bool | None = None,
    shutdown_timeout: float = 60.0,
    print: Callable[..., None] | None = print,  # noqa: A002 - web.run_app's name for it
    handle_signals: bool = True,
    access_log: logging.Logger | None = None,
    **runner_kwargs: Any,
) -> None:
    """`aiohttp.web.run_app` for TCP, on `ParserSafeAppRunner`; blocks until SIGINT or SIGTERM.

    Takes web.run_app's TCP arguments; the rest (`max_field_size`, `keepalive_timeout`, `access_log_class`,
    `handler_cancellation`, ...) go to the runner as there. The access log is off unless `access_log` is given.
    """
    serving = _serve(app, host=host, port=port, sock=sock, ssl_context=ssl_context, backlog=backlog,
                     reuse_address=reuse_address, reuse_port=reuse_port, print=print,
                     runner_kwargs=dict(runner_kwargs, handle_signals=handle_signals,
                                        shutdown_timeout=shutdown_timeout, access_log=access_log))
    with asyncio.Runner() as loop_runner, contextlib.suppress(web.GracefulExit, KeyboardInterrupt):
        loop_runner.run(serving)  # on the way out the runner cancels _serve, whose cleanup then runs


async def _serve(
    app: web.Application | Awaitable[web.Application],
    *,
    host: str | Iterable[str] | None,
    port: int | None,
    sock: socket.socket | Iterable[socket.socket] | None,
    ssl_context: Any,
    backlog: int,
    reuse_address: bool | None,
    reuse_port: bool | None,
    print: Callable[..., None] | None,  # noqa: A002
    runner_kwargs: dict[str, Any],
) -> None:
    application = app if isinstance(app, web.Application) else await app
    runner = ParserSafeAppRunner(application, **runner_kwargs)
    await runner.setup()
    try:
        sites: list[web.BaseSite] = []
        hosts: list[str | None] = [host] if isinstance(host, str) else list(host or ())
        for name in hosts or ([None] if sock is None else []):  # neither: every interface, as web.run_app
            sites.append(web.TCPSite(runner, name, port, ssl_context=ssl_context, backlog=backlog,
                                     reuse_address=reuse_address, reuse_port=reuse_port))
        for listening in [sock] if isinstance(sock, socket.socket) else list(sock or ()):
            sites.append(web.SockSite(runner, listening, ssl_context=ssl_context, backlog=backlog))
        for site in sites:
            await site.start()
        if print is not None:
            print(f"======== Running on {', '.join(site.name for site in sites)} ========\n(Press CTRL+C to quit)")
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
