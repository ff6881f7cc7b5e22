"""Alembic revisions of the archive store, run by ``mppproxy.store.migrate``
(a package so they ship inside the wheel)."""
