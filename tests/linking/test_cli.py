"""`ztmw links add|remove|list` against the configured store (SQLite here; the Redis store shares its tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ztmw.cli import main

ROOT = Path(__file__).resolve().parents[2]
BANK, SOCIAL = "https://bank-id.example", "https://social.example"


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "ztmw.toml"
    path.write_text(f"""
[resource]
identifier = "https://api.example.com"

[linking]
enabled = true
store = "sqlite:///{tmp_path / 'links.db'}"
""", encoding="utf-8")
    return str(path)


def links(config: str, *args: str) -> int:
    command, *rest = args
    return main(["links", command, "--config", config, *rest])


def test_add_list_remove(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert links(config, "add", "--issuer", BANK, "--subject", "1980", "--account", "acct-john") == 0
    assert links(config, "add", "--issuer", SOCIAL, "--subject", "google|42", "--account", "acct-john") == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"linked: {BANK} 1980 to account acct-john",
                                f"linked: {SOCIAL} google|42 to account acct-john"]
    events = [json.loads(line) for line in err.splitlines()]
    assert [e["event"] for e in events] == ["ztmw.identity_linked"] * 2
    assert all(e["via"] == "operator" and e["subject"] not in ("1980", "google|42") for e in events)
    assert links(config, "list", "--account", "acct-john") == 0
    rows = [line.split("\t") for line in capsys.readouterr()[0].splitlines()]
    assert [(r[0], r[1], r[2]) for r in rows] == [("acct-john", BANK, "1980"), ("acct-john", SOCIAL, "google|42")]
    assert links(config, "list", "--issuer", SOCIAL, "--subject", "google|42") == 0
    assert len(capsys.readouterr()[0].splitlines()) == 2
    assert links(config, "remove", "--issuer", SOCIAL, "--subject", "google|42") == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"unlinked: {SOCIAL} google|42 from account acct-john"
    assert json.loads(err)["event"] == "ztmw.identity_unlinked"
    assert links(config, "remove", "--issuer", SOCIAL, "--subject", "google|42") == 1
    assert links(config, "list", "--issuer", SOCIAL, "--subject", "google|42") == 0
    assert "is not linked" in capsys.readouterr()[0]


def test_add_refuses_to_move_a_login_without_replace(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert links(config, "add", "--issuer", SOCIAL, "--subject", "google|42", "--account", "acct-john") == 0
    assert links(config, "add", "--issuer", SOCIAL, "--subject", "google|42", "--account", "acct-john") == 0
    assert "unchanged" in capsys.readouterr()[0]
    assert links(config, "add", "--issuer", SOCIAL, "--subject", "google|42", "--account", "acct-jane") == 1
    assert "pass --replace" in capsys.readouterr()[1]
    assert links(config, "list", "--account", "acct-jane") == 0 and capsys.readouterr()[0] == ""
    assert links(config, "add", "--issuer", SOCIAL, "--subject", "google|42", "--account", "acct-jane",
                 "--replace") == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"linked: {SOCIAL} google|42 to account acct-jane (moved from account acct-john)"
    assert [json.loads(line)["event"] for line in err.splitlines()] == [
        "ztmw.identity_unlinked", "ztmw.identity_linked"]


def test_an_invalid_config_or_an_unreachable_store_is_reported(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["links", "list", "--config", str(tmp_path / "missing.toml"), "--account", "a"]) == 2
    (tmp_path / "dir.db").mkdir()
    config = tmp_path / "ztmw.toml"
    config.write_text(f'[resource]\nidentifier = "https://api.example.com"\n[linking]\n'
                      f'store = "sqlite:///{tmp_path / "dir.db"}"\n', encoding="utf-8")
    assert main(["links", "list", "--config", str(config), "--account", "a"]) == 3
    assert "cannot be reached" in capsys.readouterr()[1]
    assert main(["links", "list", "--config", str(config)]) == 2


def test_the_command_runs_as_a_real_process(config: str) -> None:
    result = subprocess.run([sys.executable, "-m", "ztmw", "links", "add", "--config", config, "--issuer", BANK,
                             "--subject", "1980", "--account", "acct-john"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("linked:")
    result = subprocess.run([sys.executable, "-m", "ztmw", "links", "list", "--config", config, "--account",
                             "acct-john"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "\t1980\t" in result.stdout
