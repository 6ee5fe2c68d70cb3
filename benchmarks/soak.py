"""Soak test: many concurrent keep-alive connections of mixed traffic against one `ztmw serve`.

    python benchmarks/soak.py                      # 1,000 connections for 60 s
    python benchmarks/soak.py --quick              # 100 connections for 10 s
    python benchmarks/soak.py --connections 300 --seconds 20

The script writes a config and a JWK Set (from a `DevIssuer` that is never started: no key server is needed,
the keys are a `jwks_file`) into a temporary directory, starts `python -m ztmw serve` (the sample API) on a
free loopback port, and drives it from one process with hand-rolled HTTP/1.1 over asyncio streams (one
connection per worker, each sending its next request when the previous answer is read).

Every request's expected status is known before it is sent: valid bearer, expired, forged, wrong scope,
no credentials, ownership, step-up (weak login on a route that needs a strong one), a satisfied step-up,
a valid DPoP-bound payment with a fresh proof, and that same proof replayed. It reports wrong decisions
(must be 0), 5xx answers (must be 0), transport errors, latency p50/p90/p99 and throughput, and exits 1
when any wrong decision, 5xx or transport error happened.

Bounded: loopback only, at most `--seconds` of traffic (plus start-up and a short drain), and the server is
terminated (then killed) at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ztmw.sample_app import SAMPLE_RULES, SAMPLE_TRUST  # noqa: E402
from ztmw.testing import DevIssuer, DPoPKey  # noqa: E402

ISSUER = "https://issuer.soak.test"
AUDIENCE = "https://api.example.com"
HOST = "127.0.0.1"
START_TIMEOUT = 60.0
REQUEST_TIMEOUT = 60.0


# -- config ------------------------------------------------------------------------------------------------

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))


def write_config(directory: Path, issuer: DevIssuer, port: int) -> Path:
    jwks = directory / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()), encoding="utf-8")
    lines = [
        "[resource]",
        f"identifier = {_toml_value(AUDIENCE)}",
        f"public_origin = {_toml_value(f'http://{HOST}:{port}')}",
        "",
        "[[issuers]]",
        f"issuer = {_toml_value(ISSUER)}",
        f"jwks_file = {_toml_value(str(jwks))}",
        'algorithms = ["ES256"]',
        "",
        "[verifiers]",
        'enabled = ["bearer", "dpop"]',
        "",
        "[dpop]",
        'replay_store = "memory"',
        "",
    ]
    for section in ("acr", "amr"):
        for name, levels in SAMPLE_TRUST[section].items():
            lines.append(f"[trust.{section}.{json.dumps(name)}]")
            lines += [f"{k} = {v}" for k, v in levels.items()] + [""]
    for rule in SAMPLE_RULES:
        lines.append("[[rules]]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in rule.items()]
        lines.append("")
    path = directory / "ztmw.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# -- the server --------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start_server(config: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "wb")
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "ztmw", "serve", "--config", str(config), "--host", HOST,
             "--port", str(port)],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "0"},
        )
    finally:
        log.close()
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_server(process)
                tail = log_path.read_text(errors="replace")[-3000:]
                raise SystemExit(f"soak: ztmw serve did not start:\n{tail}")
            time.sleep(0.1)


def stop_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)  # web.run_app shuts down cleanly on SIGINT
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


# -- traffic -----------------------------------------------------------------------------------------------

@dataclass
class Identity:
    """What one worker presents: tokens minted once, a DPoP key and its bound token."""

    user: str
    valid: str
    expired: str
    forged: str
    wrong_scope: str
    weak: str
    strong: str
    dpop_key: DPoPKey
    dpop_token: str
    last_proof: str | None = None


def make_identities(issuer: DevIssuer, count: int) -> list[Identity]:
    now = time.time()
    out = []
    for index in range(count):
        user = f"user{index}"
        valid = issuer.mint(user, scope="profile:read transactions:read", lifetime=3600)
        head, payload, signature = valid.split(".")
        forged = f"{head}.{payload}.{signature[:-8]}AAAAAAAA"
        key = DPoPKey()
        out.append(Identity(
            user=user,
            valid=valid,
            expired=issuer.mint(user, scope="profile:read", lifetime=-120),
            forged=forged,
            wrong_scope=issuer.mint(user, scope="reports:read", lifetime=3600),
            weak=issuer.mint(user, scope="profile:write", acr="urn:example:acr:social", auth_time=now,
                             lifetime=3600),
            strong=issuer.mint(user, scope="profile:write", acr="urn:example:acr:bankid", auth_time=now,
                               lifetime=3600),
            dpop_key=key,
            dpop_token=issuer.mint(user, scope="payments:write", acr="urn:example:acr:bankid", amr=["hwk"],
                                   auth_time=now, cnf={"jkt": key.thumbprint}, lifetime=3600),
        ))
    return out


# (kind, weight): how often each kind is chosen
MIX = [("valid", 30), ("expired", 8), ("forged", 8), ("wrong_scope", 8), ("no_credentials", 6),
       ("owner", 6), ("not_owner", 6), ("step_up", 8), ("strong", 6), ("dpop", 10), ("dpop_replay", 6),
       ("health", 4)]


def build_request(kind: str, ident: Identity, index: int, origin: str) -> tuple[bytes, int, str | None]:
    """(raw request, expected status, proof to remember when it is accepted)."""
    method, path, headers, expected, proof = "GET", "/profile", {}, 200, None
    if kind == "valid":
        headers["Authorization"] = f"Bearer {ident.valid}"
    elif kind == "expired":
        headers["Authorization"], expected = f"Bearer {ident.expired}", 401
    elif kind == "forged":
        headers["Authorization"], expected = f"Bearer {ident.forged}", 401
    elif kind == "wrong_scope":
        headers["Authorization"], expected = f"Bearer {ident.wrong_scope}", 403
    elif kind == "no_credentials":
        expected = 401
    elif kind == "owner":
        path, headers["Authorization"] = f"/users/{ident.user}/transactions", f"Bearer {ident.valid}"
    elif kind == "not_owner":
        path, expected = f"/users/other-than-{ident.user}/transactions", 403
        headers["Authorization"] = f"Bearer {ident.valid}"
    elif kind == "step_up":
        method, headers["Authorization"], expected = "PUT", f"Bearer {ident.weak}", 401
    elif kind == "strong":
        method, headers["Authorization"] = "PUT", f"Bearer {ident.strong}"
    elif kind == "dpop":
        method, path, expected = "POST", "/payments", 201
        proof = ident.dpop_key.proof("POST", origin + path, access_token=ident.dpop_token)
        headers["Authorization"], headers["DPoP"] = f"DPoP {ident.dpop_token}", proof
    elif kind == "dpop_replay":
        assert ident.last_proof is not None
        method, path, expected = "POST", "/payments", 401
        headers["Authorization"], headers["DPoP"] = f"DPoP {ident.dpop_token}", ident.last_proof
    elif kind == "health":
        path = "/health"
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", "Content-Length: 0"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii"), expected, proof


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    sent: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    wrong: Counter[tuple[str, int, int]] = field(default_factory=Counter)
    server_errors: int = 0
    transport_errors: Counter[str] = field(default_factory=Counter)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Status and whether the server will close the connection; the body is read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "connection" and value.strip().lower() == "close":
            close = True
        elif name == "transfer-encoding":
            raise ValueError("chunked responses are not expected from ztmw's sample API")
    if length:
        await reader.readexactly(length)
    return status, close


async def worker(index: int, ident: Identity, port: int, origin: str, deadline: float, stats: Stats,
                 rng: random.Random) -> None:
    kinds, weights = zip(*MIX)
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    try:
        while time.monotonic() < deadline:
            if writer is None:
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT):
                        reader, writer = await asyncio.open_connection(HOST, port)
                except (OSError, TimeoutError) as exc:
                    stats.transport_errors[f"connect: {type(exc).__name__}"] += 1
                    await asyncio.sleep(0.05)
                    continue
            kind = rng.choices(kinds, weights)[0]
            if kind == "dpop_replay" and ident.last_proof is None:
                kind = "dpop"
            raw, expected, proof = build_request(kind, ident, index, origin)
            started = time.perf_counter()
            try:
                assert reader is not None
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    writer.write(raw)
                    await writer.drain()
                    status, close = await read_response(reader)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                stats.transport_errors[f"{kind}: {type(exc).__name__}"] += 1
                writer.close()
                writer = reader = None
                continue
            stats.latencies.append(time.perf_counter() - started)
            stats.sent[kind] += 1
            stats.statuses[status] += 1
            if status >= 500:
                stats.server_errors += 1
            if status != expected:
                stats.wrong[(kind, expected, status)] += 1
            elif proof is not None:
                ident.last_proof = proof  # accepted once: sending it again must be a replay
            if close:
                writer.close()
                writer = reader = None
    finally:
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


async def drive(
    port: int, connections: int, seconds: float, identities: list[Identity]
) -> tuple[Stats, float]:
    origin = f"http://{HOST}:{port}"
    stats = Stats()
    started = time.monotonic()
    deadline = started + seconds
    tasks = [asyncio.create_task(worker(i, identities[i % len(identities)], port, origin, deadline, stats,
                                        random.Random(i)))
             for i in range(connections)]
    try:
        async with asyncio.timeout(seconds + REQUEST_TIMEOUT + 30):  # bounded even if the server stalls
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return stats, time.monotonic() - started


def server_log_summary(log_path: Path) -> dict[str, Any]:
    """What the server said about itself: audit decisions by status, and anything at error level."""
    decisions: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    other = 0
    with open(log_path, encoding="utf-8", errors="replace") as log:
        for line in log:
            try:
                event = json.loads(line)
            except ValueError:
                other += 1
                if "Traceback" in line or "Error" in line:
                    errors[line.strip()[:120]] += 1
                continue
            if event.get("event") in ("ztmw.decision", "ztmw.security"):
                decisions[event.get("status")] += 1
            if event.get("level") in ("error", "critical") or event.get("event") == "ztmw.verifier_error":
                errors[str(event.get("event"))] += 1
    return {"audit_events_by_status": dict(sorted(decisions.items(), key=lambda kv: str(kv[0]))),
            "error_events": dict(errors), "non_json_lines": other}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--quick", action="store_true", help="100 connections for 10 s")
    parser.add_argument("--identities", type=int, default=200, help="distinct users/tokens/DPoP keys (max)")
    args = parser.parse_args(argv)
    if args.quick:
        args.connections, args.seconds = 100, 10.0
    if not 1 <= args.connections <= 5000 or not 0 < args.seconds <= 3600:
        parser.error("--connections in 1..5000 and --seconds in (0, 3600]")

    issuer = DevIssuer(ISSUER, audience=AUDIENCE)
    identities = make_identities(issuer, min(args.identities, args.connections))
    with tempfile.TemporaryDirectory(prefix="ztmw-soak-") as tmp:
        directory = Path(tmp)
        port = free_port()
        config = write_config(directory, issuer, port)
        log_path = directory / "server.log"
        process = start_server(config, port, log_path)
        try:
            print(f"soak: ztmw serve pid {process.pid} on {HOST}:{port}; {args.connections} connections for "
                  f"{args.seconds:g} s", flush=True)
            stats, elapsed = asyncio.run(drive(port, args.connections, args.seconds, identities))
        finally:
            stop_server(process)
        summary = server_log_summary(log_path)
        exit_code = process.returncode

    total = sum(stats.sent.values())
    latencies = sorted(stats.latencies)
    wrong = sum(stats.wrong.values())
    transport = sum(stats.transport_errors.values())
    report = {
        "connections": args.connections,
        "seconds": round(elapsed, 2),
        "requests": total,
        "throughput_rps": round(total / elapsed, 1) if elapsed else 0.0,
        "latency_ms": {"p50": round(percentile(latencies, 0.50) * 1000, 2),
                       "p90": round(percentile(latencies, 0.90) * 1000, 2),
                       "p99": round(percentile(latencies, 0.99) * 1000, 2),
                       "mean": round(statistics.fmean(latencies) * 1000, 2) if latencies else None},
        "wrong_decisions": wrong,
        "wrong_detail": {f"{k} expected {e} got {g}": n for (k, e, g), n in stats.wrong.items()},
        "server_5xx": stats.server_errors,
        "transport_errors": dict(stats.transport_errors),
        "by_kind": dict(sorted(stats.sent.items())),
        "statuses": dict(sorted(stats.statuses.items())),
        "server": {**summary, "exit_code": exit_code},
    }
    print(json.dumps(report, indent=2))
    ok = wrong == 0 and stats.server_errors == 0 and transport == 0 and total > 0
    print("soak: " + ("OK" if ok else "FAILED (wrong decisions, 5xx or transport errors)"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
