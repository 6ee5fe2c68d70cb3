"""Forward-auth mode: nginx `auth_request`, Traefik ForwardAuth, Caddy `forward_auth` or Envoy `ext_authz`
ask, for each original request, whether it may pass. An adapter module (aiohttp server API).

The original method and URI arrive in headers (`X-Forwarded-Method`, `X-Forwarded-Uri` by default), with the
original `Authorization`, `DPoP` and forwarded-certificate headers. Those headers are only as true as whoever
set them, so they are believed only from `gateway.trusted_proxies`: any other peer is refused (403) and a
security event is logged, because a client talking to the decision service directly could otherwise ask about
any request it likes. Allowed: 200 with an empty body and the identity headers. Denied: the status,
challenges, `DPoP-Nonce` and `Cache-Control` the middleware would send.
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any, Callable

from aiohttp import web

from ..config import GatewayConfig
from ..errors import AccessDenied
from ..models import Decision, RequestView
from ..netaddr import peer_in
from ..pipeline import Outcome
from .app import add_allowed_headers, peer_of, record, refusal, tls_der_of
from .decision import Decider, Question


def forward_auth_handler(decider: Decider, settings: GatewayConfig) -> Callable[[web.Request], Any]:
    pipeline = decider.pipeline
    trusted = [ipaddress.ip_network(cidr, strict=False) for cidr in settings.trusted_proxies]
    cert_header = pipeline.config.mtls.header

    async def question(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        peer = peer_of(request)
        if not peer_in(peer, trusted):
            pipeline.log.warning("ztmw.security", reason="untrusted_forward_auth_peer", peer=peer)
            view = RequestView(method=request.method, path="", route=None, peer=peer)
            refused = AccessDenied("untrusted_peer", security=True)  # a client posing as the proxy
            outcome = Outcome(Decision(False, refused.reason, None, 403), error=refused)
            record(decider, view, outcome, 403, started)
            return web.json_response({"error": "access_denied"}, status=403)
        headers = request.headers
        methods = headers.getall(settings.method_header, [])
        targets = headers.getall(settings.uri_header, [])
        if len(methods) != 1 or len(targets) != 1:
            view = RequestView(method=request.method, path="", route=None, peer=peer)
            record(decider, view, Outcome(Decision(False, "missing_forwarded_request", None, 400)), 400, started)
            return web.json_response({"error": "invalid_request", "error_description":
                                      f"exactly one {settings.method_header} and {settings.uri_header} needed"},
                                     status=400)
        verdict = await decider.decide(Question(
            method=methods[0].strip(),
            target=targets[0].strip(),
            authorization=tuple(headers.getall("Authorization", ())),
            dpop=tuple(headers.getall("DPoP", ())),
            peer=peer,
            certificate_headers=tuple(headers.getall(cert_header, ())) if pipeline.mtls_enabled else (),
            tls_der=tls_der_of(request),
        ))
        if verdict.untrusted_certificate_header:
            pipeline.log.warning("ztmw.security", reason="untrusted_client_cert_header", peer=peer)
        if not verdict.allowed:
            response: web.StreamResponse = refusal(decider, verdict)
            lines = response.headers.getall("WWW-Authenticate", [])
            if settings.combine_challenges and len(lines) > 1:
                response.headers["WWW-Authenticate"] = ", ".join(lines)
        else:
            response = web.Response(status=200, headers=list(verdict.identity))
            add_allowed_headers(decider, verdict, response)
        record(decider, verdict.view, verdict.outcome, response.status, started)
        return response

    return question
