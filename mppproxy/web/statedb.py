"""The console's handle on the state database (issue 13): the domain
allow/block lists, the auto-blacklist and the greylist, as the lists and
state pages and the API read and change them.

Floor 3 (``mppproxy/web/``).  The console may run where no proxy runs (the
archive node), so it opens an engine of its own on ``[database]``, once,
at the first page that needs it, in the thread pool, making the tables
that are missing (as ``mppproxy state`` and the release command do).  The
changes go to the database only: each proxy applies them when its mirror
or cache next reloads, within ``database.cache_seconds`` (the pages say
so).  Every function here blocks; the handlers run them in the reactor's
thread pool (``ConsoleContext.in_thread``).

Audit rows go to the archive store's audit table, beside the quarantine
actions', with the list's or the triplet's recipient domain in
``rcpt_domain`` (so a domain's audit can be found) and no message row.
"""
from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from typing import Any, Optional, Sequence

from sqlalchemy import insert
from sqlalchemy.engine import Engine

from mppproxy.db import allowlist
from mppproxy.db.allowlist import ListEntry
from mppproxy.db.engine import is_memory_sqlite, make_engine
from mppproxy.db.models import StateTables, create_missing
from mppproxy.db.stateadmin import BlacklistRow, StateAdmin, TripletRow, state_url
from mppproxy.store.schema import ACTOR_LENGTH, DOMAIN_LENGTH
from mppproxy.store.store import ArchiveStore, _utc

# Rows a state page or API answer shows at most.
MAX_ROWS = 500


class StateHandle:
    """One engine on the state database for the console's process."""

    def __init__(self, config: Any, table_prefix: str = "mpp_") -> None:
        self._config = config  # the ProxyConfig the console started with
        self.tables = StateTables(table_prefix)
        self._engine: Optional[Engine] = None
        self._lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        """The engine, made (and the tables created) at the first use."""
        with self._lock:
            if self._engine is None:
                import os
                db = self._config.database
                url = state_url(db, self._config.data_dir)
                if url.get_backend_name() == "sqlite" and not is_memory_sqlite(url):
                    os.makedirs(os.path.dirname(str(url.database)), exist_ok=True)
                engine = make_engine(url, dataclasses.replace(
                    db, sqlite_in_reactor=False, pool_min=1, pool_max=2))
                t = self.tables
                create_missing(engine, [t.blacklist, t.greylist, t.greylist_whitelist,
                                        t.allow_senders, t.domain_lists])
                allowlist.move_legacy(engine, t)
                self._engine = engine
            return self._engine

    def admin(self) -> StateAdmin:
        return StateAdmin(self.engine, self.tables)

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    # -- domain lists ------------------------------------------------------

    def entries(self, domains: Optional[Sequence[str]], kind: Optional[str] = None,
                limit: int = allowlist.MIRROR_MAX_ROWS) -> list[ListEntry]:
        return allowlist.list_entries(self.engine, self.tables, domains, kind, limit)

    def add(self, domain: str, kind: str, entry: str, actor: str, note: str) -> bool:
        return allowlist.add_entry(self.engine, self.tables, domain, kind, entry, actor, note)

    def remove(self, domain: str, kind: str, entry: str) -> bool:
        return allowlist.remove_entry(self.engine, self.tables, domain, kind, entry)

    # -- the auto-blacklist and the greylist -----------------------------

    def blacklist(self, client: Optional[str]) -> list[BlacklistRow]:
        return self.admin().blacklist(time.time(), client, MAX_ROWS)

    def remove_blacklist(self, networks: list[str]) -> int:
        return self.admin().remove_blacklist(networks)

    def triplets(self, domains: Optional[Sequence[str]], client: Optional[str],
                 sender: Optional[str], recipient: Optional[str],
                 ids: Optional[list[str]] = None) -> list[TripletRow]:
        """Unexpired triplets matching the filters, newest first; with
        ``domains`` (a domain administrator's scope) only those whose
        recipient is at one of them (the filter is in the SQL)."""
        admin, now = self.admin(), time.time()
        if domains is None:
            return admin.triplets(now, client, sender, recipient, ids, MAX_ROWS)
        found: list[TripletRow] = []
        for domain in domains:
            if recipient is not None and not _in_domain(recipient, domain):
                continue
            found += admin.triplets(now, client, sender, recipient or f"@{domain}", ids,
                                    MAX_ROWS)
        found.sort(key=lambda r: (-r.first_seen, r.id))
        return found[:MAX_ROWS]

    def remove_triplets(self, ids: list[str]) -> int:
        return self.admin().remove_triplets(ids)


def _in_domain(recipient: str, domain: str) -> bool:
    text = recipient.strip().lower()
    return text.rpartition("@")[2] == domain if "@" in text else False


def audit(store: ArchiveStore, actor: str, origin: str, action: str, domain: Optional[str],
          detail: str) -> None:
    """An audit row in the store for a change of the state database
    (blocking).  ``domain``: the list's or the triplet's recipient domain."""
    with store._write() as conn:
        conn.execute(insert(store.tables.audit).values(
            at=_utc(time.time()), actor=actor[:ACTOR_LENGTH], origin=origin[:ACTOR_LENGTH],
            action=action[:32], row_id=None, node=None, queue_id=None,
            rcpt_domain=domain[:DOMAIN_LENGTH] if domain else None, detail=detail))


_handles: "weakref.WeakKeyDictionary[Any, StateHandle]" = weakref.WeakKeyDictionary()


def state_of(ctx: Any) -> StateHandle:
    """The console's handle (one per ``ConsoleContext``; made when first
    asked, without I/O)."""
    handle = _handles.get(ctx)
    if handle is None:
        handle = _handles[ctx] = StateHandle(ctx.config)
    return handle


def use_state(ctx: Any, handle: StateHandle) -> None:
    """Give a console a handle of one's own (tests: a table prefix)."""
    _handles[ctx] = handle


def close_state(ctx: Any) -> None:
    """Dispose of the handle's connections (blocking; the console's stop)."""
    handle = _handles.pop(ctx, None)
    if handle is not None:
        handle.close()
