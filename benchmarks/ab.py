"""Two or more builds of ztmw side by side, live: which costs less a request, measured in the same rounds.

    python benchmarks/ab.py unique before=/tmp/ztmw-old after=.           # a change, on distinct tokens
    python benchmarks/ab.py cached after=. after-noaudit=.:noaudit         # what audit costs on a repeated token

Each NAME=CHECKOUT[:noaudit] is a `ztmw serve` process whose PYTHONPATH puts that checkout's `ztmw` and
`ztmw_plugins` first (any other package comes from this interpreter's environment), with the benchmark's
configuration (`:noaudit`: audit off), pinned to CPU 0. wrk (`-t2 -c64`, `rotate.lua`) on CPU 1 sends one
cached token (`cached`) or 20,000 distinct tokens against a cache of 1,000 (`unique`), the builds in turn,
the order rotated each round. Each round prints every build's server CPU time a request, the end their
medians: `run.py` compares ztmw with the hand-written peers, this compares ztmw with itself. On a 2-core
machine differences under about 1 µs (cached) or 3 µs (unique) are noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from fixtures import PATH, make_material, write_lines
from run import LUA, Scenario, Server, cpu_seconds, run_wrk

SERVER_CPUS, GENERATOR_CPUS = {0}, {1}


def _build(spec: str) -> tuple[str, Path, bool]:
    name, sep, rest = spec.partition("=")
    checkout, _, option = rest.partition(":")
    if not sep or not name or not checkout or option not in ("", "noaudit"):
        raise SystemExit(f"{spec!r}: expected NAME=CHECKOUT or NAME=CHECKOUT:noaudit")
    path = Path(checkout).resolve()
    if not (path / "ztmw" / "__init__.py").is_file():
        raise SystemExit(f"{spec!r}: {path} is not a ztmw checkout")
    return name, path, option == "noaudit"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=("cached", "unique"))
    parser.add_argument("builds", nargs="+", metavar="NAME=CHECKOUT[:noaudit]")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=int, default=5, help="seconds a build is loaded each round")
    args = parser.parse_args()
    builds = [_build(spec) for spec in args.builds]
    work = Path(tempfile.mkdtemp(prefix="ztmw-ab-"))
    material = make_material(work)
    unique = args.scenario == "unique"
    tokens = material.unique_tokens(20000) if unique else [material.token]
    lines = write_lines(work / "tokens.lines", [f"Authorization: Bearer {token}" for token in tokens])
    servers: list[tuple[str, Server]] = []
    inherited = os.environ.get("PYTHONPATH")
    try:
        for name, checkout, noaudit in builds:
            config: dict[str, Any] = {"verifiers": ["bearer"], "audit": not noaudit}
            if unique:
                config["cache_entries"] = 1000
            # run.py's server, with this build's packages first on the path it inherits
            os.environ["PYTHONPATH"] = os.pathsep.join([str(checkout), str(checkout / "plugins")])
            server = Server(Scenario(name, name, "ztmw", config=config, audit=not noaudit), material, work, "file",
                            SERVER_CPUS)
            servers.append((name, server))
            server.wait_ready()
        os.environ.pop("PYTHONPATH")
        if inherited is not None:
            os.environ["PYTHONPATH"] = inherited
        offset = 0
        costs: dict[str, list[float]] = {name: [] for name, _, _ in builds}
        for round_ in range(args.rounds):
            shift = round_ % len(servers)
            for name, server in servers[shift:] + servers[:shift]:
                before = cpu_seconds(server.process.pid)
                result = run_wrk(["wrk", "-t2", "-c64", f"-d{args.duration}s", "--timeout", "5s", "-s", str(LUA),
                                  server.url, "--", PATH, str(lines), "cycle", "0",
                                  str(work / "wrk.done"), str(offset), "2"], None, args.duration + 60,
                                 GENERATOR_CPUS)
                offset += result["requests"]  # the next build goes on with tokens none has seen
                if result["err_status"]:
                    raise SystemExit(f"{name}: {result['err_status']} requests were refused")
                costs[name].append((cpu_seconds(server.process.pid) - before) / result["requests"] * 1e6)
                print(f"round {round_ + 1}  {name:16} {costs[name][-1]:7.1f} us/req", flush=True)
        for name, values in costs.items():
            print(f"{name:16} median {statistics.median(values):7.1f} us/req  (min {min(values):.1f})")
    finally:
        for _, server in servers:
            server.stop()


if __name__ == "__main__":
    main()
