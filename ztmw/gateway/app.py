"""`ztmw gateway`'s aiohttp application: the pipeline's lifetime, the gateway's own routes, and the handler of
its mode (a forward-auth question, or a request to proxy). An adapter module: it speaks aiohttp's server API.

The gateway's own routes are the RFC 9728 metadata document and the assertion key set at
`/.well-known/ztmw/jwks.json`; every other path is a question (forward-auth) or a request for the upstream
(proxy).
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Mapping

from aiohttp import web

from ..config import Config, GatewayConfig, load_config
from ..errors import ConfigurationError
from ..middleware import error_response, pipeline_lifetime
from ..models import RequestView
from ..parser_rejection import install_log_filter
from ..pipeline import Outcome, Pipeline
from ..typing import AuditSink, Clock
from .assertion import JWKS_PATH, AssertionIssuer, load_signing_key
from .decision import Decider, Verdict

GATEWAY: web.AppKey[Decider] = web.AppKey("ztmw.gateway", Decider)

Handler = Callable[[web.Request], Any]


def create_gateway_app(
    config: Config | Mapping[str, Any] | str, *, clock: Clock | None = None, audit_sink: AuditSink | None = None
) -> web.Application:
    """The gateway for `config` (which must have a `[gateway]` table); raises ConfigurationError."""
    if not isinstance(config, Config):
        config = load_config(config)
    settings = config.gateway
    if settings is None:
        raise ConfigurationError("gateway: the configuration has no [gateway] table")
    pipeline = Pipeline(config, clock=clock or time.time, audit_sink=audit_sink)
    assertions = None
    if settings.signing_key is not None:
        assert settings.assertion_audience is not None  # config guarantees it with a signing key
        assertions = AssertionIssuer(key=load_signing_key(settings.signing_key), issuer=config.resource.identifier,
                                     audience=settings.assertion_audience, ttl=settings.assertion_ttl,
                                     clock=pipeline.clock)
    decider = Decider(pipeline, assertions)
    install_log_filter()  # aiohttp's records of requests its parser refused lose the bytes (tokens) they quote
    app = web.Application(client_max_size=1024**2)
    app[GATEWAY] = decider
    app.cleanup_ctx.append(pipeline_lifetime(pipeline))
    if config.metadata_enabled:
        document = json.dumps(pipeline.metadata_document())
        app.router.add_get(config.metadata_path, _static_json(document))
    if assertions is not None:
        app.router.add_get(JWKS_PATH, _static_json(json.dumps(assertions.jwks())))
    if settings.mode == "proxy":
        from .proxy import proxy_handler, upstream_session

        app.cleanup_ctx.append(upstream_session(settings))
        app.router.add_route("*", "/{tail:.*}", proxy_handler(decider, settings))
    else:
        from .forward_auth import forward_auth_handler

        app.router.add_route("*", "/{tail:.*}", forward_auth_handler(decider, settings))
    return app


def _static_json(document: str) -> Handler:
    async def serve(request: web.Request) -> web.Response:
        return web.Response(text=document, content_type="application/json",
                            headers={"Cache-Control": "public, max-age=300"})

    return serve


def refusal(decider: Decider, verdict: Verdict) -> web.Response:
    """A denied question or request: exactly what the middleware would answer (a malformed target: 400)."""
    error = verdict.outcome.error
    if error is None:  # refused before the pipeline: malformed method or target
        return web.json_response({"error": "invalid_request", "error_description": "malformed request target"},
                                 status=verdict.outcome.decision.status)
    return error_response(decider.pipeline, error)


def add_allowed_headers(decider: Decider, verdict: Verdict, response: web.StreamResponse) -> None:
    """What an allowed answer carries besides the identity: plugin headers (a fresh DPoP nonce), uncacheable
    when they hold a nonce (RFC 9449 §8.2), as the middleware adds them to an app's response."""
    extra = decider.pipeline.response_headers(verdict.view, True)
    if extra:
        response.headers.update(extra)
        if "DPoP-Nonce" in extra:
            response.headers["Cache-Control"] = "no-store"


def record(decider: Decider, view: RequestView, outcome: Outcome, status: int, started: float) -> None:
    decider.pipeline.audit(view, outcome, status, started)


def peer_of(request: web.Request) -> str | None:
    transport = request.transport
    peername = transport.get_extra_info("peername") if transport is not None else None
    return peername[0] if isinstance(peername, (tuple, list)) and peername else None


def tls_der_of(request: web.Request) -> bytes | None:
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    return ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None


def settings_of(config: Config) -> GatewayConfig:
    if config.gateway is None:
        raise ConfigurationError("gateway: the configuration has no [gateway] table")
    return config.gateway
