"""What the console's buttons do: release, release and allow the sender,
forward, delete, hold and unhold, on one row or many.

Floor 3 (``mppproxy/web/``).  Nothing is re-implemented here: a release or
forward is ``mppproxy.release.Releaser`` (claim, re-scan, re-inject, mark,
audit: what ``mppproxy quarantine release`` runs), delete and hold are the
store's own ``delete`` and ``set_hold`` (each auditing per row), and the
allow list is ``db/allowlist.py``'s, as ``release --allow-sender`` uses
it.  The rows come from a scoped search (``app.py``), and delete and hold
repeat the scope in their own Search, so even a row id slipped in by hand
is changed only within the administrator's domains.

Every action is audited with the administrator's name as the actor and
``web:<client address>`` as the origin.  Store and allow-list calls run in
the reactor's thread pool.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from twisted.internet.threads import deferToThreadPool

from mppproxy.archive.keys import KeyRing
from mppproxy.config.schema import ProxyConfig
from mppproxy.db.allowlist import open_allow_list
from mppproxy.release import Outcome, Releaser
from mppproxy.store.store import ArchiveStore, Search, StoredRow

ACTIONS = ("release", "release-allow", "forward", "delete", "hold", "unhold")
# Rows per store call for delete and hold by ids (the store's IN lists).
CHUNK = 500
# Addresses one forward may name.
MAX_FORWARD = 10
_ADDRESS = re.compile(r"^[^\s<>()\[\],;:\"@\\]{1,64}@[^\s<>()\[\],;:\"@\\]{1,253}$")


class ActionError(Exception):
    """The action cannot be done as asked (shown to the administrator)."""


@dataclass(frozen=True)
class RowResult:
    row_id: int
    ref: str
    domain: str
    outcome: str
    detail: str


@dataclass
class Applied:
    """What an action did to some rows: how many it changed (released,
    forwarded, deleted, held...), senders put on the allow list, and for
    release and forward one result per row."""

    done: int
    allowed: int
    results: list[RowResult]
    recipients: tuple[str, ...] = ()

    def summary(self, action: str, of: int) -> str:
        """The answer's line, e.g. "3 of 4 released"."""
        if action == "forward":
            return f"{self.done} of {of} forwarded to {', '.join(self.recipients)}"
        if action in ("release", "release-allow"):
            line = f"{self.done} of {of} released"
            if self.allowed:
                line += f"; {self.allowed} sender(s) put on the allow list"
            return line
        return f"{self.done} of {of} {DONE_WORDS[action]}"


# How each store action's summary says what was done.
DONE_WORDS = {"delete": "deleted (rows on legal hold or being released are kept)",
              "hold": "put on legal hold", "unhold": "taken off legal hold"}


def parse_recipients(text: str) -> tuple[str, ...]:
    """The addresses of a forward form field (commas or spaces between)."""
    found = tuple(a for a in re.split(r"[\s,;]+", text.strip()) if a)
    if not found:
        raise ActionError("forward needs an address to send the copy to")
    if len(found) > MAX_FORWARD:
        raise ActionError(f"forward takes at most {MAX_FORWARD} addresses")
    for address in found:
        if not _ADDRESS.match(address):
            raise ActionError(f"{address!r} is not an e-mail address")
    return found


class Actions:
    """Carries out actions for one console."""

    def __init__(self, config: Callable[[], ProxyConfig], store: ArchiveStore, reactor: Any,
                 keys: Callable[[], Optional[KeyRing]]) -> None:
        self.config = config
        self.store = store
        self.reactor = reactor
        self.keys = keys

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> Any:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def check(self, action: str, to: str = "") -> tuple[str, ...]:
        """Refuse an unknown action or a forward without good addresses
        before anything is done (a bulk job checks first, then starts);
        the forward's recipients."""
        if action not in ACTIONS:
            raise ActionError(f"unknown action {action!r}")
        return parse_recipients(to) if action == "forward" else ()

    async def run(self, action: str, rows: Sequence[StoredRow], scope: Optional[tuple[str, ...]],
                  actor: str, origin: str, to: str = "") -> tuple[str, list[RowResult]]:
        """Do ``action`` on ``rows`` (already within ``scope``); a summary
        line and, for release and forward, one result per row."""
        done = await self.apply(action, rows, scope, actor, origin, to)
        return done.summary(action, len(rows)), done.results

    async def apply(self, action: str, rows: Sequence[StoredRow],
                    scope: Optional[tuple[str, ...]], actor: str, origin: str,
                    to: str = "") -> "Applied":
        """``run`` as counts: a bulk job adds up one ``Applied`` per batch."""
        recipients = self.check(action, to)
        if action == "forward":
            results = await self._releasing(rows, actor, origin, forward_to=recipients)
            done = sum(r.outcome == str(Outcome.FORWARDED) for r in results)
            return Applied(done, 0, results, recipients)
        if action in ("release", "release-allow"):
            results = await self._releasing(rows, actor, origin)
            released = [row for row, r in zip(rows, results)
                        if r.outcome == str(Outcome.RELEASED)]
            allowed = 0
            if action == "release-allow" and released:
                allowed = await self._in_thread(self._allow_senders, released, actor, origin)
            return Applied(len(released), allowed, results)
        ids = [row.id for row in rows]
        changed = 0
        for start in range(0, len(ids), CHUNK):
            chunk = tuple(ids[start:start + CHUNK])
            # The scope again: the store changes nothing outside it.
            search = Search(ids=chunk, domains=scope, status=None, limit=len(chunk))
            if action == "delete":
                changed += await self._in_thread(self.store.delete, search, actor, origin)
            else:
                changed += await self._in_thread(self.store.set_hold, search, action == "hold",
                                                 actor, origin)
        return Applied(changed, 0, [])

    async def _releasing(self, rows: Sequence[StoredRow], actor: str, origin: str,
                         forward_to: tuple[str, ...] = ()) -> list[RowResult]:
        """Release (or forward) each row in turn, one route connection at
        a time, as the CLI does."""
        releaser = Releaser(self.config(), self.store, self.reactor, self.keys(), actor, origin)
        out: list[RowResult] = []
        try:
            for row in rows:
                if forward_to:
                    result = await releaser.forward(row, forward_to)
                else:
                    result = await releaser.release(row)
                out.append(RowResult(result.row_id, result.ref, result.domain,
                                     str(result.outcome), result.detail))
        finally:
            releaser.close()
        return out

    def _allow_senders(self, rows: Sequence[StoredRow], actor: str, origin: str) -> int:
        """"Release and allow this sender" (blocking): each released row's
        sender on its recipient domain's allow list, as ``mppproxy
        quarantine release --allow-sender`` does."""
        config = self.config()
        count = 0
        with open_allow_list(config.database, config.data_dir) as allow:
            for row in rows:
                if not row.sender:
                    continue  # the null sender: "<>" would allow every bounce
                new = allow.allow(row.rcpt_domain, row.sender, actor,
                                  f"released {row.queue_id} ({origin})")
                self.store.audit(actor, origin, "allow-sender", row,
                                 f"{row.sender} allowed for {row.rcpt_domain}"
                                 + ("" if new else " (already allowed)"))
                count += 1
        return count
