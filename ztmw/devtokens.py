"""`ztmw token`: development keys, access tokens and DPoP proofs, for trying a protected API with curl.

Keys are written as private JWK files with mode 0600; nothing here is meant for production issuance.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from joserfc import jws, jwt
from joserfc.jwk import ECKey, OKPKey, RSAKey

from .jws import b64url_encode

_GENERATORS: dict[str, Callable[[], ECKey | RSAKey | OKPKey]] = {
    "ES256": lambda: ECKey.generate_key("P-256"),
    "ES384": lambda: ECKey.generate_key("P-384"),
    "PS256": lambda: RSAKey.generate_key(2048),
    "RS256": lambda: RSAKey.generate_key(2048),
    "EdDSA": lambda: OKPKey.generate_key("Ed25519"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="token_command", required=True)
    keygen = sub.add_parser("keygen", help="write a new private signing key (JWK) to a file")
    keygen.add_argument("--alg", default="ES256", choices=sorted(_GENERATORS))
    keygen.add_argument("--out", required=True)

    public = sub.add_parser("jwks", help="print the public JWK Set of a key file (for jwks_file)")
    public.add_argument("--key", required=True)

    mint = sub.add_parser("mint", help="print a signed RFC 9068 access token")
    mint.add_argument("--key", required=True)
    mint.add_argument("--issuer", required=True)
    mint.add_argument("--audience", required=True)
    mint.add_argument("--sub", default="alice")
    mint.add_argument("--client-id", default="dev-client")
    mint.add_argument("--scope", default="")
    mint.add_argument("--lifetime", type=int, default=300)
    mint.add_argument("--acr")
    mint.add_argument("--amr", help="comma-separated RFC 8176 methods, e.g. pwd,otp")
    mint.add_argument("--auth-age", type=int, help="seconds since the user authenticated (sets auth_time)")
    mint.add_argument("--dpop-key", help="bind the token to this DPoP key file (cnf.jkt)")
    mint.add_argument("--cert", help="bind the token to this PEM client certificate (cnf.x5t#S256)")

    proof = sub.add_parser("proof", help="print a DPoP proof (RFC 9449) for one request")
    proof.add_argument("--key", required=True, help="DPoP key file (make one with keygen)")
    proof.add_argument("--method", required=True)
    proof.add_argument("--url", required=True, help="the request URI without query (htu)")
    proof.add_argument("--token", help="the access token, for ath")
    proof.add_argument("--nonce")


def _read_key(path: str) -> ECKey | RSAKey | OKPKey:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    kinds: dict[str, type[ECKey] | type[RSAKey] | type[OKPKey]] = {"EC": ECKey, "RSA": RSAKey, "OKP": OKPKey}
    return kinds[data["kty"]].import_key(data)


def _alg_for(key: Any) -> str:
    stored = key.as_dict().get("alg")
    if stored:
        return str(stored)
    return {"EC": "ES256", "RSA": "PS256", "OKP": "EdDSA"}[key.key_type]


def main(args: argparse.Namespace) -> int:
    if args.token_command == "keygen":
        key = _GENERATORS[args.alg]()
        data = key.as_dict(private=True)
        data["alg"] = args.alg
        data["kid"] = key.thumbprint()[:16]
        out = Path(args.out)
        out.write_text(json.dumps(data, indent=2), encoding="utf-8")
        os.chmod(out, 0o600)
        print(f"wrote {out} (kid {data['kid']}, {args.alg})", file=sys.stderr)
        return 0
    key = _read_key(args.key)
    if args.token_command == "jwks":
        public = key.as_dict(private=False)
        print(json.dumps({"keys": [public]}, indent=2))
        return 0
    if args.token_command == "mint":
        print(mint(key, args))
        return 0
    print(proof(key, args))
    return 0


def mint(key: Any, args: argparse.Namespace) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": args.issuer, "aud": args.audience, "sub": args.sub, "client_id": args.client_id,
        "iat": now, "exp": now + args.lifetime, "jti": uuid.uuid4().hex,
    }
    if args.scope:
        claims["scope"] = args.scope
    if args.acr:
        claims["acr"] = args.acr
    if args.amr:
        claims["amr"] = [m for m in args.amr.split(",") if m]
    if args.auth_age is not None:
        claims["auth_time"] = now - args.auth_age
    cnf: dict[str, str] = {}
    if args.dpop_key:
        cnf["jkt"] = _read_key(args.dpop_key).thumbprint()
    if args.cert:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        der = x509.load_pem_x509_certificate(Path(args.cert).read_bytes()).public_bytes(Encoding.DER)
        cnf["x5t#S256"] = b64url_encode(hashlib.sha256(der).digest())
    if cnf:
        claims["cnf"] = cnf
    header = {"alg": _alg_for(key), "typ": "at+jwt", "kid": key.as_dict().get("kid") or key.thumbprint()[:16]}
    return jwt.encode(header, claims, key, algorithms=[header["alg"]])


def proof(key: Any, args: argparse.Namespace) -> str:
    alg = _alg_for(key)
    header = {"typ": "dpop+jwt", "alg": alg, "jwk": key.as_dict(private=False)}
    header["jwk"].pop("kid", None)
    header["jwk"].pop("alg", None)
    claims: dict[str, Any] = {"jti": uuid.uuid4().hex, "htm": args.method.upper(), "htu": args.url,
                              "iat": int(time.time())}
    if args.token:
        claims["ath"] = b64url_encode(hashlib.sha256(args.token.encode("ascii")).digest())
    if args.nonce:
        claims["nonce"] = args.nonce
    payload = json.dumps(claims, separators=(",", ":")).encode("utf-8")
    return jws.serialize_compact(header, payload, key, algorithms=[alg])
