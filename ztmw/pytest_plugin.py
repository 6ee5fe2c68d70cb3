"""pytest fixtures for apps protected by ztmw (registered through the `pytest11` entry point).

    async def test_profile(aiohttp_client, ztmw_issuer):
        token = ztmw_issuer.mint("alice", scope="profile:read")

Imports of the test kit happen inside the fixtures, so installing ztmw costs other test suites nothing.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator, MutableMapping

import pytest


@pytest.fixture
async def ztmw_issuer() -> AsyncIterator[Any]:
    """A development issuer serving its JWKS on loopback; `.mint(...)` makes access tokens."""
    from ztmw.testing.issuer import DevIssuer

    async with DevIssuer() as issuer:
        yield issuer


@pytest.fixture
def ztmw_dpop_key() -> Any:
    """A client DPoP key; `.proof(method, url, access_token=...)` makes proofs, `.thumbprint` binds tokens."""
    from ztmw.testing.dpop import DPoPKey

    return DPoPKey()


@pytest.fixture(scope="session")
def ztmw_test_ca() -> Any:
    """A throw-away CA: `.client_cert(name)`, `.server_ssl_context()`, `.client_ssl_context(cert)`."""
    from ztmw.testing.certs import TestCA

    return TestCA()


@pytest.fixture
def ztmw_audit() -> Iterator[list[MutableMapping[str, Any]]]:
    """The audit events emitted during the test, as dicts (structlog's capture_logs)."""
    from structlog.testing import capture_logs

    with capture_logs() as events:
        yield events
