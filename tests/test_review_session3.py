"""Review of commit 73158c6 (the memo's hot path): the key's path is now the request target as sent
(`request.raw_path`), header names are istr, the cache entry is checked with `holds`, and the verifier's
`still_trusted` is resolved once per memo entry.

Most tests here are differential: the same bytes go to two servers protected by the same configuration, one
with the decision memo and one without (`cache.memo_entries = 0`), and the memo server must answer every
request exactly as the full pipeline does (status, principal, rule and match info the handler saw), under
aiohttp's C parser and under its pure-Python parser (AIOHTTP_NO_EXTENSIONS=1) alike. The two problems it found
(older than that commit) are fixed and pinned here: a replay needs the match info its decision was made on,
and a path over 1 KiB is decided in full; the rest pins behaviour the commit got right.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any, Callable

import pytest
from aiohttp import web
from structlog.testing import capture_logs

import ztmw
from ztmw.testing import DevIssuer, FakeClock

from .conftest import base_config
from .test_memo import call, memo_size, protected
from .test_memo_review import active_answer, full_runs, introspecting, raw, raw_get, strings_in, warm

__all__ = ["full_runs"]  # a fixture, imported for the tests below


# -- helpers ---------------------------------------------------------------------------------------------------

@pytest.fixture(params=["c", "python"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test under aiohttp's C request parser and under its pure-Python one (what
    AIOHTTP_NO_EXTENSIONS=1 selects): the server's protocol looks the class up per connection."""
    import aiohttp.http_parser as http_parser
    import aiohttp.web_protocol as web_protocol

    if request.param == "c":
        c_parser = getattr(http_parser, "HttpRequestParserC", None)
        if c_parser is None:
            pytest.skip("aiohttp's C extensions are not available here")
        monkeypatch.setattr(web_protocol, "HttpRequestParser", c_parser)
    else:
        monkeypatch.setattr(web_protocol, "HttpRequestParser", http_parser.HttpRequestParserPy)
    return str(request.param)


def echo_app() -> web.Application:
    """Answers with what the handler was given: principal, rule and match info (what an owner rule reads)."""

    async def echo(request: web.Request) -> web.Response:
        principal, decision = request[ztmw.PRINCIPAL], request[ztmw.DECISION]
        return web.json_response({"sub": principal.subject if principal else None, "rule": decision.rule_id,
                                  "match": dict(request.match_info)})

    app = web.Application()
    for path in ("/items", "/users/{user}/items", "/files/{name:.*}"):
        app.router.add_get(path, echo)
    app.router.add_route("*", "/any", echo)
    return app


def echo_config(issuer: DevIssuer, **sections: Any) -> dict[str, Any]:
    config = base_config(issuer, **sections)
    config["rules"] += [
        {"id": "files", "path": "/files/{name:.*}", "methods": ["GET"], "scopes": ["items:read"]},
        {"id": "any", "path": "/any", "scopes": ["items:read"]},  # every method
    ]
    return config


async def twins(aiohttp_client: Any, config: dict[str, Any], clock: FakeClock,
                app: Callable[[], web.Application] = echo_app) -> tuple[Any, ztmw.Pipeline, Any]:
    """The same app and configuration twice: with the decision memo, and without it (the full pipeline)."""
    memo_client, pipeline = await protected(aiohttp_client, config, clock, app())
    full_config = {**config, "cache": {**config.get("cache", {}), "memo_entries": 0}}
    full_client, full_pipeline = await protected(aiohttp_client, full_config, clock, app())
    assert pipeline.memo is not None and full_pipeline.memo is None
    return memo_client, pipeline, full_client


def request_bytes(method: str, target: bytes, token: str, extra: bytes = b"") -> bytes:
    """Any method and any target bytes (raw_get covers GET with a text target)."""
    return (method.encode() + b" " + target + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token.encode()
            + b"\r\n" + extra + b"Connection: close\r\n\r\n")


async def answer(client: Any, request: bytes) -> tuple[int, Any]:
    """Status and body of the answer to bytes sent as they are (the body parsed when it is JSON)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


# -- pinned: every odd request target gets the full pipeline's answer, under both parsers ----------------------

# (method, target, keyed): whether the memo may remember the target (None: not asserted: parser-dependent or open)
TARGETS = [
    pytest.param("GET", b"/items", True, id="plain"),
    pytest.param("GET", b"//items", True, id="double-slash"),  # another route (none here): aiohttp's 404
    pytest.param("GET", b"/items?", True, id="empty-query"),
    pytest.param("GET", b"/items?#", True, id="empty-query-and-fragment"),
    pytest.param("GET", b"/items#", False, id="empty-fragment"),
    pytest.param("GET", b"/items?a#b", True, id="query-and-fragment"),
    pytest.param("GET", b"/items;x", True, id="semicolon-param"),
    pytest.param("GET", b"/items\\", True, id="backslash"),
    pytest.param("GET", b"/items/", True, id="trailing-slash"),
    pytest.param("GET", b"/users/ann/items?x#y", True, id="owner-query-fragment"),
    pytest.param("GET", b"/users/ann/items?#/../../bob/items", True, id="owner-dot-segments-in-fragment"),
    pytest.param("GET", b"/users/ann/items?/../../bob/items", True, id="owner-dot-segments-in-query"),
    pytest.param("GET", b"/users/bob/items?/../../ann/items", True, id="other-owner-dot-segments-in-query"),
    pytest.param("GET", b"/users/ann#/items", False, id="fragment-inside-path"),
    # the parsers disagree here: C routes "/users/ann/items#x" (404), Python "/users/ann/items" (200)
    pytest.param("GET", b"/users/ann/items#x?y", False, id="fragment-before-query"),
    pytest.param("GET", b"/users/bob/items#?/../../ann/items", False, id="other-owner-fragment-before-query"),
    pytest.param("GET", b"/files/a;b", True, id="param-in-match-info"),
    pytest.param("GET", b"/files/./x", True, id="dot-segment"),
    pytest.param("GET", b"/files/../items", True, id="dot-dot-segment"),
    pytest.param("GET", b"/files/a\\..\\b", True, id="backslash-segments"),
    pytest.param("GET", b"/files/" + b"a" * 8000, None, id="very-long-target"),  # see the memory test below
    pytest.param("GET", "/files/\u00e4".encode(), None, id="non-ascii"),  # Python parser: accepted
    pytest.param("GET", b"/files/\xff", None, id="invalid-utf-8"),
    pytest.param("GET", b"/files/\x00", False, id="nul"),
    pytest.param("GET", b"/files/a\x7fb", False, id="del"),
    pytest.param("GET", b"/files/%61", False, id="percent-encoded"),
    pytest.param("GET", b"http://x/items", False, id="absolute-form"),
    pytest.param("GET", b"http://x//items", False, id="absolute-form-double-slash"),
    pytest.param("GET", b"*", False, id="asterisk-get"),
    pytest.param("OPTIONS", b"*", False, id="asterisk-form"),
    pytest.param("CONNECT", b"127.0.0.1:80", False, id="authority-form"),
    pytest.param("CONNECT", b"/any", False, id="connect-with-a-path"),
    pytest.param("POST", b"/any", True, id="another-method"),
    pytest.param("HEAD", b"/items", True, id="head"),
    pytest.param("GET", b"/items?x#access_token=y", True, id="access-token-only-in-fragment"),
    pytest.param("GET", b"/items?#access_token", True, id="access-token-fragment-after-empty-query"),
    pytest.param("GET", b"/items?x;access_token=1", True, id="semicolon-is-no-separator"),
    pytest.param("GET", b"/items?access_token", False, id="query-token"),
    pytest.param("GET", b"/items?%61ccess_token=1", False, id="percent-encoded-query-token"),
]


@pytest.mark.parametrize(("method", "target", "keyed"), TARGETS)
async def test_odd_request_targets_get_the_full_pipeline_s_answer_cold_and_warm(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, parser: str, full_runs: Any, method: str,
    target: bytes, keyed: bool | None
) -> None:
    if method == "CONNECT" and parser == "python":
        pytest.skip("aiohttp's pure-Python parser answers no CONNECT (it reads on as a tunnel), ztmw or not")
    memo_client, pipeline, full_client = await twins(aiohttp_client, echo_config(issuer), clock)
    token = issuer.mint("ann", scope="items:read")
    request = request_bytes(method, target, token)
    full = await answer(full_client, request)
    assert full[0] != 500
    for path in ("/items", "/users/ann/items", "/files/x"):  # canonical entries beside the odd one
        await warm(memo_client, pipeline, token, path)
    runs = full_runs(pipeline)
    answers, counts = [], []
    for _ in range(3):
        answers.append(await answer(memo_client, request))
        counts.append(len(runs))
    assert answers == [full] * 3
    if keyed is not None and counts[0]:  # the request reached ztmw (a route matched, the parser took it)
        third_in_full = counts[2] > counts[1]
        assert third_in_full == (not keyed or full[0] != 200)  # refusals are never remembered


async def test_a_fragment_before_the_query_is_never_keyed_because_the_parsers_split_it_differently(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, parser: str, full_runs: Any
) -> None:
    """aiohttp's C parser cuts the path at the first "?" (so "#x" stays in it), the Python parser at the first
    "#": the key's "no # before the ?" rule is what keeps the raw target a faithful key under both."""
    client, pipeline = await protected(aiohttp_client, echo_config(issuer), clock, echo_app())
    token = issuer.mint("ann", scope="items:read")
    request = request_bytes("GET", b"/users/ann/items#x?y", token)
    await warm(client, pipeline, token, "/users/ann/items")
    runs = full_runs(pipeline)
    answers = [await answer(client, request) for _ in range(3)]
    assert answers == [answers[0]] * 3 and memo_size(pipeline) == 1
    if parser == "c":  # the path is "/users/ann/items#x": no route, aiohttp's 404 before ztmw
        assert answers[0][0] == 404 and runs == []
    else:  # the path is "/users/ann/items": allowed, and decided in full every time
        assert answers[0][0] == 200 and len(runs) == 3


@pytest.mark.parametrize("name", [b"authorization", b"AUTHORIZATION", b"aUTHORIZATION"])
async def test_the_istr_header_lookup_replays_any_spelling_of_the_field_name(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, parser: str, full_runs: Any, name: bytes
) -> None:
    client, pipeline = await protected(aiohttp_client, echo_config(issuer), clock, echo_app())
    token = issuer.mint("ann", scope="items:read")
    await warm(client, pipeline, token)
    runs = full_runs(pipeline)
    request = raw_get("/items", name + b": Bearer " + token.encode() + b"\r\n")
    assert [await raw(client, request) for _ in range(3)] == [200] * 3
    assert runs == [] and memo_size(pipeline) == 1  # the same key as the canonical field name


@pytest.mark.parametrize("name", [b"dpop", b"DPOP", b"dPoP"])
async def test_the_istr_dpop_lookup_sees_any_spelling_under_both_parsers(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, parser: str, full_runs: Any, name: bytes
) -> None:
    client, pipeline = await protected(aiohttp_client, echo_config(issuer, verifiers={"enabled": ["bearer", "dpop"]}),
                                       clock, echo_app())
    token = issuer.mint("ann", scope="items:read")
    await warm(client, pipeline, token)
    runs = full_runs(pipeline)
    request = raw_get("/items", b"Authorization: Bearer " + token.encode() + b"\r\n" + name + b": x.y.z\r\n")
    assert [await raw(client, request) for _ in range(2)] == [200] * 2
    assert runs == [1, 1] and memo_size(pipeline) == 1  # decided in full each time, never remembered


# -- problem: the key's path is not always the path the match info came from -----------------------------------

def rewriting_app(rewrite: Callable[[web.Request], Any]) -> Callable[[], web.Application]:
    """echo_app with an app middleware before ztmw's (setup appends its own last) that hands the handler the
    request `rewrite` returns."""

    def build() -> web.Application:
        app = echo_app()

        @web.middleware
        async def rewriting(request: web.Request, handler: Any) -> web.StreamResponse:
            return await handler(await rewrite(request))

        app.middlewares.append(rewriting)
        return app

    return build


async def lower_case_clone(request: web.Request) -> web.Request:
    """A case-insensitive URL scheme done as aiohttp allows it: the handler gets a clone with the lower-cased
    path; clone() keeps the match info resolved from the original target."""
    return request.clone(rel_url=request.rel_url.with_path(request.path.lower()))


async def user_from_header(request: web.Request) -> web.Request:
    """An app that lets a header pick the account a path names (match_info is a plain dict)."""
    if "X-Account" in request.headers and "user" in request.match_info:
        request.match_info["user"] = request.headers["X-Account"]
    return request


@pytest.mark.parametrize(("rewrite", "extra"), [
    pytest.param(lower_case_clone, b"", id="clone-without-resolve"),
    pytest.param(user_from_header, b"X-Account: bob\r\n", id="match-info-set-by-a-middleware"),
])
async def test_an_owner_rule_is_not_replayed_for_match_info_other_than_it_was_decided_on(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, rewrite: Any, extra: bytes
) -> None:
    memo_client, pipeline, full_client = await twins(aiohttp_client, echo_config(issuer), clock,
                                                     rewriting_app(rewrite))
    ann = issuer.mint("ann", scope="items:read")
    target = b"/users/ANN/items" if rewrite is lower_case_clone else b"/users/ann/items"
    request = request_bytes("GET", target, ann, extra)
    full = await answer(full_client, request)
    assert full[0] == 403  # ann's token, and the match info says another account ("ANN", or "bob")
    await warm(memo_client, pipeline, ann, "/users/ann/items")
    replayed = await answer(memo_client, request)
    # today: (200, {"sub": "ann", "rule": "own", "match": {"user": "ANN"}}): the handler serves another account
    assert replayed == full


async def test_a_clone_that_is_resolved_again_is_keyed_by_the_path_it_was_resolved_on(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    """What aiohttp's own normalize_path_middleware does with a clone (resolve it, take its match info) keeps
    the key's path and the match info in step: the memo then answers as the full pipeline does."""

    async def lower_and_resolve(request: web.Request) -> web.Request:
        clone = await lower_case_clone(request)
        clone._match_info = await request.app.router.resolve(clone)  # as normalize_path_middleware does
        return clone

    memo_client, pipeline, full_client = await twins(aiohttp_client, echo_config(issuer), clock,
                                                     rewriting_app(lower_and_resolve))
    ann = issuer.mint("ann", scope="items:read")
    await warm(memo_client, pipeline, ann, "/users/ann/items")
    for target in (b"/users/ANN/items", b"/users/Ann/items", b"/USERS/ANN/ITEMS", b"/users/bob/items"):
        request = request_bytes("GET", target, ann)
        full = await answer(full_client, request)
        assert [await answer(memo_client, request) for _ in range(2)] == [full] * 2
    assert full[0] == 403


# -- problem: the memo's bound counts entries, not bytes ------------------------------------------------------

def held_chars_per_entry(pipeline: ztmw.Pipeline) -> float:
    """Characters of text the memo holds per entry (keys, views, match info, claims), each string once."""
    entries = pipeline.memo._entries  # type: ignore[union-attr]
    held = {id(s): s for s in strings_in(list(entries.items())) if isinstance(s, str)}
    return sum(len(s) for s in held.values()) / len(entries)


async def test_short_targets_cost_about_what_the_config_documents(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, pipeline = await protected(aiohttp_client, echo_config(issuer), clock, echo_app())
    token = issuer.mint("ann", scope="items:read")
    for index in range(20):
        assert (await call(client, token, f"/files/{index}"))[0] == 200
    assert memo_size(pipeline) == 19  # the first sighting is not remembered
    assert held_chars_per_entry(pipeline) < 1000


async def test_a_long_target_does_not_make_a_memo_entry_many_times_its_documented_size(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, pipeline = await protected(aiohttp_client, echo_config(issuer), clock, echo_app())
    token = issuer.mint("ann", scope="items:read")
    assert (await call(client, token, "/files/warm"))[0] == 200
    for index in range(20):
        assert (await call(client, token, f"/files/{index:04d}" + "a" * 8000))[0] == 200
    assert memo_size(pipeline) == 0 or held_chars_per_entry(pipeline) < 2000


async def test_the_memo_never_holds_more_than_memo_entries_whatever_the_targets(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, pipeline = await protected(aiohttp_client, echo_config(issuer, cache={"memo_entries": 8}), clock,
                                       echo_app())
    tokens = [issuer.mint(f"user-{n}", scope="items:read") for n in range(3)]
    for index in range(40):
        token = tokens[index % 3]
        assert (await call(client, token, f"/files/{index}" + "b" * 500))[0] == 200
        assert (await call(client, token, f"/files/{index}?page={index}"))[0] == 200
        assert memo_size(pipeline) <= 8
    assert memo_size(pipeline) == 8
    # first in, first out: the newest entries are the ones kept, and they still replay
    assert (await call(client, tokens[39 % 3], "/files/39?other"))[1]["sub"] == "user-0"


# -- pinned: holds() and the verifier's still_trusted, resolved once per entry ---------------------------------

async def test_the_verifier_is_asked_on_every_replay_not_only_when_the_entry_is_made(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, full_runs: Any
) -> None:
    """trust_check resolves which function to ask once; the question itself is asked on every replay."""
    from ztmw_plugins.jwks import KeySet

    client, pipeline = await protected(aiohttp_client, echo_config(issuer), clock, echo_app())
    token = issuer.mint("ann", scope="items:read")
    await warm(client, pipeline, token)
    (entry,) = pipeline.memo._entries.values()  # type: ignore[union-attr]
    bearer = next(p.instance for p in pipeline.plugins if p.name == "bearer")
    assert entry.still_trusted == bearer.still_trusted
    asked: list[bool] = []
    publishes = KeySet.publishes

    def counted(self: Any, thumbprint: str) -> bool:
        asked.append(True)
        return publishes(self, thumbprint)

    monkeypatch.setattr(KeySet, "publishes", counted)
    runs = full_runs(pipeline)
    assert [(await call(client, token))[0] for _ in range(3)] == [200] * 3
    assert len(asked) == 3 and runs == []
    monkeypatch.setattr(KeySet, "publishes", lambda self, thumbprint: False)  # "no longer trusted"
    with capture_logs() as logs:
        assert (await call(client, token))[0] == 200  # the key still verifies it: verified again, in full
    assert runs == [1] and memo_size(pipeline) == 0
    assert [e["cache"] for e in logs if e["event"] == "ztmw.decision"] == ["miss"]


async def test_a_verifier_without_still_trusted_is_replayed_until_its_cache_entry_ends(
    aiohttp_client: Any, aiohttp_server: Any, issuer: DevIssuer, clock: FakeClock, monkeypatch: pytest.MonkeyPatch,
    full_runs: Any
) -> None:
    """The introspection verifier cannot tell whether its result still stands: the entry then carries no
    check (None), and lives exactly as long as the verification-cache entry, as the full pipeline's hit does."""
    answers, config = await introspecting(aiohttp_server, monkeypatch, clock, issuer, max_ttl=20)
    client, pipeline = await protected(aiohttp_client, config, clock)
    answers["opaque-2"] = active_answer(clock)
    await warm(client, pipeline, "opaque-2")
    (entry,) = pipeline.memo._entries.values()  # type: ignore[union-attr]
    assert entry.still_trusted is None and pipeline.authenticator.trust_check(entry.token) is None
    runs = full_runs(pipeline)
    clock.advance(19)
    assert (await call(client, "opaque-2"))[0] == 200 and runs == []
    answers["opaque-2"] = {"active": False}
    clock.advance(1.5)
    assert (await call(client, "opaque-2"))[0] == 401 and runs == [1] and memo_size(pipeline) == 0


async def test_a_cache_entry_replaced_by_an_equal_result_ends_the_entry_and_the_next_hit_remembers_anew(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, full_runs: Any
) -> None:
    client, pipeline = await protected(aiohttp_client, echo_config(issuer), clock, echo_app())
    token = issuer.mint("ann", scope="items:read")
    await warm(client, pipeline, token, "/users/ann/items")
    (entry,) = pipeline.memo._entries.values()  # type: ignore[union-attr]
    equal = dataclasses.replace(entry.token)
    assert equal == entry.token and equal is not entry.token
    pipeline.cache.set(entry.cache_key, equal)  # e.g. verified again after a discard, or learnt from a replica
    runs = full_runs(pipeline)
    answers = [await call(client, token, "/users/ann/items") for _ in range(3)]
    assert answers == [(200, {"sub": "ann", "rule": "own", "match": {"user": "ann"}})] * 3
    assert runs == [1]  # the old entry is dropped, the hit on the new result is decided in full and remembered
    (renewed,) = pipeline.memo._entries.values()  # type: ignore[union-attr]
    assert renewed.token is equal and memo_size(pipeline) == 1


async def test_a_replay_counts_no_verification_cache_hit_but_keeps_the_entry_recent(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, full_runs: Any
) -> None:
    """holds() is not a lookup (no hit counted), yet it refreshes recency as get() did: a replayed token is not
    the least recently used entry of a full verification cache."""
    client, pipeline = await protected(aiohttp_client, echo_config(issuer, cache={"max_entries": 2}), clock,
                                       echo_app())
    first, second, third = (issuer.mint(name, scope="items:read") for name in ("ann", "bob", "cid"))
    await warm(client, pipeline, first)
    assert (await call(client, second))[0] == 200  # the cache: first, second
    hits = pipeline.cache.hits
    assert (await call(client, first))[0] == 200  # replayed: first is the most recent again
    assert pipeline.cache.hits == hits
    assert (await call(client, third))[0] == 200  # evicts second, not first
    runs = full_runs(pipeline)
    assert (await call(client, first))[0] == 200 and runs == []
