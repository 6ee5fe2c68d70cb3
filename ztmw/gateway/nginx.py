"""The nginx side of forward-auth, as the README shows it, the tests run it and `ztmw demo --gateway` and
`benchmarks/gateway.py` start it: one place, so the documented configuration is the tested one.

`FORWARD_AUTH_LOCATIONS` asks the gateway before every request (`auth_request`), passes the identity headers
on and the challenge headers back, and keeps a 400 or 503 of the decision service (nginx itself would turn
any status but 2xx, 401 and 403 into a 500). `FORWARD_AUTH_HTTP` goes in the `http` block.
"""

from __future__ import annotations

import os
from pathlib import Path

FORWARD_AUTH_HTTP = """
    # auth_request passes a 401's WWW-Authenticate on by itself; add it for the other statuses only
    map $ztmw_status $ztmw_other_challenge {
        401 "";
        default $ztmw_challenge;
    }
"""
FORWARD_AUTH_LOCATIONS = """
        location = /_ztmw {
            internal;
            proxy_pass http://ztmw;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Forwarded-Method $request_method;
            proxy_set_header X-Forwarded-Uri $request_uri;
        }
        location = /.well-known/oauth-protected-resource {
            proxy_pass http://ztmw;
        }
        location / {
            auth_request /_ztmw;
            auth_request_set $ztmw_status $upstream_status;
            auth_request_set $ztmw_challenge $upstream_http_www_authenticate;
            auth_request_set $ztmw_nonce $upstream_http_dpop_nonce;
            auth_request_set $ztmw_cache $upstream_http_cache_control;
            auth_request_set $ztmw_subject $upstream_http_x_ztmw_subject;
            auth_request_set $ztmw_client_id $upstream_http_x_ztmw_client_id;
            auth_request_set $ztmw_aal $upstream_http_x_ztmw_aal;
            auth_request_set $ztmw_ial $upstream_http_x_ztmw_ial;
            auth_request_set $ztmw_binding $upstream_http_x_ztmw_binding;
            auth_request_set $ztmw_rule $upstream_http_x_ztmw_rule;
            auth_request_set $ztmw_identity $upstream_http_x_ztmw_identity;
            add_header WWW-Authenticate $ztmw_other_challenge always;
            add_header DPoP-Nonce $ztmw_nonce always;
            add_header Cache-Control $ztmw_cache always;
            error_page 500 = @ztmw_error;
            proxy_set_header X-Ztmw-Subject $ztmw_subject;
            proxy_set_header X-Ztmw-Client-Id $ztmw_client_id;
            proxy_set_header X-Ztmw-Aal $ztmw_aal;
            proxy_set_header X-Ztmw-Ial $ztmw_ial;
            proxy_set_header X-Ztmw-Binding $ztmw_binding;
            proxy_set_header X-Ztmw-Rule $ztmw_rule;
            proxy_set_header X-Ztmw-Identity $ztmw_identity;
            proxy_set_header Authorization "";
            proxy_set_header DPoP "";
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://app;
        }
        location @ztmw_error {
            add_header WWW-Authenticate $ztmw_challenge always;
            if ($ztmw_status = 400) {
                return 400;
            }
            return 503;
        }
"""

PROXY_LOCATIONS = """
        location / {
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://app;
        }
"""
"""nginx alone in front of the upstream: what forward-auth is measured against."""

NGINX_CONF = """
worker_processes 1;
daemon off;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{http_extra}
    upstream ztmw {{ server 127.0.0.1:{gateway_port}; keepalive 16; }}
    upstream app {{ server 127.0.0.1:{upstream_port}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
{locations}
    }}
}}
"""


def nginx_conf(prefix: Path, *, port: int, gateway_port: int, upstream_port: int, locations: str,
               http_extra: str = "") -> str:
    """A complete nginx.conf for a foreground nginx with every file under `prefix`, listening on loopback.
    `user` is set only when running as root (workers would otherwise drop to nobody)."""
    return NGINX_CONF.format(user="user root;" if os.geteuid() == 0 else "", prefix=prefix, port=port,
                             gateway_port=gateway_port, upstream_port=upstream_port, locations=locations,
                             http_extra=http_extra)
