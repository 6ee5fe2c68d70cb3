"""Memory under a token flood: distinct garbage tokens, then distinct valid tokens, against ONE ztmw process.

    python benchmarks/flood.py [--garbage 1000000] [--valid 100000] [--audit-log devnull|file]
    python benchmarks/flood.py --in-process 100000     # no server: traced bytes per cached verification

The server is `python -m ztmw serve` with the default cache (max_entries 100000), audit on (JSON lines to
/dev/null by default). Garbage tokens are made by garbage.lua inside wrk (half random token68 strings, half
well-formed JWS with the real header and a bad signature); valid tokens are pre-minted by a DevIssuer and sent
once each by rotate.lua. RSS (VmRSS from /proc) is read before, between and after the phases; the target is
growth <= 150 MB over the whole flood. Bounded: each phase stops at its count or its time limit, loopback
only, and the server is killed at the end (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from apps import AUDIENCE, ISSUER, SCOPE  # noqa: E402
from fixtures import PATH, Material, b64url, make_material, write_lines  # noqa: E402
from run import LUA, Scenario, Server, install_signal_handlers, kill_all, run_wrk  # noqa: E402

TARGET_MB = 150


def rss_kb(pid: int) -> dict[str, int]:
    values = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, amount, _ = line.split()
                values[name.rstrip(":")] = int(amount)
    return values


def wrk(argv: list[str], timeout: float, cpus: set[int] | None, done_file: Path) -> dict[str, int]:
    return run_wrk(argv + [str(done_file)], done_file, timeout, cpus)


def in_process(count: int) -> int:
    """Bytes per cached verification, traced in this process: `count` distinct tokens verified by the bearer
    plugin into the memory cache, as the server would keep them. Seconds instead of minutes, for iterating."""
    import asyncio
    import gc
    import tracemalloc

    from ztmw.cache import token_key
    from ztmw.config import load_config
    from ztmw.pipeline import Pipeline

    async def run(material: Material) -> None:
        tokens = material.unique_tokens(count + 100)
        pipeline = Pipeline(load_config({
            "resource": {"identifier": AUDIENCE},
            "issuers": [{"issuer": ISSUER, "jwks_file": str(material.jwks), "algorithms": ["ES256"]}],
            "verifiers": {"enabled": ["bearer"]}, "cache": {"max_entries": count},
            "rules": [{"id": "hello", "path": "/hello/{name}", "methods": ["GET"], "scopes": [SCOPE]}],
        }))
        await pipeline.start()
        try:
            bearer = next(p.instance for p in pipeline.plugins if p.name == "bearer")
            for token in tokens[:100]:  # warm: imports, shared tables and allocator pools before the baseline
                pipeline.cache.set(token_key(token), await bearer.verify_token(token))
            pipeline.cache.clear()
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
            for token in tokens[100:]:
                pipeline.cache.set(token_key(token), await bearer.verify_token(token))
            gc.collect()
            stats = tracemalloc.take_snapshot().compare_to(before, "lineno")
            tracemalloc.stop()
        finally:
            await pipeline.close()
        total = sum(stat.size_diff for stat in stats)
        print(f"{len(pipeline.cache):,} cached verifications: +{total / 1e6:.1f} MB traced, "
              f"{total / count:.0f} B per entry; largest allocation sites:")
        for stat in stats[:8]:
            frame = stat.traceback[0]
            print(f"  {stat.size_diff / count:6.0f} B/entry  {frame.filename}:{frame.lineno}")

    workdir = Path(tempfile.mkdtemp(prefix="ztmw-flood-"))
    try:
        asyncio.run(run(make_material(workdir)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--garbage", type=int, default=1_000_000)
    parser.add_argument("--valid", type=int, default=100_000)
    parser.add_argument("--in-process", type=int, metavar="N",
                        help="no server: trace the memory of N cached verifications in this process, and stop")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--max-seconds", type=float, default=900, help="time limit per phase")
    parser.add_argument("--audit-log", choices=["devnull", "file"], default="devnull")
    parser.add_argument("--json", default=str(HERE / "results" / "flood.json"))
    args = parser.parse_args()
    if args.in_process:
        return in_process(args.in_process)
    if not shutil.which("wrk"):
        raise SystemExit("flood.py needs wrk (apt-get install -y wrk)")
    install_signal_handlers()
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="ztmw-flood-"))
    import os

    cpus = sorted(os.sched_getaffinity(0))
    server_cpus, gen_cpus = ({cpus[0]}, {cpus[1]}) if len(cpus) >= 2 else (None, None)
    try:
        material = make_material(workdir)
        scenario = Scenario("flood", "ztmw bearer under a flood", "ztmw", config={"verifiers": ["bearer"]},
                            audit=True)
        server = Server(scenario, material, workdir, args.audit_log, server_cpus)
        server.wait_ready()
        pid = server.process.pid
        # warm up with one valid token so imports, caches and allocator pools exist before the baseline
        token_lines = write_lines(workdir / "one.lines", [f"Authorization: Bearer {material.token}"])
        wrk(["wrk", "-t1", f"-c{args.connections}", "-d2s", "-s", str(LUA), server.url, "--", PATH,
             str(token_lines), "cycle", "5000"], 60, gen_cpus, workdir / "done")
        base = rss_kb(pid)
        say(f"server pid {pid}; baseline RSS {base['VmRSS'] / 1024:.1f} MB")

        header = b64url(json.dumps({"alg": "ES256", "typ": "at+jwt", "kid": material.es256.kid},
                                   separators=(",", ":")).encode())
        say(f"phase 1: {args.garbage:,} distinct garbage tokens")
        t0 = time.monotonic()
        g = wrk(["wrk", "-t1", f"-c{args.connections}", f"-d{int(args.max_seconds)}s", "--timeout", "5s",
                 "-s", str(HERE / "garbage.lua"), server.url, "--", PATH, str(args.garbage), header,
                 secrets.token_hex(4)], args.max_seconds + 60, gen_cpus, workdir / "done")
        after_garbage = rss_kb(pid)
        say(f"  {g['requests']:,} requests in {time.monotonic() - t0:.0f} s "
            f"({g['requests'] / (g['duration_us'] / 1e6):.0f}/s), {g['err_status']:,} refused (>= 400); "
            f"RSS {after_garbage['VmRSS'] / 1024:.1f} MB")

        say(f"phase 2: minting {args.valid:,} distinct valid tokens")
        tokens = material.unique_tokens(args.valid)
        valid_lines = write_lines(workdir / "valid.lines", [f"Authorization: Bearer {t}" for t in tokens])
        del tokens
        t0 = time.monotonic()
        v = wrk(["wrk", "-t1", f"-c{args.connections}", f"-d{int(args.max_seconds)}s", "--timeout", "5s",
                 "-s", str(LUA), server.url, "--", PATH, str(valid_lines), "cycle", str(args.valid)],
                args.max_seconds + 60, gen_cpus, workdir / "done")
        after_valid = rss_kb(pid)
        say(f"  {v['requests']:,} requests in {time.monotonic() - t0:.0f} s "
            f"({v['requests'] / (v['duration_us'] / 1e6):.0f}/s), {v['err_status']:,} refused; "
            f"RSS {after_valid['VmRSS'] / 1024:.1f} MB")

        growth_mb = (after_valid["VmRSS"] - base["VmRSS"]) / 1024
        peak_growth_mb = (after_valid["VmHWM"] - base["VmRSS"]) / 1024
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "garbage_tokens": g["requests"], "garbage_refused": g["err_status"],
            "valid_tokens": v["requests"], "valid_refused": v["err_status"],
            "rss_mb": {"baseline": round(base["VmRSS"] / 1024, 1),
                       "after_garbage": round(after_garbage["VmRSS"] / 1024, 1),
                       "after_valid": round(after_valid["VmRSS"] / 1024, 1),
                       "peak": round(after_valid["VmHWM"] / 1024, 1)},
            "growth_mb": round(growth_mb, 1), "garbage_growth_mb":
                round((after_garbage["VmRSS"] - base["VmRSS"]) / 1024, 1),
            "valid_growth_mb": round((after_valid["VmRSS"] - after_garbage["VmRSS"]) / 1024, 1),
            "peak_growth_mb": round(peak_growth_mb, 1), "target_mb": TARGET_MB,
            "pass": growth_mb <= TARGET_MB, "audit_log": args.audit_log,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(json.dumps(result, indent=2))
        say(f"RSS growth {growth_mb:.1f} MB (garbage {result['garbage_growth_mb']} MB, valid "
            f"{result['valid_growth_mb']} MB; peak +{peak_growth_mb:.1f} MB): "
            f"{'PASS' if result['pass'] else 'FAIL'} (target <= {TARGET_MB} MB)")
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        kill_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
