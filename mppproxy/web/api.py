"""The console's JSON API, ``/api/v1/`` (issue 13): the quarantine (list
and search with the page's filters, an item with its check results, the
raw message, the actions single and bulk), each domain's allow and block
lists, and the state tables -- the same operations as the pages, with the
same scope and the same audit.

Floor 3 (``mppproxy/web/``).  ``app.py`` hands every path under ``/api/``
here (``Console.api``, set by ``service.py``) before its cookie and CSRF
handling, which the API does not use:

* Authentication is ``Authorization: Bearer <token>`` (RFC 6750 2.1), a
  token of ``store/tokens.py``, read again on every request (revoked,
  expired, or its account removed or disabled: 401).  No cookie is read or
  set.  CSRF protection is not needed: a browser attaches cookies to a
  forged cross-site request by itself, but never an Authorization header,
  so another site's page cannot make a request that carries the token.
* Scope: the token's administrator's, as on the pages: a domain
  administrator's item or list outside their domains answers 404 exactly
  as one that does not exist.
* Audit: as the pages, with ``api:<client address> token <label>`` as
  origin.
* Errors are JSON, ``{"error": "...", "field": "..."}`` (``field`` when a
  value was wrong), with their HTTP status: 400 a bad value (the field
  named), 401 no or a bad token (with ``WWW-Authenticate: Bearer``, RFC
  6750 3), 404 missing or out of scope, 405 another method (with
  ``Allow``), 409 a state the action cannot start from, 413 a body over
  256 KiB, 415 a body that is not JSON, 503 the store unreachable.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, Optional

from mppproxy.store.accounts import WebAdmin
from mppproxy.store.store import RawMissing, Search, StoredRow, StoreError
from mppproxy.store.tokens import ApiToken, Tokens
from mppproxy.web import listops
from mppproxy.web.actions import ACTIONS, ActionError
from mppproxy.web.app import (CSP_RAW, FILTERS, Console, FilterError, Response, checks_of,
                              search_of)
from mppproxy.web.listops import FieldError, NotFound

PREFIX = "/api/v1"
# Rows one list answer holds at most (``limit``).
MAX_LIMIT = 500
# Which filter a FilterError's text is about (app.search_of's messages).
_FILTER_FIELDS = (("From date", "since"), ("To date", "until"), ("Status", "status"))


class ApiError(Exception):
    def __init__(self, code: int, message: str, field: str = "",
                 headers: Optional[dict[bytes, bytes]] = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}


@dataclass
class ApiCall:
    console: Console
    request: Any
    match: "re.Match[str]"
    admin: WebAdmin
    token: ApiToken
    client: str
    query: dict[str, list[str]]
    body: dict[str, Any]

    @property
    def origin(self) -> str:
        return f"api:{self.client} token {self.token.label}"

    @property
    def scope(self) -> Optional[tuple[str, ...]]:
        return self.admin.scope()

    @property
    def ctx(self) -> Any:
        return self.console.ctx

    def arg(self, name: str, limit: int = 512) -> str:
        """A query parameter (GET)."""
        values = self.query.get(name) or [""]
        return values[0][:limit]

    def text(self, name: str, limit: int = 1024, required: bool = False) -> str:
        """A string field of the JSON body."""
        value = self.body.get(name, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise ApiError(400, "must be a string", name)
        if required and not value.strip():
            raise ApiError(400, "is required", name)
        if len(value) > limit:
            raise ApiError(400, f"longer than {limit} characters", name)
        return value

    def strings(self, name: str) -> list[str]:
        """A list-of-strings field of the JSON body."""
        value = self.body.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
            raise ApiError(400, "must be a list of strings", name)
        return [str(v) for v in value]


ApiHandler = Callable[[ApiCall], Awaitable[Any]]


def json_response(code: int, value: Any, headers: Optional[dict[bytes, bytes]] = None
                  ) -> Response:
    return Response(code, json.dumps(value, sort_keys=True).encode("utf-8"),
                    b"application/json", headers or {})


def _error(e: ApiError) -> Response:
    body: dict[str, Any] = {"error": e.message}
    if e.field:
        body["field"] = e.field
    return json_response(e.code, body, e.headers)


def _bearer(request: Any) -> Optional[str]:
    value = (request.getHeader(b"authorization") or b"").decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Api:
    """The routes and the request cycle of ``/api/v1/``."""

    def __init__(self, console: Console) -> None:
        self.console = console
        d = r"([A-Za-z0-9._-]{1,253})"
        self.routes: list[tuple[bytes, "re.Pattern[str]", ApiHandler]] = [
            (b"GET", re.compile(r"/me"), me),
            (b"GET", re.compile(r"/quarantine"), quarantine),
            (b"POST", re.compile(r"/quarantine/bulk"), bulk),
            (b"GET", re.compile(r"/quarantine/(\d{1,18})"), item),
            (b"GET", re.compile(r"/quarantine/(\d{1,18})/raw"), raw),
            (b"POST", re.compile(r"/quarantine/(\d{1,18})/([a-z-]{1,20})"), action),
            (b"GET", re.compile(r"/lists"), all_lists),
            (b"GET", re.compile(rf"/lists/{d}"), domain_list),
            (b"POST", re.compile(rf"/lists/{d}"), list_add),
            (b"POST", re.compile(rf"/lists/{d}/remove"), list_remove),
            (b"GET", re.compile(r"/state/blacklist"), blacklist),
            (b"POST", re.compile(r"/state/blacklist/remove"), blacklist_remove),
            (b"GET", re.compile(r"/state/greylist"), greylist),
            (b"POST", re.compile(r"/state/greylist/remove"), greylist_remove),
        ]

    async def serve(self, request: Any, path: str, method: bytes, client: str,
                    query: dict[str, list[str]]) -> Response:
        try:
            return await self._serve(request, path, method, client, query)
        except ApiError as e:
            return _error(e)

    async def _serve(self, request: Any, path: str, method: bytes, client: str,
                     query: dict[str, list[str]]) -> Response:
        ctx = self.console.ctx
        if request.too_large:
            raise ApiError(413, "the request body is larger than 256 KiB")
        if not await ctx.ready():
            raise ApiError(503, "the archive store cannot be reached just now",
                           headers={b"retry-after": b"10"})
        token = _bearer(request)
        found = None
        if token is not None:
            found = await ctx.in_thread(Tokens(ctx.store).authenticate, token, ctx.now())
        if found is None:
            # RFC 6750 3 / 3.1: the scheme, and invalid_token when one was sent.
            challenge = b'Bearer realm="mppproxy"' + (
                b', error="invalid_token"' if token is not None else b"")
            raise ApiError(401, "a valid API token is needed (Authorization: Bearer <token>)"
                           if token is None else "the token is not valid (unknown, revoked "
                           "or expired)", headers={b"www-authenticate": challenge})
        api_token, admin = found
        sub = path[len(PREFIX):] if path.startswith(PREFIX + "/") else ""
        allowed: list[bytes] = []
        for route_method, pattern, handler in self.routes:
            match = pattern.fullmatch(sub)
            if match is None:
                continue
            if route_method != method:
                allowed.append(route_method)
                continue
            body: dict[str, Any] = {}
            if method == b"POST":
                body = _json_body(request)
            call = ApiCall(self.console, request, match, admin, api_token, client, query, body)
            try:
                result = await handler(call)
            except NotFound:
                raise ApiError(404, "not found") from None
            except FieldError as e:
                raise ApiError(400, e.message, e.field) from None
            except ActionError as e:
                raise ApiError(400, str(e), "action") from None
            except StoreError as e:
                raise ApiError(409, str(e)) from None
            if isinstance(result, Response):
                return result
            code, value = result
            return json_response(code, value)
        if allowed:
            raise ApiError(405, "not with this method", headers={b"allow": b", ".join(allowed)})
        raise ApiError(404, "not found")


def _json_body(request: Any) -> dict[str, Any]:
    kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    request.content.seek(0)
    data = request.content.read()
    if not data:
        return {}
    if kind != b"application/json":
        raise ApiError(415, "send the body as application/json")
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "the body is not JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, "the body must be a JSON object")
    return value


def _row_json(row: StoredRow) -> dict[str, Any]:
    out = row.to_json()
    out.pop("raw_key", None)  # the store's own key: nothing for a client
    return out


async def _row(call: ApiCall, row_id: int) -> StoredRow:
    rows: list[StoredRow] = await call.ctx.in_thread(
        call.ctx.store.search, Search(ids=(row_id,), domains=call.scope, status=None, limit=1))
    if not rows:
        raise NotFound()
    return rows[0]


# -- the handlers ---------------------------------------------------------------

async def me(call: ApiCall) -> tuple[int, Any]:
    admin = call.admin
    return 200, {"name": admin.name, "superadmin": admin.superadmin,
                 "domains": list(admin.domains), "token": call.token.to_json()}


def _filters(values: Callable[[str, int], str]) -> Search:
    filters = {name: values(name, limit).strip() for name, limit in FILTERS.items()}
    filters["status"] = filters["status"] or "current"
    try:
        return search_of(filters, None, 0.0)
    except FilterError as e:
        text = str(e)
        field = next((f for prefix, f in _FILTER_FIELDS if text.startswith(prefix)), "")
        raise ApiError(400, text, field) from None


async def quarantine(call: ApiCall) -> tuple[int, Any]:
    """The quarantine's rows, newest first, with the page's filters;
    ``limit`` (default web.page_size, at most 500) and ``before``."""
    search = replace(_filters(call.arg), domains=call.scope)
    limit_text = call.arg("limit", 10) or str(call.ctx.config.web.page_size)
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
        raise ApiError(400, f"a number from 1 to {MAX_LIMIT}", "limit")
    limit = int(limit_text)
    before = call.arg("before", 20)
    if before:
        if not before.isdigit():
            raise ApiError(400, "a row id", "before")
        await _row(call, int(before))  # 404 when missing or out of scope
        search = replace(search, before_id=int(before))
    store = call.ctx.store
    found: list[StoredRow] = await call.ctx.in_thread(store.search,
                                                      replace(search, limit=limit + 1))
    rows = found[:limit]
    whole = replace(search, before_id=None)
    total = await call.ctx.in_thread(store.count, whole)
    return 200, {"total": total, "items": [_row_json(r) for r in rows],
                 "next_before": rows[-1].id if len(found) > limit else None}


async def item(call: ApiCall) -> tuple[int, Any]:
    row = await _row(call, int(call.match.group(1)))
    state: dict[str, Any] = await call.ctx.in_thread(call.ctx.store.state, row)
    checks, passed = checks_of(state)
    await call.ctx.in_thread(call.ctx.store.audit, call.admin.name, call.origin, "view", row,
                             "api")
    return 200, {"item": _row_json(row),
                 "checks": [{"name": c.name, "score": c.score, "detail": c.detail}
                            for c in checks],
                 "passed": passed}


async def raw(call: ApiCall) -> Response:
    row = await _row(call, int(call.match.group(1)))
    try:
        data: bytes = await call.ctx.in_thread(call.ctx.store.raw, row)
    except RawMissing:
        raise ApiError(410, "the message itself is gone (deleted or purged)") from None
    await call.ctx.in_thread(call.ctx.store.audit, call.admin.name, call.origin, "download",
                             row, "api")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{row.queue_id}-{row.rcpt_domain}")[:100]
    return Response(200, data, b"message/rfc822", {
        b"content-disposition": f'attachment; filename="{name}.eml"'.encode("ascii"),
        b"content-security-policy": CSP_RAW})


def _to(call: ApiCall) -> str:
    value = call.body.get("to", "")
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)[:2000]
    return call.text("to", 2000)


async def _act(call: ApiCall, action: str, rows: list[StoredRow]) -> tuple[int, Any]:
    if action not in ACTIONS:
        raise ApiError(400, f"one of {', '.join(ACTIONS)}", "action")
    summary, results = await call.ctx.actions.run(action, rows, call.scope, call.admin.name,
                                                  call.origin, _to(call))
    return 200, {"summary": summary, "rows": len(rows),
                 "results": [{"id": r.row_id, "ref": r.ref, "domain": r.domain,
                              "outcome": r.outcome, "detail": r.detail} for r in results]}


async def action(call: ApiCall) -> tuple[int, Any]:
    row = await _row(call, int(call.match.group(1)))
    return await _act(call, call.match.group(2), [row])


async def bulk(call: ApiCall) -> tuple[int, Any]:
    """``{"action": ..., "ids": [...]}`` or ``{"action": ..., "filters":
    {...}}`` (every row matching, at most web.bulk_max).  Ids outside the
    scope are left out as missing ones are; none found: 404."""
    limit = call.ctx.config.web.bulk_max
    action_name = call.text("action", 32, required=True)
    if "filters" in call.body:
        given = call.body["filters"]
        if not isinstance(given, dict):
            raise ApiError(400, "must be an object", "filters")
        search = replace(_filters(lambda n, size: str(given.get(n) or "")[:size]),
                         domains=call.scope)
        matching = await call.ctx.in_thread(call.ctx.store.count, search)
        if matching > limit:
            raise ApiError(400, f"{matching} rows match; one action takes at most {limit} "
                                "(web.bulk_max)", "filters")
        rows = await call.console._all_rows(search, limit)
    else:
        ids = sorted({int(i) for i in call.strings("ids") if i.isdigit() and len(i) < 19})
        if not ids:
            raise ApiError(400, "give the row ids", "ids")
        if len(ids) > limit:
            raise ApiError(400, f"at most {limit} at once (web.bulk_max)", "ids")
        rows = []
        for start in range(0, len(ids), 500):
            chunk = tuple(ids[start:start + 500])
            rows += await call.ctx.in_thread(
                call.ctx.store.search,
                Search(ids=chunk, domains=call.scope, status=None, limit=len(chunk)))
    if not rows:
        raise NotFound()
    return await _act(call, action_name, rows)


async def all_lists(call: ApiCall) -> tuple[int, Any]:
    domain = call.arg("domain", 255).strip() or None
    found = await listops.entries(call.ctx, call.admin, domain, call.arg("kind", 16) or None)
    return 200, {"entries": [e.to_json() for e in found]}


async def domain_list(call: ApiCall) -> tuple[int, Any]:
    domain = listops.list_domain(call.admin, call.match.group(1))
    found = await listops.entries(call.ctx, call.admin, domain, call.arg("kind", 16) or None)
    return 200, {"domain": domain, "entries": [e.to_json() for e in found],
                 "takes_effect": listops.cache_note(call.ctx)}


async def list_add(call: ApiCall) -> tuple[int, Any]:
    new, stored = await listops.add(call.ctx, call.admin, call.origin, call.match.group(1),
                                    call.text("kind", 16, required=True),
                                    call.text("entry", 400, required=True),
                                    call.text("note", 1000))
    return (201 if new else 200), {"added": new, "entry": stored,
                                   "takes_effect": listops.cache_note(call.ctx)}


async def list_remove(call: ApiCall) -> tuple[int, Any]:
    done = await listops.remove(call.ctx, call.admin, call.origin, call.match.group(1),
                                call.text("kind", 16, required=True),
                                call.text("entry", 400, required=True))
    return 200, {"removed": done, "takes_effect": listops.cache_note(call.ctx)}


async def blacklist(call: ApiCall) -> tuple[int, Any]:
    rows = await listops.blacklist(call.ctx, call.admin, call.arg("client", 64))
    return 200, {"entries": [{"network": r.network, "reason": r.reason, "created": r.created,
                              "expires": r.expires} for r in rows]}


async def blacklist_remove(call: ApiCall) -> tuple[int, Any]:
    done = await listops.remove_blacklist(call.ctx, call.admin, call.origin,
                                          call.strings("networks"))
    return 200, {"removed": done, "takes_effect": listops.cache_note(call.ctx)}


async def greylist(call: ApiCall) -> tuple[int, Any]:
    rows = await listops.greylist(call.ctx, call.admin, call.arg("client", 64),
                                  call.arg("sender", 320), call.arg("recipient", 320))
    return 200, {"entries": [{"id": r.id, "client_net": r.client_net, "sender": r.sender,
                              "recipient": r.recipient, "first_seen": r.first_seen,
                              "last_seen": r.last_seen, "passed": r.passed,
                              "expires": r.expires} for r in rows]}


async def greylist_remove(call: ApiCall) -> tuple[int, Any]:
    done = await listops.remove_greylist(call.ctx, call.admin, call.origin, call.strings("ids"))
    return 200, {"removed": done, "takes_effect": listops.cache_note(call.ctx)}
