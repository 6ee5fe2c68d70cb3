"""The tamper-evident audit chain: a real app writes it via ztmw.setup; verify and its command check it."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ztmw
from ztmw.audit_chain import (
    ZERO_HASH,
    ChainedAuditSink,
    create,
    main,
    verify,
    verify_file,
)
from ztmw.errors import ConfigurationError
from ztmw.models import AuditEvent
from ztmw.registry import available
from ztmw.testing import DevIssuer, FakeClock
from ztmw.testing.lifetime import PluginLifetime

from .conftest import MINIMAL_CONFIG, base_config, items_app

ROOT = Path(__file__).resolve().parent.parent
KEY = "k" * 32
KEY_ENV = "ZTMW_TEST_AUDIT_CHAIN_KEY"
WriteLog = Callable[..., Awaitable[list[str]]]


def run_verify(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m ztmw.audit_chain verify ...` as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "ztmw.audit_chain", "verify", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def canonical(obj: Any) -> bytes:
    """Written out again here on purpose: the format is a contract, not whatever the module happens to do."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def reseal(record: dict[str, Any], key: bytes | None = None) -> str:
    """What an attacker who knows the format (and maybe the key) does after editing a record."""
    body = {k: v for k, v in record.items() if k != "hash"}
    data = canonical(body)
    digest = hmac.new(key, data, hashlib.sha256) if key else hashlib.sha256(data)
    return canonical({**body, "hash": digest.hexdigest()}).decode("ascii")


@pytest.fixture
def write_log(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock) -> WriteLog:
    """Run a scripted set of requests (allow and deny) through a real server protected by ztmw.setup."""

    async def write(path: Path, *, key: bytes | None = None, rounds: int = 2) -> list[str]:
        sink = ChainedAuditSink(path, key=key, clock=clock)
        app = items_app()
        ztmw.setup(app, base_config(issuer), clock=clock, audit_sink=sink)
        client = await aiohttp_client(app)
        tokens: list[str] = []
        try:
            for _ in range(rounds):
                token = issuer.mint(scope="items:read")
                tokens.append(token)
                for path_, headers in (
                    ("/health", {}),                                        # public: allow
                    ("/items", {"Authorization": f"Bearer {token}"}),       # allow
                    ("/items", {}),                                         # 401, no credentials
                    ("/admin", {"Authorization": f"Bearer {token}"}),       # 403, no rule
                    ("/items", {"Authorization": f"Bearer {token}x"}),      # 401 invalid_token
                ):
                    response = await client.get(path_, headers=headers)
                    await response.read()
                    clock.advance(1)
        finally:
            await client.close()
            sink.close()
        return tokens

    return write


@pytest.fixture
async def log_file(tmp_path: Path, write_log: WriteLog) -> Path:
    path = tmp_path / "audit.jsonl"
    await write_log(path)
    return path


# -- what the sink writes ----------------------------------------------------------------------------------


async def test_real_app_writes_one_chained_line_per_request(tmp_path: Path, write_log: WriteLog) -> None:
    path = tmp_path / "audit.jsonl"
    tokens = await write_log(path)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) == 10 and text.endswith("\n")
    records = [json.loads(line) for line in lines]
    assert [(r["decision"], r["status"], r["route"]) for r in records[:5]] == [
        ("allow", 200, "/health"), ("allow", 200, "/items"), ("deny", 401, "/items"), ("deny", 403, "/admin"),
        ("deny", 401, "/items")]
    chain_id = records[0]["chain_id"]
    assert len(chain_id) == 32 and int(chain_id, 16) >= 0
    assert {r["chain_id"] for r in records} == {chain_id}
    assert [r["seq"] for r in records] == list(range(10))
    assert records[0]["prev"] == ZERO_HASH
    for line, record, previous in zip(lines, records, [None, *lines]):
        assert line.encode() == canonical(record), "written in canonical form"
        if previous is not None:
            assert record["prev"] == hashlib.sha256(previous.encode()).hexdigest()
        body = {k: v for k, v in record.items() if k != "hash"}
        assert record["hash"] == hashlib.sha256(canonical(body)).hexdigest()
        assert record["alg"] == "sha256"
        chain_fields = {"ts", "chain_id", "seq", "prev", "alg"}
        assert set(body) == {f.name for f in dataclasses.fields(AuditEvent)} | chain_fields
    for token in tokens:  # events carry no token by construction; the sink adds none
        assert token not in text and token.split(".")[2] not in text
    assert records[1]["subject"].startswith("sha256:"), "the [audit] subject mode applies"
    result = verify_file(path)
    assert result.ok and result.events == 10 and result.chains == {chain_id: 10}
    assert result.summary() == "10 events in 1 chain, all links intact"


async def test_keyed_chain_uses_hmac(tmp_path: Path, write_log: WriteLog) -> None:
    path = tmp_path / "audit.jsonl"
    await write_log(path, key=KEY.encode(), rounds=1)
    for line in lines_of(path):
        record = json.loads(line)
        body = canonical({k: v for k, v in record.items() if k != "hash"})
        assert record["alg"] == "hmac-sha256"
        assert record["hash"] == hmac.new(KEY.encode(), body, hashlib.sha256).hexdigest()
    assert verify_file(path, key=KEY.encode()).ok


def test_every_process_start_gets_a_new_chain_id(tmp_path: Path) -> None:
    ids = set()
    for _ in range(3):
        with ChainedAuditSink(tmp_path / "a.jsonl") as sink:
            ids.add(sink.chain_id)
    assert len(ids) == 3


def test_text_stream_target_is_flushed_per_line_and_left_open() -> None:
    class Recorder(io.StringIO):
        flushes = 0

        def flush(self) -> None:
            self.flushes += 1
            super().flush()

    stream = Recorder()
    sink = ChainedAuditSink(stream)
    for _ in range(3):
        sink.emit(event())
    assert stream.flushes == 3
    sink.close()
    assert not stream.closed, "the caller owns the stream"
    assert verify(stream.getvalue().splitlines()).ok


def event(**changes: Any) -> AuditEvent:
    return dataclasses.replace(AuditEvent(decision="allow", reason="allowed", status=200, method="GET",
                                          route="/items", rule_id="read"), **changes)


def test_emit_never_raises_and_a_lost_event_shows_as_a_gap() -> None:
    class Flaky(io.StringIO):
        fail = False

        def write(self, s: str) -> int:
            if self.fail:
                raise OSError(28, "No space left on device")
            return super().write(s)

    stream = Flaky()
    sink = ChainedAuditSink(stream, logger=_Silent())
    sink.emit(event())
    stream.fail = True
    sink.emit(event())  # must not raise
    stream.fail = False
    sink.emit(event())
    assert sink.dropped == 1
    result = verify(stream.getvalue().splitlines())
    assert not result.ok and result.first is not None
    assert result.first.line == 2 and result.first.seq == 2 and "gap: seq 1 missing" in result.first.message


def test_emit_after_close_and_to_an_unwritable_path_never_raises(tmp_path: Path) -> None:
    sink = ChainedAuditSink(tmp_path / "no-such-dir" / "audit.jsonl", logger=_Silent())
    sink.emit(event())
    assert sink.dropped == 1
    with ChainedAuditSink(tmp_path / "a.jsonl", logger=_Silent()) as closed:
        pass
    closed.emit(event())
    assert closed.dropped == 1 and (tmp_path / "a.jsonl").read_bytes() == b""


def test_non_ascii_and_lone_surrogates_are_escaped_and_verify() -> None:
    stream = io.StringIO()
    sink = ChainedAuditSink(stream)
    sink.emit(event(subject="José \u202e \ud800", client_id="客户"))
    text = stream.getvalue()
    assert text.isascii() and json.loads(text)["client_id"] == "客户"
    assert verify(text.splitlines()).ok


class _Silent:
    def warning(self, *args: Any, **kwargs: Any) -> None:
        pass


# -- tampering ---------------------------------------------------------------------------------------------


def first_problem(path: Path, key: bytes | None = None) -> Any:
    result = verify_file(path, key=key)
    assert not result.ok
    return result.first


async def test_editing_one_field_in_the_middle_names_that_line(log_file: Path) -> None:
    lines = lines_of(log_file)
    assert '"decision":"deny"' in lines[3]
    lines[3] = lines[3].replace('"decision":"deny"', '"decision":"allow"')
    write_lines(log_file, lines)
    problem = first_problem(log_file)
    assert (problem.line, problem.seq) == (4, 3)
    assert "hash mismatch" in problem.message
    result = verify_file(log_file)
    assert [p.line for p in result.problems] == [4, 5], "the next line's prev no longer matches either"
    assert "prev does not match line 4" in result.problems[1].message


async def test_editing_and_resealing_a_line_breaks_the_next_link(log_file: Path) -> None:
    lines = lines_of(log_file)
    record = json.loads(lines[3])
    lines[3] = reseal({**record, "decision": "allow", "status": 200})
    write_lines(log_file, lines)
    problem = first_problem(log_file)
    assert (problem.line, problem.seq) == (5, 4) and "prev does not match line 4" in problem.message


async def test_deleting_a_line_is_a_gap(log_file: Path) -> None:
    lines = lines_of(log_file)
    del lines[4]
    write_lines(log_file, lines)
    problem = first_problem(log_file)
    assert (problem.line, problem.seq) == (5, 5)
    assert "gap: seq 4 missing" in problem.message


async def test_deleting_the_first_line_is_a_gap(log_file: Path) -> None:
    write_lines(log_file, lines_of(log_file)[1:])
    problem = first_problem(log_file)
    assert (problem.line, problem.seq) == (1, 1) and "seq 0 missing" in problem.message


async def test_reordered_lines_are_not_an_error(log_file: Path) -> None:
    """Decided: lines are checked in seq order within their chain, so order in the file does not matter."""
    lines = lines_of(log_file)
    lines[2], lines[6] = lines[6], lines[2]
    write_lines(log_file, lines)
    assert verify_file(log_file).ok


async def test_an_inserted_forged_line_is_found(log_file: Path) -> None:
    lines = lines_of(log_file)
    forged = reseal({**json.loads(lines[2]), "reason": "allowed", "decision": "allow", "status": 200})
    lines.insert(3, forged)  # claims seq 2, links to seq 1: a valid hash, but seq 2 now appears twice
    write_lines(log_file, lines)
    result = verify_file(log_file)
    assert [(p.line, p.seq) for p in result.problems] == [(3, 2), (4, 2)]
    assert all("duplicate seq (lines 3, 4)" in p.message for p in result.problems)


async def test_a_copied_line_with_a_new_field_value_is_found(log_file: Path) -> None:
    lines = lines_of(log_file)
    lines.insert(5, lines[4].replace('"status":403', '"status":200'))
    write_lines(log_file, lines)
    problem = first_problem(log_file)
    assert problem.line == 5 and "duplicate seq" in problem.message


async def test_garbage_and_non_canonical_lines_are_reported(log_file: Path) -> None:
    lines = lines_of(log_file)
    lines[1] = json.dumps(json.loads(lines[1]))  # same content, different bytes (spaces)
    lines.insert(6, "not json")
    write_lines(log_file, lines)
    result = verify_file(log_file)
    assert result.first is not None and result.first.line == 2
    assert "not in canonical form" in result.first.message
    assert any(p.line == 7 and p.chain_id is None and "unparseable" in p.message for p in result.problems)


async def test_truncating_the_tail_is_not_detected_without_shipping_lines_off_box(log_file: Path) -> None:
    """The documented limit of a chain kept in one file: its last lines can be cut off unnoticed."""
    write_lines(log_file, lines_of(log_file)[:-3])
    assert verify_file(log_file).ok


async def test_an_unkeyed_full_rewrite_passes_unkeyed_but_not_keyed_verification(
    tmp_path: Path, write_log: WriteLog
) -> None:
    path = tmp_path / "audit.jsonl"
    await write_log(path, key=KEY.encode(), rounds=1)
    rewritten, prev = [], ZERO_HASH
    for line in lines_of(path):
        record = {**json.loads(line), "decision": "allow", "alg": "sha256", "prev": prev}
        rewritten.append(reseal(record))
        prev = hashlib.sha256(rewritten[-1].encode()).hexdigest()
    write_lines(path, rewritten)
    assert verify_file(path).ok, "the unkeyed limit: anyone who can write the file can recompute the chain"
    problem = first_problem(path, key=KEY.encode())
    assert problem.line == 1 and "unkeyed line where a keyed chain was expected" in problem.message


async def test_two_chains_interleaved_in_one_file(
    tmp_path: Path, aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    """Two processes (two apps, each with its own sink) append to the same file."""
    path = tmp_path / "audit.jsonl"
    sinks = [ChainedAuditSink(path, clock=clock) for _ in range(2)]
    clients = []
    for sink in sinks:
        app = items_app()
        ztmw.setup(app, base_config(issuer), clock=clock, audit_sink=sink)
        clients.append(await aiohttp_client(app))
    try:
        token = issuer.mint(scope="items:read")
        for i in range(7):
            for client in clients[: 1 + (i % 2)]:
                response = await client.get("/items", headers={"Authorization": f"Bearer {token}"})
                await response.read()
    finally:
        for sink in sinks:
            sink.close()
    ids = [json.loads(line)["chain_id"] for line in lines_of(path)]
    assert ids[:3] == [sinks[0].chain_id, sinks[0].chain_id, sinks[1].chain_id], "interleaved"
    result = verify_file(path)
    assert result.ok and result.chains == {sinks[0].chain_id: 7, sinks[1].chain_id: 3}
    assert result.summary() == "10 events in 2 chains, all links intact"
    lines = lines_of(path)
    del lines[2]  # seq 0 of the second chain
    write_lines(path, lines)
    problem = first_problem(path)
    assert problem.chain_id == sinks[1].chain_id and problem.seq == 1 and "seq 0 missing" in problem.message


async def test_keyed_chain_with_the_wrong_key_or_no_key(tmp_path: Path, write_log: WriteLog) -> None:
    path = tmp_path / "audit.jsonl"
    await write_log(path, key=KEY.encode(), rounds=1)
    assert verify_file(path, key=KEY.encode()).ok
    problem = first_problem(path, key=b"w" * 32)
    assert problem.line == 1 and "hash mismatch" in problem.message and "another key" in problem.message
    problem = first_problem(path)
    assert problem.line == 1 and "without the key" in problem.message


async def test_a_forged_line_in_a_keyed_chain_is_found_even_when_appended(
    tmp_path: Path, write_log: WriteLog
) -> None:
    path = tmp_path / "audit.jsonl"
    await write_log(path, key=KEY.encode(), rounds=1)
    lines = lines_of(path)
    last = json.loads(lines[-1])
    forged = {**last, "seq": last["seq"] + 1, "prev": hashlib.sha256(lines[-1].encode()).hexdigest()}
    write_lines(path, [*lines, reseal(forged, key=b"attacker guesses a key!")])
    problem = first_problem(path, key=KEY.encode())
    assert (problem.line, problem.seq) == (6, 5) and "hash mismatch" in problem.message


# -- any single-byte change is detected --------------------------------------------------------------------


def _valid_log(key: bytes | None) -> bytes:
    """Two interleaved chains of varied events (sync: hypothesis runs it once per example set)."""
    stream = io.StringIO()
    a, b = (ChainedAuditSink(stream, key=key, clock=lambda: 1.5e9) for _ in range(2))
    for i, sink in enumerate([a, a, b, a, b, b, a]):
        sink.emit(event(decision="deny" if i % 2 else "allow", status=401 if i % 2 else 200, aal=i,
                        subject=f"sha256:{i:024x}", client_id="é" if i == 3 else None, duration_ms=i / 3,
                        security=i == 5))
    data = stream.getvalue().encode("ascii")
    assert verify(data.splitlines(), key=key).ok
    return data


LOGS = {None: _valid_log(None), KEY.encode(): _valid_log(KEY.encode())}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), keyed=st.booleans())
def test_any_single_byte_change_is_detected(data: st.DataObject, keyed: bool) -> None:
    key = KEY.encode() if keyed else None
    log = LOGS[key]
    index = data.draw(st.integers(0, len(log) - 1), label="index")
    value = data.draw(st.integers(0, 255).filter(lambda v: v != log[index]), label="value")
    changed = log[:index] + bytes([value]) + log[index + 1:]
    result = verify(changed.split(b"\n")[:-1] if changed.endswith(b"\n") else changed.split(b"\n"), key=key)
    assert not result.ok
    line = log.count(b"\n", 0, index) + 1
    assert result.first is not None and result.first.line == line, "reported at the line that was changed"


@pytest.mark.parametrize(("before", "after"), [(b"\\u00e9", b"\\u00E9"), (b"1e-05", b"1E-05")])
def test_a_byte_change_that_parses_to_the_same_content_is_detected(before: bytes, after: bytes) -> None:
    """JSON has several spellings of one value; only the canonical one is what the sink wrote."""
    stream = io.StringIO()
    sink = ChainedAuditSink(stream)
    for _ in range(2):
        sink.emit(event(client_id="é", duration_ms=1e-05))
    log = stream.getvalue().encode()
    assert log.count(before) == 2
    changed = log.replace(before, after, 1)
    assert list(map(json.loads, changed.splitlines())) == list(map(json.loads, log.splitlines()))
    result = verify(changed.splitlines())
    assert result.first is not None and result.first.line == 1
    assert "not in canonical form" in result.first.message


# -- the plugin factory ------------------------------------------------------------------------------------




@pytest.mark.parametrize(("settings_", "message"), [
    ({"path": "a.jsonl", "fsync": True}, "plugins.chain: unknown key fsync"),
    ({}, "plugins.chain.path: required"),
    ({"path": ""}, "plugins.chain.path: required"),
    ({"path": "a.jsonl", "key_env": 3}, "plugins.chain.key_env: must be the name"),
    ({"path": "a.jsonl", "key_env": "ZTMW_TEST_UNSET_KEY"}, "ZTMW_TEST_UNSET_KEY is not set"),
    ({"path": "a.jsonl", "key_env": KEY_ENV}, "shorter than 16 bytes"),
])
def test_factory_rejects_bad_settings(
    settings_: dict[str, Any], message: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ZTMW_TEST_UNSET_KEY", raising=False)
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(ConfigurationError, match=message):
        create(settings_, PluginLifetime().deps(MINIMAL_CONFIG, clock=clock, logger=_Silent()))


async def test_factory_opens_on_startup_and_closes_on_cleanup(
    tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.chdir(tmp_path)
    lifetime = PluginLifetime()
    sink = create({"path": "logs.jsonl", "key_env": KEY_ENV}, lifetime.deps(MINIMAL_CONFIG, clock=clock,
                                                                              logger=_Silent()))
    assert sink.path == tmp_path / "logs.jsonl" and not sink.path.exists(), "nothing happens before start-up"
    await lifetime.start()
    sink.emit(event())
    await lifetime.stop()
    sink.emit(event())
    assert len(lines_of(sink.path)) == 1 and verify_file(sink.path, key=KEY.encode()).ok


@pytest.mark.skipif("chain" not in available("ztmw.audit_sinks"),
                    reason="entry point ztmw.audit_sinks:chain not registered in pyproject.toml yet")
async def test_chain_sink_by_name_from_the_config(
    tmp_path: Path, aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    path = tmp_path / "audit.jsonl"
    config = base_config(issuer, audit={"sinks": ["chain"]}, plugins={"chain": {"path": str(path)}})
    app = items_app()
    ztmw.setup(app, config, clock=clock)
    client = await aiohttp_client(app)
    await (await client.get("/health")).read()
    await client.close()
    assert verify_file(path).ok and verify_file(path).events == 1


# -- the command -------------------------------------------------------------------------------------------


async def test_command_exit_0_with_a_summary(log_file: Path) -> None:
    done = run_verify(str(log_file))
    assert (done.returncode, done.stdout, done.stderr) == (0, "10 events in 1 chain, all links intact\n", "")


async def test_command_exit_1_names_the_first_broken_link(log_file: Path) -> None:
    lines = lines_of(log_file)
    chain_id = json.loads(lines[0])["chain_id"]
    lines[6] = lines[6].replace('"method":"GET"', '"method":"PUT"')
    del lines[8]
    write_lines(log_file, lines)
    done = run_verify(str(log_file))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (f"{log_file}: 9 events in 1 chain: broken link at line 7: chain {chain_id} seq 6: "
                           "hash mismatch: the line was altered (2 more problems after it)\n")


async def test_command_keyed(tmp_path: Path, write_log: WriteLog) -> None:
    path = tmp_path / "audit.jsonl"
    await write_log(path, key=KEY.encode(), rounds=1)
    done = run_verify(str(path), "--key-env", KEY_ENV, env={KEY_ENV: KEY})
    assert (done.returncode, done.stdout) == (0, "5 events in 1 chain, all links intact (keyed)\n")
    done = run_verify(str(path), "--key-env", KEY_ENV, env={KEY_ENV: "x" * 32})
    assert done.returncode == 1 and "line 1: " in done.stderr and "another key" in done.stderr
    done = run_verify(str(path))
    assert done.returncode == 1 and "cannot be checked without the key (--key-env)" in done.stderr


def test_command_exit_2_when_the_file_or_key_cannot_be_read(tmp_path: Path) -> None:
    done = run_verify(str(tmp_path / "missing.jsonl"))
    assert done.returncode == 2 and "cannot read" in done.stderr
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    done = run_verify(str(path), "--key-env", "ZTMW_TEST_UNSET_KEY")
    assert done.returncode == 2 and "ZTMW_TEST_UNSET_KEY is not set" in done.stderr


def test_main_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a.jsonl"
    with ChainedAuditSink(path) as sink:
        sink.emit(event())
    assert main(["verify", str(path)]) == 0
    assert capsys.readouterr().out == "1 event in 1 chain, all links intact\n"
    path.write_bytes(path.read_bytes().replace(b'"allow"', b'"deny"'))
    assert main(["verify", str(path)]) == 1
    assert "line 1: chain" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["verify"])
    assert exc.value.code == 2
