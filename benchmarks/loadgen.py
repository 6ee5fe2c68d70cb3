"""The bundled load generator: for TLS with client certificates (wrk has no client-certificate option) and for
machines without wrk.

HTTP/1.1 keep-alive over asyncio streams (plain or TLS, optionally presenting a client certificate), C
connections each sending its next request as soon as the previous response is read (closed loop, like wrk).
The client side is hand-rolled on asyncio rather than aiohttp's ClientSession, because a generator that is
slower than the server measures itself: on one core this one reaches ~2x the rate aiohttp's client does.
It reads the same request-lines files as rotate.lua and prints the same `WRKJSON {...}` summary line.

    python loadgen.py http://127.0.0.1:8081 --path /hello/ann --duration 5 --connections 50 \
        [--lines FILE --mode once|cycle] [--limit N] [--cafile CA --cert C --key K]

Bounded: stops at --duration seconds or --limit responses, whichever comes first; loopback hosts only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from urllib.parse import urlsplit

LOOPBACK = ("127.0.0.1", "::1", "localhost")


class Plan:
    def __init__(self, requests: list[bytes], mode: str, limit: int, offset: int = 0) -> None:
        self.requests = requests
        self.mode = mode
        self.limit = limit
        self.offset = offset % len(requests)
        self.sent = 0
        self.stop = False

    def next(self) -> bytes | None:
        if self.stop:
            return None
        if self.limit and self.sent >= self.limit:
            return None
        if self.mode == "once" and self.sent >= len(self.requests):
            return None
        request = self.requests[(self.offset + self.sent) % len(self.requests)]
        self.sent += 1
        return request


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.status_errors = 0
        self.read_errors = 0
        self.connect_errors = 0
        self.bytes = 0
        self.statuses: dict[int, int] = {}


async def _connection(host: str, port: int, ctx: ssl.SSLContext | None, plan: Plan, stats: Stats) -> None:
    perf = time.perf_counter
    reader = writer = None
    try:
        while not plan.stop:
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, limit=1 << 20)
                except (OSError, ssl.SSLError):
                    stats.connect_errors += 1
                    await asyncio.sleep(0.05)
                    continue
            request = plan.next()
            if request is None:
                return
            started = perf()
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                lower = head.lower()
                at = lower.find(b"\r\ncontent-length:")
                length = int(lower[at + 17:lower.index(b"\r\n", at + 2)]) if at >= 0 else 0
                if length:
                    await reader.readexactly(length)
                closing = b"\r\nconnection: close" in lower
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, ssl.SSLError):
                stats.read_errors += 1
                writer.close()
                reader = writer = None
                continue
            stats.latencies.append(perf() - started)
            stats.bytes += len(head) + length
            stats.statuses[status] = stats.statuses.get(status, 0) + 1
            if status > 399:
                stats.status_errors += 1
            if closing:
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()


def _percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, int(round(p / 100 * len(sorted_values))) - 1))
    return sorted_values[index]


async def run(url: str, path: str, requests_lines: list[str] | None, *, mode: str = "cycle", limit: int = 0,
              offset: int = 0,
              duration: float = 5.0, connections: int = 50, ssl_context: ssl.SSLContext | None = None
              ) -> dict[str, float | int]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)
    if host not in LOOPBACK:
        raise SystemExit("loadgen drives loopback servers only")
    head = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    if requests_lines:
        requests = [(head + line.replace("\t", "\r\n") + "\r\n\r\n").encode("latin-1") for line in requests_lines]
    else:
        requests = [(head + "\r\n").encode("latin-1")]
    plan, stats = Plan(requests, mode if requests_lines else "cycle", limit, offset), Stats()
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    timer = loop.call_later(duration, lambda: setattr(plan, "stop", True))
    tasks = [asyncio.create_task(_connection(host, port, ssl_context, plan, stats)) for _ in range(connections)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=duration + 30)
    finally:
        timer.cancel()
        plan.stop = True
        for task in tasks:
            task.cancel()
    elapsed = time.perf_counter() - started
    lat = sorted(stats.latencies)
    us = 1e6
    return {
        "requests": len(lat), "duration_us": int(elapsed * us), "bytes": stats.bytes,
        "p50_us": int(_percentile(lat, 50) * us), "p90_us": int(_percentile(lat, 90) * us),
        "p99_us": int(_percentile(lat, 99) * us), "mean_us": round(sum(lat) / len(lat) * us, 1) if lat else 0.0,
        "max_us": int(lat[-1] * us) if lat else 0, "err_connect": stats.connect_errors,
        "err_read": stats.read_errors, "err_write": 0, "err_status": stats.status_errors, "err_timeout": 0,
    }


def client_ssl_context(cafile: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    if cert:
        context.load_cert_chain(cert, key)
    return context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--path", default="/")
    parser.add_argument("--lines", help="request-lines file (headers separated by TAB)")
    parser.add_argument("--mode", choices=["once", "cycle"], default="cycle")
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--offset", type=int, default=0, help="start after this many lines (cycle mode)")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--cafile")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args()
    if args.duration <= 0 or args.duration > 3600:
        raise SystemExit("--duration must be in (0, 3600]")
    lines = None
    if args.lines:
        with open(args.lines, encoding="latin-1") as fh:
            lines = [line.rstrip("\n") for line in fh if line.strip()]
    ctx = client_ssl_context(args.cafile, args.cert, args.key) if args.url.startswith("https") else None
    result = asyncio.run(run(args.url, args.path, lines, mode=args.mode, limit=args.limit, offset=args.offset,
                             duration=args.duration, connections=args.connections, ssl_context=ctx))
    sys.stdout.write(f"{result['requests'] / (result['duration_us'] / 1e6):.0f} req/s\n")
    sys.stdout.write("WRKJSON " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
