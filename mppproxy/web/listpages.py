"""The console's pages for each domain's allow and block lists and for the
state tables (issue 13): ``/lists``, ``/lists/DOMAIN`` (list, add,
remove), ``/state/blacklist`` and ``/state/greylist`` (search, remove).

Floor 3 (``mppproxy/web/``).  Handlers only: the work, the scope and the
audit are ``listops.py``'s, shared with the API.  Every change is a POST
carrying the session's CSRF token (``app.py`` checks it before the
handler runs); the answer to a change is the page again with what was
done (the text is built here, never taken from the URL).
A foreign domain's list answers 404 exactly as a missing one.
"""
from __future__ import annotations

import re
import urllib.parse
from typing import Any

from mppproxy.web import listops
from mppproxy.web.app import Call, Console, Response, Route, redirect
from mppproxy.web.listops import FieldError, NotFound

_DOMAIN = r"([A-Za-z0-9._-]{1,253})"


def routes() -> list[Route]:
    """This module's routes, for the console's table (service.py)."""
    return [
        Route(b"GET", re.compile(r"/lists"), lists),
        Route(b"GET", re.compile(rf"/lists/{_DOMAIN}"), domain_list),
        Route(b"POST", re.compile(rf"/lists/{_DOMAIN}/add"), list_add),
        Route(b"POST", re.compile(rf"/lists/{_DOMAIN}/remove"), list_remove),
        Route(b"GET", re.compile(r"/state/blacklist"), blacklist),
        Route(b"POST", re.compile(r"/state/blacklist/remove"), blacklist_remove),
        Route(b"GET", re.compile(r"/state/greylist"), greylist),
        Route(b"POST", re.compile(r"/state/greylist/remove"), greylist_remove),
    ]


def _response(code: int, body: bytes) -> Response:
    return Response(code, body)


def _redirect(location: str) -> Response:
    return redirect(location)


def _not_found(console: Console, call: Call) -> Response:
    return console._page(404, "Not found", "There is no such list.", call)


async def lists(console: Console, call: Call) -> Response:
    """``/lists``: the domains in scope with their entry counts; a
    superadmin names any domain."""
    admin = call.admin
    assert admin is not None
    wanted = call.field("domain", 255).strip()
    if wanted:
        try:
            domain = listops.list_domain(admin, wanted)
        except NotFound:
            return _not_found(console, call)
        return _redirect("/lists/" + urllib.parse.quote(domain))
    found = await listops.entries(console.ctx, admin, None)
    counts: dict[str, dict[str, int]] = {d: {"allow": 0, "block": 0}
                                         for d in (admin.domains if not admin.superadmin else ())}
    for e in found:
        counts.setdefault(e.domain, {"allow": 0, "block": 0})[e.kind] += 1
    body = console._render("lists.html", call, title="Allow and block lists",
                           counts=sorted(counts.items()), superadmin=admin.superadmin,
                           note=listops.cache_note(console.ctx))
    return _response(200, body)


async def domain_list(console: Console, call: Call, message: str = "", error: str = "",
                      code: int = 200, form: Any = None) -> Response:
    """``/lists/DOMAIN``: its entries, the add form, a remove button each."""
    admin = call.admin
    assert admin is not None
    try:
        domain = listops.list_domain(admin, call.match.group(1))
        found = await listops.entries(console.ctx, admin, domain)
    except NotFound:
        return _not_found(console, call)
    body = console._render("domain_list.html", call, title=f"Lists of {domain}", domain=domain,
                           entries=found, message=message, error=error,
                           form=form or {"kind": "block", "entry": "", "note": ""},
                           note=listops.cache_note(console.ctx))
    return _response(code, body)


async def list_add(console: Console, call: Call) -> Response:
    admin = call.admin
    assert admin is not None
    form = {name: call.field(name, 1000) for name in ("kind", "entry", "note")}
    try:
        new, stored = await listops.add(console.ctx, admin, call.origin, call.match.group(1),
                                        form["kind"], form["entry"], form["note"])
    except NotFound:
        return _not_found(console, call)
    except FieldError as e:
        return await domain_list(console, call, error=str(e), code=400, form=form)
    done = (f"{stored} added to the {form['kind'].strip().lower()} list" if new
            else f"{stored} was on the list already")
    return await domain_list(console, call, message=done)


async def list_remove(console: Console, call: Call) -> Response:
    admin = call.admin
    assert admin is not None
    kind, entry = call.field("kind", 16), call.field("entry", 400)
    try:
        done = await listops.remove(console.ctx, admin, call.origin, call.match.group(1), kind,
                                    entry)
    except NotFound:
        return _not_found(console, call)
    except FieldError as e:
        return await domain_list(console, call, error=str(e), code=400)
    text = f"{entry} removed" if done else f"{entry} was not on the {kind} list"
    return await domain_list(console, call, message=text)


# -- the state tables ----------------------------------------------------------

async def blacklist(console: Console, call: Call, message: str = "", error: str = "",
                    code: int = 200) -> Response:
    """``/state/blacklist``: superadmins only (404 for anyone else)."""
    admin = call.admin
    assert admin is not None
    client = call.field("client", 64) if call.request.method != b"POST" else ""
    rows: list[Any] = []
    try:
        rows = await listops.blacklist(console.ctx, admin, client)
    except NotFound:
        return console._page(404, "Not found", "There is no such page.", call)
    except FieldError as e:
        error, code = str(e), 400
    body = console._render("state_blacklist.html", call, title="Auto-blacklist", rows=rows,
                           client=client, message=message, error=error,
                           note=listops.cache_note(console.ctx))
    return _response(code, body)


async def blacklist_remove(console: Console, call: Call) -> Response:
    admin = call.admin
    assert admin is not None
    try:
        done = await listops.remove_blacklist(console.ctx, admin, call.origin,
                                              call.form.get("network", []))
    except NotFound:
        return console._page(404, "Not found", "There is no such page.", call)
    except FieldError as e:
        return await blacklist(console, call, error=str(e), code=400)
    return await blacklist(console, call,
                           message=f"{done} blacklist entr{'y' if done == 1 else 'ies'} removed")


async def greylist(console: Console, call: Call, message: str = "", error: str = "",
                   code: int = 200) -> Response:
    """``/state/greylist``: a domain administrator's triplets are those
    whose recipient is at one of their domains."""
    admin = call.admin
    assert admin is not None
    get = call.request.method != b"POST"
    search = {name: (call.field(name, 320) if get else "")
              for name in ("client", "sender", "recipient")}
    rows: list[Any] = []
    try:
        rows = await listops.greylist(console.ctx, admin, **search)
    except FieldError as e:
        error, code = str(e), 400
    body = console._render("state_greylist.html", call, title="Greylist", rows=rows,
                           search=search, message=message,
                           error=error, note=listops.cache_note(console.ctx))
    return _response(code, body)


async def greylist_remove(console: Console, call: Call) -> Response:
    admin = call.admin
    assert admin is not None
    try:
        done = await listops.remove_greylist(console.ctx, admin, call.origin,
                                             call.form.get("id", []))
    except FieldError as e:
        return await greylist(console, call, error=str(e), code=400)
    return await greylist(console, call, message=f"{done} triplet(s) removed")
