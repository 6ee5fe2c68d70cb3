"""Principal -> TrustAssessment: trust on separate axes, each with the inputs that produced it.

Authentication strength (AAL: how hard is it to impersonate the user) and identity assurance (IAL: how sure
are we the account is the physical person) come from `acr`/`amr` through the configured mapping; a TOTP adds
strength, not assurance. Levels combine by maximum and unknown values count for nothing (AMR-03).
"""

from __future__ import annotations

from .config import TrustConfig
from .models import ANONYMOUS_TRUST, Principal, RequestView, TrustAssessment
from .typing import Clock


class MappingTrustEvaluator:
    """The default evaluator: reads the `[trust.acr]` and `[trust.amr]` tables."""

    name = "mapping"

    def __init__(self, config: TrustConfig, clock: Clock) -> None:
        self._acr = config.acr
        self._amr = config.amr
        self._clock = clock

    def evaluate(self, principal: Principal | None, request: RequestView) -> TrustAssessment:
        if principal is None:
            return ANONYMOUS_TRUST
        token = principal.token
        aal = ial = 0
        inputs: list[str] = []
        if token.acr is not None and token.acr in self._acr:
            levels = self._acr[token.acr]
            aal, ial = max(aal, levels.aal), max(ial, levels.ial)
            inputs.append(f"acr={token.acr}:aal{levels.aal}/ial{levels.ial}")
        for method in token.amr:
            levels = self._amr.get(method)
            if levels is not None:
                aal, ial = max(aal, levels.aal), max(ial, levels.ial)
                inputs.append(f"amr={method}:aal{levels.aal}/ial{levels.ial}")
        auth_age = None
        if token.auth_time is not None:
            auth_age = max(0.0, self._clock() - token.auth_time)
            inputs.append(f"auth_age={int(auth_age)}s")
        if principal.binding:
            inputs.append(f"binding={principal.binding}")
        return TrustAssessment(
            aal=aal, ial=ial, binding=principal.binding, auth_age=auth_age, acr=token.acr, inputs=tuple(inputs)
        )
