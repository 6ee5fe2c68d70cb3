"""The original request's method and target -> the rule pattern it falls under, without an app router.

In a gateway the rules are the only routes: a path matches a rule's aiohttp pattern (`/users/{user}`,
`/files/{name:\\w+}`) exactly as aiohttp's router would match it, and the result is the same `RouteRef` and
match info the middleware hands the pipeline. A target whose meaning depends on who decodes it (dot segments,
an encoded `/` or `\\`, empty segments, control characters) is refused as malformed: the gateway and the
upstream must never disagree about which resource a request names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Mapping
from urllib.parse import unquote

from ..config import Rule
from ..errors import ConfigurationError
from ..models import RouteRef
from ..policy import canonical_pattern

# aiohttp's own grammar for a dynamic resource (web_urldispatcher.DynamicResource)
_PART = re.compile(r"(\{[_a-zA-Z][^{}]*(?:\{[^{}]*\}[^{}]*)*\})")
_PLAIN_VAR = re.compile(r"\{(?P<var>[_a-zA-Z][_a-zA-Z0-9]*)\}")
_REGEX_VAR = re.compile(r"\{(?P<var>[_a-zA-Z][_a-zA-Z0-9]*):(?P<re>.+)\}")
_SEGMENT = r"[^{}/]+"

# what a target may hold as sent: RFC 3986 pchar, "/" and "%" (checked below), nothing else
_TARGET_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")
_QUERY_CHARS = re.compile(r"[\x21-\x22\x24-\x7e]*")
_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_AMBIGUOUS_ESCAPES = re.compile(r"%(2[fF]|5[cC]|00)")


class MalformedTarget(ValueError):
    """The original request target cannot be decided on without guessing how the upstream reads it."""


@dataclass(frozen=True, slots=True)
class Target:
    """An original request target, split and checked: `raw_path` as sent (DPoP `htu`, forwarding), `path`
    percent-decoded (matching), `query` as sent."""

    raw_path: str
    path: str
    query: str


def parse_target(target: str) -> Target:
    """Split and check an origin-form request target (RFC 9112 §3.2.1); raises MalformedTarget."""
    raw_path, _, query = target.partition("?")
    if not raw_path.startswith("/") or "#" in target:
        raise MalformedTarget("not an origin-form target")
    if not _TARGET_CHARS.fullmatch(raw_path) or _PERCENT.search(raw_path) or _AMBIGUOUS_ESCAPES.search(raw_path):
        raise MalformedTarget("characters or escapes the upstream may read differently")
    if not _QUERY_CHARS.fullmatch(query):  # never decided on, forwarded as sent: only no whitespace or controls
        raise MalformedTarget("malformed query")
    try:
        path = unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        raise MalformedTarget("percent-encoding is not UTF-8") from None
    segments = path.split("/")[1:]
    if any(s in (".", "..") for s in segments) or "" in segments[:-1]:
        raise MalformedTarget("dot or empty segments")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise MalformedTarget("control characters")
    return Target(raw_path=raw_path, path=path, query=query)


@dataclass(frozen=True, slots=True)
class _Pattern:
    regex: re.Pattern[str]
    canonical: str
    rules: tuple[Rule, ...]


class RuleRoutes:
    """The rules' patterns as a router: first rule (in configuration order) whose pattern matches the path and
    whose methods cover the method wins, as with the app's router followed by the policy's lookup."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self._patterns: list[_Pattern] = []
        raw_by_canonical: dict[str, str] = {}
        grouped: dict[str, list[Rule]] = {}
        for rule in rules:
            canonical = canonical_pattern(rule.path)
            previous = raw_by_canonical.setdefault(canonical, rule.path)
            if previous != rule.path:
                # the policy finds rules by canonical pattern: two spellings would let one rule answer for another
                raise ConfigurationError(
                    f"rules[{rule.id!r}].path: {rule.path!r} and {previous!r} differ only in their regular "
                    "expressions; in a gateway, rules for one pattern must spell it the same way")
            if canonical not in grouped:
                grouped[canonical] = []
                self._patterns.append(_Pattern(compile_pattern(rule.path, rule.id), canonical, ()))
            grouped[canonical].append(rule)
        self._patterns = [_Pattern(p.regex, p.canonical, tuple(grouped[p.canonical])) for p in self._patterns]

    def match(self, method: str, path: str) -> tuple[RouteRef, Mapping[str, str]] | None:
        """The route and match info for a decoded path, or None when no rule covers it (deny)."""
        for pattern in self._patterns:
            found = pattern.regex.fullmatch(path)
            if found is not None and any(rule.covers(method) for rule in pattern.rules):
                return RouteRef(method, pattern.canonical), MappingProxyType(found.groupdict())
        return None

    def patterns(self) -> list[tuple[str, tuple[Rule, ...]]]:
        return [(p.canonical, p.rules) for p in self._patterns]


def compile_pattern(path: str, rule_id: str) -> re.Pattern[str]:
    """An aiohttp route pattern as a regular expression over the decoded path."""
    out: list[str] = []
    for part in _PART.split(path):
        plain = _PLAIN_VAR.fullmatch(part)
        if plain is not None:
            out.append(f"(?P<{plain.group('var')}>{_SEGMENT})")
            continue
        custom = _REGEX_VAR.fullmatch(part)
        if custom is not None:
            out.append(f"(?P<{custom.group('var')}>{custom.group('re')})")
            continue
        if "{" in part or "}" in part:
            raise ConfigurationError(f"rules[{rule_id!r}].path: invalid pattern part {part!r}")
        out.append(re.escape(part))
    try:
        return re.compile("".join(out))
    except re.error as exc:
        raise ConfigurationError(f"rules[{rule_id!r}].path: {exc}") from None
