"""Principal -> TrustAssessment: trust on separate axes, each with the inputs that produced it.

Authentication strength (AAL: how hard is it to impersonate the user) and identity assurance (IAL: how sure
are we the account is the physical person) come from `acr`/`amr` through the configured mapping; a TOTP adds
strength, not assurance. Levels combine by maximum and unknown values count for nothing (AMR-03).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .config import TrustConfig, check_plugin_settings
from .errors import UpstreamUnavailable
from .models import ANONYMOUS_TRUST, Principal, RequestView, TrustAssessment
from .typing import Clock, PluginDeps, TrustEvaluator

_ASSESSED_MAX = 1024


class MappingTrustEvaluator:
    """The default evaluator: reads the `[trust.acr]` and `[trust.amr]` tables."""

    name = "mapping"
    memo_safe = True  # reads only the token and the clock (a replay of an auth_time token evaluates it again)

    def __init__(self, config: TrustConfig, clock: Clock) -> None:
        # (levels, explanation) per known value, built once: the per-request work is two dict lookups
        self._acr = {v: (lv, f"acr={v}:aal{lv.aal}/ial{lv.ial}") for v, lv in config.acr.items()}
        self._amr = {m: (lv, f"amr={m}:aal{lv.aal}/ial{lv.ial}") for m, lv in config.amr.items()}
        self._clock = clock
        # the assessment of a login without auth_time, first in the chain, depends on (acr, amr, binding) alone,
        # and the same few combinations recur token after token: each is assessed once (bounded; emptied when full)
        self._assessed: dict[tuple[str | None, tuple[str, ...], str | None], TrustAssessment] = {}

    def evaluate(
        self, principal: Principal | None, request: RequestView, current: TrustAssessment = ANONYMOUS_TRUST
    ) -> TrustAssessment:
        if principal is None:
            return current
        token = principal.token
        if token.auth_time is None and current is ANONYMOUS_TRUST and type(token.amr) is tuple:
            key = (token.acr, token.amr, principal.binding)  # amr a tuple of str from the built-in verifiers
            try:
                assessed = self._assessed.get(key)
            except TypeError:  # another verifier's unhashable value: assessed as it comes
                return self._assess(principal, current)
            if assessed is None:
                if len(self._assessed) >= _ASSESSED_MAX:
                    self._assessed.clear()
                assessed = self._assessed[key] = self._assess(principal, current)
            return assessed
        return self._assess(principal, current)

    def _assess(self, principal: Principal, current: TrustAssessment) -> TrustAssessment:
        token = principal.token
        aal, ial = current.aal, current.ial  # refine what earlier evaluators found; never forget their reasons
        inputs: list[str] = list(current.inputs)
        if token.acr is not None:
            known = self._acr.get(token.acr)
            if known is not None:
                aal, ial = max(aal, known[0].aal), max(ial, known[0].ial)
                inputs.append(known[1])
            else:  # kept for acr_values rules, worth nothing for levels (AMR-03)
                inputs.append(f"acr={token.acr}:unmapped")
        for method in token.amr:
            known = self._amr.get(method)
            if known is not None:
                aal, ial = max(aal, known[0].aal), max(ial, known[0].ial)
                inputs.append(known[1])
        auth_age = current.auth_age
        if token.auth_time is not None:
            auth_age = max(0.0, self._clock() - token.auth_time)
            inputs.append(f"auth_age={int(auth_age)}s")
        if principal.binding:
            inputs.append(f"binding={principal.binding}")
        return TrustAssessment(
            aal=aal, ial=ial, binding=principal.binding or current.binding, auth_age=auth_age,
            acr=token.acr if token.acr is not None else current.acr, inputs=tuple(inputs),
        )


def create_mapping_evaluator(settings: Mapping[str, Any], deps: PluginDeps) -> MappingTrustEvaluator:
    """Entry point `mapping` in `ztmw.trust_evaluators`: configured by `[trust.acr]` and `[trust.amr]`."""
    check_plugin_settings(settings, "mapping", hint="configure [trust] instead")
    return MappingTrustEvaluator(deps.config.trust, deps.clock)


class TrustChain:
    """Runs the configured evaluators in order. An evaluator that raises denies with 503 (fail closed)."""

    def __init__(self, evaluators: Sequence[tuple[str, TrustEvaluator]], logger: Any) -> None:
        self._evaluators = tuple(evaluators)
        self._log = logger

    def evaluate(self, principal: Principal | None, request: RequestView) -> TrustAssessment:
        assessment = ANONYMOUS_TRUST
        for name, evaluator in self._evaluators:
            try:
                assessment = evaluator.evaluate(principal, request, assessment)
            except Exception:
                self._log.exception("ztmw.plugin_error", plugin=name, group="ztmw.trust_evaluators")
                raise UpstreamUnavailable("plugin_error") from None
            if not isinstance(assessment, TrustAssessment):  # e.g. an `async def evaluate`: a coroutine
                self._log.error("ztmw.plugin_error", plugin=name, group="ztmw.trust_evaluators",
                                error="evaluate did not return a TrustAssessment")
                raise UpstreamUnavailable("plugin_error")
        return assessment
