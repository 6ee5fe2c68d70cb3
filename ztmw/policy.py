"""Deny-by-default rules: route -> rule -> Decision, or the AuthError that says what is missing.

Rules cover aiohttp route patterns and methods, never raw paths, so `/users/{id:\\d+}` and percent-encoding
tricks cannot slip past a prefix match. First match wins; a route no rule covers is denied before credentials
are even looked at, because nothing could allow it.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from .config import Levels, Rule
from .errors import (
    AccessDenied,
    AuthError,
    InsufficientScope,
    InsufficientUserAuthentication,
    InvalidToken,
    MissingCredentials,
    UpstreamUnavailable,
)
from .models import Decision, Principal, RequestView, RouteRef, TrustAssessment
from .typing import Condition


def canonical_pattern(path: str) -> str:
    """`/users/{id:\\d+}` -> `/users/{id}`, the form aiohttp's `resource.canonical` reports."""
    out: list[str] = []
    i = 0
    while i < len(path):
        if path[i] != "{":
            out.append(path[i])
            i += 1
            continue
        depth, j = 1, i + 1
        while j < len(path) and depth:
            depth += {"{": 1, "}": -1}.get(path[j], 0)
            j += 1
        name = path[i + 1 : j - 1].split(":", 1)[0]
        out.append("{" + name + "}")
        i = j
    return "".join(out)


class RulePolicy:
    """The `[[rules]]` table, indexed by canonical pattern for an O(1) lookup per request."""

    def __init__(
        self,
        rules: Iterable[Rule],
        *,
        acr_levels: Mapping[str, Levels] | None = None,
        conditions: Mapping[str, Condition] | None = None,
        owner_requires_link: bool = False,
        logger: Any = None,
    ) -> None:
        self._owner_requires_link = owner_requires_link
        self._log = logger
        self.rules = tuple(rules)
        self._conditions = dict(conditions or {})
        missing = {c for rule in self.rules for c in rule.conditions} - set(self._conditions)
        if missing:
            raise ValueError(f"no condition plugin loaded for {sorted(missing)}")
        self._by_pattern: dict[str, list[Rule]] = {}
        for rule in self.rules:
            self._by_pattern.setdefault(canonical_pattern(rule.path), []).append(rule)
        self._acr_levels = dict(acr_levels or {})
        # what a rule of this table that asks nothing of the caller (any binding, client, subject type, actor)
        # answers when it allows: one shared Decision, and the caller checks skipped (they could not refuse)
        self._caller_free: dict[int, Decision] = {
            id(rule): Decision(True, "allowed", rule.id) for rule in self.rules if not _asks_of_caller(rule)
        }

    def rule_for(self, route: RouteRef) -> Rule | None:
        for rule in self._by_pattern.get(route.pattern, ()):
            if rule.covers(route.method):
                return rule
        return None

    def decide(
        self, rule: Rule, principal: Principal | None, trust: TrustAssessment, request: RequestView
    ) -> Decision:
        """Allow, or raise the AuthError whose challenge tells the client what would satisfy the rule."""
        for name in rule.conditions:  # predicates apply to public routes too (e.g. "from the office network")
            try:
                satisfied = self._conditions[name].check(principal, trust, request)
            except Exception:  # a broken predicate denies (SEC-07), it never allows and never answers 500
                if self._log is not None:
                    self._log.exception("ztmw.plugin_error", plugin=name, group="ztmw.conditions")
                raise UpstreamUnavailable("plugin_error") from None
            if satisfied is not True:
                raise AccessDenied("condition_failed", params={"condition": name})
        if rule.public:
            return Decision(True, "public", rule.id)
        if principal is None:
            raise MissingCredentials()
        try:
            return self._decide_for(rule, principal, trust, request)
        except AuthError as error:  # refusals are rendered on the scheme the token came with (RFC 9470 §3)
            error.scheme = error.scheme or ("dpop" if principal.binding == "dpop" else principal.scheme)
            raise

    def _decide_for(
        self, rule: Rule, principal: Principal, trust: TrustAssessment, request: RequestView
    ) -> Decision:
        allowed = self._caller_free.get(id(rule))  # rules are kept in self.rules: their ids stay theirs
        if allowed is None:
            self._check_binding(rule, principal)
            self._check_caller(rule, principal)
        scopes = principal.scopes  # a frozenset from the built-in verifiers; any container from another
        if not (scopes.issuperset(rule.scopes) if type(scopes) is frozenset else all(s in scopes for s in rule.scopes)):
            raise InsufficientScope(params={"scope": " ".join(rule.scopes)})
        self._check_authentication(rule, trust)
        if rule.owner is not None:
            if request.match_info.get(rule.owner) != principal.subject:
                raise AccessDenied("not_owner")
            if self._owner_requires_link and not principal.linked:  # a raw sub is no account id (see README)
                raise AccessDenied("not_owner", params={"owner": "link_required"})
        return allowed or Decision(True, "allowed", rule.id)

    # _asks_of_caller (below the class) says which rules these two checks can refuse: keep them in step
    def _check_binding(self, rule: Rule, principal: Principal) -> None:
        binding = principal.binding
        if rule.binding == "any":
            return
        if rule.binding == "required" and binding is not None:
            return
        if rule.binding == binding:
            return
        raise InvalidToken("binding_required", params={"binding": rule.binding})

    def _check_caller(self, rule: Rule, principal: Principal) -> None:
        token = principal.token
        if rule.clients and principal.caller.client_id not in rule.clients:
            raise AccessDenied("client_not_allowed")
        caller = principal.caller
        if rule.proven_caller and caller.proof is None and caller.certificate is None:
            # the caller must hold a key: a bound token, or at least a client certificate on this connection
            raise AccessDenied("caller_not_proven")
        is_client_token = token.client_id is not None and token.subject == token.client_id
        if rule.subject_type == "user" and is_client_token:
            raise AccessDenied("user_required")
        if rule.subject_type == "client" and not is_client_token:
            raise AccessDenied("client_required")
        if not rule.allow_delegation and token.actor is not None:
            raise AccessDenied("delegation_not_allowed")

    def _check_authentication(self, rule: Rule, trust: TrustAssessment) -> None:
        acr_ok = not rule.acr_values or trust.acr in rule.acr_values
        if not acr_ok or trust.aal < rule.min_aal or trust.ial < rule.min_ial:
            raise InsufficientUserAuthentication(
                "insufficient_user_authentication", params=self._step_up_params(rule, include_age=True)
            )
        if rule.max_auth_age is not None and (trust.auth_age is None or trust.auth_age > rule.max_auth_age):
            raise InsufficientUserAuthentication("auth_too_old", params={"max_age": str(rule.max_auth_age)})

    def _step_up_params(self, rule: Rule, *, include_age: bool) -> dict[str, str]:
        """RFC 9470 has no amr or level parameter: name the ACRs that would satisfy the rule (AMR-04)."""
        acr_values = list(rule.acr_values) or [
            acr for acr, lv in self._acr_levels.items() if lv.aal >= rule.min_aal and lv.ial >= rule.min_ial
        ]
        params = {}
        if acr_values:
            params["acr_values"] = " ".join(acr_values)
        if include_age and rule.max_auth_age is not None:
            params["max_age"] = str(rule.max_auth_age)
        return params


def _asks_of_caller(rule: Rule) -> bool:
    """Whether `_check_binding` or `_check_caller` can refuse a principal under `rule` (a binding, a client
    list, a proven caller, a subject type, no delegation); a rule that asks none of it skips them."""
    return (rule.binding != "any" or bool(rule.clients) or rule.proven_caller or rule.subject_type != "any"
            or not rule.allow_delegation)
