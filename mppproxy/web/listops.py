"""What the lists and state pages and the API do (issue 13), once for
both: each recipient domain's allow and block lists, the auto-blacklist
and the greylist, with the administrator's scope applied and every change
audited.

Floor 3 (``mppproxy/web/``).  Scope: a superadmin reaches every domain's
list; a domain administrator only the lists of their own domains -- a
foreign domain raises ``NotFound`` exactly as a name that is no domain
does, so neither a page nor the API tells them apart.  The auto-blacklist
is per client, not per domain: superadmins only.  Greylist triplets: a
domain administrator sees and removes those whose recipient is at one of
their domains (the condition is in the SQL, ``statedb.StateHandle``); an
id outside them counts as one that does not exist.

Audit: the store's audit table (``statedb.audit``): ``list-add``,
``list-remove``, ``blacklist-remove``, ``greylist-remove``, with the
administrator as actor and ``web:<address>`` or ``api:<address> token
<label>`` as origin.  Changes reach the proxies within
``database.cache_seconds`` (their mirrors and caches).
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence

from mppproxy.db.allowlist import (ListEntry, is_network, normalise_domain, normalise_entry,
                                   normalise_kind)
from mppproxy.db.stateadmin import BlacklistRow, TripletRow, covering
from mppproxy.store.accounts import WebAdmin
from mppproxy.web.statedb import StateHandle, audit, state_of

# A triplet's id as the pages show it (triplet_key: SHA-256 hex), or a
# prefix of at least 8 digits.
_TRIPLET_ID = re.compile(r"^[0-9a-f]{8,64}$")
NOTE_MAX = 255
# Entries one request may remove (the forms tick rows; the API sends lists).
MAX_REMOVE = 500


class NotFound(Exception):
    """Missing or outside the administrator's scope: the same answer."""


class FieldError(Exception):
    """A value that cannot be used; ``field`` names the form or JSON field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def cache_note(ctx: Any) -> str:
    """When a change reaches the proxies (for pages and API answers)."""
    seconds = ctx.config.database.cache_seconds
    return (f"Changes take effect on every proxy within {seconds:g} seconds "
            "(database.cache_seconds), when their caches reload.")


def handle(ctx: Any) -> StateHandle:
    return state_of(ctx)


def list_domain(admin: WebAdmin, text: str) -> str:
    """The domain whose lists the admin asked for (a URL part); NotFound
    for a name that is no domain and for another administrator's domain."""
    try:
        domain = normalise_domain(text)
    except ValueError:
        raise NotFound() from None
    if not admin.superadmin and domain not in admin.domains:
        raise NotFound()
    return domain


def _kind(text: str) -> str:
    try:
        return normalise_kind(text)
    except ValueError:
        raise FieldError("kind", "choose allow or block") from None


async def entries(ctx: Any, admin: WebAdmin, domain: Optional[str],
                  kind: Optional[str] = None) -> list[ListEntry]:
    """One domain's entries (``domain``), or every domain's in scope."""
    domains: Optional[Sequence[str]]
    if domain is not None:
        domains = [list_domain(admin, domain)]
    else:
        domains = admin.scope()
    found: list[ListEntry] = await ctx.in_thread(
        handle(ctx).entries, domains, _kind(kind) if kind else None)
    return found


async def add(ctx: Any, admin: WebAdmin, origin: str, domain: str, kind: str, entry: str,
              note: str = "") -> tuple[bool, str]:
    """Put ``entry`` on the domain's ``kind`` list: (new?, the entry as
    stored)."""
    domain = list_domain(admin, domain)
    kind = _kind(kind)
    try:
        stored = normalise_entry(entry, kind)
    except ValueError as e:
        raise FieldError("entry", f"{e}; give an address, @domain, .domain or a network "
                                  "such as 192.0.2.0/24") from None
    note = note.strip()
    if len(note) > NOTE_MAX or not note.isprintable():
        raise FieldError("note", f"at most {NOTE_MAX} printable characters")
    new: bool = await ctx.in_thread(handle(ctx).add, domain, kind, stored, admin.name, note)
    if new:
        what = "network" if is_network(stored) else "sender"
        await ctx.in_thread(audit, ctx.store, admin.name, origin, "list-add", domain,
                            f"{kind} {what} {stored}" + (f" ({note})" if note else ""))
    return new, stored


async def remove(ctx: Any, admin: WebAdmin, origin: str, domain: str, kind: str,
                 entry: str) -> bool:
    """Take an entry off the domain's list; False when it was not there."""
    domain = list_domain(admin, domain)
    kind = _kind(kind)
    if not entry.strip():
        raise FieldError("entry", "give the entry to remove")
    try:
        done: bool = await ctx.in_thread(handle(ctx).remove, domain, kind, entry)
    except ValueError as e:
        raise FieldError("entry", str(e)) from None
    if done:
        await ctx.in_thread(audit, ctx.store, admin.name, origin, "list-remove", domain,
                            f"{kind} {entry.strip()}")
    return done


# -- the auto-blacklist (superadmins) -------------------------------------------

def _client(text: str) -> Optional[str]:
    text = text.strip()
    if not text:
        return None
    try:
        covering(text)
    except ValueError:
        raise FieldError("client", f"{text!r} is not an address or a network") from None
    return text


async def blacklist(ctx: Any, admin: WebAdmin, client: str = "") -> list[BlacklistRow]:
    if not admin.superadmin:
        raise NotFound()
    rows: list[BlacklistRow] = await ctx.in_thread(handle(ctx).blacklist, _client(client))
    return rows


async def remove_blacklist(ctx: Any, admin: WebAdmin, origin: str,
                           networks: Sequence[str]) -> int:
    """Remove the entries of these networks (as listed); how many there were."""
    if not admin.superadmin:
        raise NotFound()
    wanted = sorted({n.strip() for n in networks if n.strip()})
    if not wanted:
        raise FieldError("network", "choose the entries to remove")
    if len(wanted) > MAX_REMOVE:
        raise FieldError("network", f"at most {MAX_REMOVE} at once")
    for network in wanted:
        if "/" not in network:
            raise FieldError("network", f"{network!r} is not a network as listed "
                                        "(192.0.2.7/32)")
        _client(network)
    done: int = await ctx.in_thread(handle(ctx).remove_blacklist, wanted)
    if done:
        await ctx.in_thread(audit, ctx.store, admin.name, origin, "blacklist-remove", None,
                            f"{done} of {', '.join(wanted)}")
    return done


# -- the greylist ---------------------------------------------------------------

def _address(field: str, text: str) -> Optional[str]:
    text = text.strip()
    if not text:
        return None
    if len(text) > 320 or any(c.isspace() for c in text):
        raise FieldError(field, f"{text[:80]!r} is not an address or @domain")
    return text


async def greylist(ctx: Any, admin: WebAdmin, client: str = "", sender: str = "",
                   recipient: str = "") -> list[TripletRow]:
    rows: list[TripletRow] = await ctx.in_thread(
        handle(ctx).triplets, admin.scope(), _client(client), _address("sender", sender),
        _address("recipient", recipient))
    return rows


async def remove_greylist(ctx: Any, admin: WebAdmin, origin: str, ids: Sequence[str]) -> int:
    """Remove the triplets with these ids that are in scope; how many.
    An id that is not there and one outside the scope count alike."""
    wanted = sorted({i.strip().lower() for i in ids if i.strip()})
    if not wanted:
        raise FieldError("id", "choose the triplets to remove")
    if len(wanted) > MAX_REMOVE:
        raise FieldError("id", f"at most {MAX_REMOVE} at once")
    for i in wanted:
        if not _TRIPLET_ID.match(i):
            raise FieldError("id", f"{i[:80]!r} is not a triplet id")
    found: list[TripletRow] = await ctx.in_thread(handle(ctx).triplets, admin.scope(), None,
                                                  None, None, wanted)
    if not found:
        return 0
    done: int = await ctx.in_thread(handle(ctx).remove_triplets, [r.id for r in found])
    for domain in sorted({r.recipient.rpartition("@")[2] for r in found}):
        mine = [r for r in found if r.recipient.rpartition("@")[2] == domain]
        await ctx.in_thread(audit, ctx.store, admin.name, origin, "greylist-remove", domain,
                            "; ".join(f"{r.client_net} <{r.sender}> <{r.recipient}>"
                                      for r in mine)[:4000])
    return done
