"""Proxy mode: an identity-aware reverse proxy. An adapter module (aiohttp server and client API).

An allowed request goes to the upstream with method, path and query exactly as sent (the gateway decided on
that very target), its body streamed as it arrives, and the response streamed back: nothing is ever buffered
whole, whatever its size. On the way, the gateway drops hop-by-hop headers, every `X-Ztmw-*` header a client
sent, the credentials (unless `forward_credentials`) and forwarding headers it cannot vouch for, and adds the
identity headers and `X-Forwarded-For/-Proto/-Host`. A refused request never reaches the upstream.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlsplit

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict
from yarl import URL

from ..config import GatewayConfig
from ..netaddr import peer_in
from .app import add_allowed_headers, peer_of, record, refusal, tls_der_of
from .decision import IDENTITY_PREFIX, Decider, Question

UPSTREAM: web.AppKey[aiohttp.ClientSession] = web.AppKey("ztmw.gateway.upstream", aiohttp.ClientSession)
_CHUNK = 64 * 1024
# RFC 9110 §7.6.1 connection-specific fields, plus those a proxy must not pass on (RFC 9112 §9.6, §7)
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                         "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "expect"})
_FORWARDING = frozenset({"forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                         "x-forwarded-port", "x-real-ip"})


def upstream_session(settings: GatewayConfig) -> Callable[[web.Application], AsyncIterator[None]]:
    """One connection pool to the upstream for the gateway's lifetime; no cookies, no decompression (the body
    passes through as the upstream encoded it), no redirects followed."""

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        session = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.upstream_timeout),
            connector=aiohttp.TCPConnector(limit=0),
        )
        app[UPSTREAM] = session
        try:
            yield
        finally:
            await session.close()

    return lifetime


def proxy_handler(decider: Decider, settings: GatewayConfig) -> Callable[[web.Request], Any]:
    pipeline = decider.pipeline
    config = pipeline.config
    trusted = [ipaddress.ip_network(cidr, strict=False) for cidr in settings.trusted_proxies]
    assert settings.upstream is not None  # config guarantees it in proxy mode
    upstream = settings.upstream
    origin = urlsplit(config.resource.public_origin)
    cert_header = config.mtls.header.lower()
    credentials = {"authorization", "dpop", cert_header}

    async def proxy(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        peer = peer_of(request)
        headers = request.headers
        verdict = await decider.decide(Question(
            method=request.method,
            target=request.raw_path,
            authorization=tuple(headers.getall("Authorization", ())),
            dpop=tuple(headers.getall("DPoP", ())),
            peer=peer,
            certificate_headers=tuple(headers.getall(config.mtls.header, ())) if pipeline.mtls_enabled else (),
            tls_der=tls_der_of(request),
        ))
        if verdict.untrusted_certificate_header:
            pipeline.log.warning("ztmw.security", reason="untrusted_client_cert_header", peer=peer)
        if not verdict.allowed or verdict.target is None:
            response = refusal(decider, verdict)
            record(decider, verdict.view, verdict.outcome, response.status, started)
            return response
        status = 502
        try:
            outgoing = _upstream_headers(request, verdict.identity, peer, peer_in(peer, trusted))
            if outgoing is None:  # a Connection header naming a field we must keep: refuse rather than guess
                status = 400
                return web.json_response({"error": "invalid_request"}, status=400)
            response_or_error = await _forward(request, upstream + request.raw_path, outgoing, settings)
            if isinstance(response_or_error, int):
                status = response_or_error
                return web.json_response({"error": "bad_gateway" if status == 502 else "gateway_timeout"},
                                         status=status)
            status, relayed = await _relay(request, response_or_error,
                                           lambda response: add_allowed_headers(decider, verdict, response))
            return relayed
        finally:
            record(decider, verdict.view, verdict.outcome, status, started)

    def _upstream_headers(request: web.Request, identity: tuple[tuple[str, str], ...], peer: str | None,
                          from_proxy: bool) -> CIMultiDict[str] | None:
        incoming = request.headers
        named = {t.strip().lower() for v in incoming.getall(hdrs.CONNECTION, ()) for t in v.split(",") if t.strip()}
        if named & (credentials | {"host", "content-length", "content-type"}):
            return None
        dropped = _HOP_BY_HOP | named | {"host"}
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in incoming.items():
            lower = name.lower()
            if lower in dropped or lower.startswith(IDENTITY_PREFIX):
                continue
            if lower in credentials and not settings.forward_credentials:
                continue
            if lower in _FORWARDING and not from_proxy:
                continue
            if lower in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"):
                continue  # rewritten below
            out.add(name, value)
        previous = ", ".join(incoming.getall("X-Forwarded-For", ())) if from_proxy else ""
        out["X-Forwarded-For"] = f"{previous}, {peer}" if previous else (peer or "unknown")
        out["X-Forwarded-Proto"] = origin.scheme
        out["X-Forwarded-Host"] = origin.netloc
        for name, value in identity:
            out.add(name, value)
        if settings.assertion_in_authorization:
            assertion = next((v for n, v in identity if n == "X-Ztmw-Identity"), None)
            if assertion is not None:
                out["Authorization"] = f"Bearer {assertion}"
        return out

    return proxy


async def _forward(request: web.Request, url: str, headers: CIMultiDict[str],
                   settings: GatewayConfig) -> aiohttp.ClientResponse | int:
    """Send the request on, streaming its body; the upstream's response once its headers arrived, or 502/504."""
    session = request.app[UPSTREAM]
    body = _stream(request) if request.body_exists else None
    try:
        async with asyncio.timeout(settings.upstream_timeout):  # no response headers in time: 504
            return await session.request(request.method, URL(url, encoded=True), headers=headers,
                                         data=body, allow_redirects=False, compress=None, skip_auto_headers=(
                                             "User-Agent", "Accept", "Accept-Encoding", "Content-Type"))
    except TimeoutError:
        return 504
    except (aiohttp.ClientError, OSError):
        return 502


async def _stream(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(_CHUNK):
        yield chunk


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse,
                 decorate: Callable[[web.StreamResponse], None]) -> tuple[int, web.StreamResponse]:
    """Stream the upstream's response back, hop-by-hop headers dropped. A small body of known length goes out
    with its headers in one write; any other is streamed in chunks. An upstream that breaks off mid-body
    breaks the client's response off too (the status is already sent); a client that went away ends it."""
    async with upstream:
        named = {t.strip().lower() for v in upstream.headers.getall(hdrs.CONNECTION, ()) for t in v.split(",")}
        length = upstream.content_length
        small = length is not None and length <= _CHUNK and request.method != "HEAD"
        response = web.Response(status=upstream.status, reason=upstream.reason) if small else \
            web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in upstream.headers.items():
            if name.lower() not in _HOP_BY_HOP and name.lower() not in named:
                response.headers.add(name, value)
        decorate(response)
        try:
            if small:
                assert isinstance(response, web.Response)
                response.body = await upstream.content.readexactly(length or 0)
                return upstream.status, response
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(_CHUNK):
                await response.write(chunk)
            await response.write_eof()
        except (aiohttp.ClientError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            if request.transport is not None:
                request.transport.close()  # a truncated body must not look complete to the client
        except ConnectionResetError:  # the client went away: nothing left to answer
            pass
        return upstream.status, response
