"""Audit events as the pipeline builds them, for the tests of the sinks and of `ztmw serve`'s logging (also
imported by a child process those tests start, as `tests.audit_events`)."""

from __future__ import annotations

from typing import Any

from ztmw.audit import hash_subject
from ztmw.models import AuditEvent


def allow_event(**overrides: Any) -> AuditEvent:
    fields: dict[str, Any] = dict(
        decision="allow", reason="allowed", status=200, method="GET", route="/users/{user}/transactions",
        rule_id="own-transactions", subject=hash_subject("john"), client_id="app",
        issuer="https://as.example.com", token_id="jti-1", binding="dpop", verifier="bearer", cache="hit",
        aal=2, ial=1, duration_ms=0.25,
    )
    fields.update(overrides)
    return AuditEvent(**fields)


def deny_security_event() -> AuditEvent:
    return AuditEvent(decision="deny", reason="dpop_bound_token_as_bearer", status=401, method="GET",
                      route="/payments", rule_id="payments", security=True)
