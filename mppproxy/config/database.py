"""``[database]``: where shared state lives (docs/design.md, "Data that outlives a process").

A leaf of ``config/``: ``schema.py`` puts ``DatabaseConfig`` into
``ProxyConfig``; ``db/`` reads it without knowing any stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from mppproxy.config.fields import at_least as _at_least, opt as _opt

# ``database.url`` and ``store.url``: one SQLAlchemy URL, or (MySQL/MariaDB
# only) a list of them, the servers of one cluster tried in order
# (db/engine.py's failover).  A TOML string stays a string, a list becomes
# a tuple (config/load.py).
ServerUrls = str | tuple[str, ...]


def server_urls(value: ServerUrls) -> tuple[str, ...]:
    """The URLs of ``database.url``/``store.url`` in order; () for none."""
    if isinstance(value, str):
        return (value,) if value else ()
    return tuple(value)


def url_problems(key: str, value: ServerUrls) -> list[str]:
    """What is wrong with ``value`` for ``key`` (``database.url``), as
    ``key: what`` lines: each must parse, be a backend we support, and
    several only for MySQL/MariaDB, all of one backend."""
    if not isinstance(value, str) and not value:
        return [f"{key}: an empty list; leave the key out for SQLite in data_dir"]
    problems: list[str] = []
    backends: list[str] = []
    several = not isinstance(value, str)
    for i, text in enumerate(server_urls(value)):
        where = f"{key}[{i}]" if several else key
        try:
            url = make_url(text)
        except (ArgumentError, ValueError) as e:  # ValueError: a port that is no number
            hint = ("; for several servers give a list of URLs, one per server"
                    if "," in text.partition("@")[2].partition("/")[0] else "")
            problems.append(f"{where}: not an SQLAlchemy URL: {e}{hint}")
            continue
        backend = url.get_backend_name()
        if backend not in ("sqlite", "mysql", "mariadb"):
            problems.append(f"{where}: {backend!r} is not supported "
                            "(sqlite, or mysql+pymysql for MySQL/MariaDB)")
        backends.append("mysql" if backend == "mariadb" else backend)
    if several and len(value) > 1 and backends and not problems:
        if "sqlite" in backends:
            problems.append(f"{key}: several servers are for MySQL/MariaDB (a Galera "
                            "cluster); SQLite takes one URL")
        elif len(set(backends)) > 1:
            problems.append(f"{key}: the servers must all be MySQL/MariaDB")
    return problems


@dataclass(frozen=True)
class DatabaseConfig:
    """Where shared state lives (greylist triplets, the auto-blacklist)."""

    # SQLAlchemy URL; empty: SQLite at data_dir/state.sqlite.  MariaDB:
    # "mysql+pymysql://user:password@host/dbname", or a list of such URLs
    # (the nodes of a Galera cluster), tried in order (db/engine.py).
    url: ServerUrls = ""
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
