"""What user digests (issue 13) remember in the archive store: the spent
one-shot release tokens, and the digests sent per day and recipient.

Floor 1 (a leaf, beside ``store.py``): the console's digest pages and the
digest sender (``mppproxy/web/digest*.py``) call it.  Every method blocks
(SQLAlchemy): callers with a reactor run them in its thread pool.

Both rules are the database's primary key, so they hold across processes
and archive nodes sharing one MariaDB:

* a token is spent by inserting its hash (``spend``): of two requests
  with one token, one insert wins, the other finds it spent;
* a digest is claimed before it is sent (``claim``) by inserting (day,
  recipient): a restart, or a second node, finds it claimed and sends
  nothing.  A send that failed gives its claim back (``unclaim``).
"""
from __future__ import annotations

import time
from typing import Optional

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError

from mppproxy.store.schema import ACTOR_LENGTH, SENDER_LENGTH
from mppproxy.store.store import ArchiveStore, _utc

# The recipient of the row that marks a day's whole run done.
RUN_DONE = ""
# Days the per-recipient rows are kept (a restart only asks about today).
SENT_KEEP_DAYS = 30


class DigestLedger:
    """Spent tokens and sent digests of one store."""

    def __init__(self, store: ArchiveStore) -> None:
        self.store = store

    # -- tokens ------------------------------------------------------------------

    def spent(self, token_hash: str) -> bool:
        t = self.store.tables.digest_tokens
        with self.store._read() as conn:
            found = conn.execute(select(t.c.token_hash).where(t.c.token_hash == token_hash))
            return found.first() is not None

    def spend(self, token_hash: str, row_id: int, recipient: str, expires: float,
              origin: str, now: Optional[float] = None) -> bool:
        """Spend a token; False when it was spent before (by anyone)."""
        t = self.store.tables.digest_tokens
        try:
            with self.store._write() as conn:
                conn.execute(insert(t).values(
                    token_hash=token_hash, row_id=row_id, recipient=recipient[:SENDER_LENGTH],
                    used=_utc(time.time() if now is None else now), expires=_utc(expires),
                    origin=origin[:ACTOR_LENGTH]))
        except IntegrityError:
            return False
        return True

    def unspend(self, token_hash: str) -> None:
        """Give a token back (its release could not be done for now: the
        route is down; the recipient may try again)."""
        t = self.store.tables.digest_tokens
        with self.store._write() as conn:
            conn.execute(delete(t).where(t.c.token_hash == token_hash))

    # -- digests sent ------------------------------------------------------------

    def run_done(self, day: str) -> bool:
        return self.is_claimed(day, RUN_DONE)

    def mark_run_done(self, day: str) -> None:
        self.claim(day, RUN_DONE)

    def is_claimed(self, day: str, recipient: str) -> bool:
        s = self.store.tables.digest_sent
        with self.store._read() as conn:
            found = conn.execute(select(s.c.day).where(s.c.day == day,
                                                       s.c.recipient == recipient.lower()))
            return found.first() is not None

    def claim(self, day: str, recipient: str) -> bool:
        """Claim the day's digest for ``recipient``; False when it was
        claimed (sent) before."""
        s = self.store.tables.digest_sent
        try:
            with self.store._write() as conn:
                conn.execute(insert(s).values(day=day, recipient=recipient.lower()[:SENDER_LENGTH],
                                              at=_utc(time.time())))
        except IntegrityError:
            return False
        return True

    def unclaim(self, day: str, recipient: str) -> None:
        s = self.store.tables.digest_sent
        with self.store._write() as conn:
            conn.execute(delete(s).where(s.c.day == day, s.c.recipient == recipient.lower()))

    # -- housekeeping ----------------------------------------------------------

    def purge(self, now: float, keep_from_day: str) -> int:
        """Forget tokens past their expiry (they are refused by their own
        expiry) and sent rows of days before ``keep_from_day``."""
        t, s = self.store.tables.digest_tokens, self.store.tables.digest_sent
        with self.store._write() as conn:
            gone = conn.execute(delete(t).where(t.c.expires < _utc(now))).rowcount
            gone += conn.execute(delete(s).where(s.c.day < keep_from_day)).rowcount
        return int(gone)
