"""A development authorization server: real keys, a real JWKS endpoint on loopback, tokens on demand.

Tests, the demo and app authors need tokens that go through exactly the checks production tokens do, so this
issuer signs with real asymmetric keys and serves its JWKS over real HTTP (the verifier cannot tell it from a
real AS). It is deliberately easy to make it misbehave: every header and claim can be overridden or dropped.
Never use it in production: private keys live in memory and anyone can mint.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from aiohttp import web
from joserfc.jwk import ECKey, OKPKey, RSAKey
from joserfc.jws import JWSRegistry

from ztmw.jws import b64url_encode

_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_RSA = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_OKP = frozenset({"EdDSA", "Ed25519"})


@dataclass(frozen=True, slots=True)
class _SigningKey:
    kid: str
    algorithm: str
    key: Any  # joserfc private key

    def public_jwk(self) -> dict[str, Any]:
        return {**self.key.as_dict(private=False), "kid": self.kid, "alg": self.algorithm, "use": "sig"}


def _generate(algorithm: str) -> _SigningKey:
    if algorithm in _CURVES:
        key: Any = ECKey.generate_key(_CURVES[algorithm])
    elif algorithm in _RSA:
        key = RSAKey.generate_key(2048)
    elif algorithm in _OKP:
        key = OKPKey.generate_key("Ed25519")
    else:
        raise ValueError(f"DevIssuer cannot generate a key for {algorithm!r}")
    return _SigningKey(kid=key.thumbprint()[:16], algorithm=algorithm, key=key)


def _json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


class DevIssuer:
    """A development issuer: `async with DevIssuer() as issuer: token = issuer.mint(scope="read")`.

    `issuer` defaults to the loopback origin it listens on; pass one explicitly to use the issuer without a
    server (for a `jwks_file`, say). `clock` sets iat/nbf/exp, so a test can share its fake clock with a
    verifier.
    """

    def __init__(
        self,
        issuer: str | None = None,
        *,
        algorithm: str = "ES256",
        audience: str = "https://api.example.com",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._issuer = issuer
        self.algorithm = algorithm
        self.audience = audience
        self.clock = clock
        self.fetch_count = 0
        self._primary = _generate(algorithm)
        self._keys: dict[str, _SigningKey] = {self._primary.kid: self._primary}
        self._runner: web.AppRunner | None = None
        self._base: str | None = None

    @property
    def issuer(self) -> str:
        if self._issuer is not None:
            return self._issuer
        if self._base is None:
            raise RuntimeError("DevIssuer has no issuer identifier until it is started")
        return self._base

    @property
    def kid(self) -> str:
        return self._primary.kid

    @property
    def jwks_uri(self) -> str:
        if self._base is None:
            raise RuntimeError("DevIssuer serves no JWKS until it is started")
        return f"{self._base}/jwks"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> DevIssuer:
        if self._runner is not None:
            raise RuntimeError("DevIssuer is already started")
        app = web.Application()
        app.router.add_get("/jwks", self._serve_jwks)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = runner.addresses[0][1]
        self._base = f"http://{f'[{host}]' if ':' in host else host}:{bound_port}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> DevIssuer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _serve_jwks(self, request: web.Request) -> web.Response:
        self.fetch_count += 1
        return web.json_response(self.jwks())

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.public_jwk() for key in self._keys.values()]}

    def rotate_key(self) -> str:
        """Replace the signing key; the old one leaves the JWKS (tokens it signed stop verifying)."""
        del self._keys[self._primary.kid]
        self._primary = _generate(self.algorithm)
        self._keys[self._primary.kid] = self._primary
        return self._primary.kid

    def add_key(self, algorithm: str) -> str:
        key = _generate(algorithm)
        self._keys[key.kid] = key
        return key.kid

    def issuer_config(self, **overrides: Any) -> dict[str, Any]:
        """An `[[issuers]]` table for this issuer, trusting every algorithm of its current keys."""
        table: dict[str, Any] = {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "algorithms": sorted({key.algorithm for key in self._keys.values()}),
            "audiences": [self.audience],
        }
        table.update(overrides)
        return table

    def mint(
        self,
        sub: str = "alice",
        *,
        scope: str | None = None,
        audience: str | list[str] | None = None,
        client_id: str = "demo-client",
        lifetime: float = 300,
        claims: Mapping[str, Any] | None = None,
        header: Mapping[str, Any] | None = None,
        typ: str | None = "at+jwt",
        drop: Iterable[str] = (),
        cnf: Mapping[str, Any] | None = None,
        acr: str | None = None,
        amr: list[str] | None = None,
        auth_time: float | None = None,
        key: str | None = None,
    ) -> str:
        """A signed compact JWS access token (RFC 9068 shape unless overridden).

        `header` overrides or adds header members, and may even lie about `alg`: the signature is always made
        with the chosen key's own algorithm. `claims` overrides or adds claims; `drop` removes claims.
        """
        signer = self._keys[key] if key is not None else self._primary
        now = self.clock()
        body: dict[str, Any] = {
            "iss": self.issuer,
            "sub": sub,
            "aud": self.audience if audience is None else audience,
            "exp": int(now + lifetime),
            "iat": int(now),
            "nbf": int(now),
            "jti": secrets.token_urlsafe(16),
            "client_id": client_id,
        }
        optional = {"scope": scope, "cnf": dict(cnf) if cnf is not None else None, "acr": acr,
                    "amr": amr, "auth_time": auth_time}
        body.update({name: value for name, value in optional.items() if value is not None})
        body.update(claims or {})
        for name in drop:
            body.pop(name, None)
        protected: dict[str, Any] = {"alg": signer.algorithm, "kid": signer.kid}
        if typ is not None:
            protected["typ"] = typ
        protected.update(header or {})
        return self.sign(_json(protected), _json(body), key=signer.kid)

    def sign(self, header: bytes, payload: bytes, *, key: str | None = None) -> str:
        """Sign raw header and payload bytes, for tests that need JSON no well-behaved AS would produce."""
        signer = self._keys[key] if key is not None else self._primary
        signing_input = f"{b64url_encode(header)}.{b64url_encode(payload)}"
        # the algorithm model signs directly: JWSRegistry's front door warns on EdDSA (RFC 9864 deprecation)
        signature = JWSRegistry.algorithms[signer.algorithm].sign(signing_input.encode("ascii"), signer.key)
        return f"{signing_input}.{b64url_encode(signature)}"
