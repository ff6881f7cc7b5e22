"""The console's ``twisted.web`` resource: routing, sessions, CSRF checks,
security headers and the page handlers (issue 13).

Floor 3 (``mppproxy/web/``).  One leaf resource answers every path from a
small route table: each route names its method, whether it needs a login,
and a coroutine that gets a ``Call`` (the request, its form, the admin)
and returns a ``Response``.  What every request goes through, in order:

1. security headers (CSP ``default-src 'self'``, ``X-Frame-Options DENY``,
   ``Referrer-Policy no-referrer``, ``nosniff``, ``Cache-Control:
   no-store``; HSTS under TLS);
2. the route, or 404 / 405; a request body over MAX_BODY: 413;
3. the session cookie: verified (``sessions.py``), then the account read
   again -- removed, disabled or with a new password ends the session;
4. a route that needs a login without one: GET goes to /login, POST is
   refused (403);
5. POST: a form (``application/x-www-form-urlencoded``) whose CSRF token
   matches the session (``csrf.py``), and an ``Origin`` header, when the
   browser sends one, that is this console's own;
6. an account whose password must change may only change it or log out.

Scoping: every store query carries the admin's domains (``Search.domains``,
in the SQL), and a message outside them answers exactly as a message
that does not exist (``_not_found``).  Store calls run in the reactor's
thread pool (``ConsoleContext.in_thread``), never on the reactor thread.
"""
from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from typing import Any, Awaitable, Callable, Optional

from sqlalchemy.exc import DBAPIError
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mppproxy._async import as_deferred
from mppproxy.config.schema import ProxyConfig
from mppproxy.logsetup import Logger
from mppproxy.store.accounts import AccountError, Accounts, WebAdmin
from mppproxy.store.schema import STATUSES
from mppproxy.store.store import (ArchiveStore, RawMissing, Search, StoredRow, StoreError,
                                   Tally)
from mppproxy.web.actions import ActionError, Actions
from mppproxy.web.csrf import FIELD as CSRF_FIELD, PRE_LOGIN_COOKIE, Csrf
from mppproxy.web.dashboard import routes as dashboard_routes
from mppproxy.web.jobs import Jobs, TooBusy, describe
from mppproxy.web.mailview import view_message
from mppproxy.web.pages import Pages
from mppproxy.web.sessions import Session, SessionCodec
from mppproxy.web.throttle import LoginThrottle, keys_for

log = Logger()

SESSION_COOKIE = "mpp_session"
# Octets of a request body: the forms are small; a bulk form with
# web.bulk_max ticked ids stays far below.
MAX_BODY = 256 * 1024
# The pre-login cookie's life (seconds): a login form left open longer
# must be loaded again.
PRE_LOGIN_LIFE = 3600
CSP = (b"default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; "
       b"object-src 'none'")
# The raw download: nothing in it may ever run, even opened in the browser.
CSP_RAW = b"sandbox; default-src 'none'"
# Filters of the list and the bulk form, and the longest value of each.
FILTERS = {"domain": 255, "since": 32, "until": 32, "sender": 512, "rcpt": 512,
           "subject": 512, "reason": 200, "ref": 64, "status": 16}
# The list counts the newest COUNT_CAP matching rows, not all: a count of
# a million rows is seconds on every page (benchmarks/console_bench.py).
COUNT_CAP = 5_000
# Seconds the counts may take (MariaDB stops the query): a filter the
# indexes cannot narrow (a subject word) reads every candidate row; the
# page then shows its rows and says the counts were skipped.
COUNT_SECONDS = 0.1
# The status choices of the list: "current" is every status but deleted.
STATUS_CHOICES = ("current", *STATUSES, "all")


class ConsoleRequest(Request):
    """A request whose body is bounded (twisted.web buffers any size):
    past MAX_BODY octets (Content-Length or chunked alike) the rest is
    dropped and the console answers 413."""

    too_large = False
    _received = 0

    def gotLength(self, length: Optional[int]) -> None:
        self.too_large = length is not None and length > MAX_BODY
        super().gotLength(None if self.too_large else length)  # type: ignore[no-untyped-call]  # Twisted's is unannotated

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self.too_large or self._received > MAX_BODY:
            self.too_large = True
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]  # Twisted's is unannotated


@dataclass
class Response:
    code: int = 200
    body: bytes = b""
    content_type: bytes = b"text/html; charset=utf-8"
    headers: dict[bytes, bytes] = field(default_factory=dict)


def redirect(location: str) -> Response:
    """303 See Other (RFC 9110 15.4.4): a POST's answer is fetched by GET."""
    return Response(303, b"", headers={b"location": location.encode("ascii")})


class ConsoleContext:
    """What the handlers share: configuration, store, accounts, keys, and
    the per-process login throttle."""

    def __init__(self, config: ProxyConfig, reactor: Any, store: ArchiveStore,
                 codec: SessionCodec, csrf: Csrf, pages: Pages, actions: Actions,
                 secure: bool, ready: Callable[[], Awaitable[bool]]) -> None:
        self.config = config
        self.reactor = reactor
        self.store = store
        self.accounts = Accounts(store)
        self.codec = codec
        self.csrf = csrf
        self.pages = pages
        self.actions = actions
        self.secure = secure
        self.ready = ready
        self.throttle = LoginThrottle(config.web.login_failures, config.web.login_lockout)
        self.css = pages.static("console.css")
        # Bulk jobs of this process (jobs.py): in memory, gone at a restart.
        self.jobs = Jobs()

    def in_thread(self, f: Callable[..., Any], *args: Any) -> Any:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def now(self) -> float:
        return float(self.reactor.seconds())


@dataclass
class Call:
    """One request being served."""

    request: Any  # a ConsoleRequest (twisted.web's Request is unannotated)
    match: "re.Match[str]"
    query: dict[str, list[str]]
    form: dict[str, list[str]]
    client: str
    admin: Optional[WebAdmin] = None
    session: Optional[Session] = None
    # A handler that set or cleared the session cookie itself.
    cookie_done: bool = False

    def field(self, name: str, limit: int = 1024) -> str:
        """A POST's form field (never the query string: a token in a URL
        would reach logs and Referer headers), or a GET's query field."""
        source = self.form if self.request.method == b"POST" else self.query
        values = source.get(name) or [""]
        return values[0][:limit]

    @property
    def origin(self) -> str:
        """The audit's origin of this request."""
        return f"web:{self.client}"

    @property
    def scope(self) -> Optional[tuple[str, ...]]:
        assert self.admin is not None
        return self.admin.scope()


Handler = Callable[["Console", Call], Awaitable[Response]]
# The API's entry: (request, path, method, client address, query) -> Response.
ApiServe = Callable[[Any, str, bytes, str, dict[str, list[str]]], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    method: bytes
    pattern: "re.Pattern[str]"
    handler: Handler
    login: bool = True


class Console(Resource):
    """The whole console as one leaf resource (module docstring)."""

    isLeaf = True

    def __init__(self, ctx: ConsoleContext) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's is unannotated
        self.ctx = ctx
        self.routes = [
            Route(b"GET", re.compile(r"/"), Console.home, login=False),
            Route(b"GET", re.compile(r"/login"), Console.login_form, login=False),
            Route(b"POST", re.compile(r"/login"), Console.login, login=False),
            Route(b"POST", re.compile(r"/logout"), Console.logout),
            Route(b"GET", re.compile(r"/password"), Console.password_form),
            Route(b"POST", re.compile(r"/password"), Console.password),
            Route(b"GET", re.compile(r"/quarantine"), Console.quarantine),
            Route(b"POST", re.compile(r"/quarantine/bulk"), Console.bulk),
            Route(b"GET", re.compile(r"/quarantine/(\d{1,18})"), Console.item),
            Route(b"GET", re.compile(r"/quarantine/(\d{1,18})/raw"), Console.raw),
            Route(b"POST", re.compile(r"/quarantine/(\d{1,18})/action"), Console.action),
            *dashboard_routes(Route, Response),
        ]
        # Whatever answers /api/ (api.py's Api.serve, set by service.py):
        # bearer tokens and JSON, before any cookie or CSRF handling.
        self.api: Optional[ApiServe] = None

    # -- the request cycle -------------------------------------------------

    def render(self, request: Any) -> Any:
        assert isinstance(request, ConsoleRequest)
        finished: list[bool] = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))
        d = as_deferred(self._serve(request, finished))
        d.addErrback(self._crashed, request, finished)
        return NOT_DONE_YET

    async def _serve(self, request: Any, finished: list[bool]) -> None:
        self._security_headers(request)
        response = await self._dispatch(request)
        if finished:
            return  # the client went away meanwhile
        self._write(request, response)

    def _write(self, request: Any, response: Response) -> None:
        request.setResponseCode(response.code)
        request.setHeader(b"content-type", response.content_type)
        for name, value in response.headers.items():
            request.setHeader(name, value)
        request.setHeader(b"content-length", str(len(response.body)).encode("ascii"))
        if request.method != b"HEAD":
            request.write(response.body)
        request.finish()

    def _crashed(self, failure: Failure, request: Any, finished: list[bool]) -> None:
        log.failure("web console: {method} {path} failed", failure,
                    method=request.method.decode("ascii", "replace"),
                    path=request.path.decode("utf-8", "replace")[:200])
        if not finished:
            self._write(request, self._page(500, "Something went wrong",
                                            "The console could not answer; the log says why.",
                                            None))

    def _security_headers(self, request: Any) -> None:
        request.setHeader(b"server", b"mppproxy")
        request.setHeader(b"content-security-policy", CSP)
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cross-origin-opener-policy", b"same-origin")
        # Pages show mail: no copy in any cache (the style sheet overrides).
        request.setHeader(b"cache-control", b"no-store")
        if self.ctx.secure:
            # RFC 6797: a browser that saw the console over TLS never
            # goes back to plain HTTP for it.
            request.setHeader(b"strict-transport-security", b"max-age=31536000")

    async def _dispatch(self, request: Any) -> Response:
        path = request.path.decode("utf-8", "replace")
        method = b"GET" if request.method == b"HEAD" else request.method
        if path.startswith("/api/") and self.api is not None:
            return await self.api(request, path, method, _client_of(request),
                                  _parse_query(request))
        if request.too_large:
            return self._page(413, "Too large", "The request is too large.", None)
        if path == "/static/console.css" and method == b"GET":
            return Response(200, self.ctx.css, b"text/css; charset=utf-8",
                            {b"cache-control": b"max-age=3600"})
        route, allowed = self._route(method, path)
        if route is None:
            if allowed:
                return self._page(405, "Method not allowed", "Not with this method.", None,
                                  {b"allow": b", ".join(allowed)})
            return self._page(404, "Not found", "There is no such page.", None)
        match = route.pattern.fullmatch(path)
        assert match is not None
        if not await self.ctx.ready():
            return self._page(503, "Store unavailable", "The archive store cannot be reached "
                              "just now; the log says why. Try again in a moment.", None,
                              {b"retry-after": b"10"})
        call = Call(request, match, _parse_query(request), {}, _client_of(request))
        if method == b"POST":
            if not (request.getHeader(b"content-type") or b"").startswith(
                    b"application/x-www-form-urlencoded"):
                return self._page(415, "Unsupported form", "Send the console's own forms.",
                                  None)
            request.content.seek(0)
            call.form = urllib.parse.parse_qs(request.content.read().decode("utf-8", "replace"),
                                              keep_blank_values=True, max_num_fields=5000)
            if not self._same_origin(request):
                return self._page(403, "Refused", "The form came from another site.", None)
        try:
            await self._authenticate(call)
            if route.login and call.admin is None:
                return self._logged_out(call, method)
            if call.admin is not None and route.login and method == b"POST":
                assert call.session is not None
                if not self.ctx.csrf.session_ok(call.session, call.field(CSRF_FIELD, 200)):
                    return self._page(403, "Refused", "The form has expired or did not come "
                                      "from this console: load the page again.", call)
            if (call.admin is not None and call.admin.must_change and route.login
                    and path not in ("/password", "/logout")):
                return redirect("/password")
            response = await route.handler(self, call)
        except DBAPIError as e:
            log.error("web console: the archive store failed: {error}",
                      error=" ".join(str(e.orig or e).split())[:300])
            return self._page(503, "Store unavailable", "The archive store failed; the log "
                              "says why. Try again in a moment.", None, {b"retry-after": b"10"})
        if call.admin is not None and call.session is not None and not call.cookie_done:
            # The session goes on: its cookie carries the new last-seen time.
            self._set_session(request, self.ctx.codec.touch(call.session, self.ctx.now()))
        return response

    def _route(self, method: bytes, path: str) -> tuple[Optional[Route], list[bytes]]:
        allowed: list[bytes] = []
        for route in self.routes:
            if route.pattern.fullmatch(path):
                if route.method == method:
                    return route, []
                allowed.append(route.method)
        return None, allowed

    def _same_origin(self, request: Any) -> bool:
        """No Origin header (an old browser, a script), or this console's
        own (RFC 6454 7: the browser says where a POST's page came from).
        Under ``Referrer-Policy: no-referrer`` browsers send ``Origin:
        null`` even for a form of the same origin (Fetch, "serialize a
        request origin"); that passes only with ``Sec-Fetch-Site:
        same-origin``, a header no page can set (Fetch Metadata)."""
        origin = request.getHeader(b"origin")
        if origin is None:
            return True
        if origin == b"null":
            return bool(request.getHeader(b"sec-fetch-site") == b"same-origin")
        host = request.getHeader(b"host") or b""
        scheme = b"https" if self.ctx.secure else b"http"
        return bool(host) and origin == scheme + b"://" + host

    async def _authenticate(self, call: Call) -> None:
        """The admin of a genuine, live session cookie whose account still
        exists, is enabled and has the password the session began with."""
        value = call.request.getCookie(SESSION_COOKIE.encode("ascii"))
        if not value:
            return
        session = self.ctx.codec.decode(value.decode("ascii", "replace"), self.ctx.now())
        if session is None:
            return
        admin: Optional[WebAdmin] = await self.ctx.in_thread(self.ctx.accounts.get,
                                                             session.admin_id)
        if (admin is None or admin.disabled
                or self.ctx.codec.fingerprint(admin.password_hash) != session.fingerprint):
            return
        call.admin, call.session = admin, session

    def _logged_out(self, call: Call, method: bytes) -> Response:
        """No (valid) session: GET to the login form, POST refused; a stale
        cookie is cleared either way."""
        if call.request.getCookie(SESSION_COOKIE.encode("ascii")):
            self._clear_session(call.request)
        if method == b"GET":
            return redirect("/login")
        return self._page(403, "Logged out", "Your session has ended: log in again.", None)

    def _cookie(self, request: Any, name: str, value: str, path: str = "/",
                max_age: Optional[int] = None) -> None:
        request.addCookie(name.encode("ascii"), value.encode("ascii"), path=path.encode("ascii"),
                          max_age=None if max_age is None else str(max_age).encode("ascii"),
                          secure=self.ctx.secure, httpOnly=True, sameSite="strict")

    def _set_session(self, request: Any, session: Session) -> None:
        # No Max-Age: the cookie ends with the browser; the idle and
        # lifetime limits inside it end it sooner.
        self._cookie(request, SESSION_COOKIE, self.ctx.codec.encode(session))

    def _clear_session(self, request: Any) -> None:
        self._cookie(request, SESSION_COOKIE, "", max_age=0)

    def _page(self, code: int, title: str, message: str, call: Optional[Call],
              headers: Optional[dict[bytes, bytes]] = None) -> Response:
        return Response(code, self._render("error.html", call, title=title, message=message),
                        headers=headers or {})

    def _render(self, template: str, call: Optional[Call], **context: Any) -> bytes:
        admin = call.admin if call is not None else None
        csrf = (self.ctx.csrf.for_session(call.session)
                if call is not None and call.session is not None else "")
        return self.ctx.pages.render(template, admin=admin, csrf=csrf, **context)

    def _not_found(self, call: Call) -> Response:
        """The answer for a message that does not exist *and* for one
        outside the admin's domains: the same code, the same page."""
        return self._page(404, "Not found", "There is no such message.", call)

    # -- login, logout, password ---------------------------------------------

    async def home(self, call: Call) -> Response:
        return redirect("/quarantine")

    async def login_form(self, call: Call, message: str = "", name: str = "",
                         code: int = 200) -> Response:
        if call.admin is not None and not message:
            return redirect("/quarantine")
        pre = self.ctx.csrf.new_pre_login()
        self._cookie(call.request, PRE_LOGIN_COOKIE, pre, path="/login", max_age=PRE_LOGIN_LIFE)
        call.admin, call.session, call.cookie_done = None, None, True
        body = self._render("login.html", None, title="Log in", message=message, name=name,
                            login_token=self.ctx.csrf.for_login(pre))
        return Response(code, body)

    async def login(self, call: Call) -> Response:
        pre = (call.request.getCookie(PRE_LOGIN_COOKIE.encode("ascii")) or b"").decode(
            "ascii", "replace")
        if not self.ctx.csrf.login_ok(pre, call.field(CSRF_FIELD, 200)):
            return await self.login_form(call, "The login form had expired: log in again.",
                                         code=403)
        name = call.field("name", 64).strip()
        password = call.field("password", 1024)
        keys = keys_for(name, call.client)
        now = self.ctx.now()
        wait = self.ctx.throttle.wait(keys, now)
        if wait > 0:
            log.warn("web console: login for {name} from {client} refused: too many failures, "
                     "{wait:.0f} s to wait", name=name, client=call.client, wait=wait)
            response = await self.login_form(
                call, f"Too many failed logins: try again in {int(wait) + 1} seconds.", name,
                code=429)
            response.headers[b"retry-after"] = str(int(wait) + 1).encode("ascii")
            return response
        admin: Optional[WebAdmin] = await self.ctx.in_thread(self.ctx.accounts.verify,
                                                             name, password)
        if admin is None:
            self.ctx.throttle.failed(keys, self.ctx.now())
            log.info("web console: failed login for {name} from {client}", name=name,
                     client=call.client)
            return await self.login_form(call, "Wrong name or password.", name)
        self.ctx.throttle.succeeded(keys)
        await self.ctx.in_thread(self.ctx.accounts.record_login, admin.id)
        await self.ctx.in_thread(self.ctx.store.audit, admin.name, call.origin, "login", None,
                                 "web console")
        log.info("web console: {name} logged in from {client}", name=admin.name,
                 client=call.client)
        self._set_session(call.request, self.ctx.codec.issue(admin.id, admin.password_hash,
                                                             self.ctx.now()))
        self._cookie(call.request, PRE_LOGIN_COOKIE, "", path="/login", max_age=0)
        call.cookie_done = True
        return redirect("/password" if admin.must_change else "/quarantine")

    async def logout(self, call: Call) -> Response:
        assert call.admin is not None
        self._clear_session(call.request)
        call.cookie_done = True
        log.info("web console: {name} logged out", name=call.admin.name)
        return redirect("/login")

    async def password_form(self, call: Call, message: str = "", code: int = 200) -> Response:
        return Response(code, self._render("password.html", call, title="Password",
                                           message=message))

    async def password(self, call: Call) -> Response:
        admin = call.admin
        assert admin is not None
        current, new, again = (call.field(n, 1024) for n in ("current", "new", "again"))
        keys = keys_for(admin.name, call.client)
        if self.ctx.throttle.wait(keys, self.ctx.now()) > 0:
            return await self.password_form(call, "Too many failed attempts: wait a while.", 429)
        if new != again:
            return await self.password_form(call, "The two new passwords differ.", 400)
        if new == current:
            return await self.password_form(call, "Choose a password other than the current "
                                            "one.", 400)
        if await self.ctx.in_thread(self.ctx.accounts.verify, admin.name, current) is None:
            self.ctx.throttle.failed(keys, self.ctx.now())
            return await self.password_form(call, "The current password is wrong.", 400)
        try:
            await self.ctx.in_thread(self.ctx.accounts.set_password, admin.name, new,
                                     admin.name, call.origin)
        except AccountError as e:
            return await self.password_form(call, str(e), 400)
        changed: Optional[WebAdmin] = await self.ctx.in_thread(self.ctx.accounts.get, admin.id)
        assert changed is not None
        # The old cookie no longer matches the password: a new session.
        self._set_session(call.request, self.ctx.codec.issue(changed.id, changed.password_hash,
                                                             self.ctx.now()))
        call.cookie_done = True
        return redirect("/quarantine")

    # -- the quarantine -------------------------------------------------------

    async def quarantine(self, call: Call) -> Response:
        admin = call.admin
        assert admin is not None
        page = self.ctx.config.web.page_size
        filters = {name: call.field(name, limit).strip() for name, limit in FILTERS.items()}
        filters["status"] = filters["status"] or "current"
        error = ""
        rows: list[StoredRow] = []
        total, capped, counted, by_verdict, by_reason, next_before = 0, False, True, [], [], None
        try:
            search = search_of(filters, call.scope, self.ctx.now())
            before = call.field("before", 20)
            if before:
                if not before.isdigit() or await self._row(call, int(before)) is None:
                    return self._not_found(call)
                search = replace(search, before_id=int(before))
            found: list[StoredRow] = await self.ctx.in_thread(
                self.ctx.store.search, replace(search, limit=page + 1))
            rows = found[:page]
            if len(found) > page:
                next_before = rows[-1].id
            tally: Optional[Tally] = await self.ctx.in_thread(
                self.ctx.store.tally, replace(search, before_id=None), COUNT_CAP, COUNT_SECONDS)
            if tally is None:
                counted = False
            else:
                total, capped = tally.total, tally.capped
                by_verdict, by_reason = tally.by_verdict[:10], tally.by_reason[:10]
        except FilterError as e:
            error = str(e)
        shown = {k: v for k, v in filters.items() if v and not (k == "status" and v == "current")}
        body = self._render(
            "list.html", call, title="Quarantine", rows=rows, filters=filters, error=error,
            total=total, capped=capped, counted=counted, by_verdict=by_verdict,
            by_reason=by_reason, next_before=next_before,
            statuses=STATUS_CHOICES, domains=admin.domains if not admin.superadmin else (),
            query=urllib.parse.urlencode(shown),
            query_without_reason=urllib.parse.urlencode(
                {k: v for k, v in shown.items() if k != "reason"}))
        return Response(200, body)

    async def _row(self, call: Call, row_id: int) -> Optional[StoredRow]:
        """The row ``row_id`` if it lies within the admin's domains (any
        status); None when it does not exist or lies outside them."""
        rows: list[StoredRow] = await self.ctx.in_thread(
            self.ctx.store.search, Search(ids=(row_id,), domains=call.scope, status=None,
                                          limit=1))
        return rows[0] if rows else None

    async def item(self, call: Call) -> Response:
        assert call.admin is not None
        row = await self._row(call, int(call.match.group(1)))
        if row is None:
            return self._not_found(call)
        state: dict[str, Any] = await self.ctx.in_thread(self.ctx.store.state, row)
        view, problem = None, ""
        try:
            raw: bytes = await self.ctx.in_thread(self.ctx.store.raw, row)
        except RawMissing:
            problem = "The message itself is gone (deleted or purged); its record stays."
        else:
            view = await self.ctx.in_thread(view_message, raw,
                                            call.field("html", 10) == "source")
        await self.ctx.in_thread(self.ctx.store.audit, call.admin.name, call.origin, "view", row,
                                 "web console")
        checks, passed = checks_of(state)
        body = self._render("item.html", call, title=row.subject or "(no subject)", row=row,
                            view=view, raw_problem=problem, raw_available=view is not None,
                            checks=checks, passed=passed)
        return Response(200, body)

    async def raw(self, call: Call) -> Response:
        assert call.admin is not None
        row = await self._row(call, int(call.match.group(1)))
        if row is None:
            return self._not_found(call)
        try:
            raw: bytes = await self.ctx.in_thread(self.ctx.store.raw, row)
        except RawMissing:
            return self._page(410, "Gone", "The message itself is gone (deleted or purged).",
                              call)
        await self.ctx.in_thread(self.ctx.store.audit, call.admin.name, call.origin, "download",
                                 row, "web console")
        name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{row.queue_id}-{row.rcpt_domain}")[:100]
        return Response(200, raw, b"message/rfc822", {
            b"content-disposition": f'attachment; filename="{name}.eml"'.encode("ascii"),
            b"content-security-policy": CSP_RAW})

    async def action(self, call: Call) -> Response:
        row = await self._row(call, int(call.match.group(1)))
        if row is None:
            return self._not_found(call)
        return await self._act(call, [row], f"/quarantine/{row.id}")

    async def bulk(self, call: Call) -> Response:
        limit = self.ctx.config.web.bulk_max
        back = "/quarantine"
        if call.field("every") == "1":
            filters = {name: call.field(f"f_{name}", size).strip()
                       for name, size in FILTERS.items()}
            filters["status"] = filters["status"] or "current"
            try:
                search = search_of(filters, call.scope, self.ctx.now())
            except FilterError as e:
                return self._page(400, "Bad search", str(e), call)
            back += "?" + urllib.parse.urlencode({k: v for k, v in filters.items() if v})
            matching = await self.ctx.in_thread(self.ctx.store.count, search)
            job_max = self.ctx.config.web.bulk_job_max
            if matching > job_max:
                return self._page(400, "Too many rows", f"{matching} rows match; one action "
                                  f"takes at most {job_max} (web.bulk_job_max): narrow the "
                                  f"search.", call)
            if matching > min(limit, self.ctx.config.web.page_size):
                # More than a page: a background job with a progress page.
                return await self._start_job(call, search, matching, filters, back)
            rows = await self._all_rows(search, limit)
        else:
            ids = sorted({int(v) for v in call.form.get("id", []) if v.isdigit() and len(v) < 19})
            if len(ids) > limit:
                return self._page(400, "Too many rows", f"At most {limit} rows at once.", call)
            rows = []
            for start in range(0, len(ids), 500):
                chunk = tuple(ids[start:start + 500])
                rows += await self.ctx.in_thread(
                    self.ctx.store.search,
                    Search(ids=chunk, domains=call.scope, status=None, limit=len(chunk)))
        if not rows:
            return self._page(400, "Nothing selected", "Tick the rows to act on, or choose "
                              "every row matching the search.", call)
        return await self._act(call, rows, back)

    async def _start_job(self, call: Call, search: Search, matching: int,
                         filters: dict[str, str], back: str) -> Response:
        """Start the bulk action of ``call``'s form on the ``matching`` rows
        of ``search`` as a job (jobs.py) and send the browser to its page
        (jobpages.py)."""
        admin = call.admin
        assert admin is not None
        try:
            job = self.ctx.jobs.start(self.ctx.actions, self.ctx.in_thread, admin.id, admin.name,
                                      call.origin, call.field("action", 32), search, matching,
                                      call.scope, call.field("to", 2000), describe(filters), back)
        except ActionError as e:
            return self._page(400, "Cannot do that", str(e), call)
        except TooBusy as e:
            return self._page(429, "Busy", str(e), call, {b"retry-after": b"10"})
        return redirect(f"/jobs/{job.id}")

    async def _all_rows(self, search: Search, limit: int) -> list[StoredRow]:
        rows: list[StoredRow] = []
        page = replace(search, limit=min(500, limit))
        for _ in range(limit // page.limit + 1):  # bounded: each page moves before_id on
            found: list[StoredRow] = await self.ctx.in_thread(self.ctx.store.search, page)
            rows += found
            if len(found) < page.limit or len(rows) >= limit:
                break
            page = replace(page, before_id=found[-1].id)
        return rows[:limit]

    async def _act(self, call: Call, rows: list[StoredRow], back: str) -> Response:
        admin = call.admin
        assert admin is not None
        action = call.field("action", 32)
        try:
            summary, results = await self.ctx.actions.run(
                action, rows, call.scope, admin.name, call.origin, call.field("to", 2000))
        except ActionError as e:
            return self._page(400, "Cannot do that", str(e), call)
        except StoreError as e:
            return self._page(409, "Cannot do that", str(e), call)
        log.info("web console: {name} from {client}: {action} on {count} row(s): {summary}",
                 name=admin.name, client=call.client, action=action, count=len(rows),
                 summary=summary)
        body = self._render("result.html", call, title=action.replace("-", " ").capitalize(),
                            summary=summary, results=results, back=back)
        return Response(200, body)


# -- helpers (no request state) ------------------------------------------------


class FilterError(Exception):
    """A filter value the list cannot use; the text names the field."""


def _parse_query(request: Any) -> dict[str, list[str]]:
    query = urllib.parse.urlsplit(request.uri.decode("utf-8", "replace")).query
    return urllib.parse.parse_qs(query, keep_blank_values=True, max_num_fields=100)


def _client_of(request: Any) -> str:
    address = request.getClientAddress()
    return str(getattr(address, "host", "") or "local")


def parse_day(text: str, field_name: str, end: bool) -> float:
    """Epoch seconds (UTC) of ``YYYY-MM-DD`` (its start, or with ``end``
    the next day's start) or ``YYYY-MM-DDTHH:MM[:SS]``."""
    try:
        day = date.fromisoformat(text)
    except ValueError:
        pass
    else:
        start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
        return (start + timedelta(days=1 if end else 0)).timestamp()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise FilterError(f"{field_name}: {text!r} is not a date (2024-05-01 or "
                          f"2024-05-01T13:00, UTC)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def search_of(filters: dict[str, str], scope: Optional[tuple[str, ...]], now: float) -> Search:
    """The store's Search for the list's filters, within ``scope``."""
    fields: dict[str, Any] = {"domains": scope}
    for name in ("sender", "rcpt", "subject", "reason", "ref"):
        if filters.get(name):
            fields[name] = filters[name]
    if filters.get("domain"):
        fields["domain"] = filters["domain"].lower().rstrip(".")
    if filters.get("since"):
        fields["since"] = parse_day(filters["since"], "From date", end=False)
    if filters.get("until"):
        fields["until"] = parse_day(filters["until"], "To date", end=True)
    if "since" in fields and "until" in fields and fields["since"] >= fields["until"]:
        raise FilterError("From date is not before To date: nothing can match")
    status = filters.get("status") or "current"
    if status not in STATUS_CHOICES:
        raise FilterError(f"Status: {status!r} is not one of {', '.join(STATUS_CHOICES)}")
    if status == "all":
        fields["status"] = None
    elif status != "current":
        fields["status"] = (status,)
    return Search(**fields)


@dataclass(frozen=True)
class CheckLine:
    name: str
    score: str
    detail: str


def checks_of(state: dict[str, Any]) -> tuple[list[CheckLine], list[str]]:
    """Each check's and engine's finding in the stored state (hits and
    skips; the misses by name), for "why it was held"."""
    lines = []
    checks = state.get("checks")
    for c in checks if isinstance(checks, list) else []:
        if not isinstance(c, dict):
            continue
        name = str(c.get("check") or c.get("name") or "?")
        score = c.get("score")
        reasons = c.get("reasons")
        detail = "; ".join(str(r) for r in reasons) if isinstance(reasons, list) else ""
        if c.get("skipped"):
            detail = f"skipped: {c.get('skipped')}" + (f"; {detail}" if detail else "")
        if c.get("action"):
            detail += f" (action {c.get('action')})"
        if c.get("recipient"):
            detail += f" (recipient {c.get('recipient')})"
        lines.append(CheckLine(name, f"{score:g}" if isinstance(score, (int, float)) else "",
                               detail.strip()))
    passed = state.get("checks_passed")
    return lines, [str(p) for p in passed] if isinstance(passed, list) else []
