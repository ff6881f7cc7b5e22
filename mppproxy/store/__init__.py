"""The quarantine and archive store (issue 12): one row per (message,
recipient domain) in SQLite or MariaDB, the raw message compressed in a
table or in files, versioned by Alembic.  Floor 1 (a leaf): it uses
``config/``, ``db/`` and the ground, and no stage."""
from mppproxy.store.store import (ArchiveStore, NewCopy, NotReleasing, RawMissing,
                                  SchemaNotCurrent, Search, StoredRow, StoreError, StuckRelease)

__all__ = ["ArchiveStore", "NewCopy", "NotReleasing", "RawMissing", "SchemaNotCurrent", "Search",
           "StoredRow", "StoreError", "StuckRelease"]
