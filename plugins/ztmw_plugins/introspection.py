"""The `introspection` verifier: opaque access tokens checked at the authorization server (RFC 7662).

A token verifier like `bearer`: `verify_token` depends on the token alone (the endpoint's answer about it),
so the core caches a success keyed by SHA-256 of the token, never beyond `expires_at` (INTRO-06). Inactive
results are not cacheable successes; `inactive_token` is also not one of the core's negative-cache reasons.
What the token is bound to (top-level `cnf`: `jkt`, `x5t#S256`) is confirmed per request by the `dpop`/`mtls`
binding verifiers exactly as for a JWT (INTRO-08, DPOP-18, MTLS-05).

Decisions (checklist §11; each pinned by tests/plugins/test_introspection.py):
- `issuer` stands alone: it need not be an `[[issuers]]` entry (those are JWT issuers with keys; requiring
  one would force a JWKS on an introspection-only AS and widen what `bearer` accepts). It is the `issuer` of
  every result, and a response's `iss`, when present, must equal it exactly.
- `active` must be the JSON literal `true` (INTRO-02); anything else is `inactive_token`, and nothing else
  in such a response is read (INTRO-07).
- `aud` is required by default (`require_audience = true`, SEC-02/BCP-09) and must name one of `audiences`.
- `sub` is required (a principal speaks for a subject); `exp`/`nbf`/`iat` are enforced with `leeway`.
- `token_type` is compared case-insensitively (RFC 6749 §5.1); with `cnf.jkt` it must be `DPoP`, and
  `DPoP` without `cnf.jkt` is refused (a DPoP token the RS cannot bind would otherwise pass as Bearer).
- Any endpoint failure (transport, TLS, timeout, redirect, status other than 200, content type other than
  `application/json`, oversize, non-JSON or non-object JSON) is `UpstreamUnavailable` -> 503 (INTRO-10).
- `only_opaque` (default true): a token that is a compact JWS (three base64url segments, the first a JSON
  header with `alg`) is left to `bearer` without a network call, so JWTs cost nothing here.
- Concurrent checks of one token share one endpoint call (single flight); each caller gets its own
  exceptions, so one request's error handling cannot touch another's.
- The token goes to the endpoint in the form body and nowhere else: it is never logged, never put in an
  exception, and `token_id` is the `jti` or a short hash.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import os
import re
import ssl
from typing import Any, Mapping
from urllib.parse import quote_plus, urlsplit

import aiohttp

from ztmw import claims as claims_
from ztmw.config import check_plugin_settings, https_url
from ztmw.errors import ConfigurationError, InvalidToken, UpstreamUnavailable
from ztmw.jws import MalformedJWS, b64url_decode, strict_json_object
from ztmw.models import VerifiedToken
from ztmw.typing import PluginDeps

NAME = "introspection"
UNAVAILABLE = "introspection_unavailable"
DEFAULT_TIMEOUT = 3.0
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024
DEFAULT_TTL = 60.0
DEFAULT_LEEWAY = 30.0

_SETTINGS = frozenset({
    "endpoint", "client_id", "client_secret_env", "issuer", "audiences", "require_audience", "timeout",
    "max_response_bytes", "token_type_hint", "only_opaque", "default_ttl", "leeway", "ca_file",
})
_HINT = re.compile(r"[\x21-\x7e]{1,64}")
_B64URL_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")


class _Unavailable(Exception):
    """The endpoint gave no usable answer; `cause` is a log-safe id (never a body, header or token)."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


# -- the entry point ---------------------------------------------------------------------------------------


def create(settings: Mapping[str, Any], deps: PluginDeps) -> IntrospectionVerifier:
    """Entry point `ztmw.verifiers: introspection`; `settings` is the `[plugins.introspection]` table."""
    return IntrospectionVerifier(_Settings(settings, deps), deps)


class _Settings:
    """`[plugins.introspection]`, validated strictly: every error names the key (unknown keys too)."""

    def __init__(self, raw: Mapping[str, Any], deps: PluginDeps) -> None:
        check_plugin_settings(raw, "introspection", _SETTINGS)
        self.endpoint = _endpoint(raw.get("endpoint"))
        self.client_id = _string(raw, "client_id")
        secret_env = _string(raw, "client_secret_env")
        secret = os.environ.get(secret_env)
        if not secret:
            raise ConfigurationError(
                f"plugins.introspection.client_secret_env: environment variable {secret_env} is not set "
                "or empty"
            )
        self.authorization = _basic_authorization(self.client_id, secret)
        self.issuer = _string(raw, "issuer")
        audiences = raw.get("audiences", [deps.config.resource.identifier])
        if (not isinstance(audiences, (list, tuple)) or not audiences
                or not all(isinstance(a, str) and a for a in audiences)):
            raise ConfigurationError("plugins.introspection.audiences: a non-empty list of non-empty strings")
        self.audiences = frozenset(audiences)
        self.require_audience = _boolean(raw, "require_audience", True)
        self.timeout = _number(raw, "timeout", DEFAULT_TIMEOUT, 0.01, 60)
        self.max_response_bytes = int(_number(raw, "max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES, 256,
                                              16 * 1024 * 1024, whole=True))
        hint = raw.get("token_type_hint")
        if hint is not None and (not isinstance(hint, str) or not _HINT.fullmatch(hint)):
            raise ConfigurationError("plugins.introspection.token_type_hint: a printable ASCII word "
                                     "(for example access_token)")
        self.token_type_hint: str | None = hint
        self.only_opaque = _boolean(raw, "only_opaque", True)
        self.default_ttl = _number(raw, "default_ttl", DEFAULT_TTL, 1, 86400)
        self.leeway = _number(raw, "leeway", DEFAULT_LEEWAY, 0, 300)
        self.ssl: ssl.SSLContext | None = None
        ca_file = raw.get("ca_file")
        if ca_file is not None:
            if not isinstance(ca_file, str) or not ca_file:
                raise ConfigurationError("plugins.introspection.ca_file: a path to a PEM file")
            try:  # a private CA for the endpoint: verification stays on, with this trust store (INTRO-05)
                self.ssl = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigurationError(
                    f"plugins.introspection.ca_file: cannot load {ca_file}: {type(exc).__name__}"
                ) from None


def _endpoint(value: Any) -> str:
    key = "plugins.introspection.endpoint"
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{key}: required, an https URL")
    https_url(value, key)
    parts = urlsplit(value)
    if parts.username is not None or parts.password is not None:
        raise ConfigurationError(f"{key}: must not carry credentials (use client_id / client_secret_env)")
    if parts.fragment or value.endswith("#"):
        raise ConfigurationError(f"{key}: must not contain a fragment")
    return value




def _string(raw: Mapping[str, Any], name: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"plugins.introspection.{name}: required, a non-empty string")
    return value


def _boolean(raw: Mapping[str, Any], name: str, default: bool) -> bool:
    value = raw.get(name, default)
    if not isinstance(value, bool):
        raise ConfigurationError(f"plugins.introspection.{name}: must be true or false")
    return value


def _number(raw: Mapping[str, Any], name: str, default: float, low: float, high: float, *,
            whole: bool = False) -> float:
    value = raw.get(name, default)
    key = f"plugins.introspection.{name}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigurationError(f"{key}: must be a number")
    if not low <= value <= high:
        raise ConfigurationError(f"{key}: must be between {low:g} and {high:g}")
    if whole and value != int(value):
        raise ConfigurationError(f"{key}: must be a whole number")
    return float(value)


def _basic_authorization(client_id: str, secret: str) -> str:
    """RFC 7662 §2.1 via RFC 6749 §2.3.1: id and secret form-urlencoded, then HTTP Basic (RFC 7617)."""
    pair = f"{quote_plus(client_id, safe='')}:{quote_plus(secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode("ascii")).decode("ascii")


# -- the verifier ------------------------------------------------------------------------------------------


class IntrospectionVerifier:
    """Asks the authorization server about a token; raises only `InvalidToken` or `UpstreamUnavailable`."""

    name = NAME

    def __init__(self, settings: _Settings, deps: PluginDeps) -> None:
        self._settings = settings
        self._http = deps.http
        self._clock = deps.clock
        self._log = deps.logger
        self._inflight: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self.endpoint_calls = 0
        """How many requests this verifier sent to the endpoint (for operators and tests)."""
        deps.on_cleanup(self.close)

    async def close(self) -> None:
        """Cancel exchanges still running when the app stops (before the shared HTTP session closes)."""
        pending = list(self._inflight.values())
        for future in pending:
            future.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def __repr__(self) -> str:  # no secret, no Authorization value
        settings = self._settings
        return f"IntrospectionVerifier(endpoint={settings.endpoint!r}, issuer={settings.issuer!r})"

    @property
    def issuer(self) -> str:
        return self._settings.issuer

    async def verify_token(self, token: str) -> VerifiedToken:
        try:
            if self._settings.only_opaque and looks_like_jws(token):
                raise InvalidToken("malformed_token")  # the bearer verifier's business; no network call
            try:
                response = await self._introspect(token)
            except _Unavailable as exc:
                self._log.warning("introspection_unavailable", endpoint=self._settings.endpoint,
                                  cause=exc.cause)
                raise UpstreamUnavailable(UNAVAILABLE) from None
            return self._verified(token, response)
        except (InvalidToken, UpstreamUnavailable):
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here still fails closed; only the type is logged (never locals)
            self._log.error("introspection_unexpected_error", error=type(exc).__name__)
            raise InvalidToken("verifier_error") from None

    # -- the exchange --------------------------------------------------------------------------------------

    async def _introspect(self, token: str) -> dict[str, Any]:
        """One endpoint call per token at a time: concurrent callers await the same exchange."""
        key = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._exchange(token))
            self._inflight[key] = future
            future.add_done_callback(lambda done: self._finished(key, done))
        # shield: one cancelled request must not cancel the exchange other requests are waiting for
        return dict(await asyncio.shield(future))

    def _finished(self, key: bytes, future: asyncio.Future[dict[str, Any]]) -> None:
        if self._inflight.get(key) is future:
            del self._inflight[key]
        if not future.cancelled():
            future.exception()  # retrieved, so an exchange nobody awaits any more is not reported as lost

    async def _exchange(self, token: str) -> dict[str, Any]:
        settings = self._settings
        form = {"token": token}
        if settings.token_type_hint is not None:
            form["token_type_hint"] = settings.token_type_hint
        headers = {"Authorization": settings.authorization, "Accept": "application/json"}
        self.endpoint_calls += 1
        try:
            async with asyncio.timeout(settings.timeout):
                async with self._http().post(
                    settings.endpoint,
                    data=form,
                    headers=headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=settings.timeout),
                    ssl=settings.ssl if settings.ssl is not None else True,  # verification always on
                ) as response:
                    if response.status != 200:
                        raise _Unavailable(f"http_{response.status}")
                    if response.content_type != "application/json":
                        raise _Unavailable("content_type")
                    if response.charset is not None and response.charset.lower() not in ("utf-8", "utf8"):
                        raise _Unavailable("charset")
                    limit = settings.max_response_bytes
                    if response.content_length is not None and response.content_length > limit:
                        raise _Unavailable("too_large")
                    body = bytearray()
                    async for chunk in response.content.iter_chunked(16384):
                        body += chunk
                        if len(body) > limit:
                            raise _Unavailable("too_large")
        except _Unavailable:
            raise
        except TimeoutError:
            raise _Unavailable("timeout") from None
        except aiohttp.ClientConnectorCertificateError:
            raise _Unavailable("tls_certificate") from None
        except Exception as exc:  # transport, TLS, a closed session: the endpoint could not be asked -> 503
            raise _Unavailable(type(exc).__name__) from None
        try:
            return strict_json_object(bytes(body))  # UTF-8, no duplicates or NaN, an object
        except MalformedJWS as exc:
            raise _Unavailable(f"body_{exc.reason}") from None

    # -- the answer ----------------------------------------------------------------------------------------

    def _verified(self, token: str, response: Mapping[str, Any]) -> VerifiedToken:
        settings = self._settings
        if response.get("active") is not True:  # INTRO-02: JSON true only; INTRO-04/07: nothing else is read
            raise InvalidToken("inactive_token")
        now, leeway = self._clock(), settings.leeway

        iss = claims_.optional(response, "iss", str)
        if iss is not None and iss != settings.issuer:  # exact, case-sensitive (JOSE-18)
            raise InvalidToken("unknown_issuer")
        exp, nbf, iat = claims_.check_times(response, now=now, leeway=leeway)  # INTRO-03
        audience = claims_.audience(response)
        if audience is None:
            if settings.require_audience:  # SEC-02, BCP-09
                raise InvalidToken("missing_claim")
            audience = ()
        elif settings.audiences.isdisjoint(audience):  # JOSE-17: exact strings only
            raise InvalidToken("audience_mismatch")
        _check_token_type(response, claims_.optional(response, "cnf", dict))  # DPOP-19
        return claims_.verified_token(
            response, token=token, verifier=NAME, issuer=settings.issuer, audience=audience,
            # INTRO-06: the core caches for min(cache.max_ttl, expires_at - now), so never beyond exp
            expires_at=exp if exp is not None else now + settings.default_ttl,
            not_before=nbf, issued_at=iat, client_id=claims_.optional(response, "client_id", str), leeway=leeway,
        )


def looks_like_jws(token: str) -> bool:
    """A compact JWS: three base64url segments, the first a JSON object header with a string `alg`.

    The payload and signature may be empty (an unsecured `alg: none` JWT is still the bearer verifier's to
    refuse, and never worth an endpoint call). VEC-9449-2 (`Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU`) has
    three segments but `~` is not base64url, so it is opaque and goes to the endpoint.
    """
    parts = token.split(".")
    if len(parts) != 3 or not parts[0] or not all(_B64URL_SEGMENT.fullmatch(p) for p in parts):
        return False
    try:
        header = strict_json_object(b64url_decode(parts[0]))
    except MalformedJWS:
        return False
    return isinstance(header.get("alg"), str)


def _check_token_type(response: Mapping[str, Any], cnf: Mapping[str, Any] | None) -> None:
    """DPOP-19: `token_type`, when present, is `DPoP` for a DPoP-bound token, and only for one."""
    if "token_type" not in response:
        return
    token_type = response["token_type"]
    if not isinstance(token_type, str) or not token_type:
        raise InvalidToken("invalid_claim")
    bound = cnf is not None and "jkt" in cnf
    if bound != (token_type.lower() == "dpop"):  # RFC 6749 §5.1: token types are case-insensitive
        raise InvalidToken("invalid_claim")
