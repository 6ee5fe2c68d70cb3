"""The servers under test, each started as its own process by run.py / flood.py / kid_flood.py.

One handler for every scenario (`GET /hello/{name}` answering a 5-byte text body), so the only difference
between scenarios is the security layer in front of it:

  bare           aiohttp alone
  noop           one `@web.middleware` that only awaits the handler
  pyjwt-rs256    the middleware people write by hand: `jwt.decode()` (PyJWT) on every request, RS256 key
  pyjwt-es256    the same with an ES256 key
  hash-cache     the cache people write by hand in front of that: SHA-256 of the Authorization header -> dict
                 of claims, PyJWT ES256 (and the scope check) on a miss, `exp` compared on a hit: the peer of
                 ztmw's cached scenarios
  dpop-peer      the DPoP check people write by hand: the token cached as in hash-cache (plus `cnf.jkt`), the
                 proof verified with PyJWT against its own `jwk` (typ, alg), `htm`, `htu`, `iat` window, `ath`,
                 the key's RFC 7638 thumbprint against `jkt`, and `jti` in a dict of recent proofs
  es256-only     a middleware that checks the token's ES256 signature and nothing else (no header, no
                 claims, no expiry): what any verifier must at least pay, live, for a token it has not seen
  busy-2us       a middleware that spins 2 microseconds: what 2 us of work per request costs in the ratio on
                 this machine (it is more than 2 us: a slower server also pays more system time per request)
  (ztmw)         `ztmw serve apps:create_app --config ...`: the factory below behind the real CLI

Run a baseline directly: `python apps.py --kind bare --port 8081 [--tls-cert C --tls-key K --tls-client-ca CA]`.
The ztmw scenarios do not use this entry point: they go through `python -m ztmw serve`, exactly as users do,
so the structlog setup (JSON lines on stdout) is the one `ztmw serve` installs.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import ssl
import time
from typing import Any, Awaitable, Callable

from aiohttp import web

AUDIENCE = "https://api.example.com"
ISSUER = "https://issuer.test"
SCOPE = "hello:read"
PUBLIC_ORIGIN = "https://api.example.com"  # what ztmw and the DPoP peer rebuild htu from


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


def create_app() -> web.Application:
    """The app behind every scenario (ztmw serve loads it as `apps:create_app`)."""
    app = web.Application()
    app.router.add_get("/hello/{name}", hello)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def noop_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    return await handler(request)


def pyjwt_middleware(public_key_pem: bytes, algorithm: str) -> Any:
    """What users write by hand: decode and verify the JWT on every request, check one scope."""
    import jwt  # PyJWT, from the `bench` extra
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(public_key_pem)

    @web.middleware
    async def jwt_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return web.json_response({"error": "unauthorized"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="api"'})
        try:
            claims = jwt.decode(header[7:], key, algorithms=[algorithm], audience=AUDIENCE, issuer=ISSUER,
                                options={"require": ["exp", "iat", "sub"]})
        except jwt.PyJWTError:
            return web.json_response({"error": "invalid_token"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="api", error="invalid_token"'})
        if SCOPE not in str(claims.get("scope", "")).split():
            return web.json_response({"error": "insufficient_scope"}, status=403)
        request["claims"] = claims
        return await handler(request)

    return jwt_auth


def _refuse(status: int, error: str) -> web.Response:
    return web.json_response({"error": error}, status=status,
                             headers={"WWW-Authenticate": f'Bearer realm="api", error="{error}"'})


class _TokenCache:
    """The hand-written token cache: SHA-256 of the token -> its claims, PyJWT on a miss, `exp` on a hit."""

    def __init__(self, public_key_pem: bytes) -> None:
        import jwt
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        self._jwt = jwt
        self._key = load_pem_public_key(public_key_pem)
        self._claims: dict[bytes, dict[str, Any]] = {}

    def claims(self, token: str) -> dict[str, Any] | None:
        digest = hashlib.sha256(token.encode()).digest()
        claims = self._claims.get(digest)
        if claims is not None:
            return claims if claims["exp"] > time.time() else None
        try:
            claims = self._jwt.decode(token, self._key, algorithms=["ES256"], audience=AUDIENCE, issuer=ISSUER,
                                      options={"require": ["exp", "iat", "sub"]})
        except self._jwt.PyJWTError:
            return None
        if SCOPE not in str(claims.get("scope", "")).split():
            return None
        self._claims[digest] = claims
        return claims


def hash_cache_middleware(public_key_pem: bytes) -> Any:
    """The hand-written cache: verify once with PyJWT, then a SHA-256, a dict lookup and the `exp` check."""
    cache = _TokenCache(public_key_pem)

    @web.middleware
    async def cached_jwt_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return _refuse(401, "invalid_request")
        claims = cache.claims(header[7:])
        if claims is None:
            return _refuse(401, "invalid_token")
        request["claims"] = claims
        return await handler(request)

    return cached_jwt_auth


def dpop_peer_middleware(public_key_pem: bytes, public_origin: str) -> Any:
    """The hand-written DPoP check (RFC 9449 §4.3 as a careful user would write it with PyJWT)."""
    import base64

    import jwt

    cache = _TokenCache(public_key_pem)
    seen: dict[str, float] = {}  # jti -> iat, pruned as proofs leave the window
    max_age, skew = 60, 5

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def thumbprint(jwk: dict[str, Any]) -> str:
        members = {"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"], "y": jwk["y"]}
        return b64(hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest())

    @web.middleware
    async def dpop_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        proof = request.headers.get("DPoP")
        if not header.startswith("DPoP ") or not proof:
            return _refuse(401, "invalid_request")
        token = header[5:]
        claims = cache.claims(token)
        if claims is None or not isinstance(claims.get("cnf"), dict):
            return _refuse(401, "invalid_token")
        try:
            head = jwt.get_unverified_header(proof)
            jwk = head.get("jwk")
            if head.get("typ") != "dpop+jwt" or head.get("alg") != "ES256" or not isinstance(jwk, dict):
                return _refuse(401, "invalid_dpop_proof")
            key = jwt.PyJWK(jwk, algorithm="ES256").key
            proof_claims = jwt.decode(proof, key, algorithms=["ES256"],
                                      options={"require": ["jti", "htm", "htu", "iat", "ath"]})
            now = time.time()
            expected_ath = b64(hashlib.sha256(token.encode()).digest())
            if (proof_claims["htm"] != request.method
                    or proof_claims["htu"] != public_origin + request.path
                    or not now - max_age <= proof_claims["iat"] <= now + skew
                    or not hmac.compare_digest(proof_claims["ath"], expected_ath)
                    or not hmac.compare_digest(thumbprint(jwk), claims["cnf"].get("jkt", ""))):
                return _refuse(401, "invalid_dpop_proof")
        except (jwt.PyJWTError, KeyError, TypeError, ValueError):
            return _refuse(401, "invalid_dpop_proof")
        jti = proof_claims["jti"]
        if jti in seen:
            return _refuse(401, "invalid_dpop_proof")
        seen[jti] = proof_claims["iat"]
        if len(seen) > 200_000:  # prune what can no longer pass the iat window
            for old in [k for k, iat in seen.items() if iat < now - max_age - skew]:
                del seen[old]
        request["claims"] = claims
        return await handler(request)

    return dpop_auth


def es256_only_middleware(public_key_pem: bytes) -> Any:
    """The signature check alone, as cheap as Python can ask OpenSSL for it: the floor under any verifier."""
    import base64

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(public_key_pem)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    algorithm = ec.ECDSA(hashes.SHA256())

    @web.middleware
    async def signature_only(request: web.Request, handler: Handler) -> web.StreamResponse:
        signing_input, _, signature = request.headers.get("Authorization", "")[7:].rpartition(".")
        raw = base64.urlsafe_b64decode(signature + "==")
        der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        key.verify(der, signing_input.encode(), algorithm)  # raises (a 500) on a bad signature: none are sent
        return await handler(request)

    return signature_only


@web.middleware
async def busy_2us_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    end = time.perf_counter_ns() + 2000
    while time.perf_counter_ns() < end:
        pass
    return await handler(request)


def build(kind: str, public_key: str | None) -> web.Application:
    app = create_app()
    if kind == "noop":
        app.middlewares.append(noop_middleware)
    elif kind == "busy-2us":
        app.middlewares.append(busy_2us_middleware)
    elif kind in ("pyjwt-rs256", "pyjwt-es256", "hash-cache", "es256-only", "dpop-peer"):
        if public_key is None:
            raise SystemExit("--public-key is needed for the PyJWT middleware")
        with open(public_key, "rb") as fh:
            pem = fh.read()
        if kind == "hash-cache":
            app.middlewares.append(hash_cache_middleware(pem))
        elif kind == "dpop-peer":
            app.middlewares.append(dpop_peer_middleware(pem, PUBLIC_ORIGIN))
        elif kind == "es256-only":
            app.middlewares.append(es256_only_middleware(pem))
        else:
            app.middlewares.append(pyjwt_middleware(pem, "RS256" if kind == "pyjwt-rs256" else "ES256"))
    elif kind != "bare":
        raise SystemExit(f"unknown kind {kind!r}")
    return app


KINDS = ["bare", "noop", "busy-2us", "hash-cache", "es256-only", "pyjwt-rs256", "pyjwt-es256", "dpop-peer"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--public-key", help="PEM public key for the PyJWT middleware")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--tls-client-ca", help="ask for (do not require) a client certificate, as ztmw serve")
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        raise SystemExit("benchmark servers listen on loopback only")
    ssl_context = None
    if args.tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_client_ca:
            ssl_context.load_verify_locations(args.tls_client_ca)
            ssl_context.verify_mode = ssl.CERT_OPTIONAL
    web.run_app(build(args.kind, args.public_key), host=args.host, port=args.port, ssl_context=ssl_context,
                print=None, access_log=None)


if __name__ == "__main__":
    main()
