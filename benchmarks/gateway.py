"""The gateway measured: proxy mode against the upstream served directly, and nginx + forward-auth against
nginx alone in front of the same upstream, with a cached token, all in one run.

    python benchmarks/gateway.py [--quick] [--rounds N] [--duration S] [--connections C]

Every server is its own process on 127.0.0.1: the upstream (a minimal aiohttp app, started by this script),
`python -m ztmw gateway` in proxy and in forward-auth mode, and nginx (Debian's package) with the
`auth_request` configuration of `ztmw.gateway.nginx`. Load comes from wrk (one thread) with one valid bearer
token, so after the first request every decision is a verification-cache hit. Scenarios run in rounds, in an
order rotated every round; the table shows medians over rounds, and each ratio divides two medians of the same
run. `--quick` is two rounds of three seconds: good for a smoke test, too noisy for conclusions.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from ztmw.gateway.nginx import (  # noqa: E402
    FORWARD_AUTH_HTTP,
    FORWARD_AUTH_LOCATIONS,
    PROXY_LOCATIONS,
    nginx_conf,
)
from ztmw.testing import DevIssuer, free_port  # noqa: E402

AUDIENCE = "https://api.example.com"
SCENARIOS = ("upstream-direct", "gateway-proxy", "nginx-alone", "nginx-forward-auth")
RATIOS = (("proxy mode vs the upstream served directly", "gateway-proxy", "upstream-direct"),
          ("nginx + forward-auth vs nginx alone", "nginx-forward-auth", "nginx-alone"))

UPSTREAM = """
import sys
from aiohttp import web
async def ok(request):
    return web.Response(text="ok")
app = web.Application()
app.router.add_route("*", "/{tail:.*}", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def toml_value(value: Any) -> str:
    return json.dumps(value)


def gateway_toml(jwks: Path, mode: str, upstream: str | None, public_origin: str, audit: Path) -> str:
    gateway = f'mode = "{mode}"\n' + (f"upstream = {toml_value(upstream)}\n" if upstream else "")
    return f"""
[resource]
identifier = {toml_value(AUDIENCE)}
public_origin = {toml_value(public_origin)}

[[issuers]]
issuer = "https://issuer.bench"
jwks_file = {toml_value(str(jwks))}
algorithms = ["ES256"]
audiences = [{toml_value(AUDIENCE)}]

[audit]
sinks = ["jsonl"]

[plugins.jsonl]
path = {toml_value(str(audit))}

[[rules]]
id = "items"
path = "/items"
methods = ["GET"]
scopes = ["items:read"]

[gateway]
{gateway}"""


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"a server exited with {process.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {timeout}s")


def wrk(url: str, token: str, duration: float, connections: int) -> dict[str, float]:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
                          "-H", f"Authorization: Bearer {token}", url],
                         capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    latency = {p: _ms(m.group(2)) for p in ("50", "99")
               for m in [re.search(rf"^\s+({p})%\s+([\d.]+\w+)", out, re.M)] if m}
    if rate is None:
        raise SystemExit(f"wrk printed no rate:\n{out}")
    return {"rps": float(rate.group(1)), "p50": latency.get("50", 0.0), "p99": latency.get("99", 0.0),
            "errors": float(errors.group(1)) if errors else 0.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 s (smoke test)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration = 2, 3.0
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"{tool} is needed (apt-get install -y {tool} or nginx-light)")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    work = Path(tempfile.mkdtemp(prefix="ztmw-gateway-bench."))
    issuer = DevIssuer("https://issuer.bench", audience=AUDIENCE)
    (work / "jwks.json").write_text(json.dumps(issuer.jwks()))
    token = issuer.mint("alice", scope="items:read", lifetime=3600)
    ports = {name: free_port() for name in ("upstream", "proxy", "decider", "nginx-alone", "nginx-fa")}
    processes: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], port: int) -> None:
        process = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        processes.append(process)
        wait_listening(port, process)

    try:
        start([sys.executable, "-c", UPSTREAM, str(ports["upstream"])], ports["upstream"])
        upstream = f"http://127.0.0.1:{ports['upstream']}"
        for name, mode, origin in (("proxy", "proxy", f"http://127.0.0.1:{ports['proxy']}"),
                                   ("decider", "forward-auth", f"http://127.0.0.1:{ports['nginx-fa']}")):
            path = work / f"{name}.toml"
            path.write_text(gateway_toml(work / "jwks.json", mode, upstream if mode == "proxy" else None, origin,
                                         work / f"{name}-audit.jsonl"))
            start([sys.executable, "-m", "ztmw", "gateway", "--config", str(path), "--port", str(ports[name])],
                  ports[name])
        for name, locations, extra in (("nginx-alone", PROXY_LOCATIONS, ""),
                                       ("nginx-fa", FORWARD_AUTH_LOCATIONS, FORWARD_AUTH_HTTP)):
            prefix = work / name
            prefix.mkdir()
            (prefix / "nginx.conf").write_text(nginx_conf(prefix, port=ports[name], gateway_port=ports["decider"],
                                                          upstream_port=ports["upstream"], locations=locations,
                                                          http_extra=extra))
            start([nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf")], ports[name])
        urls = {"upstream-direct": upstream, "gateway-proxy": f"http://127.0.0.1:{ports['proxy']}",
                "nginx-alone": f"http://127.0.0.1:{ports['nginx-alone']}",
                "nginx-forward-auth": f"http://127.0.0.1:{ports['nginx-fa']}"}
        for name, url in urls.items():  # warm up: imports, the token's first verification, keep-alive pools
            wrk(url + "/items", token, 1, 4)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in SCENARIOS}
        for round_ in range(args.rounds):
            order = SCENARIOS[round_ % len(SCENARIOS):] + SCENARIOS[:round_ % len(SCENARIOS)]
            for name in order:
                results[name].append(wrk(urls[name] + "/items", token, args.duration, args.connections))
        report(results, args)
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50", "p99", "errors")}
               for name, runs in results.items()}
    print(f"\n{args.rounds} rounds x {args.duration:g} s, {args.connections} connections, wrk -t1, cached token")
    print(f"{'scenario':<20} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}")
    for name in SCENARIOS:
        m = medians[name]
        print(f"{name:<20} {m['rps']:>9.0f} {m['p50']:>8.2f} {m['p99']:>8.2f} {m['errors']:>8.0f}")
    print()
    for title, numerator, denominator in RATIOS:
        print(f"{title}: {medians[numerator]['rps'] / medians[denominator]['rps']:.2f}x req/s")


if __name__ == "__main__":
    sys.exit(main())
