"""The whole middleware chain in process: ztmw against the hand-written peers, request after request.

`micro.py` times the pipeline's stages alone; this times what a server runs per request (the middleware and
the handler), without the network, so differences of a tenth of a microsecond show. Each request is made once
with aiohttp's `make_mocked_request`, matched by the app's real router, and answered `peername` by a stand-in
transport (the one thing a mocked request lacks that ztmw reads); the middleware is then awaited in a plain
loop, timed with `thread_time_ns` (CPU time of this thread), best and median of 7 loops, with the set-up frozen
out of the garbage collector (`gc.freeze`). ztmw runs with the benchmark's configuration and `ztmw serve`'s
structlog setup, so its audit lines go to stdout: send stdout to a file, as `ztmw serve` under the benchmark
does (a pipe adds a writer thread).

    python middleware_loop.py cached > /tmp/audit.jsonl   # one token: hash-cache, ztmw audit off, ztmw
    python middleware_loop.py unique > /tmp/audit.jsonl   # 3000 tokens, cache of 1000: es256-only, PyJWT, ztmw
    python middleware_loop.py unique --no-signature > /tmp/audit.jsonl  # ztmw without its ES256 check

Results go to stderr in ns a request. A live server multiplies each µs by about 3.5 on a hit (the busy-2us
calibration of `run.py`) and about 1.4 on a miss.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import apps
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from fixtures import Material, make_material, ztmw_config
from multidict import CIMultiDict

import ztmw
from ztmw import serve_logging

LOOPS = 7


class _Transport:
    """What a mocked request lacks: a transport that knows the peer address."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False


def _server(kind: str, material: Material, cache_entries: int | None) -> tuple[web.Application, Any]:
    app = apps.create_app()
    pem = material.es256_pem.read_bytes()
    if kind == "hash-cache":
        return app, apps.hash_cache_middleware(pem)
    if kind == "es256-only":
        return app, apps.es256_only_middleware(pem)
    if kind == "pyjwt-es256":
        return app, apps.pyjwt_middleware(pem, "ES256")
    config = ztmw_config(material, verifiers=["bearer"], audit=kind == "ztmw", cache_entries=cache_entries)
    ztmw.setup(app, tomllib.loads(config))
    return app, app.middlewares[-1]


async def _time(kind: str, material: Material, tokens: list[str], per_loop: int,
                cache_entries: int | None) -> tuple[float, float]:
    app, middleware = _server(kind, material, cache_entries)
    runner = web.AppRunner(app)
    await runner.setup()
    transport = _Transport()
    requests = []
    for token in tokens:
        request = make_mocked_request("GET", "/hello/world", app=app, transport=transport,
                                      headers=CIMultiDict({"Authorization": f"Bearer {token}", "Host": "bench"}))
        match_info = await app.router.resolve(request)
        match_info.add_app(app)
        match_info.freeze()
        request._match_info = match_info  # what aiohttp's own request handling sets
        requests.append(request)
    for request in requests[:50]:
        response = await middleware(request, apps.hello)
        if response.status != 200:
            raise RuntimeError(f"{kind}: {response.status} for a valid token")
    # the set-up (keys, tokens, thousands of mocked requests) out of the collector's way: a full collection
    # over it would land in some loops and not others (a server has no such heap of its own to walk)
    gc.collect()
    gc.freeze()
    samples = []
    for _ in range(LOOPS):
        started = time.thread_time_ns()
        for i in range(per_loop):
            await middleware(requests[i % len(requests)], apps.hello)
        samples.append((time.thread_time_ns() - started) / per_loop)
    gc.unfreeze()
    await runner.cleanup()
    return min(samples), statistics.median(samples)


def _skip_signatures() -> None:
    """Every JWS signature taken as valid, in this process only: what ztmw spends on a new token besides its
    signature check, without the check's 60 µs and their noise (a measurement, never a configuration)."""
    import ztmw_plugins.bearer

    from ztmw import jws

    def unchecked(jws: Any, key: Any, alg: str) -> bool:  # verify_signature's parameters
        return True

    jws.verify_signature = ztmw_plugins.bearer.verify_signature = unchecked


async def main(mode: str, no_signature: bool) -> None:
    serve_logging.configure()
    material = make_material(Path(tempfile.mkdtemp(prefix="ztmw-loop-")))
    kinds: tuple[str, ...]
    if mode == "cached":
        kinds, tokens, per_loop, cache_entries = ("hash-cache", "ztmw-noaudit", "ztmw"), [material.token], 20000, None
    else:
        kinds, per_loop, cache_entries = ("es256-only", "pyjwt-es256", "ztmw-noaudit", "ztmw"), 3000, 1000
        tokens = material.unique_tokens(3000)
    if no_signature:
        _skip_signatures()
        kinds = tuple(kind for kind in kinds if kind.startswith("ztmw"))
    for kind in kinds:
        best, median = await _time(kind, material, tokens, per_loop, cache_entries)
        print(f"{kind:14} best {best:9.0f} ns  median {median:9.0f} ns", file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("cached", "unique"))
    parser.add_argument("--no-signature", action="store_true",
                        help="ztmw only, every signature taken as valid: what it spends besides the check")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.mode, arguments.no_signature))
