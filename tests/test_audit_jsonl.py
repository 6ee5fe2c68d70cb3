"""The JSON-lines audit sink: one parseable line per event, batched writes, never a token, never a raise."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

import ztmw
from ztmw.audit_jsonl import _STATIC_FIELDS, JsonLinesAuditSink, _fragment, create
from ztmw.errors import ConfigurationError
from ztmw.models import AuditEvent
from ztmw.testing import DevIssuer, FakeClock
from ztmw.testing.lifetime import PluginLifetime

from .conftest import MINIMAL_CONFIG, base_config, items_app

EVENT = AuditEvent(decision="allow", reason="allowed", status=200, method="GET", route="/items", rule_id="read",
                   subject="sha256:abc", client_id="demo-client", issuer="https://issuer.test", token_id="t1",
                   verifier="bearer", cache="hit", aal=1, ial=0, trust_inputs=("acr=x:aal1/ial0",), duration_ms=0.25)


async def jsonl_client(aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock,
                       **settings: Any) -> tuple[Any, ztmw.Pipeline]:
    """The items app protected with the jsonl audit sink under `settings`, on a real server."""
    app = items_app()
    pipeline = ztmw.setup(app, base_config(issuer, audit={"sinks": ["jsonl"]}, plugins={"jsonl": settings}),
                          clock=clock)
    return await aiohttp_client(app), pipeline


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_an_event_is_one_json_line_with_every_non_empty_field(tmp_path: Path) -> None:
    clock = FakeClock(1_700_000_000.5)
    sink = JsonLinesAuditSink(tmp_path / "audit.jsonl", buffer_bytes=0, clock=clock)
    sink.emit(EVENT)
    sink.close()
    [line] = read_lines(tmp_path / "audit.jsonl")
    assert line == {
        "timestamp": "2023-11-14T22:13:20.500000Z", "level": "info", "event": "ztmw.decision",
        "decision": "allow", "reason": "allowed", "method": "GET", "route": "/items", "rule_id": "read",
        "subject": "sha256:abc", "client_id": "demo-client", "issuer": "https://issuer.test", "token_id": "t1",
        "verifier": "bearer", "cache": "hit", "aal": 1, "ial": 0, "trust_inputs": ["acr=x:aal1/ial0"],
        "status": 200, "duration_ms": 0.25,
    }


def test_emit_again_writes_what_emit_writes_for_the_same_decision(tmp_path: Path) -> None:
    sink = JsonLinesAuditSink(tmp_path / "a.jsonl", buffer_bytes=0, clock=FakeClock())
    template = replace(EVENT, status=0, duration_ms=0.0)
    sink.emit(EVENT)
    sink.emit_again(template, 200, 0.25)
    sink.emit_again(template, 500, 1.5)  # the second replay reuses the rendered fragment
    sink.close()
    first, again, third = read_lines(tmp_path / "a.jsonl")
    assert again == first
    assert (third["status"], third["duration_ms"]) == (500, 1.5)


def test_a_prepared_replay_writes_what_emit_writes_with_its_own_status_and_duration(tmp_path: Path) -> None:
    import time

    sink = JsonLinesAuditSink(tmp_path / "a.jsonl", buffer_bytes=0, clock=FakeClock(1_700_000_000.5))
    template = replace(EVENT, status=0, duration_ms=0.0)
    record = sink.prepare(template)
    sink.emit(EVENT)
    record(200, time.perf_counter())
    record(503, time.perf_counter() - 0.0125)  # started 12.5 ms ago
    sink.close()
    first, again, third = read_lines(tmp_path / "a.jsonl")
    assert {**again, "duration_ms": 0.25} == first and 0 <= again["duration_ms"] < 1000
    assert third["status"] == 503 and 12.5 <= third["duration_ms"] < 1000
    assert third["timestamp"] == first["timestamp"] == "2023-11-14T22:13:20.500000Z"


def test_a_batch_of_replays_across_a_second_or_mixed_with_events_renders_every_line(tmp_path: Path) -> None:
    """The batch of replays within one second has its own tight loop; a batch that crosses a second, or holds
    another kind of line, is rendered line by line, to the same lines."""
    import time

    clock = FakeClock(1_700_000_000.5)
    sink = JsonLinesAuditSink(tmp_path / "a.jsonl", buffer_bytes=1 << 20, clock=clock)
    record = sink.prepare(replace(EVENT, status=0, duration_ms=0.0))
    record(200, time.perf_counter())
    clock.now += 0.75  # the next second
    record(201, time.perf_counter())
    sink.flush()
    record(202, time.perf_counter())
    sink.emit(replace(EVENT, status=203))
    sink.close()
    lines = read_lines(tmp_path / "a.jsonl")
    assert [(line["timestamp"], line["status"]) for line in lines] == [
        ("2023-11-14T22:13:20.500000Z", 200), ("2023-11-14T22:13:21.250000Z", 201),
        ("2023-11-14T22:13:21.250000Z", 202), ("2023-11-14T22:13:21.250000Z", 203)]
    assert all({**line, "status": 200, "duration_ms": 0.25, "timestamp": ""} == {**lines[3], "status": 200,
               "duration_ms": 0.25, "timestamp": ""} for line in lines)


def test_a_per_token_recorder_writes_what_emit_writes_with_each_token_id(tmp_path: Path) -> None:
    import time

    sink = JsonLinesAuditSink(tmp_path / "a.jsonl", buffer_bytes=0, clock=FakeClock(1_700_000_000.5))
    record = sink.prepare_per_token(replace(EVENT, token_id=None, status=0, duration_ms=0.0))
    sink.emit(EVENT)
    record("t1", 200, time.perf_counter())
    record("t2", 403, time.perf_counter() - 0.0125)  # started 12.5 ms ago
    record(None, 200, time.perf_counter())  # a token without a usable id: no token_id field, as emit writes it
    sink.emit(replace(EVENT, token_id=None))
    sink.close()
    first, again, other, bare, emitted_bare = read_lines(tmp_path / "a.jsonl")
    assert {**again, "duration_ms": 0.25} == first and 0 <= again["duration_ms"] < 1000
    assert {**other, "token_id": "t1", "status": 200, "duration_ms": 0.25} == first
    assert other["status"] == 403 and 12.5 <= other["duration_ms"] < 1000
    assert {**bare, "duration_ms": 0.25} == emitted_bare and "token_id" not in bare
    assert list(again) == list(first)  # the fields in the same order


@given(st.text(max_size=40))
def test_a_per_token_recorder_keeps_any_token_id_inside_its_json_string(token_id: str) -> None:
    import tempfile
    import time

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "a.jsonl"
        sink = JsonLinesAuditSink(path, buffer_bytes=0, clock=FakeClock())
        sink.prepare_per_token(replace(EVENT, token_id=None))(token_id, 200, time.perf_counter())
        sink.emit(EVENT)
        sink.close()
        line, emitted = read_lines(path)
        raw = path.read_bytes()
    assert line["token_id"] == token_id  # whatever it holds, it stays inside its string
    assert {**line, "token_id": "t1", "duration_ms": 0.25} == emitted
    assert raw.isascii() and raw.count(b"\n") == 2  # two lines: control characters stay escaped


def test_a_per_token_recorder_of_a_security_decision_is_written_at_once(tmp_path: Path) -> None:
    import time

    sink = JsonLinesAuditSink(tmp_path / "a.jsonl", buffer_bytes=1 << 20, clock=FakeClock())
    record = sink.prepare_per_token(replace(EVENT, token_id=None, reason="odd", security=True))
    record("t9", 200, time.perf_counter())
    [line] = read_lines(tmp_path / "a.jsonl")
    assert line["level"] == "warning" and line["token_id"] == "t9" and line["status"] == 200
    sink.close()


def test_a_prepared_replay_of_a_security_decision_is_written_at_once(tmp_path: Path) -> None:
    import time

    sink = JsonLinesAuditSink(tmp_path / "a.jsonl", buffer_bytes=1 << 20, clock=FakeClock())
    record = sink.prepare(replace(EVENT, reason="odd", security=True))
    record(200, time.perf_counter())
    [line] = read_lines(tmp_path / "a.jsonl")
    assert (line["level"], line["event"], line["reason"]) == ("warning", "ztmw.security", "odd")
    sink.close()


def test_a_prepared_replay_that_cannot_be_rendered_is_counted_not_raised(tmp_path: Path) -> None:
    import time

    sink = JsonLinesAuditSink(tmp_path / "a.jsonl", buffer_bytes=1 << 20, clock=FakeClock())
    record = sink.prepare(replace(EVENT, status=0, duration_ms=0.0))
    record("not a status", time.perf_counter())  # type: ignore[arg-type]
    record(200, time.perf_counter())
    sink.close()
    assert [line["status"] for line in read_lines(tmp_path / "a.jsonl")] == [200] and sink.dropped == 1


async def test_security_events_are_written_at_once_at_warning_level(tmp_path: Path) -> None:
    sink = JsonLinesAuditSink(tmp_path / "a.jsonl", buffer_bytes=1 << 20, clock=FakeClock())
    sink.emit(EVENT)  # buffered until the timer (in an event loop)
    assert not (tmp_path / "a.jsonl").exists()  # nothing written yet
    sink.emit(replace(EVENT, decision="deny", reason="dpop_replay", status=401, security=True))
    lines = read_lines(tmp_path / "a.jsonl")
    assert [(line["level"], line["event"]) for line in lines] == [("info", "ztmw.decision"),
                                                                   ("warning", "ztmw.security")]


async def test_buffered_lines_leave_with_the_timer(tmp_path: Path) -> None:
    sink = JsonLinesAuditSink(tmp_path / "a.jsonl", flush_interval=0.01, buffer_bytes=1 << 20, clock=FakeClock())
    sink.open()
    for _ in range(3):
        sink.emit(EVENT)
    assert read_lines(tmp_path / "a.jsonl") == []  # still in the buffer
    for _ in range(500):  # bounded wait for the timer; no timing is asserted
        await asyncio.sleep(0.01)
        if (tmp_path / "a.jsonl").stat().st_size:
            break
    assert len(read_lines(tmp_path / "a.jsonl")) == 3
    sink.close()


async def test_a_full_buffer_is_written_without_waiting(tmp_path: Path) -> None:
    sink = JsonLinesAuditSink(tmp_path / "a.jsonl", buffer_bytes=1000, clock=FakeClock())
    for _ in range(5):  # each line is ~400 bytes: the third one fills the buffer
        sink.emit(EVENT)
    assert len(read_lines(tmp_path / "a.jsonl")) == 3
    sink.close()
    assert len(read_lines(tmp_path / "a.jsonl")) == 5


def test_a_line_carries_the_time_of_its_request_not_of_its_batch(tmp_path: Path) -> None:
    clock = FakeClock(1_700_000_000.25)
    sink = JsonLinesAuditSink(tmp_path / "a.jsonl", buffer_bytes=1 << 20, clock=clock)
    sink.emit(EVENT)
    clock.now += 61.5
    sink.emit(EVENT)
    sink.close()
    first, second = read_lines(tmp_path / "a.jsonl")
    assert (first["timestamp"], second["timestamp"]) == ("2023-11-14T22:13:20.250000Z", "2023-11-14T22:14:21.750000Z")


def test_a_line_that_cannot_be_rendered_is_counted_and_the_batch_kept(tmp_path: Path) -> None:
    sink = JsonLinesAuditSink(tmp_path / "a.jsonl", buffer_bytes=1 << 20, clock=FakeClock())
    sink.emit(EVENT)
    sink.emit_again(EVENT, "not a status", 1.0)  # type: ignore[arg-type]
    sink.emit(EVENT)
    sink.close()
    assert sink.dropped == 1 and len(read_lines(tmp_path / "a.jsonl")) == 2


def test_values_cannot_break_the_line_format(tmp_path: Path) -> None:
    sink = JsonLinesAuditSink(tmp_path / "a.jsonl", buffer_bytes=0, clock=FakeClock())
    hostile = 'x"\n{"decision":"allow"}\u2028\x00é'
    sink.emit(replace(EVENT, route=hostile, reason=hostile))
    sink.close()
    raw = (tmp_path / "a.jsonl").read_bytes()
    assert raw.count(b"\n") == 1 and raw.isascii()
    [line] = read_lines(tmp_path / "a.jsonl")
    assert line["route"] == hostile and line["decision"] == "allow"


def test_outside_an_event_loop_each_line_is_written_at_once(tmp_path: Path) -> None:
    sink = JsonLinesAuditSink(tmp_path / "a.jsonl", buffer_bytes=1 << 20, clock=FakeClock())
    sink.emit(EVENT)  # no loop to run a timer: nothing may be left behind
    assert len(read_lines(tmp_path / "a.jsonl")) == 1


def test_a_failed_write_is_counted_and_reported_once_never_raised(tmp_path: Path) -> None:
    sink = JsonLinesAuditSink(tmp_path, buffer_bytes=0, clock=FakeClock())  # a directory: open() fails
    with capture_logs() as logs:
        sink.emit(EVENT)
        sink.emit(EVENT)
    assert sink.dropped == 2
    assert [e["event"] for e in logs] == ["ztmw.audit_write_failed"]


@pytest.mark.parametrize("settings, message", [
    ({}, "plugins.jsonl.path: required"),
    ({"path": ""}, "plugins.jsonl.path: required"),
    ({"path": "a", "flush": 1}, "unknown key plugins.jsonl.flush"),
    ({"path": "a", "flush_interval": 0}, "plugins.jsonl.flush_interval"),
    ({"path": "a", "flush_interval": True}, "plugins.jsonl.flush_interval"),
    ({"path": "a", "buffer_bytes": -1}, "plugins.jsonl.buffer_bytes"),
    ({"path": "a", "buffer_bytes": "64k"}, "plugins.jsonl.buffer_bytes"),
])
def test_settings_are_checked(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        create(settings, PluginLifetime().deps(MINIMAL_CONFIG))


async def test_the_plugin_opens_at_start_and_flushes_at_cleanup(tmp_path: Path) -> None:
    lifetime = PluginLifetime()
    sink = create({"path": str(tmp_path / "a.jsonl"), "buffer_bytes": 1 << 20}, lifetime.deps(MINIMAL_CONFIG))
    await lifetime.start()
    sink.emit(EVENT)
    await lifetime.stop()
    assert len(read_lines(tmp_path / "a.jsonl")) == 1


async def test_sec_03_end_to_end_one_line_per_request_with_replays_and_no_token(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, tmp_path: Path
) -> None:
    path = tmp_path / "audit.jsonl"
    client, _ = await jsonl_client(aiohttp_client, issuer, clock, path=str(path))
    token = issuer.mint(scope="items:read")
    statuses = []
    for headers in [{}] + [{"Authorization": f"Bearer {token}"}] * 4:
        async with client.get("/items", headers=headers) as response:
            statuses.append(response.status)
    await client.close()  # app cleanup flushes the buffer
    lines = read_lines(path)
    assert [line["status"] for line in lines] == statuses == [401, 200, 200, 200, 200]
    assert [line.get("cache") for line in lines] == [None, "miss", "hit", "hit", "hit"]
    assert {line["rule_id"] for line in lines} == {"read"}
    text = path.read_text(encoding="utf-8")
    assert all(part not in text for part in token.split("."))


@given(st.text(), st.text(), st.one_of(st.none(), st.text()), st.integers(-5, 5),
       st.one_of(st.none(), st.lists(st.text(), max_size=3).map(tuple)))
def test_a_rendered_line_reads_back_as_the_events_fields(reason: str, route: str, subject: str | None, aal: int,
                                                         inputs: tuple[str, ...] | None) -> None:
    event = replace(EVENT, reason=reason, route=route, subject=subject, aal=aal, trust_inputs=inputs)
    fragment = _fragment(event)
    assert fragment.isascii() and "\n" not in fragment
    expected = {name: value for name in _STATIC_FIELDS if (value := getattr(event, name)) is not None}
    if inputs is not None:
        expected["trust_inputs"] = list(inputs)
    assert json.loads("{" + fragment[:-1] + "}") == expected


# -- every outage of the audit file is reported; a non-blocking stdout loses and glues no line ------------

def test_every_outage_of_the_audit_file_is_reported_not_only_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = JsonLinesAuditSink(tmp_path / "a.jsonl", buffer_bytes=0, clock=FakeClock())
    real_write, disk = os.write, {"full": False}

    def write(fd: int, data: Any) -> int:
        if disk["full"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with capture_logs() as logs:
        disk["full"] = True
        sink.emit(EVENT)  # the disk is full: reported
        disk["full"] = False
        sink.emit(EVENT)  # space freed: written
        disk["full"] = True
        sink.emit(EVENT)  # full again, later: must be reported again
        disk["full"] = False
    sink.close()
    assert sink.dropped == 2 and len(read_lines(tmp_path / "a.jsonl")) == 1
    assert [e["event"] for e in logs].count("ztmw.audit_write_failed") == 2


_PARTIAL_WRITE_CHILD = textwrap.dedent("""
    import asyncio, fcntl, os, sys, threading, time
    from dataclasses import replace
    out_path = sys.argv[1]
    r, w = os.pipe()
    os.dup2(w, 1)  # stdout ("-") is a pipe someone made non-blocking (O_NONBLOCK is shared by every holder)
    os.close(w)
    fcntl.fcntl(1, fcntl.F_SETFL, fcntl.fcntl(1, fcntl.F_GETFL) | os.O_NONBLOCK)
    fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_NONBLOCK)
    from ztmw.audit_jsonl import JsonLinesAuditSink
    from ztmw.models import AuditEvent
    from ztmw.testing import FakeClock
    event = AuditEvent(decision="allow", reason="allowed", status=200, method="GET", route="/items",
                       client_id="c" * 200)
    received = bytearray()
    done = threading.Event()

    def drain():  # a slow reader: starts late, reads in small steps, until the writer has been quiet a while
        time.sleep(0.3)
        quiet_since = None
        while True:
            try:
                chunk = os.read(r, 4096)
            except BlockingIOError:
                chunk = b""
            if chunk:
                received.extend(chunk)
                quiet_since = None
            elif done.is_set():
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > 0.3:
                    return
            time.sleep(0.001)

    async def main():
        sink = JsonLinesAuditSink("-", buffer_bytes=1 << 30, clock=FakeClock(1.7e9))
        for _ in range(2000):  # about 600 KB buffered (the timer is armed, it has not fired)
            sink.emit(event)
        sink.flush()  # the pipe takes what fits, then EAGAIN: the writer waits for the reader
        sink.emit(replace(event, reason="after_the_outage", security=True))
        await sink.aclose()
        sys.stderr.write(f"dropped={sink.dropped}\\n")

    reader = threading.Thread(target=drain)
    reader.start()
    asyncio.run(main())
    done.set()
    reader.join()
    with open(out_path, "wb") as out:
        out.write(bytes(received))
""")


def test_a_non_blocking_stdout_neither_loses_nor_glues_a_line(tmp_path: Path) -> None:
    """EAGAIN mid-batch: the sink's pipe writer waits for the reader instead of cutting a line."""
    out = tmp_path / "stdout.bin"
    root = str(Path(__file__).resolve().parents[1])  # the checkout, so the child imports this ztmw
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _PARTIAL_WRITE_CHILD, str(out)], check=True, env=env,
                          timeout=120, capture_output=True, text=True)
    assert "dropped=0" in done.stderr
    lines = out.read_bytes().split(b"\n")
    assert lines[-1] == b""
    parsed = [json.loads(line) for line in lines[:-1]]  # every line parses
    assert len(parsed) == 2001 and parsed[-1]["reason"] == "after_the_outage"


# -- hostile claims, template reuse, flush timing, unwritable files, stdout ---------------------------------

async def test_hostile_token_claims_stay_inside_their_json_strings_end_to_end(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, tmp_path: Path
) -> None:
    """client_id, sub (audit subject = plain) and acr come from the token: each stays one JSON string; a jti
    that is not a printable id is logged as a short hash of the token instead."""
    path = tmp_path / "audit.jsonl"
    config = base_config(issuer, audit={"sinks": ["jsonl"], "subject": "plain"},
                         plugins={"jsonl": {"path": str(path), "buffer_bytes": 0}},
                         trust={"acr": {'urn:"x"\n': {"aal": 1}}})
    app = items_app()
    ztmw.setup(app, config, clock=clock)
    client = await aiohttp_client(app)
    hostile = 'x"}\n{"decision":"allow","reason":"allowed","rule_id":"admin"}\r\u2028\u0085\x00é\\'
    token = issuer.mint(hostile, scope="items:read", client_id=hostile, acr='urn:"x"\n',
                        claims={"jti": hostile})
    statuses = []
    for path_ in ("/items", "/items", "/items", "/admin"):
        async with client.get(path_, headers={"Authorization": f"Bearer {token}"}) as response:
            statuses.append(response.status)
    await client.close()
    raw_bytes = path.read_bytes()
    assert raw_bytes.isascii() and raw_bytes.count(b"\n") == len(statuses) == 4
    lines = read_lines(path)
    assert [line["status"] for line in lines] == statuses == [200, 200, 200, 403]
    for line in lines[:3]:
        assert (line["client_id"], line["subject"]) == (hostile, hostile)
        assert line["token_id"] != hostile and line["token_id"].isalnum()  # an unprintable jti: a short hash
        assert line["rule_id"] == "read"
    assert lines[3]["reason"] == "no_rule" and "rule_id" not in lines[3] and "client_id" not in lines[3]
    assert all(part not in raw_bytes.decode() for part in token.split("."))


def test_emit_again_never_renders_another_template_s_fields(tmp_path: Path) -> None:
    """RenderedTemplates is keyed by id(): it holds the template itself, so an id cannot be recycled while it
    is kept, and after the bound is reached it starts afresh. Thousands of short-lived templates each render
    their own fields."""
    sink = JsonLinesAuditSink(tmp_path / "a.jsonl", buffer_bytes=0, clock=FakeClock())
    count = 9000  # more than twice the 4096 templates kept
    for i in range(count):
        sink.emit_again(replace(EVENT, reason=f"r{i}", client_id=f"c{i}", status=0, duration_ms=0.0), 200, 0.5)
    sink.close()
    lines = read_lines(tmp_path / "a.jsonl")
    assert [(line["reason"], line["client_id"]) for line in lines] == [(f"r{i}", f"c{i}") for i in range(count)]


async def test_lines_buffered_for_a_long_flush_interval_are_written_at_app_cleanup(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, tmp_path: Path
) -> None:
    path = tmp_path / "audit.jsonl"
    client, _ = await jsonl_client(aiohttp_client, issuer, clock, path=str(path), flush_interval=60,
                                   buffer_bytes=1 << 24)
    token = issuer.mint(scope="items:read")
    for _ in range(5):
        async with client.get("/items", headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 200
    assert not path.exists() or path.stat().st_size == 0  # still buffered: the 60 s timer has not fired
    await client.close()  # app cleanup
    assert [line["status"] for line in read_lines(path)] == [200] * 5


async def test_flush_interval_is_honoured_without_further_traffic(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock, tmp_path: Path
) -> None:
    import asyncio

    path = tmp_path / "audit.jsonl"
    client, _ = await jsonl_client(aiohttp_client, issuer, clock, path=str(path), flush_interval=0.05,
                                   buffer_bytes=1 << 24)
    async with client.get("/items", headers={"Authorization": f"Bearer {issuer.mint(scope='items:read')}"}) as r:
        assert r.status == 200
    for _ in range(1000):  # a bounded wait for the timer; no timing is asserted
        if path.exists() and path.stat().st_size:
            break
        await asyncio.sleep(0.01)
    assert [line["status"] for line in read_lines(path)] == [200]


async def test_an_unwritable_audit_file_never_fails_a_request_and_is_reported(
    aiohttp_client: Any, issuer: DevIssuer, clock: FakeClock
) -> None:
    client, pipeline = await jsonl_client(aiohttp_client, issuer, clock, path="/dev/full",  # every write: ENOSPC
                                          buffer_bytes=0)
    token = issuer.mint(scope="items:read")
    with capture_logs() as logs:
        statuses = []
        for headers in ({}, {"Authorization": f"Bearer {token}"}, {"Authorization": f"Bearer {token}"},
                        {"Authorization": "Bearer not.a.token"}):
            async with client.get("/items", headers=headers) as response:
                statuses.append(response.status)
        assert statuses == [401, 200, 200, 401]
        [sink] = [p.instance for p in pipeline.plugins if p.name == "jsonl"]
        await sink.written()  # /dev/full is no regular file: the sink's pipe writer thread meets the ENOSPC
    assert sink.dropped == 4
    failures = [e for e in logs if e["event"] == "ztmw.audit_write_failed"]
    assert len(failures) == 1 and failures[0]["error"] == os.strerror(errno.ENOSPC)


def test_stdout_is_written_and_never_closed(capfd: pytest.CaptureFixture[str]) -> None:
    sink = JsonLinesAuditSink("-", buffer_bytes=0, clock=FakeClock())
    sink.emit(EVENT)
    sink.close()
    sink.close()
    os.fstat(1)  # fd 1 is still open
    sink.emit(EVENT)  # a late event after close still goes to stdout
    sink.close()
    out = capfd.readouterr().out
    assert [json.loads(line)["client_id"] for line in out.splitlines()] == ["demo-client"] * 2


_OPTIONAL = st.one_of(st.none(), st.sampled_from(["a", "b", "é\"\\", "sha256:x"]))


@given(st.lists(st.tuples(_OPTIONAL, _OPTIONAL, _OPTIONAL, st.one_of(st.none(), st.text(max_size=8)),
                          st.one_of(st.none(), st.integers(0, 3)),
                          st.one_of(st.none(), st.tuples(st.sampled_from(["acr=x", "amr=y"])))), max_size=12))
def test_the_fragment_of_many_tokens_is_the_fragment_of_each(rows: list[tuple[Any, ...]]) -> None:
    """What surrounds token_id is rendered once and reused: the result must be `_fragment`'s for every mix of
    empty and filled fields, with and without a token id, in any order of arrival."""
    from ztmw.audit_jsonl import _Fragments

    fragments = _Fragments()
    for subject, client_id, binding, token_id, aal, inputs in rows:
        event = replace(EVENT, subject=subject, client_id=client_id, binding=binding, token_id=token_id, aal=aal,
                        trust_inputs=inputs)
        assert fragments(event) == _fragment(event)
        assert fragments(replace(event, token_id=None)) == _fragment(replace(event, token_id=None))


def test_any_integer_status_is_a_json_number_in_every_kind_of_line(tmp_path: Path) -> None:
    """A handler may answer with any status aiohttp lets through, a negative one included: replayed or decided
    in full, the line stays JSON with that number (a whole line from write_line is told apart by its kind)."""
    import time

    sink = JsonLinesAuditSink(tmp_path / "a.jsonl", buffer_bytes=1 << 20, clock=FakeClock())
    record = sink.prepare(replace(EVENT, status=0, duration_ms=0.0))
    record(-1, time.perf_counter())
    record(0, time.perf_counter())
    sink.emit(replace(EVENT, status=-1))
    sink.write_line('{"event":"a log line"}')
    sink.close()
    lines = read_lines(tmp_path / "a.jsonl")
    assert [line.get("status") for line in lines] == [-1, 0, -1, None] and lines[3] == {"event": "a log line"}


def test_a_time_before_1970_is_stamped_in_its_own_second(tmp_path: Path) -> None:
    import time

    sink = JsonLinesAuditSink(tmp_path / "a.jsonl", buffer_bytes=1 << 20, clock=FakeClock(-0.5))
    sink.prepare(replace(EVENT, status=0, duration_ms=0.0))(200, time.perf_counter())
    sink.emit(EVENT)
    sink.close()
    assert [line["timestamp"] for line in read_lines(tmp_path / "a.jsonl")] == ["1969-12-31T23:59:59.500000Z"] * 2
