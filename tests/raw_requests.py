"""Raw request bytes on a socket, with a random marker inside, and the search for any part of it in what came
back or was logged: for the tests that a refused request's bytes (a token) never reach a response or a log."""

from __future__ import annotations

import asyncio
import secrets
import string


def new_marker() -> str:
    """32 random letters: no eight of them in a row turn up in log or response text by chance."""
    return "".join(secrets.choice(string.ascii_letters) for _ in range(32))


def fragments(marker: str) -> list[bytes]:
    """Every 8-character window of the marker: "any part of the header value", not only the whole of it."""
    return [marker[i:i + 8].encode() for i in range(len(marker) - 7)]


def leaked(marker: str, data: bytes) -> list[bytes]:
    return [part for part in fragments(marker) if part in data]


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send `data` to a loopback port and read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    reply = await reader.read()
    writer.close()
    await writer.wait_closed()
    return reply
