"""SQL has one home: relay/store/ (relay/store/__init__.py states the contract of its
functions). Outside it no module calls ``execute``/``executemany`` nor holds a string of SQL;
the sources are read with ``ast``, so nothing is executed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STORE = ROOT / "relay" / "store"
CALLS = frozenset({"execute", "executemany", "executescript", "execute_now"})
# A statement, not a word in prose: the keywords are upper case and followed by their clause.
SQL = re.compile(r"\bSELECT\b[\s\S]*\bFROM\b|\bINSERT\s+INTO\b|\bUPDATE\s+\w+\s+SET\b"
                 r"|\bDELETE\s+FROM\b|\b(?:CREATE|DROP|ALTER)\s+(?:TEMP\s+)?(?:TABLE|INDEX|VIEW)\b"
                 r"|^\s*(?:BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE|PRAGMA)\b")


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring nodes (prose may name a statement)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                found.add(id(body[0].value))
    return found


def offences(source: str) -> list[str]:
    """What in ``source`` is SQL or runs it: ``line: what``."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in CALLS):
            found.append(f"{node.lineno}: .{node.func.attr}(...)")
        elif isinstance(node, ast.JoinedStr):  # an f-string: its parts, read as one
            skip.update(id(part) for part in node.values)
            text = "".join(part.value if isinstance(part, ast.Constant) else "{}"
                           for part in node.values)
            if SQL.search(text):
                found.append(f"{node.lineno}: {text.strip()[:60]!r}")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in skip and SQL.search(node.value)):
            found.append(f"{node.lineno}: {node.value.strip()[:60]!r}")
    return found


def modules() -> list[Path]:
    return [path for path in sorted((ROOT / "relay").rglob("*.py"))
            if not path.is_relative_to(STORE)]


@pytest.mark.parametrize("path", modules(), ids=lambda path: str(path.relative_to(ROOT)))
def test_no_sql_outside_the_store(path: Path) -> None:
    assert offences(path.read_text()) == [], f"{path.relative_to(ROOT)}: SQL outside relay/store/"


@pytest.mark.parametrize("source", [
    'conn.execute(QUERY, (1,))',
    'rows = db.executemany(sql, rows)',
    'store.execute_now(QUERY)',
    'Q = "SELECT name FROM webhook_endpoints WHERE source = ?"',
    'Q = f"INSERT INTO {table} VALUES (?, ?)"',
    'Q = f"SELECT {COLUMNS} FROM events WHERE id > ?"',
    'Q = ("UPDATE webhook_batches SET state = ? "\n     "WHERE id = ?")',
    'Q = """\n    DELETE FROM events WHERE at < ?"""',
    'Q = "BEGIN IMMEDIATE"',
    'Q = "CREATE TEMP TABLE t (x TEXT)"',
])
def test_the_rule_sees_sql(source: str) -> None:
    assert offences(source)


@pytest.mark.parametrize("source", [
    '"""Select what to track, from the headers; delete nothing."""',
    'def f():\n    """Rows are inserted in the transaction (INSERT INTO events, relay/store)."""',
    'await smtp.execute_command(b"RCPT", b"TO:<a@b>")',
    'log.info("selected %s from %s", a, b)',
])
def test_the_rule_lets_prose_and_other_calls_be(source: str) -> None:
    assert offences(source) == []
