"""Rule patterns as the gateway's router, and the targets it refuses to guess about."""

from __future__ import annotations

import pytest

from ztmw import ConfigurationError, Rule
from ztmw.gateway.routes import MalformedTarget, RuleRoutes, parse_target
from ztmw.models import RouteRef

RULES = [
    Rule(id="get-user", path="/users/{user}", methods=frozenset({"GET"})),
    Rule(id="put-user", path="/users/{user}", methods=frozenset({"PUT"})),
    Rule(id="file", path="/files/{name:[a-z]+\\.txt}"),
    Rule(id="any", path="/static/{rest:.*}", public=True),
]


def test_first_rule_covering_path_and_method_wins() -> None:
    routes = RuleRoutes(RULES)
    assert routes.match("GET", "/users/alice") == (RouteRef("GET", "/users/{user}"), {"user": "alice"})
    assert routes.match("HEAD", "/users/alice") is not None  # GET covers HEAD
    assert routes.match("PUT", "/users/alice") is not None
    assert routes.match("DELETE", "/users/alice") is None
    assert routes.match("GET", "/users/alice/x") is None  # {user} is one segment
    assert routes.match("GET", "/users/") is None


def test_regex_parts_match_as_aiohttp_would() -> None:
    routes = RuleRoutes(RULES)
    assert routes.match("POST", "/files/notes.txt") == (RouteRef("POST", "/files/{name}"), {"name": "notes.txt"})
    assert routes.match("POST", "/files/notes.md") is None
    assert routes.match("GET", "/static/a/b/c") == (RouteRef("GET", "/static/{rest}"), {"rest": "a/b/c"})


def test_an_invalid_pattern_stops_start_up() -> None:
    with pytest.raises(ConfigurationError, match="rules\\['bad'\\].path"):
        RuleRoutes([Rule(id="bad", path="/x/{a:[}")])


def test_target_keeps_the_raw_path_and_query() -> None:
    target = parse_target("/users/%61lice?x=%20y&z")
    assert (target.raw_path, target.path, target.query) == ("/users/%61lice", "/users/alice", "x=%20y&z")
    assert parse_target("/").path == "/"
    assert parse_target("/a/").path == "/a/"


@pytest.mark.parametrize("target", ["", "*", "a/b", "http://x/a", "/a/../b", "/a/./b", "/a/%2E%2e/b", "/a//b",
                                    "/a%2fb", "/a%5Cb", "/a%00b", "/a\\b", "/a b", "/a#f", "/a%zz", "/a%",
                                    "/%c3%28", "/a%0d%0ab", "/a?b c", "/a?b\x00"])
def test_ambiguous_targets_are_refused(target: str) -> None:
    with pytest.raises(MalformedTarget):
        parse_target(target)
