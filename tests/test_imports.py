"""The import rule: the pure parts of the relay (the rewrite, the policy, the statistics maths,
the webhook payloads, the queue's decisions) do no I/O, so they import neither the store, the
admin surface, a network or database library, nor a command-line parser; not directly, and not
through another module of the relay. The imports are read from the source with ``ast``, so
nothing is executed."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PURE = ("relay/rewrite", "relay/policy", "relay/stats/maths.py", "relay/webhooks/payloads.py",
        "relay/queue", "relay/certs/plan.py")
FORBIDDEN = ("relay.store", "relay.admin", "aiohttp", "aiosqlite", "aiosmtpd", "dns", "sqlite3",
             "psycopg", "asyncio", "socket", "selectors", "ssl", "subprocess", "argparse")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _path(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def imports(module: str) -> frozenset[str]:
    """The modules ``module`` imports by name (``from relay.x import y`` counts ``relay.x.y``
    when that is a module, else ``relay.x``); none when run time only (TYPE_CHECKING)."""
    path = _path(module)
    if path is None:
        return frozenset()
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if _path(submodule) else node.module)
    return frozenset(found)


def chain(module: str) -> list[str] | None:
    """The first import path from ``module`` to a forbidden module, or None."""
    seen = {module}
    paths = [[module]]
    while paths:
        path = paths.pop(0)
        for name in sorted(imports(path[-1])):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
                return [*path, name]
            if name.startswith("relay") and name not in seen:
                seen.add(name)
                paths.append([*path, name])
    return None


def pure_modules() -> list[str]:
    files: list[Path] = []
    for entry in PURE:
        path = ROOT / entry
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return [_module_name(f) for f in files]


@pytest.mark.parametrize("module", pure_modules())
def test_pure_modules_import_no_io(module: str) -> None:
    found = chain(module)
    assert found is None, f"{module} imports {found[-1]}: {' -> '.join(found)}"


def test_the_rule_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The reader finds both spellings of an import, and follows the relay's own modules."""
    assert "relay.store.engine" in imports("relay.admin.commands")
    assert chain("relay.admin.commands") is not None
    assert "sqlite3" in imports("relay.store.engine")
