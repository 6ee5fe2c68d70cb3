"""The `ztmw` command: demo, serve, check, token, bench, audit verify (DESIGN.md §4.3).

The library never configures logging; this command does, as an application would: JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import structlog
from aiohttp import web

from . import listener, workers
from .config import Config, load_config
from .errors import ConfigurationError
from .middleware import setup
from .models import RouteRef
from .pipeline import Pipeline


def configure_json_logging() -> None:
    """The recommended production setup: cheap processors, one JSON line per event, one writer of stdout
    that the default audit sink shares (`ztmw.serve_logging`)."""
    from .serve_logging import configure

    configure()


def load_factory(spec: str | None, extra_args: Sequence[str]) -> web.Application:
    """`module:attr` -> an aiohttp app; the factory may be sync or async, with or without an argv list."""
    if spec is None:
        from .sample_app import create_app

        return create_app()
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"ztmw: app factory must look like module:function, got {spec!r}")
    sys.path.insert(0, str(Path.cwd()))
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"ztmw: cannot load app factory {spec!r}: {exc}") from None
    params = [p for p in inspect.signature(factory).parameters.values()
              if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    result = factory(list(extra_args)) if params else factory()
    if inspect.isawaitable(result):
        result = asyncio.run(_awaited(result))
    if not isinstance(result, web.Application):
        raise SystemExit(f"ztmw: {spec} did not return an aiohttp.web.Application")
    return result


async def _awaited(result: Any) -> Any:
    return await result


def _config_or_exit(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigurationError as exc:
        print(f"ztmw: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace, extra: Sequence[str]) -> int:
    configure_json_logging()
    config = _config_or_exit(args.config)
    if workers.is_supervisor(args):  # --workers N: this process only starts and watches N of these
        return workers.supervise(args, config, args.argv)
    config = workers.enter_worker(args, config)
    app = load_factory(args.factory, extra)
    try:
        setup(app, config)
    except ConfigurationError as exc:
        print(f"ztmw: invalid configuration: {exc}", file=sys.stderr)
        return 2
    listener.listen(app, args, reuse_port=args.worker_id is not None)
    return 0


def route_table(app: web.Application, pipeline: Pipeline) -> list[tuple[str, str, str | None]]:
    rows = []
    for resource in app.router.resources():
        for route in resource:
            method = route.method
            if method == "HEAD":
                continue  # covered by its GET (a rule that lists GET also covers HEAD)
            methods = ["GET", "POST", "PUT", "PATCH", "DELETE"] if method == "*" else [method]
            for m in methods:
                rule = pipeline.policy.rule_for(RouteRef(m, resource.canonical))
                rows.append((m, resource.canonical, rule.id if rule else None))
    return rows


def cmd_check(args: argparse.Namespace, extra: Sequence[str]) -> int:
    try:
        config = load_config(args.config)
        if args.factory is None and config.gateway is not None:  # a gateway's rules are its only routes
            from .gateway.command import check

            return check(config)
        app = load_factory(args.factory, extra)
        pipeline = setup(app, config)
    except ConfigurationError as exc:
        print(f"ztmw: invalid configuration: {exc}", file=sys.stderr)
        return 2
    rows = route_table(app, pipeline)
    width = max((len(f"{m} {p}") for m, p, _ in rows), default=0)
    for method, pattern, rule_id in rows:
        print(f"{method + ' ' + pattern:<{width}}  {rule_id or 'DENIED'}")
    denied = sum(1 for _, _, r in rows if r is None)
    print(f"configuration valid; {len(rows)} routes, {denied} denied by default", file=sys.stderr)
    owners = "only linked subjects" if config.owner_requires_link else "linked subjects and raw `sub` values"
    print(f"owner rules accept {owners} (identity.owner_requires_link: {config.owner_requires_link_why})",
          file=sys.stderr)
    return 1 if args.strict and denied else 0


def cmd_gateway(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from .gateway.command import run

    configure_json_logging()
    return run(args, _config_or_exit(args.config))


def cmd_token(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from . import devtokens

    return devtokens.main(args)


def cmd_demo(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from .demo import run_demo

    if not args.verbose:  # the table tells the story; plugin start-up lines would only bury it
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.gateway:
        from .gateway.demo import run_gateway_demo

        return asyncio.run(run_gateway_demo())

    return asyncio.run(run_demo(verbose=args.verbose))


def cmd_bench(args: argparse.Namespace, extra: Sequence[str]) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
    if not script.exists():
        print("ztmw: benchmarks/run.py not found (run from a source checkout)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *extra])


def cmd_audit_verify(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from . import audit_chain

    return audit_chain.run_verify(args)


def cmd_links(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from .linking import cli as links_cli

    return links_cli.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ztmw", description="Zero-trust security layer for aiohttp servers.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the scripted scenarios against a local issuer and sample API")
    demo.add_argument("--verbose", action="store_true", help="also print the audit events")
    demo.add_argument("--gateway", action="store_true",
                      help="a non-Python upstream protected by `ztmw gateway` (proxy mode, and nginx auth_request)")
    demo.set_defaults(func=cmd_demo)

    serve = sub.add_parser("serve", help="serve an aiohttp app factory behind the configured pipeline")
    serve.add_argument("factory", nargs="?", help="module:function returning an aiohttp app (default: sample API)")
    listener.add_arguments(serve)
    workers.add_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check", help="validate the config and show which rule covers each route")
    check.add_argument("factory", nargs="?")
    check.add_argument("--config", required=True)
    check.add_argument("--strict", action="store_true", help="exit 1 when any route would be denied")
    check.set_defaults(func=cmd_check)

    gateway = sub.add_parser("gateway", help="forward-auth decision service or identity-aware reverse proxy")
    from .gateway.command import add_arguments as gateway_arguments

    gateway_arguments(gateway)
    gateway.set_defaults(func=cmd_gateway)

    token = sub.add_parser("token", help="development keys, tokens and DPoP proofs for trying an API with curl")
    from . import devtokens

    devtokens.add_arguments(token)
    token.set_defaults(func=cmd_token)

    bench = sub.add_parser("bench", help="run the load scripts in benchmarks/ and print the comparison")
    bench.set_defaults(func=cmd_bench)

    audit = sub.add_parser("audit", help="tamper-evident audit log tools ([plugins.chain])")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    audit_verify = audit_sub.add_parser(
        "verify", help="check every hash chain in an audit file (exit 0 intact, 1 broken link, 2 unreadable)")
    from . import audit_chain

    audit_chain.add_arguments(audit_verify)
    audit_verify.set_defaults(func=cmd_audit_verify)

    links = sub.add_parser("links", help="link, unlink and list logins of accounts in the [linking] store")
    from .linking import cli as links_cli

    links_cli.add_arguments(links)
    links.set_defaults(func=cmd_links)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `serve --workers` starts its children with
    if extra and args.command not in ("serve", "check", "bench"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in ("serve", "gateway") and args.tls_cert and not args.tls_key:
        parser.error("--tls-cert needs --tls-key")
    try:
        return int(args.func(args, extra) or 0)
    except ConfigurationError as exc:  # wherever it surfaces (loading, setup, start-up): one line, no traceback
        print(f"ztmw: invalid configuration: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
