"""Keys, certificates, ztmw configs, tokens and DPoP proofs for the benchmark servers, written to a work dir.

Everything is made with ztmw's own test kit (DevIssuer, TestCA) or plain `cryptography`, with no network.
DPoP proofs are made here rather than with `DPoPKey.proof()` only because the load scripts need tens of
thousands per scenario and round: the same RFC 9449 proof, with the header encoded once (~3x faster).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apps import AUDIENCE, ISSUER, PUBLIC_ORIGIN, SCOPE
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ztmw.testing import DevIssuer, TestCA
from ztmw.testing.dpop import access_token_hash, jwk_thumbprint

PATH = "/hello/ann"
HTU = PUBLIC_ORIGIN + PATH
REDIS_URL = "redis://127.0.0.1:6379/0"
TOKEN_LIFETIME = 4 * 3600  # long enough for any run; ztmw re-checks exp on every request anyway


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ProofMaker:
    """An ES256 DPoP key that makes many fresh proofs (unique jti, iat = now) for one request and token."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        numbers = self._key.public_key().public_numbers()
        self.jwk = {"kty": "EC", "crv": "P-256", "x": b64url(numbers.x.to_bytes(32, "big")),
                    "y": b64url(numbers.y.to_bytes(32, "big"))}
        self.thumbprint = jwk_thumbprint(self.jwk)
        header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": self.jwk}
        self._header = b64url(json.dumps(header, separators=(",", ":")).encode())
        self._ath = ""

    def bind(self, token: str) -> None:
        self._ath = access_token_hash(token)

    def proofs(self, count: int, method: str = "GET", htu: str = HTU) -> list[str]:
        iat = int(time.time())
        prefix = secrets.token_urlsafe(9)
        sign, algorithm = self._key.sign, ec.ECDSA(hashes.SHA256())
        out = []
        for i in range(count):
            claims = (f'{{"jti":"{prefix}.{i}","htm":"{method}","htu":"{htu}","iat":{iat},'
                      f'"ath":"{self._ath}"}}')
            signing_input = f"{self._header}.{b64url(claims.encode())}"
            r, s = decode_dss_signature(sign(signing_input.encode("ascii"), algorithm))
            out.append(f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}")
        return out


def pem_of_public_jwk(jwk: dict[str, Any]) -> bytes:
    import jwt as pyjwt  # PyJWT (the `bench` extra): imported here so run.py can say it is missing

    key = pyjwt.PyJWK(jwk).key
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="latin-1")
    return path


@dataclass
class Material:
    """What the servers and generators need; all files live in `root`."""

    root: Path
    es256: DevIssuer
    rs256: DevIssuer
    jwks: Path
    es256_pem: Path
    rs256_pem: Path
    ca: TestCA
    ca_pem: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_thumbprint: str
    dpop: ProofMaker
    token: str               # cached-bearer token (ES256)
    rs256_token: str
    dpop_token: str          # bound to dpop.thumbprint
    mtls_token: str          # bound to the client certificate

    def mint(self, **extra: Any) -> str:
        return self.es256.mint(scope=SCOPE, audience=AUDIENCE, lifetime=TOKEN_LIFETIME, **extra)

    def unique_tokens(self, count: int) -> list[str]:
        return [self.mint() for _ in range(count)]


def make_material(root: Path) -> Material:
    root.mkdir(parents=True, exist_ok=True)
    es256 = DevIssuer(ISSUER, algorithm="ES256", audience=AUDIENCE)
    rs256 = DevIssuer(ISSUER, algorithm="RS256", audience=AUDIENCE)
    jwks = root / "jwks.json"
    jwks.write_text(json.dumps(es256.jwks()), encoding="utf-8")
    es256_pem = root / "es256.pem"
    es256_pem.write_bytes(pem_of_public_jwk(es256.jwks()["keys"][0]))
    rs256_pem = root / "rs256.pem"
    rs256_pem.write_bytes(pem_of_public_jwk(rs256.jwks()["keys"][0]))

    ca = TestCA()
    ca_pem = root / "ca.pem"
    ca_pem.write_text(ca.cert_pem, encoding="ascii")
    server = ca.ca.issue_cert("127.0.0.1", "localhost", "::1")  # a server leaf from the same test CA
    server_cert, server_key = root / "server.pem", root / "server.key"
    server_cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server_key.write_bytes(server.private_key_pem.bytes())
    client = ca.client_cert("bench-client")
    client_cert, client_key = root / "client.pem", root / "client.key"
    client_cert.write_text(client.pem, encoding="ascii")
    client_key.write_text(client.key_pem, encoding="ascii")

    dpop = ProofMaker()
    material = Material(
        root=root, es256=es256, rs256=rs256, jwks=jwks, es256_pem=es256_pem, rs256_pem=rs256_pem, ca=ca,
        ca_pem=ca_pem, server_cert=server_cert, server_key=server_key, client_cert=client_cert,
        client_key=client_key, client_thumbprint=client.thumbprint, dpop=dpop, token="", rs256_token="",
        dpop_token="", mtls_token="",
    )
    material.token = material.mint()
    material.rs256_token = rs256.mint(scope=SCOPE, audience=AUDIENCE, lifetime=TOKEN_LIFETIME)
    material.dpop_token = material.mint(cnf={"jkt": dpop.thumbprint})
    dpop.bind(material.dpop_token)
    material.mtls_token = material.mint(cnf=client.cnf)
    return material


def ztmw_config(material: Material, *, verifiers: list[str], audit: bool = True, cache_entries: int | None = None,
                replay_store: str = "memory", dpop_max_age: int | None = None,
                jwks_uri: str | None = None, refetch_cooldown: int | None = None,
                audit_sink: str = "default", audit_path: str = "/dev/null") -> str:
    """A ztmw TOML config protecting `GET /hello/{name}` (scope hello:read) with the given verifiers.

    Audit is what a user gets without an `[audit]` section (`audit_sink="default"`: the structlog sink, which
    `ztmw serve` prints as JSON lines on stdout), or the `jsonl` sink writing to `audit_path`."""
    key_source = f'jwks_uri = "{jwks_uri}"' if jwks_uri else f'jwks_file = "{material.jwks}"'
    lines = [
        "[resource]",
        f'identifier = "{AUDIENCE}"',
        f'public_origin = "{PUBLIC_ORIGIN}"',
        "",
        "[[issuers]]",
        f'issuer = "{ISSUER}"',
        key_source,
        'algorithms = ["ES256"]',
    ]
    if refetch_cooldown is not None:
        lines.append(f"refetch_cooldown = {refetch_cooldown}")
    lines += ["", "[verifiers]", "enabled = " + json.dumps(verifiers)]
    if "dpop" in verifiers:
        lines += ["", "[dpop]", f'replay_store = "{replay_store}"']
        if dpop_max_age is not None:
            lines.append(f"max_age = {dpop_max_age}")
    if cache_entries is not None:
        lines += ["", "[cache]", f"max_entries = {cache_entries}"]
    if not audit:
        lines += ["", "[audit]", "enabled = false"]
    elif audit_sink == "jsonl":
        lines += ["", "[audit]", 'sinks = ["jsonl"]', "", "[plugins.jsonl]", f"path = {json.dumps(audit_path)}"]
    lines += ["", "[[rules]]", 'id = "hello"', 'path = "/hello/{name}"', 'methods = ["GET"]',
              f'scopes = ["{SCOPE}"]', ""]
    return "\n".join(lines)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:12]
