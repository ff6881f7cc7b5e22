"""What the SQL stores use of the state database (docs/design.md, "Data that
outlives a process").

``StateDatabase`` (``state.py``) builds the stores and hands itself to them;
they see it through this protocol, so no store imports ``state.py`` and the
package has no import circle.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from sqlalchemy.engine import Engine
from twisted.internet import defer

from mppproxy.db.models import StateTables


class Database(Protocol):
    """The state database as the stores and the batcher see it."""

    # The reactor the work is scheduled on, and the clock the stores read
    # (a ``task.Clock`` in tests).
    reactor: Any
    clock: Any
    # Safe for logs: the URL without its password.
    name: str
    engine: Engine
    tables: StateTables

    def run(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """``fn(engine, *args)`` in the thread pool."""

    def run_job(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """A batch job: on the reactor thread while SQLite's write lock is
        free, else in the thread pool."""
