"""Security review, session 2: the jsonl audit sink, the shared cache's `until`, the cache result on refusals,
the query-token check and the reserved rule ids.

Real problems are `xfail(strict=True)` with the fix in the reason; everything else here pins behaviour the
review checked and found correct, so a later change cannot break it unnoticed. Servers are real (aiohttp test
servers, the development issuer, Redis where the shared cache is concerned); time is the FakeClock.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from aiohttp import web
from structlog.testing import capture_logs

import ztmw
from ztmw.audit_jsonl import JsonLinesAuditSink
from ztmw.cache import token_key
from ztmw.errors import InvalidDPoPProof
from ztmw.testing import DevIssuer, DPoPKey, FakeClock

from .conftest import base_config, decisions, items_app, raw, with_query
from .test_audit_jsonl import EVENT, jsonl_client, read_lines
from .test_memo import call, protected
from .test_middleware import staged_app

CACHE_SECRET = "review-session2-cache-secret-0123"


# == 1. the jsonl audit sink ==================================================================================

# -- problems ------------------------------------------------------------------------------------------------

def test_every_outage_of_the_audit_file_is_reported_not_only_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = JsonLinesAuditSink(tmp_path / "a.jsonl", buffer_bytes=0, clock=FakeClock())
    real_write, disk = os.write, {"full": False}

    def write(fd: int, data: Any) -> int:
        if disk["full"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with capture_logs() as logs:
        disk["full"] = True
        sink.emit(EVENT)  # the disk is full: reported
        disk["full"] = False
        sink.emit(EVENT)  # space freed: written
        disk["full"] = True
        sink.emit(EVENT)  # full again, later: must be reported again
        disk["full"] = False
    sink.close()
    assert sink.dropped == 2 and len(read_lines(tmp_path / "a.jsonl")) == 1
    assert [e["event"] for e in logs].count("ztmw.audit_write_failed") == 2


_PARTIAL_WRITE_CHILD = textwrap.dedent("""
    import asyncio, fcntl, os, sys, threading, time
    from dataclasses import replace
    out_path = sys.argv[1]
    r, w = os.pipe()
    os.dup2(w, 1)  # stdout ("-") is a pipe someone made non-blocking (O_NONBLOCK is shared by every holder)
    os.close(w)
    fcntl.fcntl(1, fcntl.F_SETFL, fcntl.fcntl(1, fcntl.F_GETFL) | os.O_NONBLOCK)
    fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_NONBLOCK)
    from ztmw.audit_jsonl import JsonLinesAuditSink
    from ztmw.models import AuditEvent
    from ztmw.testing import FakeClock
    event = AuditEvent(decision="allow", reason="allowed", status=200, method="GET", route="/items",
                       client_id="c" * 200)
    received = bytearray()
    done = threading.Event()

    def drain():  # a slow reader: starts late, reads in small steps, until the writer has been quiet a while
        time.sleep(0.3)
        quiet_since = None
        while True:
            try:
                chunk = os.read(r, 4096)
            except BlockingIOError:
                chunk = b""
            if chunk:
                received.extend(chunk)
                quiet_since = None
            elif done.is_set():
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > 0.3:
                    return
            time.sleep(0.001)

    async def main():
        sink = JsonLinesAuditSink("-", buffer_bytes=1 << 30, clock=FakeClock(1.7e9))
        for _ in range(2000):  # about 600 KB buffered (the timer is armed, it has not fired)
            sink.emit(event)
        sink.flush()  # the pipe takes what fits, then EAGAIN: the writer waits for the reader
        sink.emit(replace(event, reason="after_the_outage", security=True))
        await sink.aclose()
        sys.stderr.write(f"dropped={sink.dropped}\\n")

    reader = threading.Thread(target=drain)
    reader.start()
    asyncio.run(main())
    done.set()
    reader.join()
    with open(out_path, "wb") as out:
        out.write(bytes(received))
""")


def test_a_non_blocking_stdout_neither_loses_nor_glues_a_line(tmp_path: Path) -> None:
    """EAGAIN mid-batch: the sink's pipe writer waits for the reader instead of cutting a line."""
    out = tmp_path / "stdout.bin"
    root = str(Path(__file__).resolve().parents[1])  # the checkout, so the child imports this ztmw
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _PARTIAL_WRITE_CHILD, str(out)], check=True, env=env,
                          timeout=120, capture_output=True, text=True)
    assert "dropped=0" in done.stderr
    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b""
    parsed = [json.loads(line) for line in lines[:-1]]  # every line parses
    assert len(parsed) == 2001 and parsed[-1]["reason"] == "after_the_outage"


# -- pinned ---------------------------------------------------------------------------------------------------

async def test_hostile_token_claims_stay_inside_their_json_strings_end_to_end(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, tmp_path: Path
) -> None:
    """client_id, sub (audit subject = plain) and acr come from the token: each stays one JSON string; a jti
    that is not a printable id is logged as a short hash of the token instead."""
    path = tmp_path / "audit.jsonl"
    config = base_config(issuer, audit={"sinks": ["jsonl"], "subject": "plain"},
                         plugins={"jsonl": {"path": str(path), "buffer_bytes": 0}},
                         trust={"acr": {'urn:"x"\n': {"aal": 1}}})
    app = items_app()
    ztmw.setup(app, config, clock=clock)
    client = await aiohttp_client(app)
    hostile = 'x"}\n{"decision":"allow","reason":"allowed","rule_id":"admin"}\r\u2028\u0085\x00é\\'
    token = issuer.mint(hostile, scope="items:read", client_id=hostile, acr='urn:"x"\n',
                        claims={"jti": hostile})
    statuses = []
    for path_ in ("/items", "/items", "/items", "/admin"):
        async with client.get(path_, headers={"Authorization": f"Bearer {token}"}) as response:
            statuses.append(response.status)
    await client.close()
    raw_bytes = path.read_bytes()
    assert raw_bytes.isascii() and raw_bytes.count(b"\n") == len(statuses) == 4
    lines = read_lines(path)
    assert [line["status"] for line in lines] == statuses == [200, 200, 200, 403]
    for line in lines[:3]:
        assert (line["client_id"], line["subject"]) == (hostile, hostile)
        assert line["token_id"] != hostile and line["token_id"].isalnum()  # an unprintable jti: a short hash
        assert line["rule_id"] == "read"
    assert lines[3]["reason"] == "no_rule" and "rule_id" not in lines[3] and "client_id" not in lines[3]
    assert all(part not in raw_bytes.decode() for part in token.split("."))


def test_emit_again_never_renders_another_template_s_fields(tmp_path: Path) -> None:
    """RenderedTemplates is keyed by id(): it holds the template itself, so an id cannot be recycled while it
    is kept, and after the bound is reached it starts afresh. Thousands of short-lived templates each render
    their own fields."""
    sink = JsonLinesAuditSink(tmp_path / "a.jsonl", buffer_bytes=0, clock=FakeClock())
    count = 9000  # more than twice the 4096 templates kept
    for i in range(count):
        sink.emit_again(replace(EVENT, reason=f"r{i}", client_id=f"c{i}", status=0, duration_ms=0.0), 200, 0.5)
    sink.close()
    lines = read_lines(tmp_path / "a.jsonl")
    assert [(line["reason"], line["client_id"]) for line in lines] == [(f"r{i}", f"c{i}") for i in range(count)]


async def test_lines_buffered_for_a_long_flush_interval_are_written_at_app_cleanup(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, tmp_path: Path
) -> None:
    path = tmp_path / "audit.jsonl"
    client, _ = await jsonl_client(aiohttp_client, issuer, clock, path=str(path), flush_interval=60,
                                   buffer_bytes=1 << 24)
    token = issuer.mint(scope="items:read")
    for _ in range(5):
        async with client.get("/items", headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 200
    assert not path.exists() or path.stat().st_size == 0  # still buffered: the 60 s timer has not fired
    await client.close()  # app cleanup
    assert [line["status"] for line in read_lines(path)] == [200] * 5


async def test_flush_interval_is_honoured_without_further_traffic(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, tmp_path: Path
) -> None:
    import asyncio

    path = tmp_path / "audit.jsonl"
    client, _ = await jsonl_client(aiohttp_client, issuer, clock, path=str(path), flush_interval=0.05,
                                   buffer_bytes=1 << 24)
    async with client.get("/items", headers={"Authorization": f"Bearer {issuer.mint(scope='items:read')}"}) as r:
        assert r.status == 200
    for _ in range(1000):  # a bounded wait for the timer; no timing is asserted
        if path.exists() and path.stat().st_size:
            break
        await asyncio.sleep(0.01)
    assert [line["status"] for line in read_lines(path)] == [200]


async def test_an_unwritable_audit_file_never_fails_a_request_and_is_reported(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, pipeline = await jsonl_client(aiohttp_client, issuer, clock, path="/dev/full",  # every write: ENOSPC
                                          buffer_bytes=0)
    token = issuer.mint(scope="items:read")
    with capture_logs() as logs:
        statuses = []
        for headers in ({}, {"Authorization": f"Bearer {token}"}, {"Authorization": f"Bearer {token}"},
                        {"Authorization": "Bearer not.a.token"}):
            async with client.get("/items", headers=headers) as response:
                statuses.append(response.status)
        assert statuses == [401, 200, 200, 401]
        [sink] = [p.instance for p in pipeline.plugins if p.name == "jsonl"]
        await sink.written()  # /dev/full is no regular file: the sink's pipe writer thread meets the ENOSPC
    assert sink.dropped == 4
    failures = [e for e in logs if e["event"] == "ztmw.audit_write_failed"]
    assert len(failures) == 1 and failures[0]["error"] == os.strerror(errno.ENOSPC)


def test_stdout_is_written_and_never_closed(capfd: pytest.CaptureFixture[str]) -> None:
    sink = JsonLinesAuditSink("-", buffer_bytes=0, clock=FakeClock())
    sink.emit(EVENT)
    sink.close()
    sink.close()
    os.fstat(1)  # fd 1 is still open
    sink.emit(EVENT)  # a late event after close still goes to stdout
    sink.close()
    out = capfd.readouterr().out
    assert [json.loads(line)["client_id"] for line in out.splitlines()] == ["demo-client"] * 2


# == 2. the shared cache's `until` ==============================================================================

async def _redis_get(url: str, key: bytes, namespace: str = "ztmw:vt2") -> bytes | None:
    conn = redis.from_url(url)
    try:
        value: bytes | None = await conn.get(f"{namespace}:{key.hex()}")
        return value
    finally:
        await conn.aclose()


async def _redis_set(url: str, key: bytes, value: bytes, namespace: str = "ztmw:vt2") -> None:
    conn = redis.from_url(url)
    try:
        await conn.set(f"{namespace}:{key.hex()}", value, ex=60)
    finally:
        await conn.aclose()


def _mac(key: bytes, payload: bytes, version: bytes = b"ztmw-vt-v2") -> bytes:
    """The MAC a replica with the secret computes (so these entries are as genuine as a replica's)."""
    return hmac.new(CACHE_SECRET.encode(), version + b"\0" + key + payload, hashlib.sha256).digest()


async def _two_replicas(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, redis_url: str,
                        monkeypatch: pytest.MonkeyPatch, **cache: Any) -> tuple[Any, Any]:
    monkeypatch.setenv("ZTMW_CACHE_SECRET", CACHE_SECRET)
    config = base_config(issuer, cache={"backend": redis_url, **cache})
    (first, _), (second, _) = (await protected(aiohttp_client, config, clock),
                               await protected(aiohttp_client, config, clock))
    return first, second


async def _second_replica_cache_result(second: Any, token: str) -> tuple[str | None, list[dict[str, Any]]]:
    with capture_logs() as logs:
        assert (await call(second, token))[0] == 200
    [event] = decisions(logs)
    return event.get("cache"), logs


def _rewrite(raw: bytes, key: bytes, what: str) -> bytes:
    mac, payload = raw[:32], raw[32:]
    head, _, body = payload.partition(b"\n")
    later = repr(float(head) + 86400).encode()
    return {
        "genuine": raw,
        "until moved later, old MAC": mac + later + b"\n" + body,
        "until moved later, MAC of another entry": _mac(key, head + b"\n" + body)[:31] + b"\0" + later + b"\n" + body,
        "signed: until nan": _mac(key, b"nan\n" + body) + b"nan\n" + body,
        "signed: until -inf": _mac(key, b"-inf\n" + body) + b"-inf\n" + body,
        "signed: until in the past": _mac(key, b"1.0\n" + body) + b"1.0\n" + body,
        "signed: until not a number": _mac(key, b"soon\n" + body) + b"soon\n" + body,
        "signed: no newline (v1 layout)": _mac(key, body) + body,
        "signed: empty body": _mac(key, head + b"\n") + head + b"\n",
        "v1 entry (v1 MAC, no until)": _mac(key, body, b"ztmw-vt-v1") + body,
        "truncated": raw[:40],
    }[what]


@pytest.mark.redis
@pytest.mark.parametrize("what, expected", [
    ("genuine", "shared"),
    ("until moved later, old MAC", "miss"),
    ("until moved later, MAC of another entry", "miss"),
    ("signed: until nan", "miss"),
    ("signed: until -inf", "miss"),
    ("signed: until in the past", "miss"),
    ("signed: until not a number", "miss"),
    ("signed: no newline (v1 layout)", "miss"),
    ("signed: empty body", "miss"),
    ("v1 entry (v1 MAC, no until)", "miss"),
    ("truncated", "miss"),
])
async def test_a_shared_entry_counts_only_as_written_by_a_replica(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, redis_url: str, monkeypatch: pytest.MonkeyPatch,
    what: str, expected: str
) -> None:
    """Redis write access cannot extend `until` (it is under the MAC), and no odd `until` a replica could never
    have written (NaN, -inf, past, text, missing) is used: the token is verified anew, never a 500."""
    first, second = await _two_replicas(aiohttp_client, issuer, clock, redis_url, monkeypatch)
    token = issuer.mint(scope="items:read", lifetime=3600)
    key = token_key(token)
    assert (await call(first, token))[0] == 200
    entry = await _redis_get(redis_url, key)
    assert entry is not None and token.encode() not in entry
    await _redis_set(redis_url, key, _rewrite(entry, key, what))
    cache, logs = await _second_replica_cache_result(second, token)
    assert cache == expected
    if what.startswith("until moved later"):
        assert "ztmw.shared_cache_forged_entry" in [e["event"] for e in logs]


@pytest.mark.redis
async def test_entries_of_the_old_namespace_are_never_read(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = await _two_replicas(aiohttp_client, issuer, clock, redis_url, monkeypatch)
    token = issuer.mint(scope="items:read")
    key = token_key(token)
    other = issuer.mint(scope="items:read")
    assert (await call(first, other))[0] == 200
    entry = await _redis_get(redis_url, token_key(other))
    assert entry is not None
    body = entry[32:].partition(b"\n")[2]
    await _redis_set(redis_url, key, _mac(key, body, b"ztmw-vt-v1") + body, namespace="ztmw:vt")  # a v1 replica's
    cache, _ = await _second_replica_cache_result(second, token)
    assert cache == "miss"


@pytest.mark.redis
async def test_a_genuine_entry_written_again_after_its_until_is_not_used(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replaying an old genuine entry into Redis (or Redis keeping it past its TTL) cannot stretch its life."""
    first, second = await _two_replicas(aiohttp_client, issuer, clock, redis_url, monkeypatch, max_ttl=60)
    token = issuer.mint(scope="items:read", lifetime=3600)
    key = token_key(token)
    assert (await call(first, token))[0] == 200
    entry = await _redis_get(redis_url, key)
    assert entry is not None
    clock.advance(61)  # past until (verification + max_ttl); the Redis TTL runs on real time, so it is alive
    await _redis_set(redis_url, key, entry)  # and written again, for good measure
    cache, _ = await _second_replica_cache_result(second, token)
    assert cache == "miss"


# == 3. the cache result on refusals after the token check =====================================================

async def test_a_reused_refusal_instance_carries_each_request_s_own_cache_result(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A binding plugin that raises one module-level exception for every refusal: `cache` is set afresh by the
    authenticator each time, and a refusal that comes before the token check records no cache result."""
    config = base_config(issuer, verifiers={"enabled": ["bearer", "dpop"]})
    client, pipeline = await protected(aiohttp_client, config, clock)
    shared_refusal = InvalidDPoPProof("invalid_dpop_proof")

    async def confirm(*args: Any, **kwargs: Any) -> str:
        raise shared_refusal

    monkeypatch.setattr(pipeline.authenticator._bindings["jkt"], "confirm", confirm)
    token = issuer.mint(scope="items:read", cnf={"jkt": DPoPKey().thumbprint})
    with capture_logs() as logs:
        answers = [await call(client, None, Authorization=f"DPoP {token}", DPoP="x.y.z") for _ in range(3)]
        answers.append(await call(client, None, Authorization="DPoP a b"))  # malformed: before the token check
        answers.append(await call(client, None, Authorization=f"Bearer {token}"))  # downgrade, a hit
    assert [status for status, _ in answers] == [401, 401, 401, 400, 401]
    assert [e.get("cache") for e in decisions(logs)] == ["miss", "hit", "hit", None, "hit"]


async def test_a_negatively_cached_token_records_no_cache_result(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, _ = await protected(aiohttp_client, base_config(issuer), clock)
    forged = issuer.mint(scope="items:read")[:-4] + "AAAA"
    with capture_logs() as logs:
        assert [(await call(client, forged))[0] for _ in range(2)] == [401, 401]
    assert [e.get("cache") for e in decisions(logs)] == [None, None]


async def test_the_stage_middlewares_record_the_cache_result_of_a_refusal_too(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    config = ztmw.load_config(base_config(issuer, verifiers={"enabled": ["bearer", "dpop"]}))
    token = issuer.mint(scope="items:read", cnf={"jkt": DPoPKey().thumbprint})
    trails = []
    for app in (None, staged_app(ztmw.Pipeline(config, clock=clock))):
        if app is None:
            client, _ = await protected(aiohttp_client, base_config(issuer, verifiers={"enabled": ["bearer", "dpop"]}),
                                        clock)
        else:
            client = await aiohttp_client(app)
        with capture_logs() as logs:
            assert [(await call(client, token))[0] for _ in range(2)] == [401, 401]  # a DPoP token as Bearer
        trails.append([(e["reason"], e.get("cache")) for e in decisions(logs)])
    all_in_one, staged = trails
    assert all_in_one == [("dpop_bound_token_as_bearer", "miss"), ("dpop_bound_token_as_bearer", "hit")]
    assert staged == all_in_one


# == 4. the query-token check and reserved rule ids =============================================================

@pytest.mark.parametrize("query", [
    "access_token=x", "access_tok%65n=x", "%61ccess_token=x", "access%5Ftoken=x", "access_token",
    "a=1&access_token=", "ACCESS=1&access_token=x&b=2",
])
async def test_http_06_any_spelling_of_the_access_token_parameter_beside_the_header_is_refused(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, query: str
) -> None:
    client, _ = await protected(aiohttp_client, base_config(issuer), clock)
    token = issuer.mint(scope="items:read")
    for _ in range(2):  # warm: the header alone is remembered
        assert (await call(client, token))[0] == 200
    request = with_query(query, token)
    assert await raw(client, request) == 400


@pytest.mark.parametrize("query", [
    "access_token%00=x", "access_token+=x", "%2Baccess_token=x", "a=1;access_token=x", "x=access_token",
    "access%20token=x",
])
async def test_names_that_only_resemble_access_token_are_not_a_second_transport(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, query: str
) -> None:
    """Neither ztmw nor a handler reading request.query sees an `access_token` parameter in these."""
    seen: list[bool] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append("access_token" in request.query)
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/items", handler)
    client, _ = await protected(aiohttp_client, base_config(issuer), clock, app)
    token = issuer.mint(scope="items:read")
    request = with_query(query, token)
    assert await raw(client, request) == 200
    assert seen == [False]


@pytest.mark.parametrize("rule_id", ["ztmw-metadata", "ztmw-", "ztmw-plugin-metrics-get"])
def test_reserved_rule_ids_are_refused(issuer: DevIssuer, rule_id: str) -> None:
    config = base_config(issuer)
    config["rules"].append({"id": rule_id, "path": "/admin", "methods": ["GET"], "public": True})
    with pytest.raises(ztmw.ConfigurationError, match="reserved"):
        ztmw.load_config(config)
