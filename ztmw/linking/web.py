"""The ceremony's aiohttp handlers: the edge where HTTP becomes `LinkingCeremony` calls and back.

The route is mounted by `ztmw.setup` (the `linking` resolver is a route provider) and covered by the reserved
rule `ztmw-linking`, so the pipeline has already verified the current login (Bearer, DPoP or mTLS-bound) and
published its principal and trust before a handler runs. Credentials travel in headers only, never in
cookies, so a cross-site form cannot ride on them: no CSRF token is needed.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from aiohttp import web

from ..errors import AccessDenied, AuthError, InvalidRequest, UpstreamUnavailable
from ..middleware import PIPELINE, PRINCIPAL, TRUST, error_response
from ..models import ANONYMOUS_TRUST
from ..pipeline import Pipeline
from .ceremony import Answer, LinkingCeremony

MAX_BODY = 32 * 1024  # a link token is a few KiB at most

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def routes(path: str, ceremony_for: Callable[[Pipeline], LinkingCeremony]) -> list[tuple[str, str, Handler]]:
    """(method, path, handler) for the route provider; `ceremony_for` gives the ceremony of an app's pipeline."""

    def ceremony(request: web.Request) -> LinkingCeremony:
        return ceremony_for(request.app[PIPELINE])

    async def post(request: web.Request) -> web.StreamResponse:
        async def run(principal: Any) -> Answer:
            return await ceremony(request).link(principal, request.get(TRUST, ANONYMOUS_TRUST),
                                                await _json_body(request))
        return await _answer(request, run)

    async def get(request: web.Request) -> web.StreamResponse:
        return await _answer(request, lambda principal: ceremony(request).logins(principal))

    async def delete(request: web.Request) -> web.StreamResponse:
        async def run(principal: Any) -> Answer:
            return await ceremony(request).unlink(principal, request.get(TRUST, ANONYMOUS_TRUST),
                                                  await _json_body(request))
        return await _answer(request, run)

    return [("POST", path, post), ("GET", path, get), ("DELETE", path, delete)]


async def _answer(request: web.Request, run: Callable[[Any], Awaitable[Answer]]) -> web.StreamResponse:
    pipeline = request.app[PIPELINE]
    principal = request.get(PRINCIPAL)
    if principal is None:  # the reserved rule needs credentials; reaching here without them is a wiring bug
        raise web.HTTPForbidden()
    try:
        answer = await run(principal)
    except (AuthError, UpstreamUnavailable) as error:
        pipeline.log.info("ztmw.link_refused", reason=error.reason, status=error.status, method=request.method)
        return _refusal(pipeline, error)
    return web.json_response(dict(answer.body), status=answer.status, headers={"Cache-Control": "no-store"})


def _refusal(pipeline: Pipeline, error: AuthError | UpstreamUnavailable) -> web.StreamResponse:
    if isinstance(error, AccessDenied):  # 403/404/409: no challenge; the body says which refusal it is
        body = {"error": error.error or "access_denied", "error_description": error.description}
        return web.json_response(body, status=error.status, headers={"Cache-Control": "no-store"})
    response = error_response(pipeline, error)  # 400/401 with the challenge, 503
    response.headers["Cache-Control"] = "no-store"
    return response


async def _json_body(request: web.Request) -> Any:
    """The JSON object sent; anything else (no body, another media type, too large, not JSON) is a 400."""
    if request.content_type != "application/json":
        raise InvalidRequest("malformed_link_request")
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise InvalidRequest("malformed_link_request")
    raw = bytearray()
    while chunk := await request.content.read(MAX_BODY + 1 - len(raw)):  # read() may return less than asked
        raw += chunk
        if len(raw) > MAX_BODY:
            raise InvalidRequest("malformed_link_request")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidRequest("malformed_link_request") from None
    if not isinstance(body, dict):
        raise InvalidRequest("malformed_link_request")
    return body
