"""The archive store's schema versions: Alembic run from code (floor 1,
beside ``store.py``), for ``ArchiveStore.open`` (``[store] auto_upgrade``)
and ``mppproxy db upgrade`` / ``mppproxy db current``.

The revisions live in ``migrations/`` inside the package (shipped as
package data); there is no ``alembic.ini``.  The version table is
``<prefix>archive_alembic_version`` (``schema.ArchiveTables``).

Several archive nodes may start at once against one MariaDB: the upgrade
runs under a named lock (``GET_LOCK``) so only one of them creates the
tables and the others find them current.  On SQLite the upgrade runs in
one ``BEGIN IMMEDIATE`` transaction, which does the same.

Within one process the upgrades also take turns (``_UPGRADING``):
Alembic's ``op`` and ``context`` are module-level proxies to the migration
running *now*, so two upgrades in two threads at once (an all-in-one
node's keeper and console opening their stores at first start) had one's
``op.create_table`` run on the other's connection, and a store was stamped
at the newest revision without some of its tables.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from mppproxy.db.engine import WRITE
from mppproxy.store.schema import ArchiveTables

MIGRATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")
# Seconds a node waits for another node's upgrade (MariaDB's GET_LOCK).
LOCK_TIMEOUT = 60
# One Alembic run at a time in this process (see the module's text).
_UPGRADING = threading.Lock()


class MigrationLockTimeout(Exception):
    """Another process held the upgrade lock for LOCK_TIMEOUT seconds."""


def _config(table_prefix: str, connection: Optional[Connection] = None) -> Config:
    config = Config()
    # ConfigParser interpolation: a "%" in the path must be doubled.
    config.set_main_option("script_location", MIGRATIONS.replace("%", "%%"))
    config.attributes["table_prefix"] = table_prefix
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head() -> str:
    """The newest revision the package ships."""
    found = ScriptDirectory.from_config(_config("")).get_current_head()
    if found is None:  # pragma: no cover - the package always has one
        raise RuntimeError("the archive store ships no migrations")
    return found


def current(engine: Engine, table_prefix: str = "") -> Optional[str]:
    """The database's revision; None when the store was never created."""
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"version_table": ArchiveTables(table_prefix).version_table})
        return context.get_current_revision()


def is_current(engine: Engine, table_prefix: str = "") -> bool:
    return current(engine, table_prefix) == head()


def upgrade(engine: Engine, table_prefix: str = "") -> None:
    """``alembic upgrade head``; nothing to do when the database is
    current.  Raises the database's errors (``DBAPIError``)."""
    with _UPGRADING, engine.connect() as connection:
        mysql = connection.dialect.name in ("mysql", "mariadb")
        lock = f"mppproxy_archive_migrate_{table_prefix}"[:64]
        if mysql:
            got = connection.execute(text("SELECT GET_LOCK(:name, :timeout)"),
                                     {"name": lock, "timeout": LOCK_TIMEOUT}).scalar()
            connection.commit()
            if got != 1:
                raise MigrationLockTimeout(f"another process held the upgrade lock {lock!r} "
                                           f"for {LOCK_TIMEOUT} s")
        try:
            if mysql:
                _upgrade(connection, table_prefix)
            else:
                with connection.execution_options(**WRITE).begin():
                    _upgrade(connection, table_prefix)
        finally:
            if mysql:
                connection.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": lock})
                connection.commit()


def _upgrade(connection: Connection, table_prefix: str) -> None:
    command.upgrade(_config(table_prefix, connection), "head")
    if connection.in_transaction() and connection.dialect.name != "sqlite":
        connection.commit()
