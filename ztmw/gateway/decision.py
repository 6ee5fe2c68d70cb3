"""One question about an original request -> the pipeline's answer, plus what the gateway tells the upstream.

The same pipeline that protects an app answers here: the adapter (forward-auth or proxy) reads the original
method, target, credentials and certificate off whatever carried them and hands a `Question`; this module
builds the `RequestView` the middleware would have built, asks `Pipeline.evaluate`, and turns an allowed
outcome into the identity headers. No aiohttp server API here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from types import MappingProxyType
from urllib.parse import parse_qsl, quote

from ..client_cert import certificate_from_request
from ..errors import AccessDenied, AuthError
from ..models import Decision, RequestView
from ..pipeline import Outcome, Pipeline
from .assertion import AssertionIssuer
from .routes import MalformedTarget, RuleRoutes, Target, parse_target

IDENTITY_PREFIX = "x-ztmw-"
"""Every header the gateway speaks for the identity starts so; none sent by a client ever passes."""
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")
# header values the gateway writes stay visible ASCII; anything else (and "%") is percent-encoded UTF-8
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


@dataclass(frozen=True, slots=True)
class Question:
    """What the adapter read: the original method and request target, credentials, where it came from."""

    method: str
    target: str
    authorization: tuple[str, ...] = ()
    dpop: tuple[str, ...] = ()
    peer: str | None = None
    certificate_headers: tuple[str, ...] = ()
    tls_der: bytes | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The pipeline's outcome and the view it decided on; `target` is None when the target was malformed."""

    view: RequestView
    outcome: Outcome
    target: Target | None
    identity: tuple[tuple[str, str], ...] = ()
    """Allowed: the `X-Ztmw-*` headers (and the assertion) for the upstream."""
    untrusted_certificate_header: bool = False

    @property
    def allowed(self) -> bool:
        return self.outcome.decision.allowed


class Decider:
    """The rules as routes, the pipeline, and (when configured) the assertion issuer."""

    def __init__(self, pipeline: Pipeline, assertions: AssertionIssuer | None) -> None:
        self.pipeline = pipeline
        self.routes = RuleRoutes(pipeline.policy.rules)
        self.assertions = assertions

    async def decide(self, question: Question) -> Verdict:
        pipeline = self.pipeline
        if not _METHOD.fullmatch(question.method):
            return _malformed(question, "malformed_method")
        try:
            target = parse_target(question.target)
        except MalformedTarget:
            return _malformed(question, "malformed_target")
        matched = self.routes.match(question.method, target.path)
        route, match_info = matched if matched is not None else (None, MappingProxyType({}))
        view = RequestView(
            method=question.method,
            path=target.raw_path,
            route=route,
            match_info=match_info,
            authorization=question.authorization,
            dpop=question.dpop,
            peer=question.peer,
            has_query_token=_has_query_token(target.query),
        )
        untrusted = False
        if pipeline.mtls_enabled:
            try:
                result = certificate_from_request(tls_der=question.tls_der, header_values=question.certificate_headers,
                                                  peer=question.peer, config=pipeline.config.mtls)
            except AuthError as error:  # a malformed forwarded certificate; a route no rule covers is still 403
                refusal = AccessDenied("no_rule") if route is None else error
                return Verdict(view, Outcome(Decision(False, refusal.reason, None, refusal.status), error=refusal),
                               target)
            untrusted = result.ignored_untrusted_header
            if result.certificate is not None:
                view = replace(view, client_certificate=result.certificate)
        outcome = await pipeline.evaluate(view)
        identity: tuple[tuple[str, str], ...] = ()
        if outcome.decision.allowed:
            identity = self.identity_headers(outcome)
        return Verdict(view, outcome, target, identity, untrusted)

    def identity_headers(self, outcome: Outcome) -> tuple[tuple[str, str], ...]:
        """`X-Ztmw-Rule` always; who and how strongly only when a principal was verified (not anonymous)."""
        headers = [("X-Ztmw-Rule", header_value(outcome.decision.rule_id or ""))]
        principal, trust = outcome.principal, outcome.trust
        if principal is None:
            return tuple(headers)
        headers += [
            ("X-Ztmw-Subject", header_value(principal.subject)),
            ("X-Ztmw-Client-Id", header_value(principal.token.client_id or "")),
            ("X-Ztmw-Aal", str(trust.aal)),
            ("X-Ztmw-Ial", str(trust.ial)),
            ("X-Ztmw-Binding", principal.binding or "bearer"),
        ]
        if self.assertions is not None:
            headers.append(("X-Ztmw-Identity", self.assertions.issue(principal, trust)))
        return tuple(headers)


def header_value(text: str) -> str:
    """A claim as a header value: visible ASCII as is, anything else (CR, LF, non-ASCII, "%") percent-encoded,
    so no token content can split a header or smuggle another."""
    return quote(text, safe=_SAFE)


def _has_query_token(query: str) -> bool:
    """RFC 6750 §2.3's `access_token` parameter (also percent-encoded): refused, never read (HTTP-08)."""
    if "access_token" not in query and "%" not in query:
        return False
    return any(name == "access_token" for name, _ in parse_qsl(query, keep_blank_values=True))


def _malformed(question: Question, reason: str) -> Verdict:
    view = RequestView(method=question.method[:32], path="", route=None, peer=question.peer)
    return Verdict(view, Outcome(Decision(False, reason, None, 400)), None)
