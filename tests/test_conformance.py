"""The plugin conformance kit (ztmw.testing.conformance) run on real plugins, and shown to catch bad ones.

The sample third-party distribution (tests/sample_plugin) and the built-in `bearer` verifier both pass it, the
sample through its entry point and through the `create_verifier` hook; deliberately non-conforming verifiers
are run through the kit in a child pytest and must fail the check named for their fault.
"""

from __future__ import annotations

import secrets
import textwrap
from typing import Any, AsyncIterator, Mapping

import pytest
from ztmw_sample_plugin import api_key, hash_key

from ztmw.testing import DevIssuer, FakeClock
from ztmw.testing.conformance import (
    TokenVerifierConformance,
    TrustEvaluatorConformance,
    conformance_principal,
    conformance_view,
)
from ztmw.typing import PluginDeps, TokenVerifier

from .conftest import AUDIENCE

pytest_plugins = ["pytester"]

RESOURCE = {"identifier": AUDIENCE, "public_origin": "http://127.0.0.1", "realm": "api"}


class TestStaticApiKeyConformance(TokenVerifierConformance):
    """The sample verifier, loaded by its entry point `static-api-key`."""

    entry_point_name = "static-api-key"

    @pytest.fixture(autouse=True)
    def key_table(self, ztmw_clock: FakeClock) -> None:
        self.keys: list[dict[str, Any]] = []
        self.expiry: dict[str, float] = {}

    def _new_key(self, cnf: Mapping[str, str] | None = None) -> str:
        key = "zsk_" + secrets.token_urlsafe(32)
        expires_at = int(self.clock()) + 3600
        entry: dict[str, Any] = {"id": f"key-{len(self.keys)}", "sha256": hash_key(key),
                                 "subject": "svc-build", "client_id": "svc-build", "scopes": ["items:read"],
                                 "expires_at": expires_at}
        if cnf is not None:
            entry["cnf"] = dict(cnf)
        self.keys.append(entry)
        self.expiry[key] = expires_at
        return key

    def config(self) -> dict[str, Any]:
        return {"resource": RESOURCE, "plugins": {"static-api-key": {"keys": self.keys}}}

    async def valid_token(self) -> str:
        return self._new_key()

    async def bound_token(self, cnf: Mapping[str, str]) -> str | None:
        return self._new_key(cnf)

    def token_expires_at(self, token: str) -> float | None:
        return self.expiry.get(token)


class TestStaticApiKeyThroughCreateVerifier(TestStaticApiKeyConformance):
    """The same verifier given by the `create_verifier` hook instead of an entry point name."""

    entry_point_name = None

    def create_verifier(self, deps: PluginDeps) -> TokenVerifier:
        return api_key.create(deps.config.plugins["static-api-key"], deps)


class TestBearerConformance(TokenVerifierConformance):
    """The built-in JWT verifier, with DevIssuer tokens."""

    entry_point_name = "bearer"

    @pytest.fixture(autouse=True)
    async def dev_issuer(self, ztmw_clock: FakeClock) -> AsyncIterator[None]:
        async with DevIssuer(audience=AUDIENCE, clock=ztmw_clock) as issuer:
            self.issuer = issuer
            yield

    def config(self) -> dict[str, Any]:
        return {"resource": RESOURCE, "issuers": [self.issuer.issuer_config()]}

    async def valid_token(self) -> str:
        return self.issuer.mint("alice", scope="items:read")

    async def bound_token(self, cnf: Mapping[str, str]) -> str | None:
        return self.issuer.mint("alice", scope="items:read", cnf=cnf)


class TestIpReputationConformance(TrustEvaluatorConformance):
    entry_point_name = "ip-reputation"

    def config(self) -> dict[str, Any]:
        deny = ["203.0.113.0/24", "2001:db8::/32"]
        return {"resource": RESOURCE, "plugins": {"ip-reputation": {"deny": deny}}}

    def scenarios(self) -> list[tuple[Any, Any]]:
        denied = [conformance_view(peer=p) for p in ("203.0.113.9", "::ffff:203.0.113.9", "2001:db8::1")]
        odd = [conformance_view(peer=p) for p in ("not-an-address", "fe80::1%eth0", "")]
        return [*super().scenarios(), *((conformance_principal(), v) for v in (*denied, *odd)),
                *((None, v) for v in denied)]




class TestMappingConformance(TrustEvaluatorConformance):
    """The built-in evaluator. It builds a fresh assessment instead of refining `current`, which only works
    because it is always first in the chain: after another evaluator it would throw that one's work away."""

    entry_point_name = "mapping"

    def config(self) -> dict[str, Any]:
        return {"resource": RESOURCE, "trust": {"acr": {"urn:ztmw:conformance:acr": {"aal": 2, "ial": 2}},
                                                "amr": {"otp": {"aal": 2}}}}



# -- the kit catches what it claims to catch ---------------------------------------------------------------

BAD_VERIFIERS = textwrap.dedent('''
    from types import MappingProxyType
    from ztmw import InvalidToken, VerifiedToken
    from ztmw.testing.conformance import TokenVerifierConformance

    GOOD, BOUND = "good-token-for-the-kit-0123456789", "bound-token-for-the-kit-0123456789"


    class Verifier:
        name = "kit-check"

        def __init__(self, deps, cnf):
            self.deps, self.cnf = deps, cnf

        def result(self, token):
            return VerifiedToken(issuer="urn:kit", subject="s", audience=("https://api.example.com",),
                                 expires_at=4102444800.0, token_id="t", verifier=self.name,
                                 cnf=MappingProxyType(dict(self.cnf) if token == BOUND else {}))

        async def verify_token(self, token):
            if token in (GOOD, BOUND):
                return self.result(token)
            raise InvalidToken("invalid_token")


    class Conforming(TokenVerifierConformance):
        def create_verifier(self, deps):
            return self.verifier_class(deps, self.cnf)

        verifier_class = Verifier

        def config(self):
            return {"resource": {"identifier": "https://api.example.com"}}

        async def valid_token(self):
            return GOOD

        async def bound_token(self, cnf):
            self.cnf = cnf
            return BOUND

        def token_expires_at(self, token):
            return 4102444800.0

        cnf = {}


    class TestConforming(Conforming):
        pass


    class AcceptsAnything(Verifier):
        async def verify_token(self, token):
            return self.result(token)


    class TestAcceptsAnything(Conforming):
        verifier_class = AcceptsAnything


    class ExpiresFromNow(Verifier):
        def result(self, token):
            import dataclasses
            return dataclasses.replace(super().result(token), expires_at=self.deps.clock() + 300)


    class TestExpiresFromNow(Conforming):
        verifier_class = ExpiresFromNow


    class OutlivesToken(Verifier):
        def result(self, token):
            import dataclasses
            return dataclasses.replace(super().result(token), expires_at=4102444800.0 + 3600)


    class TestOutlivesToken(Conforming):
        verifier_class = OutlivesToken


    class DropsCnf(Verifier):
        def result(self, token):
            import dataclasses
            return dataclasses.replace(super().result(token), cnf=MappingProxyType({}))


    class TestDropsCnf(Conforming):
        verifier_class = DropsCnf


    class LogsToken(Verifier):
        async def verify_token(self, token):
            self.deps.logger.info("checking token", token=token)
            return await super().verify_token(token)


    class TestLogsToken(Conforming):
        verifier_class = LogsToken


    class CrashesOnGarbage(Verifier):
        async def verify_token(self, token):
            if token not in (GOOD, BOUND):
                raise ValueError("cannot parse")
            return self.result(token)


    class TestCrashesOnGarbage(Conforming):
        verifier_class = CrashesOnGarbage
''')


@pytest.fixture
def kit_outcomes(pytester: pytest.Pytester) -> dict[str, str]:
    """Run the kit on deliberately broken verifiers in a child pytest: {"Class::test[id]": outcome}."""
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_bad_verifiers=BAD_VERIFIERS)
    selection = " or ".join([
        "TestConforming",
        "TestAcceptsAnything and (vec-9449-2 or refuses_hostile)",
        "TestExpiresFromNow and pure",
        "TestOutlivesToken and expires_at",
        "TestDropsCnf and binding",
        "TestLogsToken and logs",
        "TestCrashesOnGarbage and alg-none",
    ])
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", "-q", "-k", selection)
    outcomes: dict[str, str] = {}
    for line in result.outlines:
        outcome, _, test_id = line.partition(" ")
        if outcome in ("PASSED", "FAILED", "SKIPPED", "ERROR") and "::" in test_id:
            outcomes[test_id.split(" - ")[0].split("::", 1)[1]] = outcome
    assert outcomes, "\n".join(result.outlines[-30:])
    return outcomes


def test_kit_passes_a_conforming_verifier_and_fails_each_broken_one(kit_outcomes: dict[str, str]) -> None:
    conforming = {k: v for k, v in kit_outcomes.items() if k.startswith("TestConforming::")}
    assert conforming and set(conforming.values()) == {"PASSED"}, conforming

    def failed(cls: str, test: str) -> bool:
        return any(v == "FAILED" for k, v in kit_outcomes.items() if k.startswith(f"{cls}::{test}"))

    assert failed("TestAcceptsAnything", "test_hostile_token_gets_a_catalogue_refusal[vec-9449-2-opaque]")
    assert failed("TestAcceptsAnything", "test_verify_token_refuses_hostile_token_with_invalid_token")
    assert failed("TestExpiresFromNow", "test_verify_token_is_pure_in_the_token")
    assert failed("TestOutlivesToken", "test_expires_at_is_not_beyond_the_tokens_exp")
    assert failed("TestDropsCnf", "test_binding_is_confirmed_on_every_request_even_on_cache_hits")
    assert failed("TestLogsToken", "test_no_token_text_in_logs_or_cache_keys")
    assert failed("TestCrashesOnGarbage", "test_verify_token_refuses_hostile_token_with_invalid_token[alg-")
    # the core still keeps the app closed for the crashing one: only the direct check can see it
    through_app = "TestCrashesOnGarbage::test_hostile_token_gets_a_catalogue_refusal[alg-none]"
    assert kit_outcomes[through_app] == "PASSED"
