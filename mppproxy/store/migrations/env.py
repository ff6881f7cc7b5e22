"""Alembic's environment for the archive store (floor 1, beside
``store/``).  Run only through ``mppproxy.store.migrate``, never from an
``alembic.ini``: the caller hands over an open connection (in
``config.attributes["connection"]``) and the table prefix, so the engine
keeps the project's settings (db/engine.py) and its own transaction.

The version table is ``<prefix>archive_alembic_version``: several
applications (and the state database's tables) may share one MariaDB
database, and none of them should meet our revisions in
``alembic_version``.
"""
from __future__ import annotations

from alembic import context

from mppproxy.store.schema import ArchiveTables


def _run() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if connection is None or context.is_offline_mode():
        raise RuntimeError("the archive store's migrations run through mppproxy.store.migrate "
                           "(mppproxy db upgrade), with a connection")
    prefix = str(config.attributes.get("table_prefix", ""))
    context.configure(connection=connection,
                      version_table=ArchiveTables(prefix).version_table,
                      # SQLite runs the whole upgrade in the caller's
                      # BEGIN IMMEDIATE; MariaDB commits each DDL anyway.
                      transactional_ddl=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


_run()
