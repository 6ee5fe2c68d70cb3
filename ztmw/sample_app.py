"""A small banking-style API used by `ztmw serve` (without a factory) and by `ztmw demo`.

Its routes exercise every kind of rule: public, scopes, ownership, binding, trust minimums and an admin route
that no rule covers (and so is always denied).
"""

from __future__ import annotations

from aiohttp import web

from .middleware import PRINCIPAL, TRUST

SAMPLE_RULES = [
    {"id": "health", "path": "/health", "methods": ["GET"], "public": True},
    {"id": "own-transactions", "path": "/users/{user}/transactions", "methods": ["GET"],
     "scopes": ["transactions:read"], "owner": "user"},
    {"id": "profile", "path": "/profile", "methods": ["GET"], "scopes": ["profile:read"]},
    {"id": "profile-change", "path": "/profile", "methods": ["PUT"], "scopes": ["profile:write"], "min_ial": 3,
     "acr_values": ["urn:example:acr:bankid"]},
    {"id": "payments", "path": "/payments", "methods": ["POST"], "scopes": ["payments:write"],
     "binding": "required", "min_aal": 2, "max_auth_age": 300, "acr_values": ["urn:example:acr:bankid"]},
    {"id": "reports", "path": "/reports", "methods": ["GET"], "scopes": ["reports:read"], "subject_type": "user"},
]

SAMPLE_TRUST = {
    "acr": {
        "urn:example:acr:bankid": {"aal": 2, "ial": 3},
        "urn:example:acr:social": {"aal": 1, "ial": 1},
    },
    "amr": {"pwd": {"aal": 1}, "otp": {"aal": 2}, "hwk": {"aal": 3}},
}


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def transactions(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    return web.json_response({"user": request.match_info["user"], "subject": principal and principal.subject,
                              "transactions": [{"id": 1, "amount": "12.50"}]})


async def profile(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    assert principal is not None  # the rule requires a verified principal
    return web.json_response({"subject": principal.subject, "client_id": principal.caller.client_id})


async def update_profile(request: web.Request) -> web.Response:
    return web.json_response({"updated": True, "ial": request[TRUST].ial})


async def payments(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    assert principal is not None
    return web.json_response({"paid": True, "binding": principal.binding}, status=201)


async def reports(request: web.Request) -> web.Response:
    return web.json_response({"reports": []})


async def admin(request: web.Request) -> web.Response:  # no rule covers it: ztmw denies before this runs
    return web.json_response({"secret": "never served"})


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/users/{user}/transactions", transactions)
    app.router.add_get("/profile", profile)
    app.router.add_put("/profile", update_profile)
    app.router.add_post("/payments", payments)
    app.router.add_get("/reports", reports)
    app.router.add_get("/admin", admin)
    return app
