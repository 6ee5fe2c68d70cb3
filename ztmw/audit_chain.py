"""A tamper-evident audit log: one hash-chained JSON line per AuditEvent, and a verifier for it.

Each line is the canonical JSON (sorted keys, no whitespace, non-ASCII escaped as ``\\uXXXX``, so the bytes
are ASCII and therefore UTF-8) of every AuditEvent field plus:

- ``ts``: when the line was written (ISO 8601, UTC, from the pipeline clock);
- ``chain_id``: 128 random bits (hex), new for every sink instance, i.e. for every process start;
- ``seq``: 0, 1, 2, ... within the chain;
- ``prev``: hex SHA-256 of the previous line of the chain exactly as written (64 zeros for seq 0);
- ``alg``: ``"sha256"`` or ``"hmac-sha256"`` (keyed);
- ``hash``: hex SHA-256, or HMAC-SHA256 under a secret key, of the canonical JSON of all the other members.

Several processes may append to one file: each writes its own chain, and `verify` groups lines by
``chain_id`` and checks each chain in ``seq`` order, so the order of lines in the file does not matter.

What it proves, and what it does not:

- **Unkeyed** (``alg = "sha256"``): detects a line changed, removed or inserted *in the middle* of a chain,
  a chain whose first lines are gone, and any line that is not exactly as the sink wrote it. It does **not**
  detect removal of the *last* lines of a chain (truncation of the tail), removal of a whole chain, or a full
  rewrite: anyone who can write the file can recompute every hash, or append a forged chain of their own.
- **Keyed** (``[plugins.chain] key_env``): the hash is an HMAC under a secret the attacker does not hold, so a
  changed or forged line cannot be given a valid hash, and a rewrite without the key fails verification.
  Truncation of the tail is still undetectable from the file alone: ship the lines off-box as they are
  written (log shipper, remote syslog, append-only storage) and compare the last ``seq`` of each chain.

Writing: `emit` never raises. Each line is assembled in memory and handed to the OS in one append-mode
``write`` (the file is unbuffered in Python, so every line is flushed as it is written; no ``fsync``: an OS
crash can lose the last lines, which verification then cannot tell from truncation). That costs a JSON dump,
a hash and one syscall to the page cache: it does not block the event loop for long unless the disk itself
stalls (keep the file on a local disk). One write per line also keeps lines from several processes appending
to the same local file from interleaving. A write that fails still consumes its ``seq``, so the loss shows up
as a gap when the file is verified, and a warning ``ztmw.audit_chain_write_failed`` is logged.

Events carry no token, proof or secret by construction (see `ztmw.models.AuditEvent`); the subject is
pseudonymised as ``[audit] subject`` says.

Verify with ``ztmw audit verify FILE [--key-env NAME]`` or ``python -m ztmw.audit_chain verify FILE``:
exit 0 when every link is intact, 1 naming the first broken link, 2 when the file or key cannot be read.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Iterable, Mapping, Sequence

import structlog

from .errors import ConfigurationError
from .models import AuditEvent
from .typing import Clock, PluginDeps

ZERO_HASH = "0" * 64
ALG_PLAIN = "sha256"
ALG_KEYED = "hmac-sha256"
MIN_KEY_BYTES = 16
CHAIN_FIELDS = ("ts", "chain_id", "seq", "prev", "alg", "hash")
EVENT_FIELDS = tuple(f.name for f in dataclasses.fields(AuditEvent))
if set(CHAIN_FIELDS) & set(EVENT_FIELDS):  # pragma: no cover - guards a future AuditEvent field
    raise ImportError(f"AuditEvent fields collide with chain fields: {set(CHAIN_FIELDS) & set(EVENT_FIELDS)}")

_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def canonical(obj: Mapping[str, Any]) -> bytes:
    """Sorted keys, no whitespace, ASCII (non-ASCII escaped): the exact bytes that are hashed and written."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def line_digest(line: bytes) -> str:
    """What the next line's ``prev`` holds: plain SHA-256 of a whole line (its keyed ``hash`` included)."""
    return hashlib.sha256(line).hexdigest()


def record_hash(body: Mapping[str, Any], key: bytes | None) -> str:
    """The ``hash`` member: over the canonical JSON of every other member, keyed when a key is given."""
    data = canonical(body)
    if key is None:
        return hashlib.sha256(data).hexdigest()
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def _plain(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


class ChainedAuditSink:
    """An AuditSink (`ztmw.typing.AuditSink`) that writes a hash-chained JSON line per event.

    `target` is a path (opened for append, unbuffered, on `open()`, on entering ``with``, or on the first
    event) or a text stream the caller owns (written and flushed per line, never closed here). `key` makes the
    chain keyed (HMAC-SHA256). After `close()` further events are dropped (and counted in `dropped`).
    """

    name = "chain"

    def __init__(
        self,
        target: str | os.PathLike[str] | IO[str],
        *,
        key: bytes | None = None,
        clock: Clock = time.time,
        logger: Any = None,
    ) -> None:
        if key is not None and len(key) < MIN_KEY_BYTES:
            raise ValueError(f"an audit chain key needs at least {MIN_KEY_BYTES} bytes")
        if isinstance(target, (str, os.PathLike)):
            self.path: Path | None = Path(target)
            self._stream: IO[str] | None = None
        else:
            self.path = None
            self._stream = target
        self._file: Any = None
        self._closed = False
        self._torn = False
        self._key = key
        self._alg = ALG_KEYED if key is not None else ALG_PLAIN
        self._clock = clock
        self._log = logger if logger is not None else structlog.get_logger("ztmw.audit_chain")
        self.chain_id = secrets.token_hex(16)
        self.seq = 0
        self._prev = ZERO_HASH
        self.dropped = 0
        """Events that could not be written (each one is a gap in the chain, or follows `close()`)."""

    # -- lifetime ------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Open the file for append (creating it, mode 0600). Raises OSError: start-up should fail closed."""
        if self.path is None or self._file is not None:
            return
        if self._closed:
            raise RuntimeError("the audit chain sink is closed")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "ab", buffering=0)

    def close(self) -> None:
        self._closed = True
        if self._file is not None:
            file, self._file = self._file, None
            file.close()

    async def start(self) -> None:
        self.open()

    async def aclose(self) -> None:
        self.close()

    def __enter__(self) -> "ChainedAuditSink":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the AuditSink contract ----------------------------------------------------------------------------

    def emit(self, event: AuditEvent) -> None:
        """Append one line. Never raises: a failure is logged and leaves a gap that `verify` will report."""
        try:
            record: dict[str, Any] = {k: _plain(v) for k, v in dataclasses.asdict(event).items()}
            record.update(ts=_timestamp(self._clock()), chain_id=self.chain_id, seq=self.seq, prev=self._prev,
                          alg=self._alg)
            record["hash"] = record_hash(record, self._key)
            line = canonical(record)
        except Exception as exc:  # nothing was assigned a seq: the chain stays intact, the event is lost
            self._failed(exc, None)
            return
        seq = self.seq
        self.seq += 1
        self._prev = line_digest(line)  # even if the write fails: the next line then shows a gap, not a fork
        if self._closed:
            self._failed(RuntimeError("sink closed"), seq)
            return
        try:
            self._write(line)
        except Exception as exc:
            self._failed(exc, seq)

    def _write(self, line: bytes) -> None:
        if self._stream is not None:
            self._stream.write(line.decode("ascii") + "\n")
            self._stream.flush()
            return
        if self._file is None:
            self.open()
        data = (b"\n" if self._torn else b"") + line + b"\n"  # end a torn line so the next one still parses
        self._torn = True
        view = memoryview(data)
        while view:  # a regular file takes the whole line in one write; loop only on a short write
            view = view[self._file.write(view):]
        self._torn = False

    def _failed(self, exc: BaseException, seq: int | None) -> None:
        self.dropped += 1
        try:
            self._log.warning("ztmw.audit_chain_write_failed", chain_id=self.chain_id, seq=seq,
                              error=type(exc).__name__, detail=str(exc))
        except Exception:
            pass


def create(settings: Mapping[str, Any], deps: PluginDeps) -> ChainedAuditSink:
    """Entry point ``chain`` in ``ztmw.audit_sinks``: ``[plugins.chain] path = "audit.jsonl"``, ``key_env``.

    A relative path is taken from the working directory at start-up. With ``key_env`` the variable must hold
    at least 16 bytes (use 32 random bytes, e.g. ``openssl rand -hex 32``); a named but unset variable stops
    start-up rather than silently writing an unkeyed chain. The file is opened when the app starts and closed
    with it.
    """
    unknown = sorted(set(settings) - {"path", "key_env"})
    if unknown:
        raise ConfigurationError(f"plugins.chain: unknown key {unknown[0]} (known: path, key_env)")
    path = settings.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigurationError("plugins.chain.path: required, the file to append audit lines to")
    key = None
    if "key_env" in settings:
        key = key_from_env(settings["key_env"], "plugins.chain.key_env")
    sink = ChainedAuditSink(Path(path).absolute(), key=key, clock=deps.clock, logger=deps.logger)
    deps.on_startup(sink.start)
    deps.on_cleanup(sink.aclose)
    return sink


def key_from_env(name: Any, what: str) -> bytes:
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"{what}: must be the name of an environment variable")
    value = os.environ.get(name)
    if not value:
        raise ConfigurationError(f"{what}: environment variable {name} is not set")
    key = value.encode("utf-8", "surrogateescape")
    if len(key) < MIN_KEY_BYTES:
        raise ConfigurationError(f"{what}: the key in {name} is shorter than {MIN_KEY_BYTES} bytes")
    return key


# -- verification ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One broken link: where and what. `chain_id` and `seq` are None when the line did not parse."""

    line: int
    chain_id: str | None
    seq: int | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}"
        if self.chain_id is not None:
            where += f": chain {self.chain_id} seq {self.seq}"
        return f"{where}: {self.message}"


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """`problems` in line order; `ok` when there are none. `chains` maps chain id -> number of events."""

    events: int
    chains: Mapping[str, int]
    problems: tuple[Problem, ...]
    keyed: bool

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def summary(self) -> str:
        n, m = self.events, len(self.chains)
        head = f"{n} event{'s' * (n != 1)} in {m} chain{'s' * (m != 1)}"
        if self.ok:
            return f"{head}, all links intact" + (" (keyed)" if self.keyed else "")
        more = len(self.problems) - 1
        tail = f" ({more} more problem{'s' * (more != 1)} after it)" if more else ""
        return f"{head}: broken link at {self.first}{tail}"


@dataclass(slots=True)
class _Entry:
    line: int
    seq: int
    prev: str
    digest: str  # SHA-256 of the line as written: what the next line's prev must hold


def _parse(raw: bytes) -> dict[str, Any]:
    """The record on one line, or ValueError saying why it is not a line the sink wrote."""
    if not raw:
        raise ValueError("empty line")
    try:
        text = raw.decode("utf-8")
        record = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"unparseable line ({type(exc).__name__})") from None
    if not isinstance(record, dict):
        raise ValueError("unparseable line (not a JSON object)")
    chain_id, seq, prev, digest, alg = (record.get(k) for k in ("chain_id", "seq", "prev", "hash", "alg"))
    if not isinstance(chain_id, str) or not _HEX32.fullmatch(chain_id):
        raise ValueError("no valid chain_id (32 lower-case hex digits)")
    if type(seq) is not int or seq < 0:
        raise ValueError("no valid seq (a whole number >= 0)")
    for name, value in (("prev", prev), ("hash", digest)):
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            raise ValueError(f"no valid {name} (64 lower-case hex digits)")
    if alg not in (ALG_PLAIN, ALG_KEYED):
        raise ValueError(f"unknown alg {alg!r}")
    try:
        same = canonical(record) == raw
    except ValueError:
        same = False
    if not same:
        raise ValueError("not in canonical form (the line was changed after it was written)")
    return record


def _split(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    return lines


def verify(lines: Iterable[bytes | str], *, key: bytes | None = None) -> VerifyResult:
    """Check every chain in an audit file, given its lines (bytes or str, with or without the newline).

    Lines are grouped by ``chain_id`` and each chain is checked in ``seq`` order, so interleaved writers and
    reordered lines are fine; a changed, missing, duplicated or inserted line, a wrong ``prev`` or ``hash``
    and any line that is not exactly what the sink wrote are problems. With `key`, every line must carry a
    valid HMAC under it (an unkeyed line is a problem: the chain may have been rewritten without the key);
    without it, keyed lines cannot be checked and are reported as such.
    """
    messages: dict[int, list[str]] = {}
    located: dict[int, tuple[str | None, int | None]] = {}
    chains: dict[str, list[_Entry]] = {}

    def report(line: int, message: str, chain_id: str | None = None, seq: int | None = None) -> None:
        messages.setdefault(line, []).append(message)
        located.setdefault(line, (chain_id, seq))

    for number, item in enumerate(lines, start=1):
        raw = item.encode("utf-8", "surrogateescape") if isinstance(item, str) else bytes(item)
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        try:
            record = _parse(raw)
        except ValueError as exc:
            report(number, str(exc))
            continue
        chain_id, seq = record["chain_id"], record["seq"]
        located[number] = (chain_id, seq)
        body = {k: v for k, v in record.items() if k != "hash"}
        if record["alg"] == ALG_KEYED and key is None:
            report(number, "keyed line (hmac-sha256): cannot be checked without the key (--key-env)")
        elif record["alg"] == ALG_PLAIN and key is not None:
            report(number, "unkeyed line where a keyed chain was expected (rewritten without the key?)")
        elif not hmac.compare_digest(record_hash(body, key), record["hash"]):
            report(number, "hash mismatch: the line was altered"
                   + (" or was written under another key" if key is not None else ""))
        chains.setdefault(chain_id, []).append(_Entry(number, seq, record["prev"], line_digest(raw)))

    for chain_id, entries in chains.items():
        entries.sort(key=lambda e: (e.seq, e.line))
        by_seq: dict[int, list[_Entry]] = {}
        for entry in entries:
            by_seq.setdefault(entry.seq, []).append(entry)
        previous: list[_Entry] = []
        for seq in sorted(by_seq):
            group = by_seq[seq]
            if len(group) > 1:
                lines_text = ", ".join(str(e.line) for e in group)
                for entry in group:
                    report(entry.line, f"duplicate seq (lines {lines_text})", chain_id, seq)
            last_seq = previous[0].seq if previous else -1
            for entry in group:
                if seq != last_seq + 1:
                    first_missing = last_seq + 1
                    missing = f"seq {first_missing}" + (f"..{seq - 1}" if seq - 1 > first_missing else "")
                    what = "the chain starts" if last_seq < 0 else f"after seq {last_seq}"
                    report(entry.line, f"gap: {missing} missing ({what} here; lines removed?)", chain_id, seq)
                elif seq == 0:
                    if entry.prev != ZERO_HASH:
                        report(entry.line, "prev of seq 0 is not all zeros", chain_id, seq)
                elif not any(hmac.compare_digest(entry.prev, p.digest) for p in previous):
                    where = ", ".join(str(p.line) for p in previous)
                    report(entry.line, f"prev does not match line {where} (seq {seq - 1}): "
                           "a line was altered, replaced or inserted", chain_id, seq)
            previous = group

    problems = tuple(
        Problem(line, *located.get(line, (None, None)), "; ".join(texts))
        for line, texts in sorted(messages.items())
    )
    sizes = {c: len(e) for c, e in chains.items()}
    return VerifyResult(events=sum(sizes.values()), chains=sizes, problems=problems, keyed=key is not None)


def verify_file(path: str | os.PathLike[str], *, key: bytes | None = None) -> VerifyResult:
    """`verify` on a file's lines, split on ``\\n`` only (a ``\\r`` is part of a line, hence a problem)."""
    return verify(_split(Path(path).read_bytes()), key=key)


# -- command line ------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``verify`` (shared by ``ztmw audit verify`` and ``python -m ztmw.audit_chain``)."""
    parser.add_argument("file", help="the audit file ([plugins.chain] path)")
    parser.add_argument("--key-env", metavar="NAME",
                        help="environment variable holding the HMAC key of a keyed chain "
                             "([plugins.chain] key_env)")


def run_verify(args: argparse.Namespace) -> int:
    """0: every link intact; 1: a broken link (the first is printed); 2: the file or key cannot be read."""
    key = None
    if args.key_env:
        try:
            key = key_from_env(args.key_env, "--key-env")
        except ConfigurationError as exc:
            print(f"ztmw: {exc}", file=sys.stderr)
            return 2
    try:
        result = verify_file(args.file, key=key)
    except OSError as exc:
        print(f"ztmw: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if result.ok:
        print(result.summary())
        return 0
    print(f"{args.file}: {result.summary()}", file=sys.stderr)
    return 1


def build_parser(prog: str = "python -m ztmw.audit_chain") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Tamper-evident audit log tools.")
    sub = parser.add_subparsers(dest="action", required=True)
    verify_parser = sub.add_parser("verify", help="check every hash chain in an audit file")
    add_arguments(verify_parser)
    verify_parser.set_defaults(func=run_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess in the tests
    sys.exit(main())
