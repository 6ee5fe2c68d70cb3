"""DPoP across replicas (DESIGN §5; DPOP-22, DPOP-24, RESP-20): real `ztmw serve` processes, real Redis.

Two replicas run the same TOML config, as behind a load balancer: one public origin
(`https://api.example.com`, so every proof's `htu` names the balancer, not a replica), one Redis replay
store, one nonce secret in `ZTMW_DPOP_NONCE_SECRET`. The issuer is a `DevIssuer` in the test's event loop;
the replicas fetch its JWKS over loopback. Nothing here runs on a fake clock: the replicas are other
processes.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from ztmw.testing import DevIssuer, DPoPKey

from .replica_config import AUDIENCE, PUBLIC_ORIGIN, Replica, dpop_error, serving, write_replica_config

PATH = "/hello/x"
HTU = PUBLIC_ORIGIN + PATH
NONCE_SECRET = "replica-test-nonce-secret-shared-by-all"  # >= 16 bytes
SHARED_ENV = {"ZTMW_DPOP_NONCE_SECRET": NONCE_SECRET}
CLOSED_REDIS = "redis://127.0.0.1:1/0"


@pytest.fixture
async def dev_issuer() -> AsyncIterator[DevIssuer]:
    async with DevIssuer(audience=AUDIENCE) as issuer:
        yield issuer


Result = tuple[int, Any, str]


async def call(session: aiohttp.ClientSession, replica: Replica, headers: dict[str, str]) -> Result:
    async with session.get(replica.base + PATH, headers=headers) as response:
        return response.status, response.headers.copy(), await response.text()


async def dpop_call(session: aiohttp.ClientSession, replica: Replica, token: str, proof: str) -> Result:
    return await call(session, replica, {"Authorization": f"DPoP {token}", "DPoP": proof})


async def fetch_nonce(session: aiohttp.ClientSession, replica: Replica, token: str, key: DPoPKey) -> str:
    """First contact without a nonce: R-NONCE, exactly one DPoP-Nonce (RESP-08)."""
    status, headers, _ = await dpop_call(session, replica, token, key.proof("GET", HTU, access_token=token))
    assert status == 401 and dpop_error(headers) == "use_dpop_nonce"
    nonces = headers.getall("DPoP-Nonce", [])
    assert len(nonces) == 1 and headers.get("Cache-Control") == "no-store"
    return str(nonces[0])


def security_reasons(replica: Replica) -> list[str]:
    return [e["reason"] for e in replica.events() if e.get("event") == "ztmw.security"]


@pytest.fixture
async def cluster(
    redis_url: str, dev_issuer: DevIssuer, tmp_path: Path
) -> AsyncIterator[tuple[Replica, Replica]]:
    """Replicas A and B: one config file, one Redis replay store, one nonce secret."""
    config = write_replica_config(tmp_path / "ztmw.toml", issuer=dev_issuer.issuer,
                                  jwks_uri=dev_issuer.jwks_uri, replay_store=redis_url)
    async with serving("a", config, tmp_path, SHARED_ENV) as a, \
            serving("b", config, tmp_path, SHARED_ENV) as b:
        yield a, b


@pytest.mark.redis
async def test_proof_accepted_by_one_replica_is_a_replay_at_the_other(
    cluster: tuple[Replica, Replica], dev_issuer: DevIssuer, session: aiohttp.ClientSession
) -> None:
    a, b = cluster
    key = DPoPKey()
    token = dev_issuer.mint("alice", scope="hello:read", cnf={"jkt": key.thumbprint})
    nonce = await fetch_nonce(session, a, token, key)
    proofs = []
    for first, second in ((a, b), (b, a)):
        proof = key.proof("GET", HTU, access_token=token, nonce=nonce)
        proofs.append(proof)
        status, _, body = await dpop_call(session, first, token, proof)
        assert status == 200 and body == '{"hello": "x"}'
        # the attacker sends the same proof to the other replica
        status, headers, _ = await dpop_call(session, second, token, proof)
        assert status == 401 and dpop_error(headers) == "invalid_dpop_proof"
    # each replica saw the other's proof as a replay, and logged it as one, without the token or the proof
    assert security_reasons(a) == security_reasons(b) == ["dpop_replay"]
    for replica in (a, b):
        text = replica.log_text()
        for secret in (token, *proofs, token.split(".")[2], *(p.split(".")[2] for p in proofs)):
            assert secret not in text
    # control: the same token with a fresh proof still works on both
    for replica in (a, b):
        status, _, _ = await dpop_call(session, replica, token, key.proof("GET", HTU, access_token=token,
                                                                           nonce=nonce))
        assert status == 200


@pytest.mark.redis
async def test_nonce_issued_by_one_replica_is_accepted_by_the_other(
    cluster: tuple[Replica, Replica], dev_issuer: DevIssuer, session: aiohttp.ClientSession
) -> None:
    a, b = cluster
    key = DPoPKey()
    token = dev_issuer.mint("alice", scope="hello:read", cnf={"jkt": key.thumbprint})
    for issuing, accepting in ((a, b), (b, a)):
        nonce = await fetch_nonce(session, issuing, token, key)
        status, _, body = await dpop_call(session, accepting, token,
                                          key.proof("GET", HTU, access_token=token, nonce=nonce))
        assert status == 200 and body == '{"hello": "x"}'
    # control: a nonce the replicas did not make is refused with a fresh one (DPOP-11, DPOP-24)
    forged = nonce[:-4] + ("AAAA" if not nonce.endswith("AAAA") else "BBBB")
    proof = key.proof("GET", HTU, access_token=token, nonce=forged)
    status, headers, _ = await dpop_call(session, b, token, proof)
    assert status == 401 and dpop_error(headers) == "use_dpop_nonce"
    assert len(headers.getall("DPoP-Nonce")) == 1


async def test_memory_replay_store_protects_only_one_replica(
    dev_issuer: DevIssuer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The README's known limit, pinned: without a shared store the other replica cannot know the proof.

    Also the control for the Redis test above: the replay it catches is caught by the shared store.
    """
    config = write_replica_config(tmp_path / "memory.toml", issuer=dev_issuer.issuer,
                                  jwks_uri=dev_issuer.jwks_uri, replay_store="memory")
    async with serving("m1", config, tmp_path, SHARED_ENV) as a, \
            serving("m2", config, tmp_path, SHARED_ENV) as b:
        key = DPoPKey()
        token = dev_issuer.mint("alice", scope="hello:read", cnf={"jkt": key.thumbprint})
        nonce = await fetch_nonce(session, a, token, key)
        proof = key.proof("GET", HTU, access_token=token, nonce=nonce)
        assert (await dpop_call(session, a, token, proof))[0] == 200
        assert (await dpop_call(session, b, token, proof))[0] == 200
        status, headers, _ = await dpop_call(session, a, token, proof)  # the same replica still catches it
        assert status == 401 and dpop_error(headers) == "invalid_dpop_proof"


@pytest.mark.redis
async def test_unreachable_replay_store_is_503_and_bearer_routes_keep_working(
    redis_url: str, dev_issuer: DevIssuer, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    with pytest.raises(OSError):  # precondition: nothing answers where the replay store is supposed to be
        socket.create_connection(("127.0.0.1", 1), timeout=1).close()
    config = write_replica_config(tmp_path / "down.toml", issuer=dev_issuer.issuer,
                                  jwks_uri=dev_issuer.jwks_uri, replay_store=CLOSED_REDIS)
    async with serving("down", config, tmp_path, SHARED_ENV) as replica:
        key = DPoPKey()
        token = dev_issuer.mint("alice", scope="hello:read", cnf={"jkt": key.thumbprint})
        nonce = await fetch_nonce(session, replica, token, key)  # nonces are stateless: no store needed
        # a valid request, and its replay: neither may pass while nobody can tell them apart
        for _ in range(2):
            proof = key.proof("GET", HTU, access_token=token, nonce=nonce)
            for _attempt in range(2):
                status, headers, body = await dpop_call(session, replica, token, proof)
                assert status == 503, body  # fail closed: never 200, never 500 (RESP-20)
                assert "WWW-Authenticate" not in headers
                assert body == '{"error": "temporarily_unavailable"}'
        bearer = dev_issuer.mint("bob", scope="hello:read")
        status, _, body = await call(session, replica, {"Authorization": f"Bearer {bearer}"})
        assert status == 200 and body == '{"hello": "x"}'
        async with session.get(replica.base + "/open") as response:
            assert response.status == 200
        decisions = [(e["status"], e["reason"]) for e in await replica.audit_events(7)]
        assert decisions == [(401, "dpop_nonce_required")] + [(503, "replay_store_unavailable")] * 4 + [
            (200, "allowed"), (200, "public")]
        assert token not in replica.log_text() and bearer not in replica.log_text()
