"""HTTP calls of tests that must end: a request still unanswered after `GUARD` seconds fails its test."""

from __future__ import annotations

import asyncio
from typing import Any

GUARD = 20.0  # seconds after which a request counts as hung (generous: the point is "bounded", not "fast")

Result = tuple[int, Any, str]
"""(status, headers, body text)"""


async def call(client: Any, path: str = "/items", headers: dict[str, str] | None = None) -> Result:
    async with asyncio.timeout(GUARD):  # a hang is a failure, not a slow test
        response = await client.get(path, headers=headers or {})
        body = await response.text()
    return response.status, response.headers, body


async def bearer(client: Any, token: str) -> Result:
    return await call(client, headers={"Authorization": f"Bearer {token}"})
