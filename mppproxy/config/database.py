"""``[database]``: where shared state lives (docs/design.md, "Data that outlives a process").

A leaf of ``config/``: ``schema.py`` puts ``DatabaseConfig`` into
``ProxyConfig``; ``db/`` reads it without knowing any stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mppproxy.config.fields import at_least as _at_least, opt as _opt


@dataclass(frozen=True)
class DatabaseConfig:
    """Where shared state lives (greylist triplets, the auto-blacklist)."""

    # SQLAlchemy URL; empty: SQLite at data_dir/state.sqlite.  MariaDB:
    # "mysql+pymysql://user:password@host/dbname".
    url: str = ""
    # Threads that run database work off the reactor.
    pool_min: int = field(default=1, metadata=_opt(_at_least(1)))
    pool_max: int = field(default=8, metadata=_opt(_at_least(1)))
    # Seconds a blacklist or greylist answer may be served from the
    # in-process cache before the database is asked again; nodes sharing
    # one database see each other's entries within this time.
    cache_seconds: float = field(default=30.0, metadata=_opt(_at_least(0)))
    # Expired rows are deleted this often (seconds).
    purge_interval: float = field(default=3600.0, metadata=_opt(_at_least(10)))
    # SQLite: run the stores' batch jobs on the reactor thread while the
    # write lock is free (db/state.py says why; a job that would wait goes
    # to the thread pool).  MySQL/MariaDB always use the pool.
    sqlite_in_reactor: bool = True
    # The dashboard's traffic counts (db/traffic.py): each process adds its
    # transactions up in memory and writes them every this many seconds,
    # one batched statement per flush; 0 = not counted.
    traffic_flush: float = field(default=30.0, metadata=_opt(_at_least(0)))
    # Hourly traffic rows older than this many days are deleted by the
    # purge: a year and a month, so a year's charts compare like months.
    traffic_retention_days: int = field(default=400, metadata=_opt(_at_least(1)))
