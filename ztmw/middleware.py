"""The aiohttp adapter: the only module that knows `aiohttp.web`.

It turns a request into a `RequestView`, asks the pipeline, and turns the outcome into either the handler's
response or an error response with the right challenge. `setup()` installs it all; the stage middlewares
(`audit_middleware`, `authentication_middleware`, `authorization_middleware`) are there for apps that want
one stage alone.
"""

from __future__ import annotations

import json
import os
import sys
import time
from hashlib import sha256
from time import perf_counter
from types import MappingProxyType
from typing import Any, AsyncIterator, Awaitable, Callable, Hashable, Mapping

from aiohttp import hdrs, web
from multidict import istr
from yarl import URL

from ._frozen import positional_factory
from .client_cert import certificate_from_request
from .config import Config, load_config
from .errors import AccessDenied, AuthError, UpstreamUnavailable
from .extract import plain_bearer
from .memo import MemoKey
from .models import ANONYMOUS_TRUST, Decision, Principal, RequestView, RouteRef, TrustAssessment
from .parser_rejection import install_log_filter
from .pipeline import Outcome, Pipeline
from .typing import AuditSink, Clock, RouteProvider

PRINCIPAL: web.RequestKey[Principal | None] = web.RequestKey("ztmw.principal", Principal)
TRUST: web.RequestKey[TrustAssessment] = web.RequestKey("ztmw.trust", TrustAssessment)
DECISION: web.RequestKey[Decision] = web.RequestKey("ztmw.decision", Decision)
PIPELINE: web.AppKey[Pipeline] = web.AppKey("ztmw.pipeline", Pipeline)
_VIEW: web.RequestKey[RequestView] = web.RequestKey("ztmw.view", RequestView)
# what the stage middlewares hand the audit stage besides the public keys
_ERROR: web.RequestKey[Any] = web.RequestKey("ztmw.error", object)
_CACHE: web.RequestKey[str] = web.RequestKey("ztmw.cache", str)
_DPOP = istr("DPoP")  # header names as istr: the case-insensitive lookup skips folding them every request
_AUTHORIZATION, _CONTENT_TYPE = hdrs.AUTHORIZATION, hdrs.CONTENT_TYPE
_BLANK = ("", " ")  # what may not follow "Bearer ": nothing, or a second space
# CPython's str hash is SipHash under a random key per process unless PYTHONHASHSEED fixes it (memo.MemoKey)
_SIPHASH = (sys.hash_info.algorithm.startswith("siphash") and bool(sys.flags.hash_randomization)
            and os.environ.get("PYTHONHASHSEED", "random") == "random")
# longer paths are decided in full: a memo entry holds its path twice (key, match info), keep entries small
_MEMO_PATH_MAX = 1024
_FORM = "application/x-www-form-urlencoded"
# ztmw reads a form body (to refuse a second token transport) only up to this size: a request it is about to
# deny must not make it buffer what the app would allow (client_max_size); a form carrying a token is small
_FORM_READ_MAX = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# aiohttp keeps a request's storage (request[key]) in the dict `_state`, one of the attributes it declares
# (BaseRequest.ATTRS). A replay writes its three keys there directly: `request[key] = ...` runs a Python-level
# check per key (str keys warn), a fifth of what a replay costs beside the token's hash. Keys are RequestKeys.
_STORAGE = "_state" in web.BaseRequest.ATTRS


def setup(
    app: web.Application,
    config: Config | Mapping[str, Any] | str,
    *,
    clock: Clock | None = None,
    audit_sink: AuditSink | None = None,
) -> Pipeline:
    """Protect `app`: every request is denied unless a rule allows it. Returns the pipeline (for tests)."""
    if not isinstance(config, Config):
        config = load_config(config)
    pipeline = Pipeline(config, clock=clock or time.time, audit_sink=audit_sink)
    app[PIPELINE] = pipeline
    app.cleanup_ctx.append(pipeline_lifetime(pipeline))
    if config.metadata_enabled:
        app.router.add_get(config.metadata_path, _metadata_handler(pipeline), name="ztmw-metadata")
    for plugin in pipeline.plugins:  # e.g. a metrics endpoint; still deny-by-default: a rule must allow it
        if not isinstance(plugin.instance, RouteProvider):
            continue
        for method, path, handler in plugin.instance.web_routes():
            app.router.add_route(method, path, handler, name=f"ztmw-plugin-{plugin.name}-{method.lower()}")
    app.middlewares.append(zero_trust_middleware(pipeline))
    install_log_filter()  # aiohttp's records of requests its parser refused, before this middleware, lose the bytes
    if config.cors_expose_headers:
        app.on_response_prepare.append(expose_challenge_headers)
    return pipeline


_EXPOSE = "Access-Control-Expose-Headers"
_EXPOSED = ("WWW-Authenticate", "DPoP-Nonce")


async def expose_challenge_headers(request: web.Request, response: web.StreamResponse) -> None:
    """RESP-19 (RFC 9449 §7.1, §8): a browser client on another origin reads a challenge or a DPoP nonce only
    from a response that exposes them. Added to every response (a replayed one, the app's own, an error),
    beside whatever the app's CORS setup exposes; harmless where no browser asks."""
    present = {name.strip().lower() for line in response.headers.getall(_EXPOSE, ()) for name in line.split(",")}
    missing = [name for name in _EXPOSED if name.lower() not in present]
    if missing:
        response.headers.add(_EXPOSE, ", ".join(missing))


def pipeline_lifetime(pipeline: Pipeline) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        await pipeline.start()
        try:
            yield
        finally:
            await pipeline.close()

    return lifetime


def _metadata_handler(pipeline: Pipeline) -> Handler:
    async def metadata(request: web.Request) -> web.Response:
        return web.json_response(pipeline.metadata_document())

    return metadata


def request_view(
    request: web.Request, pipeline: Pipeline, *, shared: bool = False, has_body_token: bool = False
) -> RequestView:
    """Everything the pipeline may know about the request; raises InvalidRequest for a malformed cert header.

    With `shared`, built once per request for the stage middlewares used alone, so a security event about it
    is logged once; the all-in-one middleware builds it once anyway and skips the lookup.
    """
    if shared and _VIEW in request:
        return request[_VIEW]
    match_info = request.match_info
    route = None
    method = request.method
    if match_info.http_exception is None:
        route = _route_ref(pipeline.route_refs, match_info.route, method)
    transport = request.transport
    peer = _peer(transport)
    certificate = None
    if pipeline.mtls_enabled:
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        result = certificate_from_request(
            tls_der=ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None,
            header_values=request.headers.getall(pipeline.config.mtls.header, []),
            peer=peer,
            config=pipeline.config.mtls,
        )
        certificate = result.certificate
        if result.ignored_untrusted_header:
            pipeline.log.warning("ztmw.security", reason="untrusted_client_cert_header", peer=peer,
                                 route=route.pattern if route else None)
    headers = request.headers
    view = RequestView(
        method=method,
        path=request.rel_url.raw_path,
        route=route,
        match_info=MappingProxyType(match_info),
        authorization=tuple(headers.getall(_AUTHORIZATION, ())),
        dpop=tuple(headers.getall(_DPOP, ())),
        peer=peer,
        client_certificate=certificate,
        has_query_token=_has_query_token(request.rel_url),
        has_body_token=has_body_token,
    )
    if shared:
        request[_VIEW] = view
    return view


def _peer(transport: Any) -> str | None:
    peername = transport.get_extra_info("peername") if transport is not None else None
    return peername[0] if isinstance(peername, (tuple, list)) and peername else None


# RequestView's fields in order, for the view of a plain request (positionally: a third of the keywords' cost)
_make_view = positional_factory(RequestView, (
    "method", "path", "route", "match_info", "authorization", "dpop", "peer", "client_certificate",
    "has_query_token", "has_body_token"))


def _plain_view(request: web.Request, match_info: web.UrlMappingMatchInfo, value: str,
                refs: dict[Hashable, RouteRef]) -> RequestView:
    """`request_view` of a plain request (`_plain_request`) without mTLS: what it would build, without looking
    for what `_plain_request` ruled out (a DPoP header, a query or form token, a second Authorization)."""
    method = request.method
    return _make_view(method, request.rel_url.raw_path, _route_ref(refs, match_info.route, method),
                      MappingProxyType(match_info), (value,), (), _peer(request.transport), None, False, False)


_ROUTE_REFS_MAX = 4096  # an app's routes times methods: a bound only against a pathological app


def _route_ref(refs: dict[Hashable, RouteRef], route: web.AbstractRoute, method: str) -> RouteRef:
    """The RouteRef of a matched route and the request's method, made once per pair (as the router's routes,
    they are fixed once the app runs) and kept in `refs`, the pipeline's: they go when its app goes."""
    ref = refs.get((route, method))
    if ref is None:
        if len(refs) >= _ROUTE_REFS_MAX:
            refs.clear()
        resource = route.resource
        ref = refs[(route, method)] = RouteRef(method, resource.canonical if resource else "")
    return ref


def zero_trust_middleware(pipeline: Pipeline) -> Any:
    """All stages in one middleware: decide, audit, then call the handler only when allowed."""
    recall = pipeline.memo.recall if pipeline.memo is not None else None
    keyed = recall is not None
    timed = pipeline.audit_sink is not None  # the time a request took is only ever read by audit
    # a plain bearer request is decided without a coroutine per stage when nothing of it needs awaiting
    # (Pipeline.decide_plain); with mTLS its view would carry a certificate: decided in full
    immediate = pipeline.authenticator.immediate and not pipeline.mtls_enabled
    max_bytes = pipeline.config.limits.max_credential_bytes
    route_refs = pipeline.route_refs

    @web.middleware
    async def zero_trust(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = perf_counter() if timed else 0.0
        match_info = request.match_info
        if match_info.http_exception is not None:
            return await handler(request)  # no such route: aiohttp's own 404/405, untouched
        outcome = None
        value, key = _plain_request(request, match_info, keyed)
        if value is not None:
            if key is not None and recall is not None:  # (a key is only made when there is a memo)
                entry = recall(key)
                # the same bearer request was allowed before: replay its outcome, when it resolved to the same
                # match info (an app middleware before this one may have cloned the request to another path
                # without resolving it again, or set its match info: an owner rule reads the match info)
                if entry is not None and entry.view.match_info == match_info:
                    if entry.ages:  # its trust was evaluated anew; any change: the full pipeline decides, below
                        aged = pipeline.replayed(entry)
                        if aged is not None:
                            _publish(request, aged)
                            return await _call_handler(request, handler, pipeline, entry.view, aged, started)
                    else:
                        _publish(request, entry.outcome)
                        record = entry.record
                        if record is None:  # audit is off: nothing to record
                            return await handler(request)
                        # _call_handler, written out: this is the path of most requests. Nothing to
                        # decorate: the memo only exists when decorators add nothing to plain bearer requests
                        # and mTLS is off.
                        status = 500
                        try:
                            response = await handler(request)
                            status = response.status
                            return response
                        except web.HTTPException as exc:
                            status = exc.status
                            raise
                        finally:
                            try:
                                record(status, started)
                            except Exception:  # a third party's recorder that raises: never a 500 (SEC-07)
                                pass
            if immediate and (credential := plain_bearer(value, max_bytes=max_bytes)) is not None:
                view = _plain_view(request, match_info, value, route_refs)
                outcome = pipeline.decide_plain(view, credential)
                if outcome is not None:
                    _publish(request, outcome)
        if outcome is None:
            try:
                view, outcome = await _decide(request, pipeline)
            except web.HTTPException as exc:  # aiohttp's own answer while reading the body (413): still recorded
                pipeline.audit(_bare_view(request), Outcome(Decision(False, "unreadable_body", None, exc.status)),
                               exc.status, started)
                raise
        if outcome.error is not None:
            response = error_response(pipeline, outcome.error)
            pipeline.audit(view, outcome, response.status, started)
            return response
        if key is not None and outcome.cache == "hit":  # only a second sighting is remembered (memo.accepts)
            pipeline.remember(key, view, outcome)
        return await _call_handler(request, handler, pipeline, view, outcome, started)

    return zero_trust


_NOT_PLAIN: tuple[None, None] = (None, None)


def _plain_request(request: web.Request, match_info: web.UrlMappingMatchInfo,
                   keyed: bool) -> tuple[str | None, MemoKey | None]:
    """(Authorization value, memo key) of a plain request, (None, None) for any other; no key unless `keyed`
    (there is a memo to look it up in).

    A plain request has one Authorization header in the canonical `Bearer <token>` spelling, no DPoP header,
    no form body and no query token: only such a request is replayed from the memo or decided without
    awaiting; any other is decided in full. Its memo key is None unless its path (read off the request target
    as sent: yarl keeps it as is) is in origin form, at most 1 KiB, without percent-encoding or a fragment
    (other spellings of the same request are decided in full, so one token cannot fill the memo with spellings
    of itself). The query is left out of the key: the decision never depends on it, but for an `access_token`
    parameter, which makes the request not plain. See `memo.MemoKey`. (One function: the path of most
    requests.)"""
    headers = request.headers
    authorization = headers.getall(_AUTHORIZATION, ())
    if len(authorization) != 1 or _DPOP in headers:
        return _NOT_PLAIN
    if _CONTENT_TYPE in headers and request.content_type == _FORM:  # a body token is looked for in full
        return _NOT_PLAIN
    value = authorization[0]
    if not value.startswith("Bearer ") or value[7:8] in _BLANK:
        return _NOT_PLAIN
    path = request.raw_path
    if "?" in path:
        path, _, query = path.partition("?")
        if ("access_token" in query or "%" in query) and _has_query_token(request.rel_url):
            return _NOT_PLAIN
    if not keyed or path[:1] != "/" or "%" in path or "#" in path or len(path) > _MEMO_PATH_MAX:
        return value, None
    if _SIPHASH:  # see memo.MemoKey
        return value, (match_info.route, request.method, path, hash(value), hash(value[6:]))
    return value, (match_info.route, request.method, path, sha256(value.encode("utf-8", "surrogatepass")).digest(), 0)


async def _has_body_token(request: web.Request) -> bool:
    """RFC 6750 §2.2's form-body `access_token` beside an Authorization header: two transports (HTTP-06).

    The body is read only for a form with an Authorization header and a Content-Length of at most 64 KiB;
    aiohttp keeps what it read, so the handler still gets it. A body over the app's `client_max_size` gets
    aiohttp's own 413, as the handler reading it would have (a half-read body must not reach it); one that
    does not parse, or is larger or chunked, is left to the handler: no token is ever taken from a body, so
    not finding one cannot let a request in."""
    if request.content_type != _FORM or hdrs.AUTHORIZATION not in request.headers or not request.body_exists:
        return False
    length = request.content_length
    if length is None or length > _FORM_READ_MAX:
        return False
    try:
        form = await request.post()
    except web.HTTPException:
        raise
    except Exception:
        return False
    return "access_token" in form


def _has_query_token(url: URL) -> bool:
    """RFC 6750 §2.3's `access_token` query parameter, also when its name is percent-encoded."""
    raw = url.raw_query_string
    return ("access_token" in raw or "%" in raw) and "access_token" in url.query


async def _decide(request: web.Request, pipeline: Pipeline) -> tuple[RequestView, Outcome]:
    try:
        # a request without a Content-Type has no form body: no coroutine for it (most requests)
        body_token = hdrs.CONTENT_TYPE in request.headers and await _has_body_token(request)
        view = request_view(request, pipeline, has_body_token=body_token)
    except AuthError as error:  # a malformed forwarded-certificate header
        view = _bare_view(request)
        # a route no rule covers is 403 whatever else is wrong with the request
        refusal = AccessDenied("no_rule") if pipeline.rule_for(view) is None else error
        return view, Outcome(Decision(False, refusal.reason, None, refusal.status), error=refusal)
    outcome = await pipeline.evaluate(view)
    _publish(request, outcome)
    return view, outcome


def _publish(request: web.Request, outcome: Outcome) -> None:
    """The request keys handlers read, written into the request's storage (see _STORAGE)."""
    if _STORAGE:
        storage = request._state
        storage[PRINCIPAL] = outcome.principal
        storage[TRUST] = outcome.trust
        storage[DECISION] = outcome.decision
    else:  # pragma: no cover - an aiohttp that keeps request storage elsewhere
        request[PRINCIPAL] = outcome.principal
        request[TRUST] = outcome.trust
        request[DECISION] = outcome.decision


async def _call_handler(
    request: web.Request, handler: Handler, pipeline: Pipeline, view: RequestView | None, outcome: Outcome | None,
    started: float,
) -> web.StreamResponse:
    """The handler of a request let through, its status audited (also when it raises: 500, or the
    HTTPException's). An allowed request (`view` and `outcome` given) also has its response decorated; without
    them, the audit stage alone (`audit_middleware`) records what the other stages published. (No closure per
    request: this is the path of every allowed request that is not replayed.)"""
    status = 500
    try:
        response = await handler(request)
        status = response.status
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        if view is None or outcome is None:  # the audit stage alone
            _audit_published(request, pipeline, status, started)
        elif pipeline.audit_sink is not None:
            pipeline.audit(view, outcome, status, started)
    if view is not None and pipeline.decorates_responses and not response.prepared:
        _decorate(pipeline, view, response)
    return response


def _audit_published(request: web.Request, pipeline: Pipeline, status: int, started: float) -> None:
    """The audit event of a request the stage middlewares decided, from what they published."""
    if request.match_info.http_exception is None:
        decision = request.get(DECISION) or Decision(False, "no_decision", None, status)
        outcome = Outcome(decision, request.get(PRINCIPAL), request.get(TRUST) or ANONYMOUS_TRUST,
                          request.get(_ERROR), request.get(_CACHE))
        pipeline.audit(_bare_view(request), outcome, status, started)


def _decorate(pipeline: Pipeline, view: RequestView, response: web.StreamResponse) -> None:
    """What every allowed response carries: plugin headers (a fresh DPoP nonce) and the cache rules."""
    extra = pipeline.response_headers(view, True)
    if extra:
        response.headers.update(extra)
        if "DPoP-Nonce" in extra:
            response.headers["Cache-Control"] = "no-store"  # RFC 9449 §8.2: a nonce must not be cached
    _vary_on_certificate_header(pipeline, response)


def _vary_on_certificate_header(pipeline: Pipeline, response: web.StreamResponse) -> None:
    """RFC 9440 §2.4: any response may depend on a forwarded certificate, so caches must key on it."""
    if pipeline.varies_on_certificate_header:
        response.headers.add("Vary", pipeline.config.mtls.header)


def error_response(pipeline: Pipeline, error: AuthError | UpstreamUnavailable) -> web.Response:
    """The refusal as the client gets it: status, challenges, nonce, and a small JSON body (also the gateway's)."""
    rendered = pipeline.render(error)
    body: dict[str, str] = {}
    if isinstance(error, AuthError) and error.error:
        body["error"] = error.error
        if error.description:
            body["error_description"] = error.description
    elif isinstance(error, UpstreamUnavailable):
        body["error"] = "temporarily_unavailable"
    elif error.status == 403:
        body["error"] = "access_denied"
    else:  # no credentials: the challenge carries no error code (RFC 6750 §3.1); the body just says why
        body["error"] = "authentication_required"
    response = web.Response(status=rendered.status, text=json.dumps(body), content_type="application/json")
    for name, value in rendered.headers:
        response.headers.add(name, value)
    _vary_on_certificate_header(pipeline, response)
    return response


# -- stages usable alone -----------------------------------------------------------------------------------

def authentication_middleware(pipeline: Pipeline) -> Any:
    """Verify credentials when present and publish the principal; refuse bad ones. Decides nothing else."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.http_exception is not None:
            return await handler(request)
        try:
            view = request_view(request, pipeline, shared=True, has_body_token=await _has_body_token(request))
            authentication = await pipeline.authenticate(view)
            principal = authentication.principal if authentication else None
            if authentication is not None:
                request[_CACHE] = authentication.cache  # recorded even when trust evaluation refuses next
            trust = pipeline.trust.evaluate(principal, view)
        except (AuthError, UpstreamUnavailable) as error:
            return _refuse(request, pipeline, error)
        request[PRINCIPAL] = principal
        request[TRUST] = trust
        response = await handler(request)
        if not response.prepared:
            _decorate(pipeline, view, response)
        return response

    return authenticate


def authorization_middleware(pipeline: Pipeline) -> Any:
    """Apply the rules to the principal an earlier stage published (none: anonymous)."""

    @web.middleware
    async def authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.http_exception is not None:
            return await handler(request)
        try:
            view = request_view(request, pipeline, shared=True)
            principal = request.get(PRINCIPAL)
            trust = request.get(TRUST) or pipeline.trust.evaluate(principal, view)
            decision = pipeline.authorize(view, principal, trust)
        except (AuthError, UpstreamUnavailable) as error:
            return _refuse(request, pipeline, error)
        request[DECISION] = decision
        return await handler(request)

    return authorize


def audit_middleware(pipeline: Pipeline) -> Any:
    """One audit event per request from what the other stages published; put it first in the chain."""

    @web.middleware
    async def audit(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await _call_handler(request, handler, pipeline, None, None, time.perf_counter())

    return audit


def _refuse(request: web.Request, pipeline: Pipeline, error: AuthError | UpstreamUnavailable) -> web.Response:
    """A stage's refusal, published for the audit stage (reason, security flag, how the token check was
    answered when it came first) and rendered."""
    request[DECISION] = Decision(False, error.reason, None, error.status)
    request[_ERROR] = error
    if error.cache is not None:
        request[_CACHE] = error.cache
    return error_response(pipeline, error)


def _bare_view(request: web.Request) -> RequestView:
    resource = request.match_info.route.resource
    return RequestView(
        method=request.method,
        path=request.rel_url.raw_path,
        route=RouteRef(request.method, resource.canonical) if resource else None,
    )
