"""The RFC 9110 §11.6.1 challenge grammar (one challenge per field line), parsed strictly: what tests hold every WWW-Authenticate line to."""

from __future__ import annotations

import re

_TOKEN = r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+"
_PARAM = re.compile(
    rf'[ \t]*(?P<name>{_TOKEN})[ \t]*=[ \t]*(?:(?P<token>{_TOKEN})|"(?P<quoted>(?:[^"\\]|\\.)*)")[ \t]*'
)


def parse_challenge(value: str) -> tuple[str, list[tuple[str, str]]]:
    """`scheme [1*SP auth-param *( "," auth-param )]` -> (scheme, [(name, value), ...]) in wire order."""
    match = re.match(rf"({_TOKEN})(?: +|$)", value)
    assert match, f"no auth-scheme in {value!r}"
    scheme, rest = match.group(1), value[match.end():]
    params: list[tuple[str, str]] = []
    pos = 0
    while pos < len(rest):
        param = _PARAM.match(rest, pos)
        assert param, f"bad auth-param at {rest[pos:]!r} in {value!r}"
        raw = param.group("token") if param.group("token") is not None else param.group("quoted")
        params.append((param.group("name").lower(), re.sub(r"\\(.)", r"\1", raw)))
        pos = param.end()
        if pos < len(rest):
            assert rest[pos] == ",", f"expected ',' at {rest[pos:]!r} in {value!r}"
            pos += 1
            assert pos < len(rest), "trailing comma"
    return scheme, params
