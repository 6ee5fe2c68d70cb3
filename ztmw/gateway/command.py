"""`ztmw gateway` and the gateway half of `ztmw check`: run the gateway, or show what its rules cover."""

from __future__ import annotations

import argparse
import sys

from .. import listener, workers
from ..config import Config
from ..errors import ConfigurationError
from .app import GATEWAY, create_gateway_app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    listener.add_arguments(parser)  # `ztmw serve`'s listening flags and workers, so both behave alike
    workers.add_arguments(parser)


def run(args: argparse.Namespace, config: Config) -> int:
    """Raises ConfigurationError (the command line prints it in one line, exit 2) for anything that stops
    start-up: the config, the signing key, the TLS files, the listening socket."""
    if workers.is_supervisor(args):  # --workers N: this process only starts and watches N of these
        return workers.supervise(args, config, args.argv)
    app = create_gateway_app(workers.enter_worker(args, config))
    listener.listen(app, args, reuse_port=args.worker_id is not None)
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
