"""The `static-api-key` verifier: opaque API keys, known to the server only as SHA-256 hashes.

    [verifiers]
    enabled = ["bearer", "static-api-key"]

    [plugins.static-api-key]
    issuer = "urn:example:api-keys"            # optional: the `issuer` of every VerifiedToken it returns

    [[plugins.static-api-key.keys]]
    id = "ci-deploy"                           # required, unique: what audit logs show (token_id)
    sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    subject = "ci"                             # required
    client_id = "ci"                           # optional
    scopes = ["items:read"]                    # optional
    expires_at = 1798761600                    # optional, seconds since the epoch; absent: never expires
    cnf = { "x5t#S256" = "..." }               # optional: only usable with that client certificate

The keys themselves are never configured, only their hashes (`hash_key`), so a leaked config file leaks no
credential. API keys must be long random strings (at least 128 bits): an unsalted SHA-256 is fine for those
and would not be for passwords. The incoming key is hashed and compared with every configured hash in constant
time, so response timing says nothing about how close a guess was.

`verify_token` depends on the key alone (and on the clock only to refuse an expired key), which is what lets
ztmw cache its result; a key bound with `cnf` is confirmed by ztmw on every request, cached or not.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from ztmw import ConfigurationError, InvalidToken, VerifiedToken
from ztmw.typing import Clock, PluginDeps

NAME = "static-api-key"
DEFAULT_ISSUER = "urn:ztmw-sample:api-keys"
MAX_KEY_LENGTH = 1024
_SETTINGS = frozenset({"issuer", "keys"})
_KEY_FIELDS = frozenset({"id", "sha256", "subject", "client_id", "scopes", "expires_at", "cnf"})
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
_LOG_SAFE_ID = re.compile(r"[\x21-\x7e]{1,128}")


def hash_key(key: str) -> str:
    """The `sha256` value to configure for an API key (lower-case hex)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One configured key: its hash and what a request carrying it may do."""

    id: str
    digest: bytes
    subject: str
    client_id: str | None
    scopes: frozenset[str]
    expires_at: float
    cnf: Mapping[str, str]


class StaticApiKeyVerifier:
    """A `ztmw.typing.TokenVerifier`: raises `InvalidToken` for anything but a configured, unexpired key."""

    name = NAME

    def __init__(self, keys: tuple[ApiKey, ...], *, issuer: str, audience: str, clock: Clock) -> None:
        self._keys = keys
        self._issuer = issuer
        self._audience = (audience,)
        self._clock = clock

    async def verify_token(self, token: str) -> VerifiedToken:
        # Cheap refusals first; none of them looks at the configured keys, and none echoes the token.
        if not token or len(token) > MAX_KEY_LENGTH or not token.isascii():
            raise InvalidToken("malformed_token")
        digest = hashlib.sha256(token.encode("ascii")).digest()
        found: ApiKey | None = None
        for key in self._keys:  # no early exit: every hash is compared, in constant time
            if hmac.compare_digest(digest, key.digest):
                found = key
        if found is None:
            raise InvalidToken("invalid_token")
        if self._clock() >= found.expires_at:
            raise InvalidToken("token_expired")
        return VerifiedToken(
            issuer=self._issuer,
            subject=found.subject,
            audience=self._audience,
            expires_at=found.expires_at,
            token_id=found.id,  # the key's label: safe to log, unlike the key
            verifier=NAME,
            client_id=found.client_id,
            scopes=found.scopes,
            cnf=found.cnf,
        )


def create(settings: Mapping[str, Any], deps: PluginDeps) -> StaticApiKeyVerifier:
    """Entry point `ztmw.verifiers: static-api-key`; `settings` is the `[plugins.static-api-key]` table."""
    unknown = sorted(set(settings) - _SETTINGS)
    if unknown:
        raise ConfigurationError(f"plugins.{NAME}: unknown key {unknown[0]!r}")
    issuer = settings.get("issuer", DEFAULT_ISSUER)
    if not isinstance(issuer, str) or not issuer:
        raise ConfigurationError(f"plugins.{NAME}.issuer: must be a non-empty string")
    entries = settings.get("keys")
    if not isinstance(entries, list) or not entries:
        raise ConfigurationError(f"plugins.{NAME}.keys: must be a non-empty array of tables")
    keys = tuple(_key(entry, f"plugins.{NAME}.keys[{i}]") for i, entry in enumerate(entries))
    if len({k.id for k in keys}) != len(keys):
        raise ConfigurationError(f"plugins.{NAME}.keys: two keys share an id")
    if len({k.digest for k in keys}) != len(keys):
        raise ConfigurationError(f"plugins.{NAME}.keys: the same key is configured twice")
    audience = deps.config.resource.identifier
    return StaticApiKeyVerifier(keys, issuer=issuer, audience=audience, clock=deps.clock)


def _key(entry: Any, where: str) -> ApiKey:
    if not isinstance(entry, Mapping):
        raise ConfigurationError(f"{where}: must be a table")
    unknown = sorted(set(entry) - _KEY_FIELDS)
    if unknown:
        raise ConfigurationError(f"{where}: unknown key {unknown[0]!r}")
    key_id = entry.get("id")
    if not isinstance(key_id, str) or not _LOG_SAFE_ID.fullmatch(key_id):
        raise ConfigurationError(f"{where}.id: must be 1-128 printable ASCII characters")
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not _HEX_SHA256.fullmatch(digest):
        raise ConfigurationError(f"{where}.sha256: must be 64 lower-case hex digits (see hash_key)")
    subject = entry.get("subject")
    if not isinstance(subject, str) or not subject:
        raise ConfigurationError(f"{where}.subject: must be a non-empty string")
    client_id = entry.get("client_id")
    if client_id is not None and (not isinstance(client_id, str) or not client_id):
        raise ConfigurationError(f"{where}.client_id: must be a non-empty string")
    scopes = entry.get("scopes", [])
    if not isinstance(scopes, list) or not all(isinstance(s, str) and s and " " not in s for s in scopes):
        raise ConfigurationError(f"{where}.scopes: must be an array of scope tokens")
    expires_at = entry.get("expires_at", math.inf)
    if isinstance(expires_at, bool) or not isinstance(expires_at, (int, float)) or math.isnan(expires_at):
        raise ConfigurationError(f"{where}.expires_at: must be seconds since the epoch")
    cnf = entry.get("cnf", {})
    if not isinstance(cnf, Mapping) or not all(isinstance(k, str) and isinstance(v, str) and v
                                               for k, v in cnf.items()):
        raise ConfigurationError(f"{where}.cnf: must be a table of confirmation members (strings)")
    return ApiKey(
        id=key_id,
        digest=bytes.fromhex(digest),
        subject=subject,
        client_id=client_id,
        scopes=frozenset(scopes),
        expires_at=float(expires_at),
        cnf=MappingProxyType(dict(cnf)),
    )
