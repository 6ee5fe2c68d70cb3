"""Micro-benchmarks of the pipeline stages, in ns/op, in one process on a loop driven by hand.

pytest-benchmark cannot await, so every stage runs in a plain `for` loop (awaited ones inside one coroutine on
one event loop), timed with thread_time_ns (CPU time, so other processes on a busy machine do not inflate it), repeated; the median of the repeats is reported with the best.
Inputs that must not repeat (unique tokens for the ES256 miss, fresh proofs for DPoP) are made beforehand
and are not timed. The audit stage uses the structlog setup of `ztmw serve` (JSON lines) writing to
/dev/null, so it measures ztmw plus rendering, not the disk.

    python micro.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import structlog
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from fixtures import HTU, PATH, ProofMaker, make_material

from ztmw.audit_jsonl import JsonLinesAuditSink
from ztmw.cache import token_key
from ztmw.config import load_config
from ztmw.errors import InvalidToken
from ztmw.extract import extract_credential
from ztmw.jws import import_public_jwk, parse_compact
from ztmw.models import Credential, RequestView, RouteRef
from ztmw.pipeline import Outcome, Pipeline

ROUTE = RouteRef("GET", "/hello/{name}")


def _configure_audit_to_devnull() -> None:
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(open(os.devnull, "w")),  # noqa: SIM115 - lives for the run
        cache_logger_on_first_use=True,
    )


def _time_sync(fn: Callable[[], Any], n: int) -> float:
    perf = time.thread_time_ns  # CPU time of this thread: steady when other processes compete
    started = perf()
    for _ in range(n):
        fn()
    return (perf() - started) / n


async def _time_async(fn: Callable[[], Awaitable[Any]], n: int) -> float:
    perf = time.thread_time_ns  # CPU time of this thread: steady when other processes compete
    started = perf()
    for _ in range(n):
        await fn()
    return (perf() - started) / n


def _time_each(fn: Callable[[Any], Any], inputs: list[Any]) -> float:
    perf = time.thread_time_ns  # CPU time of this thread: steady when other processes compete
    started = perf()
    for item in inputs:
        fn(item)
    return (perf() - started) / len(inputs)


async def _time_async_each(fn: Callable[[Any], Awaitable[Any]], inputs: list[Any]) -> float:
    perf = time.thread_time_ns  # CPU time of this thread: steady when other processes compete
    started = perf()
    for item in inputs:
        await fn(item)
    return (perf() - started) / len(inputs)


def _row(stage: str, samples: list[float], n: int, note: str = "") -> dict[str, Any]:
    return {"stage": stage, "ns_per_op": round(statistics.median(samples)), "best_ns": round(min(samples)),
            "ops": n, "repeats": len(samples), "note": note}


async def run_micro(quick: bool = False, progress: Callable[[str], None] = lambda _: None) -> list[dict[str, Any]]:
    _configure_audit_to_devnull()
    repeats = 3 if quick else 5
    fast = 10_000 if quick else 50_000
    slow = 300 if quick else 1_500
    root = Path(tempfile.mkdtemp(prefix="ztmw-micro-"))
    material = make_material(root)
    base = {
        "resource": {"identifier": "https://api.example.com", "public_origin": "https://api.example.com"},
        "issuers": [{"issuer": "https://issuer.test", "jwks_file": str(material.jwks), "algorithms": ["ES256"]}],
        "verifiers": {"enabled": ["bearer", "dpop"]},
        "cache": {"max_entries": 100_000},
        "rules": [{"id": "hello", "path": "/hello/{name}", "methods": ["GET"], "scopes": ["hello:read"]}],
    }
    pipeline = Pipeline(load_config(base))
    await pipeline.start()
    rows: list[dict[str, Any]] = []
    try:
        token = material.token
        view = RequestView("GET", PATH, ROUTE, {"name": "ann"}, authorization=(f"Bearer {token}",))
        schemes = pipeline.authenticator.schemes
        bearer = next(p.instance for p in pipeline.plugins if p.name == "bearer")
        dpop = next(p.instance for p in pipeline.plugins if p.name == "dpop")
        await pipeline.authenticate(view)  # fill the cache

        def add(stage: str, samples: list[float], n: int, note: str = "") -> None:
            rows.append(_row(stage, samples, n, note))
            progress(f"  micro {stage:<34} {rows[-1]['ns_per_op']:>10,} ns/op")

        add("extract", [_time_sync(lambda: extract_credential(view, schemes=schemes), fast)
                        for _ in range(repeats)], fast, "Authorization header -> Credential")
        add("cache key (sha256)", [_time_sync(lambda: token_key(token), fast) for _ in range(repeats)], fast)
        add("cache hit (key + get)", [_time_sync(lambda: pipeline.cache.get(token_key(token)), fast)
                                      for _ in range(repeats)], fast, "token_key + LRU get")
        add("authenticate (cache hit)", [await _time_async(lambda: pipeline.authenticate(view), fast)
                                         for _ in range(repeats)], fast, "extract + hit + expiry + Principal")
        samples = []
        for _ in range(repeats):
            tokens = material.unique_tokens(slow)
            samples.append(await _time_async_each(bearer.verify_token, tokens))
        add("verify_token miss ES256", samples, slow, "bearer plugin, distinct tokens")
        # what the miss costs beyond the signature: the raw ES256 check on the same kind of tokens, and the
        # JOSE parse alone
        public = import_public_jwk(material.es256.jwks()["keys"][0]).get_op_key("verify")
        es256 = ec.ECDSA(hashes.SHA256())
        parsed = [parse_compact(t) for t in tokens]
        signed = [(p.signing_input, encode_dss_signature(int.from_bytes(p.signature[:32], "big"),
                                                         int.from_bytes(p.signature[32:], "big"))) for p in parsed]
        add("ES256 verify (raw cryptography)",
            [_time_each(lambda item: public.verify(item[1], item[0], es256), signed) for _ in range(repeats)],
            slow, "the floor of any ES256 miss")
        add("parse_compact", [_time_each(parse_compact, tokens) for _ in range(repeats)], slow,
            "split, base64url, strict JSON, header checks")

        maker: ProofMaker = material.dpop
        dpop_token = material.dpop_token
        verified = await bearer.verify_token(dpop_token)
        credential = Credential("dpop", dpop_token)
        samples = []
        for _ in range(repeats):
            views = [RequestView("GET", PATH, ROUTE, {"name": "ann"}, authorization=(f"DPoP {dpop_token}",),
                                 dpop=(proof,)) for proof in maker.proofs(slow, htu=HTU)]
            samples.append(await _time_async_each(lambda v: dpop.confirm(verified, credential, v), views))
        add("DPoP confirm (memory store)", samples, slow, "proof parse + ES256 verify + replay insert")

        authentication = await pipeline.authenticate(view)
        assert authentication is not None
        principal = authentication.principal
        add("trust evaluate", [_time_sync(lambda: pipeline.trust.evaluate(principal, view), fast)
                               for _ in range(repeats)], fast)
        trust = pipeline.trust.evaluate(principal, view)
        rule = pipeline.rule_for(view)
        add("rule lookup", [_time_sync(lambda: pipeline.rule_for(view), fast) for _ in range(repeats)], fast)
        add("policy decide", [_time_sync(lambda: pipeline.policy.decide(rule, principal, trust, view), fast)
                              for _ in range(repeats)], fast)
        error = InvalidToken("token_expired", scheme="bearer")
        add("challenge render", [_time_sync(lambda: pipeline.render(error), fast) for _ in range(repeats)], fast,
            "401 invalid_token, Bearer + resource_metadata")
        outcome = await pipeline.evaluate(view)
        started = time.perf_counter()
        add("audit via an app's structlog", [_time_sync(lambda: pipeline.audit(view, outcome, 200, started), fast)
                                             for _ in range(repeats)], fast,
            "AuditEvent + structlog's JSON renderer (an app that configures structlog itself)")
        # the default under `ztmw serve` is this writer on stdout; a file here, so its batches are written
        lines = JsonLinesAuditSink(root / "audit.jsonl")
        lines.open()
        written = Pipeline(load_config(base), audit_sink=lines)
        await written.start()
        try:
            add("audit, a new decision", [_time_sync(lambda: written.audit(view, outcome, 200, started), fast)
                                          for _ in range(repeats)], fast,
                "the default sink: AuditEvent, then its line rendered and written with its batch")
            record = written.audit_sink.recorder(written.audit_event(view, outcome, 0, 0.0))  # type: ignore[union-attr]
            add("audit, a replayed decision", [_time_sync(lambda: record(200, started), fast)
                                               for _ in range(repeats)], fast,
                "the default sink's prepared recorder, its line rendered and written with its batch")
        finally:
            await written.close()
            lines.close()
        add("evaluate (all stages, cache hit)", [await _time_async(lambda: pipeline.evaluate(view), fast)
                                                 for _ in range(repeats)], fast, "no aiohttp, no audit")
        assert isinstance(outcome, Outcome) and outcome.decision.allowed, outcome
    finally:
        await pipeline.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    rows = asyncio.run(run_micro(args.quick, progress=lambda line: print(line, file=sys.stderr, flush=True)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    else:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
