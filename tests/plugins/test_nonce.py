"""Stateless DPoP nonces: HMAC over a time window, accepted for the current and the previous window."""

from __future__ import annotations

import logging
import re

import pytest
from ztmw_plugins.nonce import NonceAge, NonceManager, load_secret

from ztmw.errors import ConfigurationError

ORIGIN = "https://api.example.com"
SECRET = b"s" * 32
NQCHAR = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 9449 §8.1: 1*NQCHAR


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def manager(clock: FakeClock, secret: bytes = SECRET, origin: str = ORIGIN, lifetime: float = 60
            ) -> NonceManager:
    return NonceManager(secret, lifetime=lifetime, origin=origin, clock=clock)


def test_round_trip_in_current_window(clock: FakeClock) -> None:
    nonces = manager(clock)
    assert nonces.check(nonces.issue()) is NonceAge.CURRENT


def test_nonce_is_base64url_and_nqchar(clock: FakeClock) -> None:
    nonce = manager(clock).issue()
    assert NQCHAR.fullmatch(nonce)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", nonce)


def test_previous_window_is_accepted_then_expires(clock: FakeClock) -> None:
    nonces = manager(clock)
    nonce = nonces.issue()
    clock.now += 60
    assert nonces.check(nonce) is NonceAge.PREVIOUS
    clock.now += 60
    assert nonces.check(nonce) is NonceAge.INVALID


def test_nonce_from_the_future_is_rejected(clock: FakeClock) -> None:
    nonces = manager(clock)
    clock.now += 120
    future = nonces.issue()
    clock.now -= 120
    assert nonces.check(future) is NonceAge.INVALID


def test_replicas_sharing_the_secret_accept_each_others_nonces(clock: FakeClock) -> None:
    assert manager(clock).check(manager(clock).issue()) is NonceAge.CURRENT


def test_other_secret_or_other_origin_rejects(clock: FakeClock) -> None:
    nonce = manager(clock).issue()
    assert manager(clock, secret=b"t" * 32).check(nonce) is NonceAge.INVALID
    assert manager(clock, origin="https://as.example.com").check(nonce) is NonceAge.INVALID


@pytest.mark.parametrize("bad", [None, 1, "", "abc", "eyJ7S_zG.eyJH0-Z.HX4w-7v", "=" * 54, "A" * 54,
                                 "é" * 54])
def test_malformed_nonces_are_invalid(clock: FakeClock, bad: object) -> None:
    assert manager(clock).check(bad) is NonceAge.INVALID


def test_one_flipped_character_is_invalid(clock: FakeClock) -> None:
    nonces = manager(clock)
    nonce = nonces.issue()
    flipped = nonce[:20] + ("A" if nonce[20] != "A" else "B") + nonce[21:]
    assert nonces.check(flipped) is NonceAge.INVALID


def test_short_secret_is_a_configuration_error(clock: FakeClock) -> None:
    with pytest.raises(ConfigurationError):
        manager(clock, secret=b"short")


def test_load_secret_reads_the_environment_variable() -> None:
    assert load_secret("NONCE_KEY", {"NONCE_KEY": "x" * 32}) == b"x" * 32


def test_load_secret_rejects_a_short_value_without_echoing_it() -> None:
    with pytest.raises(ConfigurationError) as info:
        load_secret("NONCE_KEY", {"NONCE_KEY": "tiny-secret"})
    assert "tiny-secret" not in str(info.value)


def test_load_secret_unset_warns_and_is_random(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("ztmw.test.nonce")
    with caplog.at_level(logging.WARNING, logger="ztmw.test.nonce"):
        first = load_secret("NONCE_KEY", {}, logger=logger)
        second = load_secret("NONCE_KEY", {}, logger=logger)
    assert first != second and len(first) == 32
    assert "NONCE_KEY" in caplog.text and "one replica" in caplog.text
