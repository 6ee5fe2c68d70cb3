"""`ztmw check` on a gateway configuration, and `ztmw gateway`'s refusals, through the real command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ztmw.testing import DevIssuer

from .conftest import gateway_config
from .processes import ROOT, toml


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ztmw", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_check_prints_the_gateway_rules(issuer: DevIssuer, tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(toml(gateway_config(issuer, {"mode": "forward-auth"})))
    result = run("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["GET", "/.well-known/oauth-protected-resource", "ztmw-metadata"] in lines
    assert ["GET", "/users/{user}/items", "own"] in lines
    assert ["*", "/admin", "admin"] in lines
    assert lines[-1] == ["*", "(anything", "else)", "DENIED"]
    assert "forward-auth mode" in result.stderr


def test_gateway_refuses_an_invalid_configuration(issuer: DevIssuer, tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(toml(gateway_config(issuer, {"mode": "proxy"})))
    for command in ("gateway", "check"):
        result = run(command, "--config", str(path))
        assert result.returncode == 2
        assert "gateway.upstream" in result.stderr


def test_gateway_without_a_gateway_table_is_refused(issuer: DevIssuer, tmp_path: Path) -> None:
    config = gateway_config(issuer, {"mode": "forward-auth"})
    del config["gateway"]
    path = tmp_path / "app.toml"
    path.write_text(toml(config))
    result = run("gateway", "--config", str(path))
    assert result.returncode == 2
    assert "[gateway]" in result.stderr


def test_gateway_with_unreadable_tls_files_stops_in_one_line(issuer: DevIssuer, tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(toml(gateway_config(issuer, {"mode": "forward-auth"})))
    result = run("gateway", "--config", str(path), "--tls-cert", str(tmp_path / "none.pem"),
                 "--tls-key", str(tmp_path / "none.key"))
    assert result.returncode == 2
    assert result.stderr.startswith("ztmw: invalid configuration: --tls-cert/--tls-key/--tls-client-ca: cannot load")
    assert "Traceback" not in result.stderr
