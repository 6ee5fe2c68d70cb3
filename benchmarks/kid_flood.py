"""Random-kid flood: does an unknown `kid` make ztmw hammer the issuer's JWKS endpoint?

    python benchmarks/kid_flood.py [--cooldown 5] [--duration 31] [--tokens 50000]

A DevIssuer (ztmw.testing) serves its JWKS on loopback from this process and counts fetches; one
`python -m ztmw serve` process trusts it through `jwks_uri` with `refetch_cooldown = --cooldown`. wrk then
sends well-formed tokens whose header names a random, unknown `kid` (garbage signature, each token distinct)
for --duration seconds. DESIGN.md §4.5: an unknown kid causes at most one fetch per refetch_cooldown, counted
from the previous fetch. Reported: fetches during the flood, the times between them, and whether they stay
within 1 per cooldown (allowed = floor(duration / cooldown) + 1, counting a fetch that may fall due at the
very start). A valid token is checked before and after the flood (it must still get 200). Bounded and
loopback only; the server is killed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from apps import AUDIENCE, ISSUER, SCOPE  # noqa: E402
from fixtures import PATH, b64url, make_material, write_lines  # noqa: E402
from run import LUA, Scenario, Server, _parse, install_signal_handlers, kill_all  # noqa: E402

from ztmw.testing import DevIssuer  # noqa: E402


def random_kid_tokens(count: int) -> list[str]:
    now = int(time.time())
    payload = b64url(json.dumps({"iss": ISSUER, "sub": "mallory", "aud": AUDIENCE, "exp": now + 3600,
                                 "iat": now, "jti": "x", "client_id": "x", "scope": SCOPE}).encode())
    out = []
    for _ in range(count):
        header = b64url(json.dumps({"alg": "ES256", "typ": "at+jwt", "kid": secrets.token_urlsafe(12)}).encode())
        out.append(f"{header}.{payload}.{b64url(secrets.token_bytes(64))}")
    return out


async def status_of(url: str, token: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.get(url + PATH, headers={"Authorization": f"Bearer {token}"}) as response:
            return response.status


async def flood(args: argparse.Namespace) -> int:
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="ztmw-kidflood-"))
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus = {cpus[0]} if len(cpus) >= 2 else None
    issuer = DevIssuer(ISSUER, audience=AUDIENCE)
    await issuer.start()  # serves /jwks on 127.0.0.1, counts fetches; tokens still name ISSUER as iss
    fetch_times: list[float] = []
    try:
        material = make_material(workdir)
        material.es256 = issuer  # valid tokens come from the issuer the server fetches keys from
        scenario = Scenario("kid-flood", "ztmw bearer, JWKS over loopback", "ztmw", audit=True,
                            config={"verifiers": ["bearer"], "jwks_uri": issuer.jwks_uri,
                                    "refetch_cooldown": args.cooldown})
        server = Server(scenario, material, workdir, "devnull", server_cpus)
        deadline = time.monotonic() + 60
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.close()
                break
            except OSError:
                if server.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(server.stderr_path.read_text(errors="replace")[-2000:])
                await asyncio.sleep(0.1)
        valid = material.mint()
        before_status = await status_of(server.url, valid)
        say(f"server up; valid token -> {before_status}; JWKS fetches so far: {issuer.fetch_count}")

        tokens = random_kid_tokens(args.tokens)
        lines = write_lines(workdir / "kids.lines", [f"Authorization: Bearer {t}" for t in tokens])
        await asyncio.sleep(args.cooldown + 0.5)  # let the start-up fetch's cooldown pass: worst case for us
        fetches_before = issuer.fetch_count
        flood_started = time.monotonic()

        async def watch() -> None:
            seen = issuer.fetch_count
            while True:
                await asyncio.sleep(0.02)
                if issuer.fetch_count != seen:
                    fetch_times.extend([time.monotonic() - flood_started] * (issuer.fetch_count - seen))
                    seen = issuer.fetch_count

        watcher = asyncio.create_task(watch())
        say(f"flood: {args.tokens:,} distinct random-kid tokens, cycled for {args.duration:g} s, "
            f"refetch_cooldown = {args.cooldown:g} s")
        process = await asyncio.create_subprocess_exec(
            "wrk", "-t1", f"-c{args.connections}", f"-d{int(args.duration)}s", "--timeout", "5s", "-s", str(LUA),
            server.url, "--", PATH, str(lines), "cycle", "0",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=HERE)
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=args.duration + 60)
        except BaseException:
            process.kill()
            raise
        elapsed = time.monotonic() - flood_started
        watcher.cancel()
        result = _parse(stdout.decode())
        fetches = issuer.fetch_count - fetches_before
        after_status = await status_of(server.url, valid)
        allowed = math.floor(elapsed / args.cooldown) + 1
        gaps = [round(b - a, 2) for a, b in zip(fetch_times, fetch_times[1:])]
        summary = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "refetch_cooldown_s": args.cooldown, "flood_s": round(elapsed, 1),
            "requests": result["requests"], "refused": result["err_status"],
            "rps": round(result["requests"] / (result["duration_us"] / 1e6)),
            "jwks_fetches_during_flood": fetches, "allowed": allowed,
            "fetch_times_s": [round(t, 2) for t in fetch_times], "gaps_s": gaps,
            "min_gap_s": min(gaps) if gaps else None,
            "fetches_per_cooldown": round(fetches / (elapsed / args.cooldown), 2),
            "valid_token_before": before_status, "valid_token_after": after_status,
            "pass": fetches <= allowed and (not gaps or min(gaps) >= args.cooldown * 0.95),
        }
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        print(json.dumps(summary, indent=2))
        say(f"{result['requests']:,} requests ({summary['rps']}/s), {fetches} JWKS fetches in {elapsed:.1f} s "
            f"(allowed {allowed}, min gap {summary['min_gap_s']} s): {'PASS' if summary['pass'] else 'FAIL'}"
            " (target <= 1 fetch per refetch_cooldown)")
        return 0
    finally:
        kill_all()
        await issuer.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cooldown", type=int, default=5, help="refetch_cooldown in the server config (s)")
    parser.add_argument("--duration", type=float, default=31)
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--json", default=str(HERE / "results" / "kid_flood.json"))
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("kid_flood.py needs wrk (apt-get install -y wrk)")
    if not (1 <= args.duration <= 600 and 1 <= args.tokens <= 1_000_000):
        raise SystemExit("duration 1..600 s, tokens 1..1000000")
    install_signal_handlers()
    try:
        return asyncio.run(flood(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
