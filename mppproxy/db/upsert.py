"""Rows that count: insert, or add to the row with the same key (the
dashboard's traffic counts, ``traffic.py``; the shared threshold counts,
``ratecounts.py``), so several processes and nodes writing their own
increments to one database sum correctly.  A leaf (db/)."""
from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import Table
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.engine import Engine

from mppproxy.db.engine import WRITE


def add_counts(engine: Engine, table: Table, key: Sequence[str], rows: list[dict[str, Any]],
               chunk: int = 500, count: str = "n") -> None:
    """Write ``rows`` in one transaction (blocking): a row whose ``key``
    columns match an existing one adds its ``count`` to it.  MariaDB:
    ``INSERT ... ON DUPLICATE KEY UPDATE n = n + VALUES(n)``; SQLite:
    ``INSERT ... ON CONFLICT (key) DO UPDATE SET n = n + excluded.n``."""
    if not rows:
        return
    column = table.c[count]
    if engine.dialect.name == "sqlite":
        lite = sqlite.insert(table)
        statement: Any = lite.on_conflict_do_update(
            index_elements=[table.c[k] for k in key],
            set_={count: column + lite.excluded[count]})
    else:
        my = mysql.insert(table)
        statement = my.on_duplicate_key_update({count: column + my.inserted[count]})
    with engine.connect().execution_options(**WRITE) as conn, conn.begin():
        for i in range(0, len(rows), chunk):
            conn.execute(statement, rows[i:i + chunk])
