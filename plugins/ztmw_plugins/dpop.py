"""The `dpop` binding verifier: checks a DPoP proof on every request (RFC 9449 §4.3, §7; checklist §6, §7).

The core has already verified the access token (cached) and found `cnf.jkt` under the DPoP scheme; this
plugin proves the caller holds that key, per request and never cached. Checks run cheapest first and the
signature is verified before the replay store is written, so unsigned junk cannot burn `jti` values
(DPOP-15). Every refusal carries a stable snake_case reason; no proof, token or secret text ever goes into an
exception message or a log line.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

from ztmw import jws
from ztmw.config import ASYMMETRIC_ALGORITHMS, DPoPConfig, check_plugin_settings
from ztmw.errors import ConfigurationError, InvalidDPoPProof, InvalidToken, TokenBindingMismatch, UseDPoPNonce
from ztmw.lru import LRU
from ztmw.models import Credential, RequestView, VerifiedToken
from ztmw.typing import Clock, PluginDeps, ReplayStore
from ztmw.workers import refuse_per_process_state

from .nonce import NonceAge, NonceManager, load_secret
from .replay import DEFAULT_MAX_ENTRIES, DEFAULT_REDIS_TIMEOUT, create_replay_store

MAX_PROOF_BYTES = 8192  # DPOP-28: checked before any decoding
MAX_PROOF_RSA_BITS = 4096  # DPOP-28: a 16k-bit RSA key would make every verification expensive
_MAX_RSA_N_CHARS = -(-MAX_PROOF_RSA_BITS // 6)  # base64url characters of a MAX_PROOF_RSA_BITS modulus
MAX_JTI_CHARS = 256  # DPOP-23
_HEADER_CACHE_MAX_CHARS = 1024  # a checked proof header is remembered up to this size (an RSA-4096 jwk fits)
LONG_TOKEN_SECONDS = 3600  # DPOP-29: warn when long-lived DPoP tokens meet a server without nonces
_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_JKT = re.compile(r"[A-Za-z0-9_-]{43}")
_SETTINGS = frozenset({"replay_max_entries", "redis_timeout"})


def _proof_digest(proof: str) -> bytes:
    """What stands for a proof in memory: its SHA-256 (SEC-03: no proof kept as a key)."""
    return hashlib.sha256(proof.encode("utf-8", "surrogatepass")).digest()


def _proof_error(reason: str, **kwargs: Any) -> InvalidDPoPProof:
    return InvalidDPoPProof(reason, scheme="dpop", **kwargs)


class DPoPVerifier:
    """Confirms DPoP-bound tokens; also a response decorator that rolls nonces over (RFC 9449 §8.2)."""

    name = "dpop"
    cnf_member = "jkt"
    scheme = "dpop"
    memo_safe = True  # as a response decorator: adds nothing to a request without a DPoP header

    def __init__(
        self,
        config: DPoPConfig,
        *,
        public_origin: str,
        clock: Clock,
        replay_store: ReplayStore,
        nonces: NonceManager | None = None,
        logger: Any = None,
    ) -> None:
        if config.require_nonce and nonces is None:
            raise ConfigurationError("dpop.require_nonce: a nonce manager is needed")
        self.algorithms: tuple[str, ...] = tuple(config.algorithms)
        self._allowed = frozenset(self.algorithms) & ASYMMETRIC_ALGORITHMS
        self._max_age = config.max_age
        self._skew = config.clock_skew
        self._require_nonce = config.require_nonce
        self._origin = public_origin.rstrip("/")
        self._clock = clock
        self._replay = replay_store
        self._nonces = nonces
        self._logger = logger
        self._warned_long_tokens = False
        # proofs whose nonce `confirm` found in the previous window, for `response_headers` of the same request,
        # by digest (no proof is kept); bounded: a request refused after `confirm` never collects its entry
        self._stale_nonce_proofs: LRU[bytes, bool] = LRU(1024)
        # checked proof headers by their base64url text -> (key, RFC 7638 thumbprint)
        self._checked_headers: LRU[str, tuple[Any, str]] = LRU(1024)

    async def confirm(self, verified: VerifiedToken, credential: Credential, request: RequestView) -> str:
        """Every check of RFC 9449 §4.3 plus the key binding; returns the matched `jkt` or raises."""
        jkt = self._bound_thumbprint(verified, credential)
        proof = self._parse(request.dpop)
        key, key_thumbprint = self._checked_header(request.dpop[0], proof)
        claims = _Claims.read(proof.claims)
        now = self._clock()
        self._check_request(claims, request, credential.token, credential.digest, now)
        if not jws.verify_signature(proof, key, proof.header["alg"]):
            raise _proof_error("dpop_bad_signature")
        if not jws.constant_time_equals(key_thumbprint, jkt):
            raise TokenBindingMismatch("dpop_key_mismatch", scheme="dpop")
        if self._check_nonce(claims.nonce) is NonceAge.PREVIOUS:
            self._stale_nonce_proofs.put(_proof_digest(request.dpop[0]), True)
        self._warn_long_lived(verified)
        # TTL covers the whole time this proof could still pass the iat window (iat up to `skew` ahead)
        if not await self._replay.first_seen(f"{jkt}|{claims.jti}", self._max_age + self._skew + 1):
            raise _proof_error("dpop_replay", security=True)
        return jkt

    def response_headers(self, request: RequestView, allowed: bool) -> Mapping[str, str]:
        """A fresh `DPoP-Nonce` when the client's nonce is from the previous window, so it can move on.

        A missing or invalid nonce gets its fresh nonce through `UseDPoPNonce` instead; returning one here too
        would send two `DPoP-Nonce` fields (RESP-08).
        """
        if self._nonces is None or len(request.dpop) != 1 or not self._stale_nonce_proofs:
            return {}
        digest = _proof_digest(request.dpop[0])
        if digest in self._stale_nonce_proofs:  # confirm saw an old-window nonce
            self._stale_nonce_proofs.pop(digest)
            return {"DPoP-Nonce": self._nonces.issue()}
        return {}

    # -- the steps, in the order they run --------------------------------------------------------------------

    def _bound_thumbprint(self, verified: VerifiedToken, credential: Credential) -> str:
        """The token side of the binding (JKT-04/05, DPOP-20/21), checked again here as defence in depth."""
        if credential.scheme != "dpop":
            raise TokenBindingMismatch("dpop_bound_token_as_bearer", scheme=credential.scheme)
        if "jkt" not in verified.cnf:
            raise InvalidToken("unbound_token_as_dpop", scheme="dpop")
        jkt = verified.cnf["jkt"]
        if not isinstance(jkt, str) or not _JKT.fullmatch(jkt):
            raise InvalidToken("invalid_claim", scheme="dpop")
        try:
            jws.b64url_decode(jkt)  # 43 characters could still carry non-zero unused bits
        except jws.MalformedJWS:
            raise InvalidToken("invalid_claim", scheme="dpop") from None
        return jkt

    def _parse(self, values: tuple[str, ...]) -> jws.CompactJWS:
        if not values:
            raise _proof_error("dpop_proof_missing")
        if len(values) > 1:  # DPOP-01: we answer 401 invalid_dpop_proof, not 400
            raise _proof_error("dpop_multiple_proofs")
        value = values[0]
        if len(value) > MAX_PROOF_BYTES:
            raise _proof_error("dpop_too_large")
        if not _COMPACT.fullmatch(value):  # DPOP-02: one JWT, so "a,b" or a JWE fails before any decoding
            raise _proof_error("dpop_malformed")
        try:
            return jws.parse_compact(value, max_bytes=MAX_PROOF_BYTES)
        except jws.MalformedJWS as exc:
            crit = exc.reason == "unsupported_crit"
            raise _proof_error("dpop_unsupported_crit" if crit else "dpop_malformed") from None

    def _checked_header(self, value: str, proof: jws.CompactJWS) -> tuple[Any, str]:
        """The proof's key and its thumbprint, after `_check_header`. A client signs every proof under the
        same protected header (typ, alg, jwk), so the outcome is remembered by the header's text (bounded):
        its key is imported and thumbprinted once, not per request. Refusals are never remembered."""
        head = value[:value.index(".")]
        known = self._checked_headers.get(head)
        if known is not None:
            return known
        key = self._check_header(proof)
        checked = (key, jws.thumbprint(key))
        if len(head) <= _HEADER_CACHE_MAX_CHARS:
            self._checked_headers.put(head, checked)
        return checked

    def _check_header(self, proof: jws.CompactJWS) -> Any:
        header = proof.header
        if not jws.media_type_is(header.get("typ"), "dpop+jwt"):
            raise _proof_error("dpop_wrong_typ")
        if header["alg"] not in self._allowed:  # case-sensitive; none, HS* and unlisted algorithms fail here
            raise _proof_error("dpop_bad_alg")
        jwk = header.get("jwk")
        if not isinstance(jwk, Mapping):  # DPOP-06: the only key source; kid, jku, x5u, x5c are ignored
            raise _proof_error("dpop_missing_jwk")
        if jwk.get("kty") == "oct":
            raise _proof_error("dpop_private_key")
        if jwk.get("kty") == "RSA" and isinstance(jwk.get("n"), str) and len(jwk["n"]) > _MAX_RSA_N_CHARS:
            raise _proof_error("dpop_bad_key")
        try:
            key = jws.import_public_jwk(jwk)
        except jws.MalformedJWS as exc:
            private = exc.reason == "private_jwk"
            raise _proof_error("dpop_private_key" if private else "dpop_bad_key") from None
        if not jws.key_fits_algorithm(key, header["alg"]):
            raise _proof_error("dpop_bad_alg")
        return key

    def _check_request(self, claims: "_Claims", request: RequestView, token: str, digest: bytes, now: float) -> None:
        if claims.htm != request.method:  # RFC 9110 §9.1: methods are case-sensitive
            raise _proof_error("dpop_htm_mismatch")
        if "?" in claims.htu or "#" in claims.htu:
            raise _proof_error("dpop_htu_mismatch")
        expected = _normalized(self._origin + (request.path or "/"))
        if expected is None or _normalized(claims.htu) != expected:
            raise _proof_error("dpop_htu_mismatch")
        if not now - self._max_age <= claims.iat <= now + self._skew:
            raise _proof_error("dpop_iat_out_of_window")
        if claims.exp is not None and claims.exp <= now:
            raise _proof_error("dpop_expired")
        try:
            ath = jws.b64url_encode(digest or hashlib.sha256(token.encode("ascii")).digest())
        except UnicodeEncodeError:
            raise _proof_error("dpop_ath_mismatch") from None
        if not jws.constant_time_equals(ath, claims.ath):
            raise _proof_error("dpop_ath_mismatch")

    def _check_nonce(self, nonce: Any) -> NonceAge | None:
        if not self._require_nonce or self._nonces is None:
            return None  # we never handed out a nonce, so a proof's nonce has nothing to match (§4.3 step 10)
        age = self._nonces.check(nonce)
        if age is NonceAge.INVALID:
            raise UseDPoPNonce("dpop_nonce_required", nonce=self._nonces.issue(), scheme="dpop")
        return age

    def _warn_long_lived(self, verified: VerifiedToken) -> None:
        """DPOP-29: without nonces a stolen proof-plus-token pair works for the whole window; say so once."""
        if self._require_nonce or self._warned_long_tokens or verified.issued_at is None:
            return
        if verified.expires_at - verified.issued_at > LONG_TOKEN_SECONDS and self._logger is not None:
            self._warned_long_tokens = True
            self._logger.warning(
                f"DPoP-bound tokens live longer than {LONG_TOKEN_SECONDS} s while dpop.require_nonce is off; "
                "consider turning nonces on"
            )


@dataclass(frozen=True, slots=True)
class _Claims:
    """The proof claims RFC 9449 §4.2 and §7 require at a resource server, type-checked once."""

    jti: str
    htm: str
    htu: str
    iat: float
    ath: str
    exp: float | None
    nonce: Any

    @classmethod
    def read(cls, claims: Mapping[str, Any]) -> "_Claims":
        for name in ("jti", "htm", "htu", "iat", "ath"):
            if name not in claims:
                raise _proof_error("dpop_missing_claim")
        jti, htm, htu, ath = claims["jti"], claims["htm"], claims["htu"], claims["ath"]
        if not all(isinstance(v, str) for v in (jti, htm, htu, ath)):
            raise _proof_error("dpop_invalid_claim")
        if not 1 <= len(jti) <= MAX_JTI_CHARS:
            raise _proof_error("dpop_invalid_claim")
        iat = jws.numeric_date(claims["iat"])
        if iat is None:
            raise _proof_error("dpop_invalid_claim")
        exp = None
        if "exp" in claims:
            exp = jws.numeric_date(claims["exp"])
            if exp is None:
                raise _proof_error("dpop_invalid_claim")
        return cls(jti, htm, htu, iat, ath, exp, claims.get("nonce"))


# -- htu comparison (RFC 3986 §6.2.2, §6.2.3) ---------------------------------------------------------------
# Written by hand because urllib.parse neither normalises percent-encoding nor removes dot segments.

_URI = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?#]*)(?P<path>[^?#]*)")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


_NORMALIZED_CACHE_MAX_CHARS = 512


def _normalized(uri: str) -> str | None:
    """`normalize_uri`, remembered for URIs of a sane length: a client sends the same htu request after request
    (3 us each time otherwise); the bound keeps hostile proofs from filling memory."""
    return _normalize_cached(uri) if len(uri) <= _NORMALIZED_CACHE_MAX_CHARS else normalize_uri(uri)


def normalize_uri(uri: str) -> str | None:
    """Syntax- and scheme-based normal form of an http(s) URI without query or fragment, else None.

    Scheme and host are lower-cased, a default or empty port is dropped, percent-encoded unreserved characters
    are decoded and other percent-encodings upper-cased, dot segments are removed and an empty path becomes /.
    Userinfo is kept, so a URI carrying it never equals a request URI.
    """
    match = _URI.fullmatch(uri)
    if match is None:
        return None
    scheme = match["scheme"].lower()
    if scheme not in _DEFAULT_PORTS:
        return None
    userinfo, _, hostport = match["authority"].rpartition("@")
    host, port = hostport, ""
    if hostport.startswith("["):  # IP literal: its colons are not a port separator
        end = hostport.find("]")
        rest = hostport[end + 1:] if end >= 0 else "x"
        if rest and not rest.startswith(":"):
            return None
        host, port = hostport[: end + 1], rest[1:]
    elif ":" in hostport:
        host, port = hostport.split(":", 1)
    if not host or (port and not (port.isascii() and port.isdigit() and len(port) <= 5)):
        return None
    port = str(int(port)) if port else ""  # an empty port means the default one (§6.2.3)
    if port == _DEFAULT_PORTS[scheme]:
        port = ""
    authority = (_normalize_percent(userinfo) + "@" if "@" in match["authority"] else "")
    authority += _normalize_percent(host).lower() + (":" + port if port else "")
    path = _remove_dot_segments(_normalize_percent(match["path"])) or "/"
    return f"{scheme}://{authority}{path}"


_normalize_cached = functools.lru_cache(maxsize=2048)(normalize_uri)


def _normalize_percent(text: str) -> str:
    def fix(m: re.Match[str]) -> str:
        byte = int(m[1], 16)
        return chr(byte) if byte in _UNRESERVED else "%" + m[1].upper()

    return _PCT.sub(fix, text)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, on a path whose unreserved percent-encodings (%2E) are already decoded."""
    output: list[str] = []
    while path:
        if path.startswith("../"):
            path = path[3:]
        elif path.startswith("./"):
            path = path[2:]
        elif path.startswith("/./"):
            path = path[2:]
        elif path == "/.":
            path = "/"
        elif path.startswith("/../"):
            path = path[3:]
            if output:
                output.pop()
        elif path == "/..":
            path = "/"
            if output:
                output.pop()
        elif path in (".", ".."):
            path = ""
        else:
            start = 1 if path.startswith("/") else 0
            end = path.find("/", start)
            end = len(path) if end < 0 else end
            output.append(path[:end])
            path = path[end:]
    return "".join(output)


# -- the entry point ---------------------------------------------------------------------------------------


def create(settings: Mapping[str, Any], deps: PluginDeps) -> DPoPVerifier:
    """Entry point `ztmw.verifiers: dpop`. Optional settings: replay_max_entries, redis_timeout (seconds)."""
    check_plugin_settings(settings, "dpop", _SETTINGS)
    max_entries = settings.get("replay_max_entries", DEFAULT_MAX_ENTRIES)
    if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
        raise ConfigurationError("plugins.dpop.replay_max_entries: a positive integer")
    timeout = settings.get("redis_timeout", DEFAULT_REDIS_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 30:
        raise ConfigurationError("plugins.dpop.redis_timeout: a number of seconds in (0, 30]")
    config = deps.config.dpop
    refuse_per_process_state(config, os.environ)
    store = create_replay_store(
        config.replay_store, deps.clock, max_entries=max_entries, timeout=float(timeout)
    )
    deps.on_startup(store.start)
    deps.on_cleanup(store.close)
    nonces = None
    if config.require_nonce:
        nonces = NonceManager(
            load_secret(config.nonce_secret_env, logger=deps.logger),
            lifetime=config.nonce_lifetime,
            origin=deps.config.resource.public_origin,
            clock=deps.clock,
        )
    return DPoPVerifier(
        config,
        public_origin=deps.config.resource.public_origin,
        clock=deps.clock,
        replay_store=store,
        nonces=nonces,
        logger=deps.logger,
    )
