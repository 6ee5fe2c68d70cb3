"""What ztmw may import: the core never imports aiohttp.web (only the adapters, and the CLI/demo/test kit,
which run servers, may), plugins only public modules, and nothing imports a JWT library (IMPL-11)."""

from __future__ import annotations

import ast
from pathlib import Path

import ztmw

ADAPTERS = {"middleware.py", "parser_rejection.py", "listener.py", "cli.py", "demo.py", "sample_app.py", "pytest_plugin.py",
            "gunicorn_worker.py"}
PACKAGE = Path(ztmw.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def core_modules() -> list[Path]:
    return [p for p in PACKAGE.glob("*.py") if p.name not in ADAPTERS]


def test_core_modules_exist() -> None:
    assert {p.name for p in core_modules()} >= {"pipeline.py", "authenticate.py", "policy.py", "challenge.py"}


def test_core_does_not_import_aiohttp_web() -> None:
    offenders = {
        p.name: sorted(m for m in imported_modules(p) if m.startswith(("aiohttp.web", "aiohttp.web_")))
        for p in core_modules()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_core_does_not_import_the_adapter() -> None:
    # __init__ re-exports the adapter's public names; nothing else in the core may reach it
    modules = [p for p in core_modules() if p.name != "__init__.py"]
    offenders = [p.name for p in modules if {"middleware", "ztmw.middleware"} & imported_modules(p)]
    assert offenders == []


def test_plugins_use_only_public_ztmw_modules() -> None:
    plugins = Path(ztmw.__file__).parent.parent / "plugins" / "ztmw_plugins"
    for path in plugins.glob("*.py"):
        for module in imported_modules(path):
            assert not module.startswith("ztmw.middleware"), f"{path.name} imports the aiohttp adapter"


GATEWAY_ADAPTERS = {"app.py", "forward_auth.py", "proxy.py", "command.py", "demo.py", "__init__.py"}


def test_the_core_never_imports_the_gateway() -> None:
    offenders = [p.name for p in core_modules() if any(m.startswith(("ztmw.gateway", "gateway"))
                                                       for m in imported_modules(p))]
    assert offenders == []


def test_only_the_gateway_adapters_import_aiohttp_web() -> None:
    plain = [p for p in (PACKAGE / "gateway").glob("*.py") if p.name not in GATEWAY_ADAPTERS]
    assert {p.name for p in plain} >= {"decision.py", "routes.py", "assertion.py"}
    offenders = {p.name: sorted(m for m in imported_modules(p)
                                if m.startswith("aiohttp") or m.split(".")[0] in ("middleware", "app"))
                 for p in plain}
    assert {k: v for k, v in offenders.items() if v} == {}


LINKING_EDGE = {"web.py", "plugin.py"}  # the ceremony's handlers, and the route provider that mounts them


def test_the_core_never_imports_linking() -> None:
    """The link store reaches the pipeline only as an identity resolver (entry point `linking`)."""
    offenders = [p.name for p in core_modules() if any(m.startswith(("ztmw.linking", "linking"))
                                                       for m in imported_modules(p))]
    assert offenders == []


def test_only_the_linking_edge_imports_aiohttp_web() -> None:
    plain = [p for p in (PACKAGE / "linking").glob("*.py") if p.name not in LINKING_EDGE]
    assert {p.name for p in plain} >= {"store.py", "ceremony.py", "sqlite_store.py", "redis_store.py"}
    offenders = {p.name: sorted(m for m in imported_modules(p)
                                if m.startswith("aiohttp") or m.split(".")[0] in ("middleware", "web"))
                 for p in plain}
    assert {k: v for k, v in offenders.items() if v} == {}


ROOT = Path(__file__).resolve().parent.parent


def test_impl_11_no_jwt_library_with_known_bypasses_is_used() -> None:
    """ztmw verifies JWS with `cryptography` itself; PyJWT, python-jose and Authlib are never imported, and
    joserfc (JWK import only) is not asked to treat key material as an HMAC secret."""
    banned = {"jwt", "jose", "authlib", "python_jose"}
    for folder in (ROOT / "ztmw", ROOT / "plugins" / "ztmw_plugins"):
        for source in folder.rglob("*.py"):
            tree = ast.parse(source.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    assert name.split(".")[0] not in banned, f"{source.relative_to(ROOT)} imports {name}"
                    if name.startswith("joserfc"):
                        assert "OctKey" not in ast.unparse(node), f"{source.relative_to(ROOT)} imports OctKey"
