"""`ztmw gateway` and the gateway half of `ztmw check`: run the gateway, or show what its rules cover."""

from __future__ import annotations

import argparse
import ssl
import sys

from ..config import Config
from ..errors import ConfigurationError
from ..parser_rejection import run_app
from .app import GATEWAY, create_gateway_app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--tls-client-ca")
    parser.add_argument("--tls-require-client-cert", action="store_true")


def run(args: argparse.Namespace, config: Config) -> int:
    """Raises ConfigurationError (the command line prints it in one line, exit 2) for anything that stops
    start-up: the config, the signing key, the TLS files, the listening socket. The TLS and listening part is
    `ztmw serve`'s, so both listeners behave alike."""
    app = create_gateway_app(config)
    ssl_context = None
    if args.tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
            if args.tls_client_ca:
                ssl_context.load_verify_locations(args.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"--tls-cert/--tls-key/--tls-client-ca: cannot load: {exc}") from None
        if args.tls_client_ca:
            ssl_context.verify_mode = ssl.CERT_REQUIRED if args.tls_require_client_cert else ssl.CERT_OPTIONAL
    # access_log=None: a forwarded URI may carry a refused ?access_token=; a large max_field_size lets ztmw's
    # own cap answer oversize credentials with a challenge; run_app is aiohttp's on a runner whose parser
    # rejections never echo the request (ztmw/parser_rejection.py)
    try:
        run_app(app, host=args.host, port=args.port, ssl_context=ssl_context, print=None, access_log=None,
                    max_field_size=32768)
    except OSError as exc:
        raise ConfigurationError(f"--host/--port: cannot listen on {args.host}:{args.port}: {exc.strerror}") from None
    return 0


def check(config: Config) -> int:
    """One line per rule pattern and method set, in the order they are tried; everything else is denied."""
    try:
        app = create_gateway_app(config)
    except ConfigurationError as exc:
        print(f"ztmw: invalid configuration: {exc}", file=sys.stderr)
        return 2
    rows = []
    for pattern, rules in app[GATEWAY].routes.patterns():
        for rule in rules:
            methods = ",".join(sorted(rule.methods)) if rule.methods is not None else "*"
            rows.append((methods, pattern, rule.id))
    width = max((len(f"{m} {p}") for m, p, _ in rows), default=0)
    for methods, pattern, rule_id in rows:
        print(f"{methods + ' ' + pattern:<{width}}  {rule_id}")
    print(f"{'* (anything else)':<{width}}  DENIED")
    assert config.gateway is not None
    print(f"configuration valid; gateway in {config.gateway.mode} mode, {len(rows)} rules", file=sys.stderr)
    return 0
