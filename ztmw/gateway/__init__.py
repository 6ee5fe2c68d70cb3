"""The gateway: ztmw's pipeline in front of services written in any language (`ztmw gateway`).

Above the pipeline, beside `middleware.py`; the pipeline never imports it. `decision`, `routes` and
`assertion` are plain code; `app`, `forward_auth` and `proxy` are the adapter modules that speak aiohttp.
"""

from .app import create_gateway_app
from .assertion import ASSERTION_TYPE, JWKS_PATH

__all__ = ["ASSERTION_TYPE", "JWKS_PATH", "create_gateway_app"]
