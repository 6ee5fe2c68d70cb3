"""`ztmw serve --workers N`: N processes serving one port, and the state they must share to stay safe.

The parent is a small supervisor that never serves a request. It reserves the address (a socket bound with
SO_REUSEPORT and never listening, so the kernel hands it no connection), then starts N `ztmw serve` child
processes with the same arguments; each binds the address with SO_REUSEPORT and the kernel spreads new
connections across them. Children are fresh interpreters, not forks: an app factory may start threads or loops
that a fork would copy half-alive.

What one process keeps to itself and N processes must not:
- DPoP proof ids: a proof replayed to another worker must be refused. A configured Redis store is shared
  already; "memory" becomes a SQLite file in a private temporary directory that all children open
  (`ztmw_plugins.replay_sqlite`), removed when the parent exits.
- The DPoP nonce secret: a nonce one worker issued must verify at the others. When the configured variable
  (`dpop.nonce_secret_env`) is unset, the parent puts one random secret into the children's environment; it is
  never logged and never written to disk.
The verification cache and the decision memo stay per process: they only hold results each worker verified.

Lifetimes: SIGTERM or SIGINT to the parent is passed to every child, which shuts down gracefully; if a child
exits on its own, the parent stops the others and exits non-zero (a supervisor such as systemd restarts the
whole set); if the parent dies, even by SIGKILL, each child sees its lifeline pipe close and stops.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from .config import Config, DPoPConfig
from .errors import ConfigurationError

MAX_WORKERS = 512
STOP_TIMEOUT = 70.0  # seconds a child may take to shut down after SIGTERM (aiohttp waits up to 60 for handlers)
_POLL = 0.1


def worker_count(text: str) -> int:
    """`--workers` value: a positive number, or "auto" for the CPUs this process may run on."""
    if text == "auto":
        affinity = getattr(os, "sched_getaffinity", None)
        return len(affinity(0)) if affinity else (os.cpu_count() or 1)
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of processes or 'auto', got {text!r}") from None
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"between 1 and {MAX_WORKERS}, got {count}")
    return count


def add_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--workers", type=worker_count, default=1, metavar="N|auto",
                       help="processes serving the port (default 1; auto: one per CPU)")
    # set by the parent for its children only
    serve.add_argument("--worker-id", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--worker-lifeline", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--worker-replay-store", default=None, help=argparse.SUPPRESS)


def is_supervisor(args: argparse.Namespace) -> bool:
    return bool(args.workers > 1 and args.worker_id is None)


def under_gunicorn() -> bool:
    """True inside a gunicorn worker (or master): gunicorn's arbiter is loaded before any worker forks.

    gunicorn can add workers at any time (TTIN) and restarts them (`max_requests`, timeouts), so its worker
    count at start-up says nothing reliable: callers treat every gunicorn process as one of several.
    """
    return "gunicorn.arbiter" in sys.modules or os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn/")


def refuse_per_process_state(dpop: DPoPConfig, environ: Mapping[str, str]) -> None:
    """Under gunicorn, DPoP state that one process would keep to itself is a start-up error, not a silent hole.

    With a "memory" replay store a proof replayed to another worker (or to a worker gunicorn just restarted)
    would pass; with a per-process nonce secret the other workers would refuse every nonce. `ztmw serve
    --workers` shares both by itself; gunicorn cannot, so the settings must.
    """
    if not under_gunicorn():
        return
    problems = []
    if dpop.replay_store == "memory":
        problems.append('dpop.replay_store = "memory" keeps proof ids in one process: set it to '
                        '"sqlite:///a/path/on/this/host" or a redis:// URL')
    if dpop.require_nonce and not environ.get(dpop.nonce_secret_env):
        problems.append(f"dpop.require_nonce with {dpop.nonce_secret_env} unset gives each process its own "
                        f"nonce secret: set {dpop.nonce_secret_env} to one secret (16 bytes or more) for all")
    if problems:
        raise ConfigurationError("gunicorn runs several worker processes and replaces them at will; "
                                 + "; ".join(problems))


# -- the child side -------------------------------------------------------------------------------------------


def enter_worker(args: argparse.Namespace, config: Config) -> Config:
    """In a child: watch the lifeline, and use the replay store the parent chose. Identity for a lone server."""
    if args.worker_id is None:
        return config
    if args.worker_lifeline is not None:
        threading.Thread(target=_stop_when_orphaned, args=(args.worker_lifeline,), daemon=True,
                         name="ztmw-lifeline").start()
    if args.worker_replay_store:
        config = dataclasses.replace(config, dpop=dataclasses.replace(config.dpop,
                                                                      replay_store=args.worker_replay_store))
    return config


def _stop_when_orphaned(fd: int) -> None:
    """The parent holds the write end and never writes: end of file means it is gone, whatever killed it."""
    while True:
        try:
            if not os.read(fd, 1):
                break
        except InterruptedError:  # pragma: no cover - PEP 475 retries, but be explicit
            continue
        except OSError:
            break
    os.kill(os.getpid(), signal.SIGTERM)  # aiohttp's run_app turns it into a graceful shutdown


# -- the parent side ------------------------------------------------------------------------------------------


def reserve(host: str, port: int) -> list[socket.socket]:
    """Bind (never listen) every address of host:port with SO_REUSEPORT; port 0 becomes one free port.

    Holding the address for the parent's lifetime makes "address in use" a start-up error of the parent, and
    the kernel's rule that only sockets of the same user can join a SO_REUSEPORT group protects the port.
    """
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigurationError("--workers needs SO_REUSEPORT, which this platform does not have")
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ConfigurationError(f"cannot bind {host}:{port}: {exc.strerror or exc}") from None
    return sockets


@dataclasses.dataclass
class _Child:
    index: int
    process: subprocess.Popen[bytes]


def supervise(args: argparse.Namespace, config: Config, argv: Sequence[str]) -> int:
    """Run `args.workers` children of `ztmw serve argv` (or `gateway`) until a signal or a child's exit; the
    exit status."""
    try:
        sockets = reserve(args.host, args.port)
    except ConfigurationError as exc:
        print(f"ztmw: {exc}", file=sys.stderr)
        return 2
    port = sockets[0].getsockname()[1]
    environment = dict(os.environ)
    if not environment.get(config.dpop.nonce_secret_env):
        environment[config.dpop.nonce_secret_env] = secrets.token_urlsafe(32)
    shared: list[str] = []
    private_dir = None
    if config.dpop.replay_store == "memory":
        private_dir = os.path.abspath(tempfile.mkdtemp(prefix="ztmw-workers-"))  # mode 0700
        shared = ["--worker-replay-store", f"sqlite://{private_dir}/dpop-replay.sqlite3"]
    lifeline_read, lifeline_write = os.pipe()
    stop: list[int] = []
    previous = _handle_signals(lambda signum: stop.append(signum))
    children: list[_Child] = []
    try:
        for index in range(args.workers):
            own = ["--port", str(port), "--worker-id", str(index), "--worker-lifeline", str(lifeline_read), *shared]
            command = [sys.executable, "-m", "ztmw", *_with_options(argv, args.command, own)]
            children.append(_Child(index, subprocess.Popen(command, env=environment, pass_fds=(lifeline_read,))))
        os.close(lifeline_read)
        lifeline_read = -1
        _log(f"{args.workers} workers on {args.host}:{port}, pids "
             f"{' '.join(str(c.process.pid) for c in children)}")
        status = _watch(children, stop)
    finally:
        _stop_all(children)
        _handle_signals(None, previous)
        for fd in (lifeline_read, lifeline_write):
            if fd >= 0:
                os.close(fd)
        for sock in sockets:
            sock.close()
        if private_dir is not None:
            shutil.rmtree(private_dir, ignore_errors=True)
    return status


def _with_options(argv: Sequence[str], command: str, options: list[str]) -> list[str]:
    """`argv` with `options` right after the subcommand: after a `--` they would reach the app factory."""
    at = list(argv).index(command) + 1
    return [*argv[:at], *options, *argv[at:]]


def _watch(children: list[_Child], stop: list[int]) -> int:
    while not stop:
        for child in children:
            code = child.process.poll()
            if code is not None:
                how = f"code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
                _log(f"worker {child.index} (pid {child.process.pid}) exited with {how}; stopping the others")
                return code if code > 0 else 1
        time.sleep(_POLL)
    return 0


def _stop_all(children: list[_Child]) -> None:
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for child in children:
        try:
            child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _handle_signals(handler: Callable[[int], None] | None, previous: dict[int, Any] | None = None) -> dict[int, Any]:
    """Install `handler` for SIGTERM/SIGINT (returning what was there), or put `previous` back."""
    if previous is not None:
        for signum, old in previous.items():
            signal.signal(signum, old)
        return {}
    assert handler is not None
    return {signum: signal.signal(signum, lambda s, _frame: handler(s)) for signum in _SIGNALS}


def _log(message: str) -> None:
    """The parent's few lines go to stderr: stdout carries the children's JSON audit lines."""
    print(f"ztmw: {message}", file=sys.stderr, flush=True)
