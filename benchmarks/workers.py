"""Throughput of `ztmw serve --workers 1` against `--workers 2`, measured in the same run.

    python benchmarks/workers.py [--rounds 3] [--duration 5] [--workers 1,2] [--only cached,unique,dpop]

Every server is `python -m ztmw serve apps:create_app --workers N` on 127.0.0.1 with the default audit
(structlog JSON lines on stdout, sent to /dev/null here), driven by wrk with one thread and 64 connections
(`apt-get install -y wrk`). Nothing is pinned: the workers must be free to use every core, so on a small
machine the load generator competes with them for the same cores, and the ratio shows what adding a worker
buys on *this* machine, generator included. Scenarios and worker counts are interleaved round by round;
the table shows medians, with the server's CPU time per request (parent and workers together, from /proc):
on a busy machine that is the steadier number, and equal CPU per request means N workers serve N times as
much once N cores are free for them. Every request must be answered 200: a refusal (for DPoP, a replay the shared store
caught) fails the run instead of being counted as throughput.

Scenarios: `cached` one Bearer token over and over (the cache and memo hit path); `unique` a new ES256 token
per request (a 1,000-entry cache and 20,000 tokens in rotation: every request verifies a signature); `dpop` a
new DPoP proof per request (the "memory" replay store, which two workers share as one SQLite file);
`dpop-sqlite` the same with a configured SQLite store, so one worker pays for the file too (not run by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fixtures import PATH, Material, free_port, make_material, write_lines, ztmw_config  # noqa: E402

LUA = HERE / "rotate.lua"
CONNECTIONS = 64
UNIQUE_TOKENS = 20_000
PROOFS_PER_SECOND = 14000  # more than two workers serve here; a run that runs out stops early and says so


def scenario_config(material: Material, name: str, workdir: Path) -> str:
    if name == "cached":
        return ztmw_config(material, verifiers=["bearer"], audit_sink="structlog")
    if name == "unique":
        return ztmw_config(material, verifiers=["bearer"], audit_sink="structlog", cache_entries=1000)
    store = f"sqlite://{workdir}/{name}.sqlite3" if name == "dpop-sqlite" else "memory"
    return ztmw_config(material, verifiers=["bearer", "dpop"], audit_sink="structlog", replay_store=store)


def request_lines(material: Material, name: str, duration: float, workdir: Path) -> tuple[Path, str]:
    if name == "cached":
        return write_lines(workdir / "cached.txt", [f"Authorization: Bearer {material.token}"]), "cycle"
    if name == "unique":
        lines = [f"Authorization: Bearer {t}" for t in material.unique_tokens(UNIQUE_TOKENS)]
        return write_lines(workdir / "unique.txt", lines), "cycle"
    proofs = material.dpop.proofs(int(PROOFS_PER_SECOND * duration))  # fresh for every run: iat = now
    lines = [f"Authorization: DPoP {material.dpop_token}\tDPoP: {p}" for p in proofs]
    return write_lines(workdir / f"{name}.txt", lines), "once"


class Server:
    """`ztmw serve --workers N` in its own session, so stopping it reaches every process."""

    def __init__(self, config: Path, workers: int) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ztmw", "serve", "apps:create_app", "--config", str(config), "--host",
             "127.0.0.1", "--port", str(self.port), "--workers", str(workers)],
            cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                time.sleep(1.0)  # every worker listening and warm before the clock starts
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("server did not start: " + self.process.stderr.read().decode()[-2000:]
                                       if self.process.stderr else "server did not start")
                time.sleep(0.05)

    def pids(self) -> list[int]:
        """The parent and its workers (the workers are the parent's children)."""
        pid = self.process.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        return [pid, *(int(c) for c in children)]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # the parent passes SIGTERM to its workers
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes, from /proc."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run_wrk(url: str, lines: Path, mode: str, duration: float, workdir: Path) -> dict[str, Any]:
    done = workdir / "wrk.done"
    done.unlink(missing_ok=True)
    argv = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration:g}s", "-s", str(LUA), url, "--", PATH, str(lines),
            mode, "0", str(done)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + duration + 30
    while process.poll() is None:
        if done.exists():
            process.send_signal(2)  # out of proofs: SIGINT ends wrk now, its req/s stays honest
            break
        if time.monotonic() > deadline:
            process.kill()
            break
        time.sleep(0.05)
    out, err = process.communicate(timeout=30)
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            result: dict[str, Any] = json.loads(line[8:])
            result["exhausted"] = done.exists()
            return result
    raise RuntimeError(f"wrk printed no summary: {out[-1000:]} {err[-1000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--only", default="cached,unique,dpop", help="comma-separated scenarios")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("benchmarks/workers.py needs wrk (apt-get install -y wrk)")
    counts = [int(n) for n in args.workers.split(",")]
    names = args.only.split(",")
    samples: dict[tuple[str, int], list[float]] = {(s, n): [] for s in names for n in counts}
    cpu: dict[tuple[str, int], list[float]] = {(s, n): [] for s in names for n in counts}
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} CPUs usable, load average {os.getloadavg()[0]:.2f} at start; wrk -t1 -c{CONNECTIONS}, "
          f"{args.duration:g} s per run, {args.rounds} rounds", flush=True)
    with tempfile.TemporaryDirectory(prefix="ztmw-bench-workers-") as tmp:
        workdir = Path(tmp)
        material = make_material(workdir / "material")
        for round_number in range(args.rounds):
            order = counts if round_number % 2 == 0 else counts[::-1]
            for name in names:
                config = workdir / f"{name}.toml"
                config.write_text(scenario_config(material, name, workdir), encoding="utf-8")
                for workers in order:
                    lines, mode = request_lines(material, name, args.duration, workdir)
                    server = Server(config, workers)
                    try:
                        server.wait_ready()
                        pids = server.pids()
                        before = cpu_seconds(pids)
                        result = run_wrk(f"http://127.0.0.1:{server.port}", lines, mode, args.duration, workdir)
                        used = cpu_seconds(pids) - before
                    finally:
                        server.stop()
                    errors = sum(v for k, v in result.items() if k.startswith("err_"))
                    if errors:
                        raise SystemExit(f"{name} with {workers} workers: {errors} errors/refusals: {result}")
                    rate = result["requests"] / (result["duration_us"] / 1e6)
                    samples[(name, workers)].append(rate)
                    cpu[(name, workers)].append(used / result["requests"] * 1e6)
                    note = "  (ran out of proofs)" if result["exhausted"] else ""
                    print(f"round {round_number + 1}: {name:<11} workers={workers}  {rate:8.0f} req/s  "
                          f"p99 {result['p99_us'] / 1000:6.1f} ms  server CPU {cpu[(name, workers)][-1]:5.0f} "
                          f"us/req{note}", flush=True)
    print(f"\n| scenario | {' | '.join(f'{n} worker(s) req/s' for n in counts)} | "
          f"{' | '.join(f'{n} ÷ {counts[0]}' for n in counts[1:])} | "
          f"{' | '.join(f'CPU µs/req, {n}' for n in counts)} |")
    print("|---|" + "---:|" * (3 * len(counts) - 1))
    for name in names:
        medians = [statistics.median(samples[(name, n)]) for n in counts]
        ratios = [f"{m / medians[0]:.2f}" for m in medians[1:]]
        costs = [f"{statistics.median(cpu[(name, n)]):.0f}" for n in counts]
        print(f"| {name} | {' | '.join(f'{m:.0f}' for m in medians)} | {' | '.join(ratios)} | "
              f"{' | '.join(costs)} |")
    print(f"load average {os.getloadavg()[0]:.2f} at the end (other work on the machine skews every number)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
