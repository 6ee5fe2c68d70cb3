"""Deliberately broken plugins, for ztmw's own loading tests: never list these in a real configuration.

Each one fails at a different moment, so the tests can show that ztmw fails closed at every one of them:
`raises-at-start` (a factory that raises), `raises-at-request` (a verifier and a trust evaluator that raise
on every request). `broken-import` lives in `broken.py`, which cannot be imported at all.
"""

from __future__ import annotations

from typing import Any, Mapping

from ztmw import Principal, RequestView, TrustAssessment, VerifiedToken
from ztmw.typing import PluginDeps


class PluginBug(RuntimeError):
    """What a bug inside a plugin looks like to ztmw: an exception it did not ask for."""


def create_raising(settings: Mapping[str, Any], deps: PluginDeps) -> object:
    """Entry point `ztmw.verifiers: raises-at-start`: the factory itself fails."""
    raise PluginBug("the sample plugin could not start")


class RaisingVerifier:
    name = "raises-at-request"

    async def verify_token(self, token: str) -> VerifiedToken:
        raise PluginBug("bug in the sample verifier")


class RaisingEvaluator:
    name = "raises-at-request"

    def evaluate(
        self, principal: Principal | None, request: RequestView, current: TrustAssessment
    ) -> TrustAssessment:
        raise PluginBug("bug in the sample trust evaluator")


def create_raising_verifier(settings: Mapping[str, Any], deps: PluginDeps) -> RaisingVerifier:
    """Entry point `ztmw.verifiers: raises-at-request`."""
    return RaisingVerifier()


def create_raising_evaluator(settings: Mapping[str, Any], deps: PluginDeps) -> RaisingEvaluator:
    """Entry point `ztmw.trust_evaluators: raises-at-request`."""
    return RaisingEvaluator()
