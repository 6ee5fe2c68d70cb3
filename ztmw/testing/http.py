"""Small helpers for tests that talk to a ztmw-protected server over real sockets."""

from __future__ import annotations

import re
import socket
from typing import Any

_PARAM = r'([A-Za-z_]+)="((?:[^"\\]|\\.)*)"'
_PARAMS = re.compile(rf"{_PARAM}(?:\s*,\s*{_PARAM})*")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers whose URL must be known before they start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def challenges(response: Any) -> dict[str, dict[str, str]]:
    """A response's WWW-Authenticate field lines as {scheme: {param: value}}, quoted-strings unescaped.

    Raises ValueError for what the response catalogue forbids: a line that is not a list of quoted auth-params,
    a parameter repeated within a challenge (RESP-16), or two lines for one scheme (RESP-03).
    """
    parsed: dict[str, dict[str, str]] = {}
    for line in response.headers.getall("WWW-Authenticate", []):
        scheme, _, rest = line.partition(" ")
        if not _PARAMS.fullmatch(rest):
            raise ValueError(f"not a list of auth-params: {line!r}")
        params: dict[str, str] = {}
        for match in re.finditer(_PARAM, rest):
            if match.group(1) in params:
                raise ValueError(f"parameter repeated in {line!r} (RESP-16)")
            params[match.group(1)] = re.sub(r"\\(.)", r"\1", match.group(2))
        if scheme in parsed:
            raise ValueError("one field line per scheme (RESP-03)")
        parsed[scheme] = params
    return parsed
