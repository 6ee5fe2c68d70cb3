"""Stateless DPoP server nonces (RFC 9449 §9, §8.2).

A nonce is `base64url(window || HMAC-SHA256(secret, label || origin || window))`, where `window` is the
current time divided by the nonce lifetime. No state is kept, so any replica holding the same secret accepts
any replica's nonce, and a restart loses nothing. A nonce from the current or the previous window is accepted,
so a nonce lives between one and two lifetimes. The origin enters the MAC so that a nonce issued by another
server that happens to share the secret (an AS, another API) is not accepted here (DPOP-24).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
from typing import Any, Mapping

from ztmw.errors import ConfigurationError
from ztmw.typing import Clock

_LABEL = b"ztmw dpop nonce v1\x00"
_WINDOW_BYTES = 8
_MAC_BYTES = 32
_NONCE_CHARS = math.ceil((_WINDOW_BYTES + _MAC_BYTES) * 4 / 3)
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
MIN_SECRET_BYTES = 16

_log = logging.getLogger(__name__)


class NonceAge(enum.Enum):
    """How a presented nonce relates to the current window; PREVIOUS asks the server to hand out a new one."""

    CURRENT = "current"
    PREVIOUS = "previous"
    INVALID = "invalid"


class NonceManager:
    """Issues and checks nonces for one resource origin under one secret."""

    def __init__(self, secret: bytes, *, lifetime: float, origin: str, clock: Clock) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigurationError(f"dpop nonce secret: at least {MIN_SECRET_BYTES} bytes")
        if not (lifetime > 0 and math.isfinite(lifetime)):
            raise ConfigurationError("dpop.nonce_lifetime: must be a positive number")
        self._secret = secret
        self._lifetime = float(lifetime)
        self._origin = origin.encode("utf-8")
        self._clock = clock

    def __repr__(self) -> str:  # the secret must never reach a log through a repr
        return f"NonceManager(lifetime={self._lifetime}, origin={self._origin.decode()!r})"

    def _window(self) -> int:
        return int(self._clock() // self._lifetime)

    def _mac(self, window: bytes) -> bytes:
        return hmac.new(self._secret, _LABEL + self._origin + b"\x00" + window, hashlib.sha256).digest()

    def issue(self) -> str:
        """The nonce of the current window: only base64url characters, a subset of RFC 9449's 1*NQCHAR."""
        window = self._window().to_bytes(_WINDOW_BYTES, "big", signed=True)
        return base64.urlsafe_b64encode(window + self._mac(window)).rstrip(b"=").decode("ascii")

    def check(self, nonce: Any) -> NonceAge:
        """Classify a nonce from a proof; anything malformed, forged or older than one window is INVALID."""
        if not isinstance(nonce, str) or len(nonce) != _NONCE_CHARS or not _B64URL.fullmatch(nonce):
            return NonceAge.INVALID
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (binascii.Error, ValueError):
            return NonceAge.INVALID
        if len(raw) != _WINDOW_BYTES + _MAC_BYTES:
            return NonceAge.INVALID
        window_bytes, mac = raw[:_WINDOW_BYTES], raw[_WINDOW_BYTES:]
        # compare the MAC before looking at the window, so timing says nothing about which windows are valid
        if not hmac.compare_digest(mac, self._mac(window_bytes)):
            return NonceAge.INVALID
        window, current = int.from_bytes(window_bytes, "big", signed=True), self._window()
        if window == current:
            return NonceAge.CURRENT
        if window == current - 1:
            return NonceAge.PREVIOUS
        return NonceAge.INVALID


def load_secret(env_name: str, environ: Mapping[str, str] | None = None, logger: Any = None) -> bytes:
    """The shared HMAC secret from the environment, or a random one that only this process knows.

    A per-process secret keeps a single replica working out of the box, but nonces from one replica then fail
    on every other one, so say so loudly.
    """
    value = (os.environ if environ is None else environ).get(env_name)
    if value:
        secret = value.encode("utf-8")
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigurationError(
                f"dpop.nonce_secret_env: the variable {env_name} must hold at least {MIN_SECRET_BYTES} bytes"
            )
        return secret
    # one preformatted string: deps.logger may be stdlib or structlog, which treat positional args differently
    (logger or _log).warning(
        f"environment variable {env_name} is not set: DPoP nonces use a random per-process secret, "
        "so only one replica can accept them"
    )
    return secrets.token_bytes(32)
