"""The decision memo's key: a replay answers exactly as the full pipeline would, whatever the bytes.

The key's path is the request target as sent (`request.raw_path`), header names are looked up as istr, and a
replay needs the match info its decision was made on. Most tests are differential: the same bytes go to two
servers protected by the same configuration, one with the decision memo and one without
(`cache.memo_entries = 0`), and the memo server must answer every request exactly as the full pipeline does
(status, principal, rule and match info the handler saw), under aiohttp's C parser and under its pure-Python
parser (AIOHTTP_NO_EXTENSIONS=1) alike.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

import pytest
from aiohttp import web

import ztmw
from ztmw.testing import DevIssuer, FakeClock

from .conftest import echo_app, echo_config, memo_size, protected, raw, raw_get, warm

pytestmark = pytest.mark.usefixtures("decision_path")  # decided without awaiting, and in full


# -- helpers -------------------------------------------------------------------------------------------------

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


# -- every odd request target gets the full pipeline's answer, under both parsers ----------------------------

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
    pytest.param("GET", b"/files/" + b"a" * 8000, None, id="very-long-target"),  # see the memory tests in test_memo.py
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


# -- a replay needs the match info its decision was made on --------------------------------------------------

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
    # a key of the path alone would replay (200, {... "match": {"user": "ANN"}}): another account served
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
