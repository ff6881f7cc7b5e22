"""Shared state in SQL: the auto-blacklist and the greylist
(``StateDatabase``), behind in-process caches."""
from mppproxy.db.state import StateDatabase, StateDatabaseError

__all__ = ["StateDatabase", "StateDatabaseError"]
