"""The JSON-lines audit sink: one parseable line per event, batched writes, never a token, never a raise."""

from __future__ import annotations

import asyncio
import json
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

from .conftest import base_config, items_app
from .test_audit_chain import MINIMAL_CONFIG

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

