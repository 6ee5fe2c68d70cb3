"""`ztmw` as a user runs it (a subprocess from the repository root) and the small configuration file the
command tests write: shared by the modules that start the command rather than call ztmw in process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AUDIENCE = "https://api.example.com"


def ztmw(*args: str, cwd: Path = ROOT, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ztmw", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=check)


# the rules of the test apps' two routes (tests/factories.py), as TOML tables
HELLO_RULE = '[[rules]]\nid = "hello"\npath = "/hello/{name}"\nmethods = ["GET"]\nscopes = ["hello:read"]\n'
OPEN_RULE = '[[rules]]\nid = "open"\npath = "/open"\npublic = true\n'


def write_config(path: Path, issuer_table: str, rules: str = "") -> Path:
    path.write_text(f"""
[resource]
identifier = "{AUDIENCE}"
public_origin = "http://127.0.0.1"

{issuer_table}

{HELLO_RULE}
{OPEN_RULE}{rules}
""", encoding="utf-8")
    return path


def issuer_table(jwks: Path) -> str:
    return f'[[issuers]]\nissuer = "https://issuer.test"\njwks_file = "{jwks}"\nalgorithms = ["ES256"]\n'
