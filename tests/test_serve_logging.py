"""`ztmw serve`'s logging: one writer of stdout shared by structlog and the default audit sink, and an app's
own structlog configuration still obeyed."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import textwrap
from typing import Any

import structlog
import structlog.testing

from tests.audit_events import allow_event
from ztmw import serve_logging
from ztmw.audit import StructlogAuditSink

_CHILD = textwrap.dedent("""
    import asyncio, dataclasses, structlog
    from ztmw import serve_logging
    from ztmw.audit import StructlogAuditSink
    from tests.audit_events import allow_event, deny_security_event

    async def main():
        serve_logging.configure()
        log = structlog.get_logger("ztmw")
        sink = StructlogAuditSink()
        await sink.start()
        log.info("first", n=1)
        for i in range(300):
            sink.emit(dataclasses.replace(allow_event(), duration_ms=float(i)))
        sink.emit_again(allow_event(), 201, 2.5)
        log.warning("second", n=2)  # after every audit line queued before it
        sink.emit(deny_security_event())
        sink.emit(allow_event(token_id="last"))  # written at exit, from the batch
        await sink.aclose()

    asyncio.run(main())
""")


def _run_child(stdout: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-c", _CHILD], stdout=stdout, stderr=subprocess.PIPE, timeout=60,
                          check=True)


def test_audit_lines_and_log_lines_share_stdout_in_order_as_json_lines() -> None:
    output = _run_child(subprocess.PIPE).stdout.decode()
    events = [json.loads(line) for line in output.splitlines()]  # every line whole and valid
    names = [e["event"] for e in events]
    assert names[0] == "first"
    assert names[1:302] == ["ztmw.decision"] * 301
    assert names[302:] == ["second", "ztmw.security", "ztmw.decision"]
    assert [e["duration_ms"] for e in events[1:301]] == [float(i) for i in range(300)]
    assert events[301]["status"] == 201 and events[301]["duration_ms"] == 2.5
    assert events[303]["level"] == "warning" and events[303]["reason"] == "dpop_bound_token_as_bearer"
    assert events[304]["token_id"] == "last"
    # the same fields structlog's renderer gives an audit event, and the timestamp it adds
    event = allow_event()
    expected = {f.name for f in dataclasses.fields(event) if getattr(event, f.name) is not None} - {"security"}
    assert set(events[1]) == expected | {"event", "level", "timestamp"}
    assert events[1]["timestamp"].endswith("Z")


def test_a_regular_file_as_stdout_gets_the_same_lines(tmp_path: Any) -> None:
    target = tmp_path / "out.jsonl"
    with open(target, "wb") as fh:
        _run_child(fh)
    lines = target.read_text().splitlines()
    assert len(lines) == 305 and all(json.loads(line) for line in lines)


def test_an_app_that_configures_structlog_itself_gets_every_event_through_its_processors() -> None:
    seen: list[dict[str, Any]] = []

    def keep(logger: Any, method: str, event_dict: Any) -> Any:
        seen.append(dict(event_dict))
        raise structlog.DropEvent

    saved = structlog.get_config()
    serve_logging.configure()
    try:
        structlog.configure(processors=[keep])  # what an app factory may do after `ztmw serve` set up logging
        assert serve_logging.direct_audit_writer() is None
        sink = StructlogAuditSink()
        asyncio.run(sink.start())
        sink.emit(allow_event())
        sink.emit_again(allow_event(), 204, 1.5)
    finally:
        structlog.configure(**saved)
    assert [e["event"] for e in seen] == ["ztmw.decision", "ztmw.decision"]
    assert seen[1]["status"] == 204 and seen[1]["duration_ms"] == 1.5


def test_without_serve_logging_the_sink_logs_through_structlog() -> None:
    saved = structlog.get_config()
    structlog.reset_defaults()
    try:
        assert serve_logging.direct_audit_writer() is None
        with structlog.testing.capture_logs() as seen:
            sink = StructlogAuditSink()
            asyncio.run(sink.start())
            sink.emit(allow_event())
        assert [e["event"] for e in seen] == ["ztmw.decision"]
    finally:
        structlog.configure(**saved)
