"""Load scripts: ztmw against bare aiohttp and hand-written middleware, servers in separate processes.

    python benchmarks/run.py [--quick] [--only bare,ztmw-cached] [--rounds N] [--duration S]
                             [--generator auto|wrk|python] [--audit-log file|devnull] [--no-micro]
    ztmw bench [same arguments]

Every server is its own process on 127.0.0.1 (ztmw scenarios run `python -m ztmw serve apps:create_app`, with
the structlog JSON-lines setup of `ztmw serve`; the baselines run apps.py). The load generator is wrk
(`apt-get install -y wrk`) with one thread, or the bundled loadgen.py; TLS scenarios always use loadgen.py,
because wrk cannot present a client certificate. On a machine with two or more CPUs the server is pinned to
CPU 0 and the generator to CPU 1. Scenarios run in rounds, in an order rotated every round; the table shows
the median over rounds of req/s and of p50/p99 latency, and the ratio of the median req/s to the median of
the baseline measured in the same run (bare aiohttp; bare aiohttp over the same TLS listener for mTLS).

Output: a table on the terminal, benchmarks/results/latest.json, latest.md and latest.png (when matplotlib is
installed). Everything is bounded: each load run by its duration (and a hard timeout), proofs and tokens by
count, and every server is killed at the end, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from apps import AUDIENCE, PUBLIC_ORIGIN, SCOPE  # noqa: E402
from fixtures import PATH, Material, free_port, make_material, write_lines, ztmw_config  # noqa: E402

RESULTS = HERE / "results"
LUA = HERE / "rotate.lua"


# -- scenarios ---------------------------------------------------------------------------------------------

@dataclass
class Scenario:
    name: str
    title: str
    server: str                      # "app:<kind>" (apps.py) or "ztmw"
    baseline: str | None = "bare"    # ratio denominator
    config: dict[str, Any] = field(default_factory=dict)  # ztmw_config keyword arguments
    headers: str = "none"            # none | token | rs256 | unique | dpop | mtls
    tls: bool = False
    audit: bool = False              # audit events written (ztmw serve's stdout, or the jsonl sink's file)
    peer: str | None = None          # the hand-written peer (or other scenario) "ztmw / peer" compares with


SCENARIOS: list[Scenario] = [
    Scenario("bare", "bare aiohttp", "app:bare", baseline=None),
    Scenario("noop", "no-op middleware (calibration)", "app:noop"),
    Scenario("busy-2us", "middleware spinning 2 us (calibration)", "app:busy-2us"),
    Scenario("es256-only", "raw ES256 signature check only, distinct tokens (calibration)", "app:es256-only",
             headers="unique"),
    # the hand-written peers, exactly as a user would write them (apps.py)
    Scenario("hash-cache", "peer: sha256(token) -> dict, PyJWT ES256 on a miss, exp on a hit", "app:hash-cache",
             headers="token"),
    Scenario("pyjwt-es256", "peer: PyJWT ES256 decode per request", "app:pyjwt-es256", headers="unique"),
    Scenario("dpop-peer", "peer: token cached as hash-cache + PyJWT proof verify, htm/htu/iat/ath/jkt, jti dict",
             "app:dpop-peer", headers="dpop"),
    # ztmw as shipped: `ztmw serve` with no [audit] section (the structlog sink, JSON lines on stdout)
    Scenario("ztmw-cached", "ztmw bearer, cache hit, default configuration (audit on)", "ztmw",
             config={"verifiers": ["bearer"]}, headers="token", audit=True, peer="hash-cache"),
    Scenario("ztmw-cached-noaudit", "ztmw bearer, cache hit, audit off", "ztmw",
             config={"verifiers": ["bearer"], "audit": False}, headers="token", peer="hash-cache"),
    Scenario("ztmw-cached-jsonl", "ztmw bearer, cache hit, audit through the jsonl sink to a file", "ztmw",
             config={"verifiers": ["bearer"], "audit_sink": "jsonl"}, headers="token", audit=True,
             peer="hash-cache"),
    Scenario("ztmw-uncached", "ztmw bearer ES256, distinct tokens (every request a miss)", "ztmw",
             config={"verifiers": ["bearer"], "cache_entries": 1000}, headers="unique", audit=True,
             peer="pyjwt-es256"),
    Scenario("ztmw-uncached-noaudit", "ztmw bearer ES256, distinct tokens, audit off (what a new decision's "
             "audit line costs)", "ztmw", config={"verifiers": ["bearer"], "cache_entries": 1000, "audit": False},
             headers="unique", peer="pyjwt-es256"),
    Scenario("ztmw-dpop-memory", "ztmw DPoP, fresh proof per request, memory replay store", "ztmw",
             config={"verifiers": ["bearer", "dpop"], "replay_store": "memory"}, headers="dpop", audit=True,
             peer="dpop-peer"),
    Scenario("ztmw-dpop-redis", "ztmw DPoP, fresh proof per request, Redis replay store", "ztmw",
             config={"verifiers": ["bearer", "dpop"], "replay_store": "redis://127.0.0.1:6379/0"},
             headers="dpop", audit=True, peer="ztmw-dpop-memory"),
    Scenario("bare-tls", "bare aiohttp over TLS, client cert requested+sent (loadgen)", "app:bare",
             baseline=None, tls=True),
    Scenario("ztmw-mtls", "ztmw mTLS-bound token over TLS (loadgen)", "ztmw", baseline="bare-tls",
             config={"verifiers": ["bearer", "mtls"]}, headers="mtls", tls=True, audit=True),
]
BY_NAME = {s.name: s for s in SCENARIOS}

# (scenario, denominator, minimum ratio, description): ztmw against what a user would otherwise write
TARGETS = [
    ("ztmw-cached", "hash-cache", 0.90, "cached bearer, default configuration >= 0.90x the hand-written cache"),
    ("ztmw-cached-noaudit", "hash-cache", 0.95, "cached bearer, audit off >= 0.95x the hand-written cache"),
    ("ztmw-uncached", "pyjwt-es256", 1.10, "unique ES256 token, default configuration >= 1.10x PyJWT decode"),
    ("ztmw-dpop-memory", "dpop-peer", 1.20, "DPoP, memory replay store >= 1.20x the hand-written DPoP check"),
    ("ztmw-dpop-redis", "ztmw-dpop-memory", 0.85, "DPoP, Redis replay store >= 0.85x DPoP memory"),
]


# -- processes -----------------------------------------------------------------------------------------------

_LIVE: list[subprocess.Popen[bytes]] = []


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)  # own session: the group is just this server
    except (ProcessLookupError, PermissionError):
        return
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)


def kill_all() -> None:
    while _LIVE:
        _kill(_LIVE.pop())


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def install_signal_handlers() -> None:
    """SIGTERM and SIGINT both unwind through `finally: kill_all()`; a shell that starts us in the background
    ignores SIGINT for us, so it is set back explicitly."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


atexit.register(kill_all)


def _pin(cpus: set[int] | None) -> Callable[[], None] | None:
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


class Server:
    def __init__(self, scenario: Scenario, material: Material, workdir: Path, audit_log: str,
                 cpus: set[int] | None) -> None:
        self.scenario = scenario
        self.port = free_port()
        self.scheme = "https" if scenario.tls else "http"
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self.audit_path: Path | None = None
        argv: list[str]
        stdout_audit = scenario.config.get("audit_sink", "default") == "default"  # ztmw serve prints them
        if audit_log == "file" and scenario.server == "ztmw" and scenario.audit:
            self.audit_path = workdir / f"{scenario.name}.audit.jsonl"
        if scenario.server == "ztmw":
            config = workdir / f"{scenario.name}.toml"
            audit_to = str(self.audit_path) if self.audit_path and not stdout_audit else "/dev/null"
            config.write_text(ztmw_config(material, **scenario.config, audit_path=audit_to), encoding="utf-8")
            argv = [sys.executable, "-m", "ztmw", "serve", "apps:create_app", "--config", str(config),
                    "--host", "127.0.0.1", "--port", str(self.port)]
        else:
            kind = scenario.server.split(":", 1)[1]
            argv = [sys.executable, str(HERE / "apps.py"), "--kind", kind, "--port", str(self.port)]
            if kind == "pyjwt-rs256":
                argv += ["--public-key", str(material.rs256_pem)]
            elif kind in ("pyjwt-es256", "hash-cache", "es256-only", "dpop-peer"):
                argv += ["--public-key", str(material.es256_pem)]
        if scenario.tls:
            argv += ["--tls-cert", str(material.server_cert), "--tls-key", str(material.server_key),
                     "--tls-client-ca", str(material.ca_pem)]
        # ztmw serve writes its JSON lines to stdout: into the audit file for the default configuration
        if self.audit_path is not None and stdout_audit:
            stdout = open(self.audit_path, "wb")  # noqa: SIM115 - handed to the child
        else:
            stdout = open(os.devnull, "wb")  # noqa: SIM115
        self.stderr_path = workdir / f"{scenario.name}.stderr"
        stderr = open(self.stderr_path, "wb")  # noqa: SIM115
        env = dict(os.environ, PYTHONUNBUFFERED="0")
        self.process = subprocess.Popen(argv, cwd=HERE, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                        start_new_session=True, env=env, preexec_fn=_pin(cpus))
        stdout.close()
        stderr.close()
        _LIVE.append(self.process)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.scenario.name} server did not start:\n"
                                       + self.stderr_path.read_text(errors="replace")[-3000:])
                time.sleep(0.05)

    def stop(self) -> None:
        _kill(self.process)
        if self.process in _LIVE:
            _LIVE.remove(self.process)


# -- load generation -----------------------------------------------------------------------------------------

def run_wrk(argv: list[str], done_file: Path | None, timeout: float, cpus: set[int] | None) -> dict[str, Any]:
    """Run wrk; when its Lua script writes `done_file` (count reached), SIGINT ends the run right there."""
    if done_file is not None and done_file.exists():
        done_file.unlink()
    process = subprocess.Popen(argv, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_pin(cpus))
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None:
            if done_file is not None and done_file.exists():
                process.send_signal(signal.SIGINT)
                break
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"wrk did not finish within {timeout:.0f} s")
            time.sleep(0.05)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed ({process.returncode}): {stderr[-2000:]}")
    return _parse(stdout)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its waited-for children), from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _parse(output: str) -> dict[str, Any]:
    for line in output.splitlines():
        if line.startswith("WRKJSON "):
            return json.loads(line[8:])
    raise RuntimeError("load generator printed no summary:\n" + output[-2000:])


class Runner:
    def __init__(self, args: argparse.Namespace, material: Material, workdir: Path) -> None:
        self.args = args
        self.material = material
        self.workdir = workdir
        self.wrk = shutil.which("wrk") if args.generator in ("auto", "wrk") else None
        if args.generator == "wrk" and not self.wrk:
            raise SystemExit("--generator wrk: wrk is not installed (apt-get install -y wrk)")
        cpus = sorted(os.sched_getaffinity(0))
        self.server_cpus = {cpus[0]} if len(cpus) >= 2 and not args.no_pin else None
        self.generator_cpus = {cpus[1]} if len(cpus) >= 2 and not args.no_pin else None
        self.rate_estimate: dict[str, float] = {}
        self.unique_file: Path | None = None
        self.offsets: dict[Path, int] = {}  # cycle mode: continue where the last run of a file stopped

    def generator_for(self, scenario: Scenario) -> str:
        return "wrk" if self.wrk and not scenario.tls else "loadgen"

    def lines_for(self, scenario: Scenario, duration: float) -> tuple[Path | None, str]:
        m, h = self.material, scenario.headers
        if h == "none":
            return None, "cycle"
        if h in ("token", "rs256", "mtls"):
            token = {"token": m.token, "rs256": m.rs256_token, "mtls": m.mtls_token}[h]
            return write_lines(self.workdir / f"{h}.lines", [f"Authorization: Bearer {token}"]), "cycle"
        if h == "unique":
            if self.unique_file is None:
                tokens = m.unique_tokens(self.args.unique_tokens)
                self.unique_file = write_lines(self.workdir / "unique.lines",
                                               [f"Authorization: Bearer {t}" for t in tokens])
            return self.unique_file, "cycle"
        if h == "dpop":
            # every request needs a fresh proof: made now (iat = now, well inside dpop.max_age = 60 s),
            # enough for 1.5x the rate seen so far; "once" mode stops the generator if they run out
            estimate = self.rate_estimate.get(scenario.name) or self.rate_estimate.get("bare", 8000.0)
            count = min(int(estimate * duration * 1.5) + 500, self.args.max_proofs)
            proofs = m.dpop.proofs(count)
            lines = [f"Authorization: DPoP {m.dpop_token}\tDPoP: {p}" for p in proofs]
            return write_lines(self.workdir / f"{scenario.name}.lines", lines), "once"
        raise ValueError(h)

    @staticmethod
    def _line_count(path: Path) -> int:
        with open(path, "rb") as fh:
            return sum(1 for _ in fh)

    def measure(self, scenario: Scenario, server: Server, duration: float) -> dict[str, Any]:
        lines, mode = self.lines_for(scenario, duration)
        generator = self.generator_for(scenario)
        connections = self.args.connections
        done_file = self.workdir / "wrk.done"
        cpu_before = cpu_seconds(server.process.pid)
        if generator == "wrk":
            assert self.wrk is not None
            threads = self.args.threads
            argv = [self.wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout",
                    "5s", "-s", str(LUA), server.url, "--", PATH, str(lines) if lines else "-", mode, "0",
                    str(done_file), str(self.offsets.get(lines, 0)) if lines else "0", str(threads)]
            result = run_wrk(argv, done_file, duration + 90, self.generator_cpus)
        else:
            argv = [sys.executable, str(HERE / "loadgen.py"), server.url, "--path", PATH,
                    "--duration", str(duration), "--connections", str(connections)]
            if lines:
                argv += ["--lines", str(lines), "--mode", mode, "--offset", str(self.offsets.get(lines, 0))]
            if scenario.tls:
                argv += ["--cafile", str(self.material.ca_pem), "--cert", str(self.material.client_cert),
                         "--key", str(self.material.client_key)]
            done = subprocess.run(argv, cwd=HERE, capture_output=True, text=True, timeout=duration + 90,
                                  preexec_fn=_pin(self.generator_cpus))
            if done.returncode != 0:
                raise RuntimeError(f"{generator} failed for {scenario.name}: {done.stderr[-2000:]}")
            result = _parse(done.stdout)
        if lines is not None and mode == "cycle":
            self.offsets[lines] = self.offsets.get(lines, 0) + result["requests"]
        cpu = cpu_seconds(server.process.pid) - cpu_before
        result["server_cpu_us_per_req"] = cpu / result["requests"] * 1e6 if result["requests"] else 0.0
        result["server_cpu_share"] = cpu / (result["duration_us"] / 1e6) if result["duration_us"] else 0.0
        if mode == "once" and lines is not None and result["requests"] >= self._line_count(lines):
            result["exhausted"] = True  # ran out of fresh proofs before the duration ended
        seconds = result["duration_us"] / 1e6
        result["rps"] = result["requests"] / seconds if seconds else 0.0
        result["generator"] = generator
        result["errors"] = sum(result[k] for k in ("err_connect", "err_read", "err_write", "err_status",
                                                   "err_timeout"))
        if result["rps"]:
            self.rate_estimate[scenario.name] = result["rps"]
        return result


# -- every server under test must refuse bad credentials before it is timed ---------------------------------

def _status(url: str, headers: dict[str, str]) -> int:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request("GET", PATH, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def _tampered(token: str) -> str:
    head, _, signature = token.rpartition(".")
    middle = len(signature) // 2
    return f"{head}.{signature[:middle]}{'A' if signature[middle] != 'A' else 'B'}{signature[middle + 1:]}"


def refusal_checks(scenario: Scenario, server: Server, material: Material) -> list[str]:
    """What a correct check must refuse, sent once before any timing; the failures (empty: all refused).

    Calibration servers are exempt (they check nothing or only a signature, by design); the TLS scenario is
    covered by the test suite."""
    peers = {s.peer for s in SCENARIOS}
    if scenario.tls or scenario.headers not in ("token", "unique", "dpop") or not (
            scenario.server == "ztmw" or scenario.name in peers):
        return []
    m, url, failures = material, server.url, []

    def expect(label: str, headers: dict[str, str], allowed: bool) -> None:
        status = _status(url, headers)
        if (status == 200) != allowed or (not allowed and status not in (400, 401, 403)):
            failures.append(f"{label}: answered {status}")

    if scenario.headers in ("token", "unique"):
        expect("valid token", {"Authorization": f"Bearer {m.token}"}, True)
        expect("valid token again (cached)", {"Authorization": f"Bearer {m.token}"}, True)
        expect("no credentials", {}, False)
        expect("bad signature", {"Authorization": f"Bearer {_tampered(m.mint())}"}, False)
        expect("missing scope", {"Authorization": "Bearer " + m.es256.mint(
            scope="other:read", audience=AUDIENCE, lifetime=600)}, False)
        expect("expired", {"Authorization": "Bearer " + m.es256.mint(
            scope=SCOPE, audience=AUDIENCE, lifetime=-120)}, False)
        expect("other audience", {"Authorization": "Bearer " + m.es256.mint(
            scope=SCOPE, audience="https://other.example", lifetime=600)}, False)
    else:
        bearer = f"DPoP {m.dpop_token}"
        good, replayed, elsewhere = m.dpop.proofs(2) + m.dpop.proofs(1, htu=PUBLIC_ORIGIN + "/hello/bob")
        expect("valid proof", {"Authorization": bearer, "DPoP": good}, True)
        expect("replayed proof", {"Authorization": bearer, "DPoP": good}, False)
        expect("no proof", {"Authorization": bearer}, False)
        expect("proof for another URI", {"Authorization": bearer, "DPoP": elsewhere}, False)
        expect("tampered proof", {"Authorization": bearer, "DPoP": _tampered(replayed)}, False)
        other = m.mint(cnf={"jkt": "A" * 43})
        m.dpop.bind(other)
        expect("proof by another key than cnf.jkt", {"Authorization": f"DPoP {other}",
                                                     "DPoP": m.dpop.proofs(1)[0]}, False)
        m.dpop.bind(m.dpop_token)
    return failures


# -- reporting -------------------------------------------------------------------------------------------------

def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def summarize(samples: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, runs in samples.items():
        out[name] = {
            "rps": median([r["rps"] for r in runs]),
            "p50_ms": median([r["p50_us"] for r in runs]) / 1000,
            "p99_ms": median([r["p99_us"] for r in runs]) / 1000,
            "rounds": len(runs),
            "rps_all": [round(r["rps"], 1) for r in runs],
            "errors": sum(r["errors"] for r in runs),
            "requests": sum(r["requests"] for r in runs),
            "generator": runs[0]["generator"] if runs else None,
            "cpu_us_per_req": median([r["server_cpu_us_per_req"] for r in runs]),
            "cpu_share": median([r["server_cpu_share"] for r in runs]),
        }
    for name, row in out.items():
        base = BY_NAME[name].baseline
        row["baseline"] = base
        row["ratio"] = row["rps"] / out[base]["rps"] if base in out and out[base]["rps"] else None
        # the same ratio from server CPU time per request: what a whole core would give, less sensitive to
        # other processes competing for the CPU than req/s is
        row["cpu_ratio"] = (out[base]["cpu_us_per_req"] / row["cpu_us_per_req"]
                            if base in out and row["cpu_us_per_req"] else None)
        if base is None:
            row["ratio"] = row["cpu_ratio"] = 1.0
    return out


def evaluate_targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for scenario, denominator, minimum, text in TARGETS:
        if scenario not in summary or denominator not in summary or not summary[denominator]["rps"]:
            continue
        ratio = summary[scenario]["rps"] / summary[denominator]["rps"]
        cpu_ratio = (summary[denominator]["cpu_us_per_req"] / summary[scenario]["cpu_us_per_req"]
                     if summary[scenario]["cpu_us_per_req"] else 0.0)
        rows.append({"target": text, "scenario": scenario, "against": denominator, "minimum": minimum,
                     "ratio": round(ratio, 3), "pass": ratio >= minimum, "cpu_ratio": round(cpu_ratio, 3),
                     "cpu_pass": cpu_ratio >= minimum})
    return rows


def raw_es256_verify_us(count: int = 2000) -> float:
    """One ES256 signature check in OpenSSL (via cryptography), measured in this run: the floor of any
    middleware that verifies a signature per request, whatever it is written in."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    public, data, algorithm = key.public_key(), b"x" * 300, ec.ECDSA(hashes.SHA256())
    signature = key.sign(data, algorithm)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(count):
            public.verify(signature, data, algorithm)
        best = min(best, (time.perf_counter() - started) / count * 1e6)
    return best


CALIBRATIONS = [
    ("noop", "any aiohttp middleware (no-op middleware)"),
    ("hash-cache", "a hand-written token cache: sha256(token) -> dict, exp checked on a hit"),
    ("es256-only", "any verifier of a new token: its ES256 signature check alone"),
    ("busy-2us", "a middleware doing 2 us of work (how work is amplified here)"),
]


def ceilings(summary: dict[str, dict[str, Any]], verify_us: float) -> list[dict[str, Any]]:
    """What no implementation could beat on this machine, to read the targets against: a no-op aiohttp
    middleware (its dispatch alone), the hand-written hash-and-dict cache, a middleware that checks an ES256
    signature and nothing else (against bare aiohttp and against the PyJWT middleware), bare aiohttp plus one
    ES256 check timed in process; and, to read them with, what 2 us of work per request costs in the ratio."""
    rows = []
    for name, label in CALIBRATIONS:
        if name in summary and summary[name]["ratio"] is not None:
            rows.append({"ceiling": label, "ratio": round(summary[name]["ratio"], 3),
                         "cpu_ratio": round(summary[name]["cpu_ratio"], 3)})
    if "es256-only" in summary and "pyjwt-es256" in summary:
        signature, pyjwt = summary["es256-only"], summary["pyjwt-es256"]
        rows.append({"ceiling": "any verifier of a new token, against the hand-written PyJWT ES256 middleware",
                     "ratio": round(signature["rps"] / pyjwt["rps"], 3),
                     "cpu_ratio": round(pyjwt["cpu_us_per_req"] / signature["cpu_us_per_req"], 3)})
    if "bare" in summary and summary["bare"]["cpu_us_per_req"]:
        bare = summary["bare"]["cpu_us_per_req"]
        rows.append({"ceiling": f"bare aiohttp + one ES256 verification ({verify_us:.0f} us)",
                     "ratio": None, "cpu_ratio": round(bare / (bare + verify_us), 3)})
    return rows


def table(summary: dict[str, dict[str, Any]]) -> list[str]:
    lines = [f"| {'scenario':<21} | {'req/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} | {'ratio':>6} | "
             f"{'vs':<9} | {'CPU us/req':>10} | {'CPU ratio':>9} | {'errors':>6} | generator |",
             f"|{'-' * 23}|{'-' * 9}:|{'-' * 8}:|{'-' * 8}:|{'-' * 7}:|{'-' * 11}|{'-' * 11}:|{'-' * 10}:|"
             f"{'-' * 7}:|-----------|"]
    for s in SCENARIOS:
        row = summary.get(s.name)
        if row is None:
            continue
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        cpu_ratio = f"{row['cpu_ratio']:.2f}" if row["cpu_ratio"] is not None else "-"
        lines.append(f"| {s.name:<21} | {row['rps']:>8.0f} | {row['p50_ms']:>7.2f} | {row['p99_ms']:>7.2f} | "
                     f"{ratio:>6} | {row['baseline'] or '-':<9} | {row['cpu_us_per_req']:>10.0f} | "
                     f"{cpu_ratio:>9} | {row['errors']:>6} | {row['generator']:<9} |")
    return lines


def peer_rows(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """ztmw against what a user would write by hand, in the same run: both as a share of bare aiohttp."""
    rows = []
    bare = summary.get("bare")
    for s in SCENARIOS:
        if s.peer is None or s.name not in summary or s.peer not in summary or not summary[s.peer]["rps"]:
            continue
        ztmw, peer = summary[s.name], summary[s.peer]
        rows.append({
            "scenario": s.name, "peer": s.peer,
            "bare_rps": round(bare["rps"]) if bare else None,
            "ztmw_vs_bare": round(ztmw["rps"] / bare["rps"], 3) if bare and bare["rps"] else None,
            "peer_vs_bare": round(peer["rps"] / bare["rps"], 3) if bare and bare["rps"] else None,
            "ratio": round(ztmw["rps"] / peer["rps"], 3),
            "cpu_ratio": round(peer["cpu_us_per_req"] / ztmw["cpu_us_per_req"], 3) if ztmw["cpu_us_per_req"] else None,
        })
    return rows


def peer_table(rows: list[dict[str, Any]]) -> list[str]:
    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    lines = ["| scenario | bare | ztmw | peer | ztmw ÷ peer | CPU-time ztmw ÷ peer |",
             "|---|---:|---:|---|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['scenario']} | {row['bare_rps'] or '-'} req/s | {share(row['ztmw_vs_bare'])} | "
                     f"{row['peer']}: {share(row['peer_vs_bare'])} | **{row['ratio']:.2f}** | "
                     f"{'-' if row['cpu_ratio'] is None else format(row['cpu_ratio'], '.2f')} |")
    return lines


def chart(summary: dict[str, dict[str, Any]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [s.name for s in SCENARIOS if s.name in summary]
    rps = [summary[n]["rps"] for n in names]
    colors = ["#888888" if BY_NAME[n].server != "ztmw" else "#2a7ab9" for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    bars = ax1.barh(names[::-1], rps[::-1], color=colors[::-1])
    for bar, n in zip(bars, names[::-1]):
        ratio = summary[n]["ratio"]
        label = f"{summary[n]['rps']:.0f}" + (f"  ({ratio:.2f}x {summary[n]['baseline']})"
                                               if ratio is not None and summary[n]["baseline"] else "")
        ax1.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + label, va="center", fontsize=8)
    ax1.set_xlabel("requests/s (median of rounds)")
    ax1.set_xlim(0, max(rps) * 1.45 if rps else 1)
    ax1.set_title(title, fontsize=9)
    p50 = [summary[n]["p50_ms"] for n in names][::-1]
    p99 = [summary[n]["p99_ms"] for n in names][::-1]
    y = range(len(names))
    ax2.barh([i + 0.2 for i in y], p99, height=0.4, label="p99", color="#d98c3a")
    ax2.barh([i - 0.2 for i in y], p50, height=0.4, label="p50", color="#5aa05a")
    ax2.set_yticks(list(y))
    ax2.set_yticklabels(names[::-1])
    ax2.set_xlabel("latency ms (median of rounds)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def cache_check(path: Path | None) -> dict[str, int] | None:
    """Count the audit events' cache field: proves the uncached scenario missed and the cached one hit."""
    if path is None or not path.exists():
        return None
    counts = {"hit": 0, "miss": 0, "lines": 0}
    with open(path, "rb") as fh:
        for line in fh:
            counts["lines"] += 1
            compact = line.replace(b'": "', b'":"')  # structlog's renderer puts a space after the colon
            if b'"cache":"hit"' in compact:
                counts["hit"] += 1
            elif b'"cache":"miss"' in compact:
                counts["miss"] += 1
    return counts


# -- main ------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short rounds (< 3 minutes in all)")
    parser.add_argument("--only", help="comma-separated scenarios: " + ",".join(s.name for s in SCENARIOS))
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--duration", type=float, help="seconds per load run")
    parser.add_argument("--warmup", type=float)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (-t)")
    parser.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--audit-log", choices=["file", "devnull"], default="file",
                        help="where ztmw serve's JSON lines go (default: a file in the work dir)")
    parser.add_argument("--unique-tokens", type=int, help="distinct tokens for the uncached scenarios")
    parser.add_argument("--max-proofs", type=int, default=250_000, help="cap on DPoP proofs per run")
    parser.add_argument("--no-micro", action="store_true", help="skip the in-process stage micro-benchmarks")
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and generator to CPUs")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (configs, audit logs)")
    parser.add_argument("--out", default=str(RESULTS), help="results directory")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.duration = args.duration or (3.0 if args.quick else 7.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    args.unique_tokens = args.unique_tokens or (5000 if args.quick else 20000)
    if not (1 <= args.rounds <= 50 and 0.5 <= args.duration <= 120 and 0 <= args.warmup <= 30):
        parser.error("rounds 1..50, duration 0.5..120 s, warmup 0..30 s")
    if not (1 <= args.connections <= 1000):
        parser.error("connections 1..1000")
    return args


def missing_tools(args: argparse.Namespace) -> list[str]:
    """What the benchmark needs beyond ztmw itself, each with the command that installs it."""
    missing = []
    try:
        import jwt  # noqa: F401 - PyJWT: the hand-written peers
    except ImportError:
        missing.append("PyJWT (the hand-written peers): pip install -e '.[bench]'  (or: pip install 'pyjwt[crypto]')")
    if args.generator in ("auto", "wrk") and shutil.which("wrk") is None:
        missing.append("wrk (the load generator): apt-get install -y wrk  (or run with --generator python: "
                       "the bundled loadgen.py, which measures less precisely)")
    return missing


def _redis_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_tools(args)
    if missing:
        print("ztmw bench needs:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    if args.generator == "python":
        args.generator = "python"
    selected = SCENARIOS
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in BY_NAME]
        if unknown:
            print(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(BY_NAME)}", file=sys.stderr)
            return 2
        selected = [s for s in SCENARIOS if s.name in wanted]
    # a ratio needs its baseline measured in the same run
    for s in list(selected):
        for needed in (s.baseline, s.peer):
            if needed and needed not in {x.name for x in selected}:
                print(f"note: adding {needed!r} for {s.name}", file=sys.stderr)
                selected = [x for x in SCENARIOS if x in selected or x.name == needed]

    if any("redis://" in str(x.config.get("replay_store", "")) for x in selected) and not _redis_answers():
        print("note: no Redis on 127.0.0.1:6379 (apt-get install -y redis-server): skipping ztmw-dpop-redis",
              file=sys.stderr)
        selected = [x for x in selected if "redis://" not in str(x.config.get("replay_store", ""))]

    install_signal_handlers()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="ztmw-bench-"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    servers: dict[str, Server] = {}
    samples: dict[str, list[dict[str, Any]]] = {s.name: [] for s in selected}
    micro: list[dict[str, Any]] = []

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", flush=True)

    try:
        say(f"work dir {workdir}; making keys, certificates and tokens")
        material = make_material(workdir)
        runner = Runner(args, material, workdir)
        gen = f"wrk -t{args.threads}" if runner.wrk else "loadgen.py"
        say(f"generator: {gen} for plain HTTP, loadgen.py for TLS; {args.connections} connections; "
            f"{args.rounds} rounds x {args.duration:g} s; pinning: server cpu {runner.server_cpus}, "
            f"generator cpu {runner.generator_cpus}; audit lines -> {args.audit_log}")
        for s in selected:
            servers[s.name] = Server(s, material, workdir, args.audit_log, runner.server_cpus)
        for s in selected:
            servers[s.name].wait_ready()
        say(f"{len(servers)} servers up: " + ", ".join(f"{n}@{v.port}" for n, v in servers.items()))
        for s in selected:
            failures = refusal_checks(s, servers[s.name], material)
            if failures:
                raise RuntimeError(f"{s.name} does not refuse what it must, so it is not timed: "
                                   + "; ".join(failures))
        say("every peer and ztmw server refused bad credentials (signature, scope, expiry, audience, "
            "DPoP replay/htu/key)")

        order = list(selected)
        if args.warmup > 0:
            for s in order:
                result = runner.measure(s, servers[s.name], args.warmup)
                flag = f"  !! {result['errors']} errors" if result["errors"] else ""
                say(f"warm-up {s.name:<20} {result['rps']:8.0f} req/s{flag}")
                if result["requests"] == 0 or result["err_status"] > result["requests"] // 2:
                    raise RuntimeError(f"{s.name}: the server refuses the benchmark requests "
                                       f"({result['err_status']} of {result['requests']} >= 400); "
                                       + servers[s.name].stderr_path.read_text(errors="replace")[-1500:])
        total = args.rounds * len(order)
        for r in range(args.rounds):
            shift = r % len(order)
            rotated = order[shift:] + order[:shift]
            for i, s in enumerate(rotated):
                result = runner.measure(s, servers[s.name], args.duration)
                samples[s.name].append(result)
                done = r * len(order) + i + 1
                flag = f"  !! {result['errors']} errors" if result["errors"] else ""
                flag += "  !! ran out of proofs" if result.get("exhausted") else ""
                flag += f"  cpu {result['server_cpu_us_per_req']:.0f} us/req ({result['server_cpu_share']:.0%} core)"
                say(f"round {r + 1}/{args.rounds} [{done}/{total}] {s.name:<20} {result['rps']:8.0f} req/s  "
                    f"p50 {result['p50_us'] / 1000:6.2f} ms  p99 {result['p99_us'] / 1000:6.2f} ms{flag}")
            partial = summarize({k: v for k, v in samples.items() if v})
            if "bare" in partial:
                say("after round %d: " % (r + 1) + ", ".join(
                    f"{k} {v['ratio']:.2f}" for k, v in partial.items() if v["ratio"] is not None and k != "bare"))
        audit_counts = {n: cache_check(srv.audit_path) for n, srv in servers.items() if srv.audit_path}
        for srv in servers.values():
            srv.stop()

        if not args.no_micro:
            say("micro-benchmarks (in process, ns/op)")
            micro_json = workdir / "micro.json"
            argv = [sys.executable, str(HERE / "micro.py"), "--json", str(micro_json)] + (
                ["--quick"] if args.quick else [])
            subprocess.run(argv, cwd=HERE, timeout=600, check=True)
            micro = json.loads(micro_json.read_text())

        summary = summarize(samples)
        targets = evaluate_targets(summary)
        verify_us = raw_es256_verify_us()
        limits = ceilings(summary, verify_us)
        peers = peer_rows(summary)
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "mode": "quick" if args.quick else "default",
            "rounds": args.rounds, "duration_s": args.duration, "warmup_s": args.warmup,
            "connections": args.connections, "generator": gen, "audit_log": args.audit_log,
            "unique_tokens": args.unique_tokens, "cpus": os.cpu_count(),
            "pinning": {"server": sorted(runner.server_cpus or []), "generator": sorted(runner.generator_cpus or [])},
            "loadavg_at_end": os.getloadavg(),
            "python": platform.python_version(), "platform": platform.platform(),
            "elapsed_s": round(time.monotonic() - started, 1),
            "command": " ".join(["python benchmarks/run.py"] + sys.argv[1:]),
        }
        document = {"meta": meta, "scenarios": summary, "peers": peers, "targets": targets, "ceilings": limits,
                    "raw_es256_verify_us": round(verify_us, 1), "micro": micro,
                    "audit_cache_counts": audit_counts, "samples": samples,
                    "descriptions": {s.name: s.title for s in selected}}
        (out / "latest.json").write_text(json.dumps(document, indent=2), encoding="utf-8")

        lines = table(summary)
        if peers:
            lines += ["", "ztmw against the hand-written peers (medians over rounds, same run):", ""]
            lines += peer_table(peers)
        report = ["", f"ztmw benchmark ({meta['mode']}, {meta['date']}, {args.rounds} rounds x "
                      f"{args.duration:g} s, {args.connections} connections, {gen}, "
                      f"audit -> {args.audit_log}, {meta['elapsed_s']} s)", ""] + lines
        if targets:
            report += ["", "| target | req/s ratio | result | CPU-time ratio | result |", "|---|---:|---|---:|---|"]
            report += [f"| {t['target']} | {t['ratio']:.2f} | {'PASS' if t['pass'] else 'FAIL'} | "
                       f"{t['cpu_ratio']:.2f} | {'PASS' if t['cpu_pass'] else 'FAIL'} |" for t in targets]
        if limits:
            report += ["", "| ceiling on this machine (nothing can do better) | req/s ratio | CPU-time ratio |",
                       "|---|---:|---:|"]
            report += [f"| {c['ceiling']} | {'-' if c['ratio'] is None else format(c['ratio'], '.2f')} | "
                       f"{c['cpu_ratio']:.2f} |" for c in limits]
        if micro:
            report += ["", "| stage | ns/op (median) | best | note |", "|---|---:|---:|---|"]
            report += [f"| {m['stage']} | {m['ns_per_op']:,} | {m['best_ns']:,} | {m['note']} |" for m in micro]
        checks = {k: v for k, v in audit_counts.items() if v}
        if checks:
            report += ["", "audit events per scenario (cache field): " + "; ".join(
                f"{k}: {v['lines']} lines, {v['hit']} hit, {v['miss']} miss" for k, v in checks.items())]
        print("\n".join(report))
        (out / "latest.md").write_text("\n".join(report) + "\n", encoding="utf-8")
        if chart(summary, out / "latest.png", f"ztmw bench {meta['mode']} {meta['date']} ({gen})"):
            say(f"wrote {out / 'latest.json'}, latest.md, latest.png")
        else:
            say(f"wrote {out / 'latest.json'}, latest.md (no chart: pip install matplotlib)")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping servers", file=sys.stderr)
        return 130
    finally:
        kill_all()
        if args.keep:
            print(f"work dir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
