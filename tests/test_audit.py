"""Audit: one structlog event per decision, security events at warning, hashed subjects, never raises."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from ztmw.audit import AuditFanout, StructlogAuditSink, hash_subject, subject_for_audit
from ztmw.models import AuditEvent
from ztmw.testing import DevIssuer

from .audit_events import allow_event, deny_security_event
from .conftest import base_config

pytestmark = pytest.mark.usefixtures("decision_path")  # decided without awaiting, and in full


class TestStructlogAuditSink:
    def test_allow_is_one_info_event_named_ztmw_decision(self) -> None:
        sink = StructlogAuditSink()
        with capture_logs() as logs:
            sink.emit(allow_event())
        assert len(logs) == 1
        entry = logs[0]
        assert entry["event"] == "ztmw.decision"
        assert entry["log_level"] == "info"
        assert entry["decision"] == "allow"
        assert entry["rule_id"] == "own-transactions"
        assert entry["status"] == 200
        assert entry["aal"] == 2 and entry["ial"] == 1
        assert entry["binding"] == "dpop" and entry["cache"] == "hit"
        assert entry["subject"] == hash_subject("john")

    def test_plain_deny_is_info_too(self) -> None:
        with capture_logs() as logs:
            StructlogAuditSink().emit(AuditEvent(decision="deny", reason="no_rule", status=403, method="GET",
                                                 route="/x"))
        found = [(e["event"], e["log_level"], e["reason"]) for e in logs]
        assert found == [("ztmw.decision", "info", "no_rule")]

    def test_security_event_is_a_warning_named_ztmw_security(self) -> None:
        with capture_logs() as logs:
            StructlogAuditSink().emit(deny_security_event())
        assert len(logs) == 1
        assert logs[0]["event"] == "ztmw.security"
        assert logs[0]["log_level"] == "warning"
        assert logs[0]["reason"] == "dpop_bound_token_as_bearer"
        assert logs[0]["decision"] == "deny"

    def test_none_fields_and_the_security_flag_are_left_out(self) -> None:
        with capture_logs() as logs:
            StructlogAuditSink().emit(deny_security_event())
        entry = logs[0]
        assert "security" not in entry
        assert not [k for k, v in entry.items() if v is None]
        assert "subject" not in entry and "token_id" not in entry

    def test_a_given_logger_is_used(self) -> None:
        with capture_logs() as logs:
            StructlogAuditSink(logger=structlog.get_logger("custom").bind(app="shop")).emit(allow_event())
        assert logs[0]["app"] == "shop"

    def test_a_sink_whose_logger_raises_does_not_raise(self) -> None:
        class Broken:
            def info(self, *args: object, **kwargs: object) -> None:
                raise RuntimeError("disk full")

            def warning(self, *args: object, **kwargs: object) -> None:
                raise OSError("socket closed")

        sink = StructlogAuditSink(logger=Broken())
        sink.emit(allow_event())
        sink.emit(deny_security_event())

    def test_sink_has_a_plugin_name(self) -> None:
        assert StructlogAuditSink.name == "structlog"


def test_sec_03_audit_events_have_no_field_for_a_token_or_proof() -> None:
    names = {f.name for f in dataclasses.fields(AuditEvent)}
    assert not {"token", "access_token", "proof", "dpop", "authorization", "query", "claims"} & names


class TestSubjectForAudit:
    def test_hash_is_a_stable_pseudonym(self) -> None:
        first, second = subject_for_audit("john", "hash"), subject_for_audit("john", "hash")
        assert first == second == hash_subject("john")
        assert first is not None and "john" not in first
        assert first.startswith("sha256:")

    def test_hash_differs_per_subject(self) -> None:
        assert subject_for_audit("john", "hash") != subject_for_audit("jane", "hash")

    def test_plain_keeps_the_subject(self) -> None:
        assert subject_for_audit("john", "plain") == "john"

    def test_omit_drops_the_subject(self) -> None:
        assert subject_for_audit("john", "omit") is None

    @pytest.mark.parametrize("mode", ["hash", "plain", "omit"])
    def test_no_subject_stays_none(self, mode: Any) -> None:
        assert subject_for_audit(None, mode) is None

    @pytest.mark.parametrize("subject", ["", "é", "\U0001f600", "x" * 10_000, "\udcff"])
    def test_hash_of_odd_subjects(self, subject: str) -> None:
        assert hash_subject(subject).startswith("sha256:")

    def test_hash_never_raises_on_a_lone_high_surrogate(self) -> None:
        assert hash_subject("\ud800").startswith("sha256:")


class ListSink:
    """A sink without emit_again: the fanout must hand it complete events."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def emit(self, event: AuditEvent) -> None:
        self.events.append(event)


def test_emit_again_gives_every_sink_the_event_with_this_requests_status_and_duration() -> None:
    template = allow_event(status=0, duration_ms=0.0)
    plain = ListSink()
    fanout = AuditFanout([StructlogAuditSink(), plain])
    with capture_logs() as logs:
        fanout.emit_again(template, 204, 1.5)
        fanout.emit_again(template, 500, 2.0)
    assert [(e.status, e.duration_ms) for e in plain.events] == [(204, 1.5), (500, 2.0)]
    assert plain.events[0] == dataclasses.replace(template, status=204, duration_ms=1.5)
    assert [(e["status"], e["duration_ms"]) for e in logs] == [(204, 1.5), (500, 2.0)]
    with capture_logs() as direct:
        StructlogAuditSink().emit(dataclasses.replace(template, status=204, duration_ms=1.5))
    assert logs[0] == direct[0]  # a replayed event reads exactly like a fresh one


async def test_a_replay_recorder_is_the_only_sinks_prepared_one(tmp_path: Any) -> None:
    """One sink that prepares (jsonl): its own recorder; more sinks: every one gets the replay via emit_again."""
    import time

    from ztmw.audit_jsonl import JsonLinesAuditSink

    template = allow_event(status=0, duration_ms=0.0)
    jsonl = JsonLinesAuditSink(tmp_path / "a.jsonl", buffer_bytes=0)
    alone = AuditFanout([jsonl])
    await alone.start()
    record = alone.recorder(template)
    assert record.__qualname__.startswith("JsonLinesAuditSink.prepare")
    record(201, time.perf_counter())
    plain = ListSink()
    both = AuditFanout([jsonl, plain])
    await both.start()
    both.recorder(template)(202, time.perf_counter() - 0.002)
    jsonl.close()
    lines = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [line["status"] for line in lines] == [201, 202]
    [event] = plain.events
    assert event.status == 202 and event.duration_ms >= 2.0


async def items_client(aiohttp_client: Any, issuer: DevIssuer, sink: Any) -> Any:
    """A real server: `GET /items` (an empty JSON list) protected by ztmw, `sink` its only audit sink."""
    from aiohttp import web

    import ztmw
    from ztmw.testing import FakeClock

    async def items(request: web.Request) -> web.Response:
        return web.json_response([])

    app = web.Application()
    app.router.add_get("/items", items)
    ztmw.setup(app, base_config(issuer), clock=FakeClock(), audit_sink=sink)
    return await aiohttp_client(app)


async def test_sec_07_a_third_partys_recorder_that_raises_never_turns_a_replay_into_a_500(
    aiohttp_client: Any, issuer: DevIssuer
) -> None:
    """SEC-07: a sink's prepared recorder must not raise; when one does anyway, the response stands."""

    class RaisingRecorders:
        def __init__(self) -> None:
            self.events: list[AuditEvent] = []

        def emit(self, event: AuditEvent) -> None:
            self.events.append(event)

        def emit_again(self, template: AuditEvent, status: int, duration_ms: float) -> None:
            raise RuntimeError("sink bug")

        def prepare(self, template: AuditEvent) -> Any:
            def record(status: int, started: float) -> None:
                raise RuntimeError("sink bug")

            return record

    sink = RaisingRecorders()
    client = await items_client(aiohttp_client, issuer, sink)
    token = issuer.mint(scope="items:read")
    statuses = []
    for _ in range(4):
        async with client.get("/items", headers={"Authorization": f"Bearer {token}"}) as response:
            statuses.append(response.status)
    assert statuses == [200] * 4 and len(sink.events) == 2  # two full decisions, then replays


async def test_a_new_decision_recorded_per_token_reads_as_its_event_would(aiohttp_client: Any, issuer: DevIssuer,
                                                                         tmp_path: Any) -> None:
    """A new token's decision goes through the jsonl sink's per-shape recorder: the same line as its AuditEvent
    emitted (timestamp and duration aside), each with its own token id, also for tokens with `auth_time` (which
    take the event path) and for a refusal."""
    from ztmw.audit_jsonl import JsonLinesAuditSink

    jsonl = JsonLinesAuditSink(tmp_path / "a.jsonl", buffer_bytes=0)
    events = ListSink()  # no prepared recorders: every decision as its AuditEvent
    tokens = [issuer.mint(scope="items:read"), issuer.mint(scope="items:read"),
              issuer.mint(scope="items:read", sub="bob"), issuer.mint(scope="items:read", auth_time=1_700_000_000),
              issuer.mint(scope="other")]
    for sink in (jsonl, events):
        client = await items_client(aiohttp_client, issuer, sink)
        assert [(await client.get("/items", headers={"Authorization": f"Bearer {token}"})).status
                for token in tokens] == [200, 200, 200, 200, 403]
    jsonl.close()
    emitted = tmp_path / "b.jsonl"
    reference = JsonLinesAuditSink(emitted, buffer_bytes=0)
    for event in events.events:
        reference.emit(event)
    reference.close()

    def comparable(path: Any) -> list[dict[str, Any]]:
        return [{**json.loads(line), "timestamp": "", "duration_ms": 0} for line in path.read_text().splitlines()]

    lines = comparable(tmp_path / "a.jsonl")
    assert lines == comparable(emitted)
    assert len({line["token_id"] for line in lines}) == 5 and [line["cache"] for line in lines] == ["miss"] * 5


async def test_sec_07_a_per_token_recorder_that_raises_never_turns_a_decision_into_a_500(
    aiohttp_client: Any, issuer: DevIssuer
) -> None:
    """SEC-07: a sink's per-token recorder must not raise; when one does anyway, the response stands."""

    class RaisingPerToken(ListSink):
        def emit_again(self, template: AuditEvent, status: int, duration_ms: float) -> None:
            raise RuntimeError("sink bug")

        def prepare(self, template: AuditEvent) -> Any:
            raise RuntimeError("sink bug")

        def prepare_per_token(self, template: AuditEvent) -> Any:
            def record(token_id: str | None, status: int, started: float) -> None:
                raise RuntimeError("sink bug")

            return record

    client = await items_client(aiohttp_client, issuer, RaisingPerToken())
    for _ in range(3):
        response = await client.get("/items", headers={"Authorization": f"Bearer {issuer.mint(scope='items:read')}"})
        assert response.status == 200
