"""A conformance suite for ztmw plugins: subclass it in your own test module and pytest runs the checks.

    from ztmw.testing import DevIssuer
    from ztmw.testing.conformance import TokenVerifierConformance

    class TestMyVerifier(TokenVerifierConformance):
        entry_point_name = "my-verifier"            # or override create_verifier(deps)

        def config(self) -> dict:                    # the ztmw config of an app that enables it
            return {"resource": {"identifier": "https://api.example.com"},
                    "plugins": {"my-verifier": {...}}}

        async def valid_token(self) -> str:          # a token the verifier must accept (at self.clock's time)
            return "..."

The inherited tests run the verifier twice over: alone, with no app and no request (`verify_token`
must be pure in the token), and inside a real `ztmw.setup` app served on loopback (what a client sees). They
check that hostile tokens get catalogue answers (401 `invalid_token` / 400 `invalid_request`, never 500, never
200), that the per-request binding check runs on cache hits, that `expires_at` does not outlive the token,
that no token text reaches a log line or a cache key, and that a failure inside the verifier denies.
`TrustEvaluatorConformance` does the same, smaller, for trust evaluators. Needs pytest and pytest-asyncio;
time is `self.clock`, a `FakeClock` shared by the app, the verifier and your fixtures (request `ztmw_clock`).

A verifier given through `create_verifier` rather than an entry point is served to the app through a temporary
entry point of a distribution that exists only while a test runs (`importlib.metadata`'s documented finder
hook), so both ways go through ztmw's real plugin loading.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import random
import sys
from importlib.metadata import Distribution, DistributionFinder
from typing import Any, AsyncIterator, Callable, ClassVar, Iterator, Mapping

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

import ztmw
from ztmw.errors import InvalidToken
from ztmw.models import (
    ANONYMOUS_TRUST,
    Caller,
    Principal,
    RequestView,
    RouteRef,
    TrustAssessment,
    VerifiedToken,
)
from ztmw.pipeline import Pipeline
from ztmw.registry import load_plugin
from ztmw.typing import PluginDeps, TokenVerifier, TrustEvaluator

from .certs import TestCA
from .clock import FakeClock
from .lifetime import PluginLifetime

__all__ = [
    "HOSTILE_TOKENS",
    "TokenVerifierConformance",
    "TrustEvaluatorConformance",
    "conformance_principal",
    "conformance_view",
]

ROUTE = "/conformance"
RULE_ID = "conformance"
SHIM_NAME = "conformance-under-test"
SHIM_DISTRIBUTION = "ztmw-conformance-shim"
VEC_9449_2 = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"  # spec-checklist VEC-9449-2: opaque, JWT-shaped
MAX_FIELD_SIZE = 32 * 1024
_MIN_SECRET_LENGTH = 16  # shorter hostile tokens ("=", ".") occur in any text


# -- the hostile token table -------------------------------------------------------------------------------


def _b64url(data: bytes | str) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _flip_one_byte(token: str) -> str:
    """The token with one character in its middle replaced by another token68 character (not a dot)."""
    chars = list(token)
    index = len(chars) // 2
    while index < len(chars) and chars[index] in ".=":
        index += 1
    index = min(index, len(chars) - 1)
    chars[index] = "B" if chars[index] == "A" else "A"
    return "".join(chars)


def _alg_none(valid: str) -> str:
    header = _b64url('{"alg":"none","typ":"at+jwt"}')
    payload = _b64url('{"iss":"https://as.example.com","sub":"alice","aud":"https://api.example.com",'
                      '"exp":4102444800,"iat":1700000000,"jti":"conformance","client_id":"c"}')
    return f"{header}.{payload}."


def _jwe_shaped(valid: str) -> str:
    header = _b64url('{"alg":"RSA-OAEP-256","enc":"A256GCM","typ":"at+jwt"}')
    return f"{header}.{_b64url(b'k' * 32)}.{_b64url(b'iv' * 6)}.{_b64url(b'ciphertext')}.{_b64url(b't' * 16)}"


def _random_bytes(valid: str) -> str:
    return random.Random(9449).randbytes(96).decode("latin-1")


HOSTILE_TOKENS: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("empty", lambda valid: ""),
    ("single-dot", lambda valid: "."),
    ("dots-only", lambda valid: ".."),
    ("padding-only", lambda valid: "=="),
    ("ten-kib", lambda valid: "A" * 10 * 1024),
    ("non-ascii", lambda valid: "tökén-ключ-\u2603-\U0001f511"),
    ("jwe-shaped", _jwe_shaped),
    ("alg-none", _alg_none),
    ("padded-base64", lambda valid: base64.b64encode(b"opaque\x00token\xff" * 3 + b"x").decode("ascii")),
    ("valid-token-padded", lambda valid: valid + "=="),
    ("random-bytes", _random_bytes),
    ("vec-9449-2-opaque", lambda valid: VEC_9449_2),
    ("valid-token-one-byte-flipped", _flip_one_byte),
    ("valid-token-truncated", lambda valid: valid[:-1]),
    ("valid-token-doubled", lambda valid: valid + valid),
)
"""(id, make(valid_token) -> hostile token). Every one must be refused; none may produce a 500 or a 200."""


def _on_the_wire(token: str) -> str:
    """What of a token an HTTP client can send at all: field values cannot hold control characters."""
    return "".join(c for c in token if c == "\t" or not (ord(c) < 0x20 or ord(c) == 0x7F))


# -- a temporary entry point for verifiers given by create_verifier() -------------------------------------

_shim_target: Callable[[Mapping[str, Any], PluginDeps], object] | None = None


def shim_factory(settings: Mapping[str, Any], deps: PluginDeps) -> object:
    """What the temporary entry point names; calls the factory of the test that is running."""
    if _shim_target is None:
        raise RuntimeError("no conformance test is running")
    return _shim_target(settings, deps)


class _ShimDistribution(Distribution):
    _FILES = {
        "METADATA": f"Metadata-Version: 2.1\nName: {SHIM_DISTRIBUTION}\nVersion: 0\n",
        "entry_points.txt": f"[ztmw.verifiers]\n{SHIM_NAME} = {__name__}:shim_factory\n",
    }

    def read_text(self, filename: str) -> str | None:
        return self._FILES.get(filename)

    def locate_file(self, path: Any) -> Any:
        raise FileNotFoundError(path)


class _ShimFinder(DistributionFinder):
    def find_spec(self, *args: Any, **kwargs: Any) -> None:
        return None

    def find_distributions(self, context: Any = DistributionFinder.Context()) -> Iterator[Distribution]:
        if context.name is None or context.name.replace("_", "-").lower() == SHIM_DISTRIBUTION:
            yield _ShimDistribution()


@contextlib.contextmanager
def _shim(factory: Callable[[Mapping[str, Any], PluginDeps], object]) -> Iterator[None]:
    global _shim_target
    finder = _ShimFinder()
    _shim_target = factory
    sys.meta_path.append(finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        _shim_target = None


# -- helpers shared by both suites -----------------------------------------------------------------------


@dataclasses.dataclass
class Served:
    """An app protected by ztmw on a loopback server, for one test."""

    client: TestClient[web.Request, web.Application]
    pipeline: Pipeline
    scheme: str

    async def get(self, token: str | None, **headers: str) -> aiohttp.ClientResponse:
        if token is not None:
            headers["Authorization"] = f"{self.scheme} {_on_the_wire(token)}"
        response = await self.client.get(ROUTE, headers=headers)
        await response.read()
        return response


def _challenge_errors(response: aiohttp.ClientResponse) -> dict[str, str | None]:
    """{scheme (lower case): error param or None} from the WWW-Authenticate field lines."""
    found: dict[str, str | None] = {}
    for line in response.headers.getall("WWW-Authenticate", []):
        scheme, _, params = line.partition(" ")
        error = None
        for part in params.split(","):
            name, _, value = part.strip().partition("=")
            if name == "error":
                error = value.strip('"')
        found[scheme.lower()] = error
    return found


def _describe(response: aiohttp.ClientResponse) -> str:
    return f"{response.status} {response.headers.getall('WWW-Authenticate', [])}"


def _assert_refused(response: aiohttp.ClientResponse, scheme: str, what: str) -> None:
    """A catalogue refusal (spec-checklist section 0): 401 invalid_token or 400 invalid_request."""
    assert response.status not in (200, 500), f"{what}: got {_describe(response)}, expected 401 or 400"
    assert response.status in (400, 401), f"{what}: got {_describe(response)}, expected 401 or 400"
    errors = _challenge_errors(response)
    if response.status == 400:
        assert "invalid_request" in errors.values(), f"{what}: 400 without error=invalid_request: {errors}"
    else:
        assert errors.get(scheme.lower()) == "invalid_token", (
            f"{what}: 401 without error=invalid_token on the {scheme} challenge: {errors}")


def _secrets_of(tokens: list[str]) -> list[str]:
    """The strings that must never appear in a log: each token and each long dot-separated part of it."""
    found: set[str] = set()
    for token in tokens:
        for text in (token, *token.split(".")):
            if len(text) >= _MIN_SECRET_LENGTH:
                found.add(text)
    return sorted(found)


def conformance_principal(
    subject: str = "conformance-user",
    *,
    acr: str | None = "urn:ztmw:conformance:acr",
    amr: tuple[str, ...] = ("pwd", "otp"),
    auth_time: float | None = None,
    binding: Any = None,
    issuer: str = "https://as.example.com",
) -> Principal:
    """A verified principal as the core would build it, for trust evaluators and conditions."""
    token = VerifiedToken(issuer=issuer, subject=subject, audience=("https://api.example.com",),
                          expires_at=4102444800.0, token_id="conformance", verifier="conformance",
                          client_id="conformance-client", scopes=frozenset({"items:read"}), acr=acr, amr=amr,
                          auth_time=auth_time)
    caller = Caller(client_id="conformance-client", proof=binding)
    return Principal(subject=subject, issuer=issuer, token=token, caller=caller, raw_subject=subject)


def conformance_view(
    peer: str | None = "192.0.2.10", *, method: str = "GET", path: str = ROUTE
) -> RequestView:
    """A request as the adapter would describe it."""
    return RequestView(method=method, path=path, route=RouteRef(method, path), peer=peer)


def _cache_entries(cache: object, depth: int = 2) -> dict[Any, Any]:
    """The key -> entry mappings inside a cache object (its internals: they change, so look, do not name)."""
    found: dict[Any, Any] = {}
    attributes = getattr(cache, "__dict__", {}) or {
        name: getattr(cache, name) for name in getattr(type(cache), "__slots__", ()) if hasattr(cache, name)}
    for value in attributes.values():
        if isinstance(value, dict):
            found.update(value)
        elif depth > 0 and not isinstance(value, (str, bytes, int, float)) and not callable(value):
            found.update(_cache_entries(value, depth - 1))
    return found


def _cached_values(entries: Mapping[Any, Any]) -> Iterator[Any]:
    """The stored values, unwrapped from (expiry, value) pairs."""
    for entry in entries.values():
        yield entry[-1] if isinstance(entry, tuple) else entry


class _DependencyFault:
    """A clock and an HTTP session getter that raise once armed, counting how often they were asked."""

    def __init__(self, clock: Callable[[], float], http: Callable[[], aiohttp.ClientSession]) -> None:
        self._clock, self._http = clock, http
        self.armed = False
        self.calls = 0

    def clock(self) -> float:
        if self.armed:
            self.calls += 1
            raise RuntimeError("conformance kit: injected clock failure")
        return self._clock()

    def http(self) -> aiohttp.ClientSession:
        if self.armed:
            self.calls += 1
            raise RuntimeError("conformance kit: injected HTTP session failure")
        return self._http()


class _RaisingVerifier:
    """Wraps the verifier under test so that `verify_token` raises an exception nobody asked for."""

    def __init__(self, inner: Any) -> None:
        self.name = getattr(inner, "name", SHIM_NAME)
        self.inner = inner

    async def verify_token(self, token: str) -> VerifiedToken:
        raise RuntimeError("conformance kit: injected bug in verify_token")


# -- token verifiers ---------------------------------------------------------------------------------------


class TokenVerifierConformance:
    """Subclass as `class TestSomething(TokenVerifierConformance)` and provide the hooks below.

    Hooks: `entry_point_name` or `create_verifier(deps)`; `config()`; async `valid_token()`; optionally async
    `bound_token(cnf)`, `token_expires_at(token)` and `scheme`. Token hooks are always called before
    `config()`, so a verifier whose tokens live in its settings (API keys) can add each token it made.
    """

    entry_point_name: ClassVar[str | None] = None
    """The verifier's name in the `ztmw.verifiers` entry-point group (tests your registration too)."""

    scheme: ClassVar[str] = "Bearer"
    """The Authorization scheme the tokens are sent with."""

    clock: FakeClock

    # -- hooks ---------------------------------------------------------------------------------------------

    def create_verifier(self, deps: PluginDeps) -> TokenVerifier:
        """The verifier under test; by default the `entry_point_name` plugin, given `[plugins.<name>]`."""
        if self.entry_point_name is None:
            raise NotImplementedError("set entry_point_name or override create_verifier(deps)")
        settings = deps.config.plugins.get(self.entry_point_name, {})
        instance = load_plugin("ztmw.verifiers", self.entry_point_name, settings, deps).instance
        assert isinstance(instance, TokenVerifier), f"{self.entry_point_name!r} is not a TokenVerifier"
        return instance

    def config(self) -> dict[str, Any]:
        """The ztmw config (dict) of an app using the verifier; the kit supplies `rules` and the route."""
        raise NotImplementedError("return the ztmw config dict of an app using the verifier")

    async def valid_token(self) -> str:
        """A token the verifier must accept now (at `self.clock()`)."""
        raise NotImplementedError("return a token the verifier accepts")

    async def bound_token(self, cnf: Mapping[str, str]) -> str | None:
        """A token the verifier accepts with exactly this `cnf` (RFC 7800); None if it has no bound tokens."""
        return None

    def token_expires_at(self, token: str) -> float | None:
        """When the token itself says it expires; the default reads a JWT's `exp`. None: unknown."""
        parts = token.split(".")
        if len(parts) != 3:
            return None
        try:
            claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        except ValueError:
            return None
        exp = claims.get("exp") if isinstance(claims, dict) else None
        return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None

    # -- fixtures ------------------------------------------------------------------------------------------

    @pytest.fixture(autouse=True)
    def ztmw_clock(self) -> FakeClock:
        """The one clock of the test: the app's, the verifier's, and (request it) your issuer's."""
        self.clock = FakeClock()
        return self.clock

    # -- machinery -----------------------------------------------------------------------------------------

    @property
    def _uses_shim(self) -> bool:
        return type(self).create_verifier is not TokenVerifierConformance.create_verifier

    def _factory(self, wrap: Callable[[Any, PluginDeps], Any] | None = None,
                 deps_for: Callable[[PluginDeps], PluginDeps] | None = None) -> Callable[..., object]:
        def factory(settings: Mapping[str, Any], deps: PluginDeps) -> object:
            own = deps_for(deps) if deps_for else deps
            verifier = self.create_verifier(own)
            return wrap(verifier, own) if wrap else verifier
        return factory

    def _app_config(
        self, *, shim: bool, extra_verifiers: tuple[str, ...] = (), **sections: Any
    ) -> dict[str, Any]:
        config = copy.deepcopy(self.config())
        name = self.entry_point_name
        enabled = list(config.get("verifiers", {}).get("enabled", [name] if name else []))
        if shim:
            enabled = [v for v in enabled if v != name] + [SHIM_NAME]
        elif name is not None and name not in enabled:
            enabled.append(name)
        config["verifiers"] = {**config.get("verifiers", {}), "enabled": enabled + list(extra_verifiers)}
        config["rules"] = [{"id": RULE_ID, "path": ROUTE, "methods": ["GET"]}]
        config.update(sections)
        return config

    @contextlib.asynccontextmanager
    async def serve(
        self,
        *,
        wrap: Callable[[Any, PluginDeps], Any] | None = None,
        deps_for: Callable[[PluginDeps], PluginDeps] | None = None,
        extra_verifiers: tuple[str, ...] = (),
        **sections: Any,
    ) -> AsyncIterator[Served]:
        """A real app (`ztmw.setup`) on a loopback server; `GET /conformance` needs any valid token."""
        shim = self._uses_shim or wrap is not None or deps_for is not None
        config = self._app_config(shim=shim, extra_verifiers=extra_verifiers, **sections)

        async def handler(request: web.Request) -> web.Response:
            principal = request[ztmw.PRINCIPAL]
            return web.json_response({"subject": principal.subject if principal else None})

        with _shim(self._factory(wrap, deps_for)) if shim else contextlib.nullcontext():
            app = web.Application()
            app.router.add_get(ROUTE, handler)
            pipeline = ztmw.setup(app, config, clock=self.clock)
            server = TestServer(app)
            # aiohttp refuses header fields over 8190 bytes itself (a bare 400, and it logs the field's first
            # 100 bytes); a server that accepts larger fields lets ztmw's own limit give the catalogue answer.
            await server.start_server(max_field_size=MAX_FIELD_SIZE, max_line_size=MAX_FIELD_SIZE)
            client = TestClient(server)
            await client.start_server()
            try:
                yield Served(client, pipeline, self.scheme)
            finally:
                await client.close()

    @contextlib.asynccontextmanager
    async def standalone_verifier(self) -> AsyncIterator[TokenVerifier]:
        """The verifier alone: no app, no request, only the `PluginDeps` a factory is given."""
        config = ztmw.load_config(self._app_config(shim=False))
        lifetime = PluginLifetime()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            verifier = self.create_verifier(lifetime.deps(config, clock=self.clock, http=lambda: session,
                                                          logger=structlog.get_logger("ztmw.conformance")))
            await lifetime.start()
            try:
                yield verifier
            finally:
                await lifetime.stop()

    # -- the checks ----------------------------------------------------------------------------------------

    @pytest.mark.asyncio
    async def test_valid_token_is_accepted(self) -> None:
        """Positive control: without it every refusal below would prove nothing."""
        token = await self.valid_token()
        async with self.serve() as served:
            response = await served.get(token)
            assert response.status == 200, f"valid_token() refused by the app: {_describe(response)}"
        async with self.standalone_verifier() as verifier:
            verified = await verifier.verify_token(token)
        assert isinstance(verified, VerifiedToken)

    @pytest.mark.asyncio
    @pytest.mark.parametrize("make", [m for _, m in HOSTILE_TOKENS], ids=[i for i, _ in HOSTILE_TOKENS])
    async def test_hostile_token_gets_a_catalogue_refusal(self, make: Callable[[str], str]) -> None:
        token = make(await self.valid_token())
        async with self.serve() as served:
            response = await served.get(token)
            _assert_refused(response, self.scheme, "hostile token")
            body = await response.text()
            assert all(secret not in body for secret in _secrets_of([token])), "the token was echoed"

    @pytest.mark.asyncio
    @pytest.mark.parametrize("make", [m for _, m in HOSTILE_TOKENS], ids=[i for i, _ in HOSTILE_TOKENS])
    async def test_verify_token_refuses_hostile_token_with_invalid_token(
        self, make: Callable[[str], str]
    ) -> None:
        """Called directly (the core stops some of these earlier): InvalidToken, not another exception."""
        token = make(await self.valid_token())
        async with self.standalone_verifier() as verifier:
            with pytest.raises(InvalidToken):
                await verifier.verify_token(token)

    @pytest.mark.asyncio
    async def test_verify_token_is_pure_in_the_token(self) -> None:
        """Same token twice, with no app running and the clock moved on: equal results, field by field."""
        token = await self.valid_token()
        async with self.standalone_verifier() as verifier:
            first = await verifier.verify_token(token)
            self.clock.advance(1)
            second = await verifier.verify_token(token)
        differing = [f.name for f in dataclasses.fields(VerifiedToken)
                     if getattr(first, f.name) != getattr(second, f.name)]
        assert not differing, f"verify_token is not pure in the token: {differing} changed between two calls"

    @pytest.mark.asyncio
    async def test_binding_is_confirmed_on_every_request_even_on_cache_hits(self) -> None:
        ca = TestCA()
        holder, thief = ca.client_cert("conformance-holder"), ca.client_cert("conformance-thief")
        token = await self.bound_token(holder.cnf)
        if token is None:
            pytest.skip("bound_token() returned None: the verifier has no sender-constrained tokens")
        async with self.standalone_verifier() as verifier:
            verified = await verifier.verify_token(token)
        assert dict(verified.cnf) == holder.cnf, "cnf dropped or changed: the bound token works for anyone"
        mtls = {"source": "header", "trusted_proxies": ["127.0.0.1/32", "::1/128"]}
        async with self.serve(extra_verifiers=("mtls",), mtls=mtls) as served:
            first = await served.get(token, **{"Client-Cert": holder.rfc9440_header()})
            assert first.status == 200, f"bound token with its certificate: {_describe(first)}"
            hits = served.pipeline.cache.hits
            stolen = await served.get(token, **{"Client-Cert": thief.rfc9440_header()})
            assert served.pipeline.cache.hits > hits, "the second request did not hit the verification cache"
            _assert_refused(stolen, self.scheme, "bound token with another certificate (cache hit)")
            assert stolen.status == 401
            bare = await served.get(token)
            _assert_refused(bare, self.scheme, "bound token without a certificate (cache hit)")
            again = await served.get(token, **{"Client-Cert": holder.rfc9440_header()})
            assert again.status == 200, "a refused impostor must not lock out the holder"

    @pytest.mark.asyncio
    async def test_expires_at_is_not_beyond_the_tokens_exp(self) -> None:
        token = await self.valid_token()
        async with self.standalone_verifier() as verifier:
            verified = await verifier.verify_token(token)
        exp = self.token_expires_at(token)
        if exp is None:
            pytest.skip("token_expires_at() does not know when this token expires")
        assert verified.expires_at <= exp, f"expires_at {verified.expires_at} is after the token's exp {exp}"
        if not math.isfinite(exp):
            return
        async with self.serve() as served:
            assert (await served.get(token)).status == 200
            self.clock.now = max(self.clock.now, exp + verified.leeway + 1)
            response = await served.get(token)
            _assert_refused(response, self.scheme, "expired token")
            assert response.status == 401

    @pytest.mark.asyncio
    async def test_no_token_text_in_logs_or_cache_keys(self, caplog: pytest.LogCaptureFixture) -> None:
        valid = await self.valid_token()
        hostile = [make(valid) for _, make in HOSTILE_TOKENS]
        caplog.set_level(logging.DEBUG)
        with capture_logs(processors=[structlog.processors.format_exc_info]) as events:
            async with self.serve() as served:
                for token in (valid, valid, *hostile):
                    await served.get(token)
                caches = [served.pipeline.cache, getattr(served.pipeline, "negative_cache", None)]
                entries = {key: value for cache in caches if cache is not None
                           for key, value in _cache_entries(cache).items()}
        assert hashlib.sha256(valid.encode("utf-8")).digest() in entries, "the valid token was not cached"
        for key in entries:
            assert isinstance(key, bytes) and len(key) == 32, f"cache key is not a sha256 digest: {key!r}"
        stored = repr([(value, dict(getattr(value, "claims", {}))) for value in _cached_values(entries)])
        logged = [repr(event) for event in events] + [caplog.text]
        for secret in _secrets_of([valid, *hostile]):
            assert secret not in stored, "token text in a cached VerifiedToken"
            for line in logged:
                assert secret not in line, f"token text in a log line: {line[:300]}"

    @pytest.mark.asyncio
    async def test_exception_raised_inside_verify_token_is_401_never_500(self) -> None:
        token = await self.valid_token()
        with capture_logs():
            async with self.serve(wrap=lambda verifier, deps: _RaisingVerifier(verifier)) as served:
                response = await served.get(token)
                _assert_refused(response, self.scheme, "verify_token raised")
                assert response.status == 401
                assert "injected" not in await response.text(), "exception text reached the client"

    @pytest.mark.asyncio
    async def test_failing_dependency_inside_the_verifier_fails_closed(self) -> None:
        """deps.clock and deps.http raise once armed: the answer is 401 (or 503), never 200 or 500."""
        faults: list[_DependencyFault] = []

        def faulty_deps(deps: PluginDeps) -> PluginDeps:
            fault = _DependencyFault(deps.clock, deps.http)
            faults.append(fault)
            return dataclasses.replace(deps, clock=fault.clock, http=fault.http)

        token = await self.valid_token()
        with capture_logs():
            async with self.serve(deps_for=faulty_deps) as served:
                for fault in faults:
                    fault.armed = True
                response = await served.get(token)
        if not any(fault.calls for fault in faults):
            pytest.skip("the verifier never reads deps.clock or deps.http while verifying")
        assert response.status in (401, 503), f"a failing dependency gave {_describe(response)}"
        if response.status == 401:
            _assert_refused(response, self.scheme, "failing dependency")


# -- trust evaluators --------------------------------------------------------------------------------------


class TrustEvaluatorConformance:
    """Subclass as `class TestSomething(TrustEvaluatorConformance)`; set `entry_point_name` or override
    `create_evaluator(deps)`, and optionally `config()` and `scenarios()` (what your evaluator reacts to)."""

    entry_point_name: ClassVar[str | None] = None

    PRIOR: ClassVar[TrustAssessment] = TrustAssessment(aal=2, ial=2, acr="urn:ztmw:conformance:acr",
                                                      inputs=("conformance=prior",))

    def config(self) -> dict[str, Any]:
        return {"resource": {"identifier": "https://api.example.com"}}

    def create_evaluator(self, deps: PluginDeps) -> TrustEvaluator:
        if self.entry_point_name is None:
            raise NotImplementedError("set entry_point_name or override create_evaluator(deps)")
        settings = deps.config.plugins.get(self.entry_point_name, {})
        instance: TrustEvaluator = load_plugin("ztmw.trust_evaluators", self.entry_point_name, settings,
                                               deps).instance
        return instance

    def scenarios(self) -> list[tuple[Principal | None, RequestView]]:
        """Requests to evaluate; add the ones your evaluator acts on (a denied peer, a weak login...)."""
        return [
            (None, conformance_view()),
            (conformance_principal(), conformance_view()),
            (conformance_principal(binding="dpop", auth_time=0.0), conformance_view(peer=None)),
            (conformance_principal(acr=None, amr=()), conformance_view(peer="2001:db8::1")),
        ]

    @pytest.fixture(autouse=True)
    def ztmw_clock(self) -> FakeClock:
        self.clock = FakeClock()
        return self.clock

    @pytest.fixture
    def evaluator(self) -> TrustEvaluator:
        deps = PluginLifetime().deps(ztmw.load_config(self.config()), clock=self.clock,
                                     logger=structlog.get_logger("ztmw.conformance"))
        return self.create_evaluator(deps)

    def _evaluate(self, evaluator: TrustEvaluator, principal: Principal | None, view: RequestView,
                  current: TrustAssessment) -> TrustAssessment:
        result = evaluator.evaluate(principal, view, current)
        assert isinstance(result, TrustAssessment), (
            f"evaluate returned {type(result).__name__}, not a TrustAssessment (is it async by mistake?)")
        return result

    def test_anonymous_request_gets_an_assessment(self, evaluator: TrustEvaluator) -> None:
        self._evaluate(evaluator, None, conformance_view(), ANONYMOUS_TRUST)
        self._evaluate(evaluator, None, conformance_view(peer=None), ANONYMOUS_TRUST)

    def test_every_scenario_gets_an_assessment(self, evaluator: TrustEvaluator) -> None:
        for principal, view in self.scenarios():
            for current in (ANONYMOUS_TRUST, self.PRIOR):
                self._evaluate(evaluator, principal, view, current)

    def test_earlier_inputs_are_kept(self, evaluator: TrustEvaluator) -> None:
        """A link of the chain refines the assessment so far: what justified it must stay in `inputs`."""
        for principal, view in self.scenarios():
            result = self._evaluate(evaluator, principal, view, self.PRIOR)
            assert result.inputs[: len(self.PRIOR.inputs)] == self.PRIOR.inputs, (
                f"earlier inputs dropped: {result.inputs} "
                f"(principal={principal is not None}, peer={view.peer})")

    def test_every_change_is_explained(self, evaluator: TrustEvaluator) -> None:
        for principal, view in self.scenarios():
            for current in (ANONYMOUS_TRUST, self.PRIOR):
                result = self._evaluate(evaluator, principal, view, current)
                changed = [name for name in ("aal", "ial", "binding", "auth_age", "acr")
                           if getattr(result, name) != getattr(current, name)]
                if changed:
                    assert len(result.inputs) > len(current.inputs), f"{changed} changed with no new input"

    def test_same_request_same_assessment(self, evaluator: TrustEvaluator) -> None:
        for principal, view in self.scenarios():
            assert (self._evaluate(evaluator, principal, view, self.PRIOR)
                    == self._evaluate(evaluator, principal, view, self.PRIOR))
