"""The listening side that `ztmw serve` and `ztmw gateway` share: the same flags, TLS set-up and socket, so both
listeners behave alike and every start-up problem is a `ConfigurationError` (one line on the command line)."""

from __future__ import annotations

import argparse
import ssl

from aiohttp import web

from .errors import ConfigurationError
from .parser_rejection import run_app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--tls-client-ca")
    parser.add_argument("--tls-require-client-cert", action="store_true")


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """None without `--tls-cert`. With `--tls-client-ca` the listener asks for a client certificate but does
    not require one: a missing one is then an HTTP 401 from ztmw, not a failed handshake."""
    if not args.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_client_ca:
            context.load_verify_locations(args.tls_client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"--tls-cert/--tls-key/--tls-client-ca: cannot load: {exc}") from None
    if args.tls_client_ca:
        context.verify_mode = ssl.CERT_REQUIRED if args.tls_require_client_cert else ssl.CERT_OPTIONAL
    return context


def listen(app: web.Application, args: argparse.Namespace, *, reuse_port: bool = False) -> None:
    """Serve `app` until a signal. access_log=None: aiohttp's default line carries the query string (a refused
    ?access_token= would be logged); a larger max_field_size lets ztmw's own cap answer oversize credentials
    with a challenge; run_app is aiohttp's on a runner whose parser rejections never echo the request
    (ztmw/parser_rejection.py); `reuse_port` lets the workers of `--workers N` share the port."""
    context = tls_context(args)
    try:
        run_app(app, host=args.host, port=args.port, ssl_context=context, print=None, access_log=None,
                max_field_size=32768, reuse_port=reuse_port)
    except OSError as exc:  # the listening socket: taken port, unknown host, no permission
        raise ConfigurationError(f"--host/--port: cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
