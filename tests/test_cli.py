"""The `ztmw` command as a user runs it: real subprocesses, real files, a real server."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest

from ztmw.testing.http import free_port

from .command import AUDIENCE, ROOT, issuer_table, write_config, ztmw


@pytest.fixture
def keyfile(tmp_path: Path) -> tuple[Path, Path]:
    key = tmp_path / "issuer-key.json"
    ztmw("token", "keygen", "--alg", "ES256", "--out", str(key), check=True)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(ztmw("token", "jwks", "--key", str(key), check=True).stdout, encoding="utf-8")
    return key, jwks


def test_check_lists_every_route_with_its_rule(tmp_path: Path, keyfile: tuple[Path, Path]) -> None:
    config = write_config(tmp_path / "ztmw.toml", issuer_table(keyfile[1]))
    result = ztmw("check", "tests.factories:create_app", "--config", str(config))
    assert result.returncode == 0, result.stderr
    lines = {" ".join(line.split()) for line in result.stdout.splitlines()}
    assert "GET /hello/{name} hello" in lines
    assert "GET /open open" in lines
    assert "POST /unruled DENIED" in lines


def test_check_strict_fails_when_a_route_is_denied(tmp_path: Path, keyfile: tuple[Path, Path]) -> None:
    config = write_config(tmp_path / "ztmw.toml", issuer_table(keyfile[1]))
    assert ztmw("check", "tests.factories:create_app", "--config", str(config), "--strict").returncode == 1
    covered = write_config(tmp_path / "all.toml", issuer_table(keyfile[1]),
                           '[[rules]]\nid = "unruled"\npath = "/unruled"\nscopes = ["x"]\n')
    assert ztmw("check", "tests.factories:create_app", "--config", str(covered), "--strict").returncode == 0


@pytest.mark.parametrize("factory", ["tests.factories:create_app_async", "tests.factories:create_app_with_args"])
def test_check_accepts_async_and_argv_factories(tmp_path: Path, keyfile: tuple[Path, Path], factory: str) -> None:
    config = write_config(tmp_path / "ztmw.toml", issuer_table(keyfile[1]))
    result = ztmw("check", factory, "--config", str(config), "--extra-route")
    assert result.returncode == 0, result.stderr
    if factory.endswith("with_args"):
        assert "GET /extra" in result.stdout


def test_check_invalid_config_exits_2_naming_the_key(tmp_path: Path, keyfile: tuple[Path, Path]) -> None:
    config = write_config(tmp_path / "ztmw.toml", issuer_table(keyfile[1]),
                          '[[rules]]\nid = "typo"\npath = "/x"\nscope = ["a"]\n')
    result = ztmw("check", "tests.factories:create_app", "--config", str(config))
    assert result.returncode == 2
    assert "scope" in result.stderr and "unknown key" in result.stderr


def test_check_rejects_a_factory_that_returns_no_app(tmp_path: Path, keyfile: tuple[Path, Path]) -> None:
    config = write_config(tmp_path / "ztmw.toml", issuer_table(keyfile[1]))
    result = ztmw("check", "tests.factories:not_an_app", "--config", str(config))
    assert result.returncode != 0 and "did not return" in result.stderr


@pytest.fixture
def served(tmp_path: Path, keyfile: tuple[Path, Path]) -> Iterator[tuple[str, Path, subprocess.Popen[str]]]:
    """`ztmw serve tests.factories:create_app` in its own process, with keys made by `ztmw token`."""
    config = write_config(tmp_path / "ztmw.toml", issuer_table(keyfile[1]))
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ztmw", "serve", "tests.factories:create_app", "--config", str(config),
         "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"server did not start: {process.stdout.read() if process.stdout else ''}")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", keyfile[0], process
    finally:
        if process.poll() is None:
            process.terminate()
            process.communicate(timeout=30)


def mint(key: Path, *extra: str) -> str:
    return ztmw("token", "mint", "--key", str(key), "--issuer", "https://issuer.test", "--audience", AUDIENCE,
                *extra, check=True).stdout.strip()


def test_serve_protects_an_arbitrary_factory(served: tuple[str, Path, Any]) -> None:
    base, key, _ = served
    good = mint(key, "--scope", "hello:read")
    wrong_scope = mint(key, "--scope", "other")

    async def scenario() -> list[tuple[int, Any]]:
        async with aiohttp.ClientSession() as session:
            out = []
            for path, token in [("/hello/ann", good), ("/hello/ann", wrong_scope), ("/hello/ann", None),
                                ("/open", None), ("/unruled", good)]:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                method = "POST" if path == "/unruled" else "GET"
                async with session.request(method, base + path, headers=headers) as response:
                    out.append((response.status, await response.text()))
            return out

    results = asyncio.run(scenario())
    assert [status for status, _ in results] == [200, 403, 401, 200, 403]
    assert json.loads(results[0][1]) == {"hello": "ann"}


def test_serve_logs_json_audit_lines_without_tokens(served: tuple[str, Path, Any]) -> None:
    base, key, process = served
    token = mint(key, "--scope", "hello:read")

    async def call() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/hello/x", headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200

    asyncio.run(call())
    process.terminate()
    output = process.communicate(timeout=30)[0]
    events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    decisions = [e for e in events if e.get("event") == "ztmw.decision"]
    assert len(decisions) == 1 and decisions[0]["decision"] == "allow" and decisions[0]["route"] == "/hello/{name}"
    assert token not in output and token.split(".")[2] not in output


def test_token_proof_is_a_dpop_jwt(tmp_path: Path) -> None:
    key = tmp_path / "dpop.json"
    ztmw("token", "keygen", "--out", str(key), check=True)
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    proof = ztmw("token", "proof", "--key", str(key), "--method", "get", "--url", "https://api.example.com/x",
                 "--token", "abc", check=True).stdout.strip()
    from ztmw.jws import import_public_jwk, parse_compact, verify_signature

    jws = parse_compact(proof)
    assert jws.header["typ"] == "dpop+jwt" and "d" not in jws.header["jwk"]
    assert jws.claims["htm"] == "GET" and jws.claims["htu"] == "https://api.example.com/x"
    assert verify_signature(jws, import_public_jwk(jws.header["jwk"]), jws.header["alg"])


def test_demo_runs_every_scenario_and_exits_0() -> None:
    result = ztmw("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "scenarios behaved as expected" in result.stdout
    assert "FAIL" not in result.stdout


# -- configuration problems: one line on stderr, exit 2, never a traceback ---------------------------------------

def ztmw_without(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """`ztmw ARGS` in a Python where `module` cannot be imported, as on a machine without that extra."""
    code = f"import sys; sys.modules[{module!r}] = None; from ztmw.cli import main; sys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_one_line_config_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("ztmw: invalid configuration:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0]


@pytest.mark.parametrize(("module", "setting", "extra"), [
    ("redis", '[dpop]\nreplay_store = "redis://:s3cret-password@127.0.0.1:6379/0"\n', "redis"),
    ("redis", '[cache]\nbackend = "redis://:s3cret-password@127.0.0.1:6379/0"\n', "redis"),
    ("redis", '[identity]\nresolvers = ["config", "redis"]\n', "redis"),
    ("prometheus_client", '[audit]\nsinks = ["structlog", "metrics"]\n', "metrics"),
])
@pytest.mark.parametrize("command", ["check", "serve"])
def test_a_setting_whose_extra_is_missing_is_a_configuration_error(
    tmp_path: Path, keyfile: tuple[Path, Path], module: str, setting: str, extra: str, command: str
) -> None:
    config = write_config(tmp_path / "ztmw.toml", issuer_table(keyfile[1]) + setting)
    port = ["--port", str(free_port())] if command == "serve" else []
    result = ztmw_without(module, command, "tests.factories:create_app", "--config", str(config), *port)
    section, name = setting.split("\n")[0].strip("[]"), setting.split("\n")[1].split(" =")[0]
    assert_one_line_config_error(result, f"pip install 'ztmw[{extra}]'", f"{section}.{name}")
    assert "s3cret-password" not in result.stderr  # a Redis URL may carry a password: the setting is named, not shown


def test_serve_reports_configuration_problems_without_a_traceback(
    tmp_path: Path, keyfile: tuple[Path, Path]
) -> None:
    good = write_config(tmp_path / "ztmw.toml", issuer_table(keyfile[1]))
    missing_jwks = write_config(tmp_path / "jwks.toml", issuer_table(tmp_path / "absent.json"))
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[resource\n", encoding="utf-8")
    unset_secret = write_config(tmp_path / "secret.toml", issuer_table(keyfile[1])
                                + '[cache]\nbackend = "redis://127.0.0.1:6379/0"\nsecret_env = "ZTMW_TEST_UNSET"\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy_port = str(taken.getsockname()[1])
        cases = {
            "jwks_file": ("serve", "--config", str(missing_jwks)),
            "invalid TOML": ("serve", "--config", str(bad_toml)),
            "ZTMW_TEST_UNSET": ("serve", "--config", str(unset_secret)),
            "--tls-cert": ("serve", "--config", str(good), "--tls-cert", str(tmp_path / "no.pem"),
                           "--tls-key", str(tmp_path / "no.key")),
            "cannot listen": ("serve", "--config", str(good), "--port", busy_port),
            "cannot read config file": ("serve", "--config", str(tmp_path / "absent.toml")),
        }
        for needle, args in cases.items():
            assert_one_line_config_error(ztmw(*args[:1], "tests.factories:create_app", *args[1:]), needle)


def test_check_says_whether_owner_rules_need_a_link(tmp_path: Path, keyfile: tuple[Path, Path]) -> None:
    one = write_config(tmp_path / "one.toml", issuer_table(keyfile[1]))
    second = '[[issuers]]\nissuer = "https://social.test"\njwks_file = "' + str(keyfile[1]) + '"\n'
    two = write_config(tmp_path / "two.toml", issuer_table(keyfile[1]) + second)
    explicit = write_config(tmp_path / "explicit.toml", issuer_table(keyfile[1]) + second
                            + "[identity]\nowner_requires_link = false\n")
    said = {name: ztmw("check", "tests.factories:create_app", "--config", str(path)).stderr
            for name, path in {"one": one, "two": two, "explicit": explicit}.items()}
    assert "raw `sub` values (identity.owner_requires_link: default with 1 token source)" in said["one"]
    assert "only linked subjects (identity.owner_requires_link: default with 2 token sources)" in said["two"]
    assert "raw `sub` values (identity.owner_requires_link: explicit)" in said["explicit"]
