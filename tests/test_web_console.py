"""The web console (mppproxy/web/, issue 13) served for real: the
``WebConsole`` service on a loopback port, spoken to by Twisted's HTTP
client (``Agent``) with a cookie jar of our own, over a real archive store
(SQLite in the test's data directory; the store-facing tests again on
MariaDB with ``require_mariadb``: skipped locally without a server,
failing under ``MPP_REQUIRE_SERVICES=1``).  Releases and forwards go to a
real SMTP sink on loopback (``SmtpSink`` of test_quarantine_cli.py).

The permission matrix: every route as a superadmin, as the admin of
domain A, as the admin of domain B, logged out, with a forged and an
expired cookie, without a CSRF token and with another session's.  A
domain admin must never tell another domain's message from one that does
not exist.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import ssl
import tempfile
import time
import urllib.parse
import uuid
from http.client import HTTPSConnection
from pathlib import Path
from typing import Any, Optional, Sequence

from twisted.internet import reactor as _reactor
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from test_db_stores import require_mariadb
from test_quarantine_cli import SmtpSink
from mppproxy.config.load import from_mapping
from mppproxy.config.schema import ProxyConfig
from mppproxy.config.web import secret_path
from mppproxy.db.allowlist import open_allow_list
from mppproxy.store.accounts import Accounts
from mppproxy.store.store import ArchiveStore, NewCopy, Search
from mppproxy.web.sessions import Session, SessionCodec
from mppproxy.web.secret import load_or_create_secret
from mppproxy.web.service import WebConsole
from mppproxy.web.throttle import LoginThrottle, address_key, keys_for

reactor: Any = _reactor

NOW = time.time()
HOUR = 3600.0
PASSWORD = "a long password"
# Accounts: the superadmin, the admin of a.test, the admin of b.test.
ROOT_NAME, ANNA, BERT = "root", "anna", "bert"


def message(subject: str, body: bytes = b"Hello.\r\n", html: bool = False) -> bytes:
    kind = b"text/html; charset=utf-8" if html else b"text/plain; charset=utf-8"
    return (b"From: sender@x.test\r\nTo: someone\r\nSubject: " + subject.encode("utf-8") +
            b"\r\nMIME-Version: 1.0\r\nContent-Type: " + kind + b"\r\n\r\n" + body)


def copy(ref: str, recipients: tuple[str, ...], subject: str, hours_ago: float = 1.0,
         sender: str = "sender@x.test", verdict: str = "reject", score: float = 9.0,
         reasons: tuple[str, ...] = ("clamav: Eicar-Signature",), body: bytes = b"Hello.\r\n",
         html: bool = False) -> NewCopy:
    state = {"queue_id": ref, "policy": "default", "verdict": verdict, "score": score,
             "checks": [{"check": "clamav", "score": score, "reasons": list(reasons),
                         "skipped": None, "recipient": None, "action": None}],
             "checks_passed": ["spf", "dnsbl"]}
    return NewCopy(node="edge1", queue_id=ref, received=NOW - hours_ago * HOUR,
                   client="192.0.2.7", helo="mx.x.test", tls=False, sender=sender,
                   recipients=recipients, policy="default", verdict=verdict,
                   disposition="quarantine", score=score, reasons=reasons,
                   state_json=json.dumps(state), message=message(subject, body, html))


# Rows: A has four (one shared with B), B two.
COPIES = (
    copy("REFA1", ("u1@a.test",), "A one", 1),
    copy("REFA2", ("u2@a.test",), "A two", 2, sender="spam@spam.test", verdict="hold",
         score=6.0, reasons=("rspamd: BAYES_SPAM",)),
    copy("REFA3", ("u3@a.test",), "A three <b>bold</b>", 3,
         body=b"<script>alert(1)</script>plain &lt;tag&gt;\r\n"),
    copy("REFAB", ("u4@a.test", "v4@b.test"), "Both domains", 4),
    copy("REFB1", ("v1@b.test",), "B secret", 5, sender="boss@b-partner.test"),
    copy("REFHTML", ("u5@a.test",), "Html only", 6, html=True,
         body=b"<html><head><style>p{}</style><script>evil()</script></head><body>"
              b"<p>Visible <img src=\"http://remote.test/pixel.png\">text</p></body></html>"),
)

_TEMPLATE: dict[str, Path] = {}


def template_dir() -> Path:
    """A data directory with the store, its rows and the three accounts,
    made once (argon2 costs ~0.2 s a hash) and copied for each test."""
    if "dir" not in _TEMPLATE:
        base = Path(tempfile.mkdtemp(prefix="mpp-web-template-"))
        store = ArchiveStore(from_mapping({"data_dir": str(base)}).store, str(base))
        store.open()
        try:
            fill(store)
        finally:
            store.close()
        _TEMPLATE["dir"] = base
    return _TEMPLATE["dir"]


def fill(store: ArchiveStore) -> None:
    assert store.add_copies(COPIES) == 7
    accounts = Accounts(store)
    accounts.add(ROOT_NAME, PASSWORD, True, (), "test", "test")
    accounts.add(ANNA, PASSWORD, False, ("a.test",), "test", "test")
    accounts.add(BERT, PASSWORD, False, ("b.test",), "test", "test")


class Page:
    def __init__(self, code: int, headers: Headers, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body
        self.text = body.decode("utf-8", "replace")

    def header(self, name: str) -> str:
        values = self.headers.getRawHeaders(name) or []
        return values[0] if values else ""

    def csrf(self) -> str:
        found = re.search(r'name="csrf" value="([^"]*)"', self.text)
        assert found is not None, self.text[:500]
        return found.group(1)


class Browser:
    """An HTTP client with a cookie jar: cookies by name (no domains: one
    host), Max-Age=0 deletes.  Follows no redirects."""

    def __init__(self, base: str, pool: HTTPConnectionPool) -> None:
        self.base = base
        self.agent = Agent(reactor, pool=pool)
        self.cookies: dict[str, str] = {}
        self.set_cookies: list[str] = []

    async def request(self, method: str, path: str, body: Optional[bytes] = None,
                      headers: Optional[dict[str, str]] = None) -> Page:
        sent = Headers({k: [v] for k, v in (headers or {}).items()})
        if self.cookies:
            sent.setRawHeaders("cookie", ["; ".join(f"{k}={v}" for k, v in self.cookies.items())])
        producer = None
        if body is not None:
            from twisted.web.client import FileBodyProducer
            import io
            producer = FileBodyProducer(io.BytesIO(body))
            sent.setRawHeaders("content-type", ["application/x-www-form-urlencoded"])
        response = await self.agent.request(method.encode("ascii"),
                                            (self.base + path).encode("ascii"), sent, producer)
        data = await readBody(response)
        for line in response.headers.getRawHeaders("set-cookie") or []:
            self.set_cookies.append(line)
            pair = line.split(";", 1)[0]
            name, _, value = pair.partition("=")
            if "max-age=0" in line.lower() or not value:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return Page(response.code, response.headers, data)

    async def get(self, path: str) -> Page:
        return await self.request("GET", path)

    async def post(self, path: str, fields: Sequence[tuple[str, str]] | dict[str, str],
                   headers: Optional[dict[str, str]] = None) -> Page:
        items = list(fields.items()) if isinstance(fields, dict) else list(fields)
        return await self.request("POST", path, urllib.parse.urlencode(items).encode("ascii"),
                                  headers)

    async def login(self, name: str, password: str = PASSWORD) -> Page:
        form = await self.get("/login")
        assert form.code == 200
        return await self.post("/login", {"name": name, "password": password,
                                          "csrf": form.csrf()})


class ConsoleCase(unittest.TestCase):
    """One console per test over a store of its own."""

    backend = "sqlite"
    extra: dict[str, Any] = {}

    def setUp(self) -> None:
        self.sink = SmtpSink()
        self.addCleanup(self.sink.stop)
        self.data = Path(tempfile.mkdtemp(prefix="mpp-web-"))
        self.addCleanup(shutil.rmtree, self.data, True)
        url, prefix = "", ""
        if self.backend == "mariadb":
            url = require_mariadb()
            prefix = f"t{uuid.uuid4().hex[:10]}_"
        else:
            shutil.copytree(template_dir(), self.data, dirs_exist_ok=True)
        mapping: dict[str, Any] = {
            "data_dir": str(self.data),
            "store": {"url": url},
            "release": {"default_route": f"127.0.0.1:{self.sink.port}", "rescan": False},
            "web": {"listen": ["tcp:0:interface=127.0.0.1"], "page_size": 5, **self.extra},
        }
        self.config: ProxyConfig = from_mapping(mapping)
        self.store = ArchiveStore(self.config.store, str(self.data), table_prefix=prefix)
        self.store.open()
        if self.backend == "mariadb":
            fill(self.store)
            self.addCleanup(self.store.drop_all)
        self.addCleanup(self.store.close)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)

    async def start(self, config: Optional[ProxyConfig] = None) -> WebConsole:
        console = WebConsole(config or self.config, reactor, store=self.store)
        console.startService()
        self.addCleanup(console.stopService)
        await console.listening
        self.port = console.ports[0].getHost().port
        return console

    def browser(self) -> Browser:
        return Browser(f"http://127.0.0.1:{self.port}", self.pool)

    async def logged_in(self, name: str) -> Browser:
        browser = self.browser()
        page = await browser.login(name)
        self.assertEqual(page.code, 303, page.text[:300])
        return browser

    def row(self, ref: str, domain: str) -> Any:
        rows = self.store.search(Search(ref=ref, domain=domain, status=None))
        assert len(rows) == 1
        return rows[0]


class StoreFacingTests:
    """The tests that exercise the store through the console (run on
    SQLite and on MariaDB)."""

    async def test_each_admin_lists_only_their_domains(self: Any) -> None:
        """The superadmin lists every row, A's admin only a.test's, B's only
        b.test's: counts, subjects and filters that name the other domain
        or its reference find nothing."""
        await self.start()
        expected = {ROOT_NAME: 7, ANNA: 5, BERT: 2}
        for name, count in expected.items():
            browser = await self.logged_in(name)
            page = await browser.get("/quarantine")
            self.assertEqual(page.code, 200)
            self.assertIn(f"<strong>{count}</strong> matching", page.text)
            if name == ANNA:
                self.assertNotIn("B secret", page.text)
                page = await browser.get("/quarantine?ref=REFB1")
                self.assertIn("<strong>0</strong> matching", page.text)
                page = await browser.get("/quarantine?domain=b.test")
                self.assertIn("<strong>0</strong> matching", page.text)
                page = await browser.get("/quarantine?sender=boss%40b-partner.test")
                self.assertIn("<strong>0</strong> matching", page.text)
            if name == BERT:
                self.assertIn("B secret", page.text)
                self.assertNotIn("A one", page.text)

    async def test_another_domains_item_is_exactly_not_found(self: Any) -> None:
        """B's admin gets for A's message, its raw download, an action on it,
        a bulk action naming it and a page cursor at it the same 404 (same
        body) as for an id that does not exist; nothing changes."""
        await self.start()
        foreign = self.row("REFA1", "a.test").id
        missing = 10 ** 9
        bert = await self.logged_in(BERT)
        list_page = await bert.get("/quarantine")
        token = list_page.csrf()
        for suffix in ("", "/raw"):
            a = await bert.get(f"/quarantine/{foreign}{suffix}")
            b = await bert.get(f"/quarantine/{missing}{suffix}")
            self.assertEqual((a.code, b.code), (404, 404))
            self.assertEqual(a.body, b.body)
        for action in ("release", "delete", "hold", "forward"):
            a = await bert.post(f"/quarantine/{foreign}/action",
                                {"action": action, "csrf": token, "to": "x@y.test"})
            b = await bert.post(f"/quarantine/{missing}/action",
                                {"action": action, "csrf": token, "to": "x@y.test"})
            self.assertEqual((a.code, b.code), (404, 404))
            self.assertEqual(a.body, b.body)
        a = await bert.post("/quarantine/bulk", [("action", "delete"), ("csrf", token),
                                                 ("id", str(foreign))])
        b = await bert.post("/quarantine/bulk", [("action", "delete"), ("csrf", token),
                                                 ("id", str(missing))])
        self.assertEqual((a.code, a.body), (b.code, b.body))
        a = await bert.get(f"/quarantine?before={foreign}")
        b = await bert.get(f"/quarantine?before={missing}")
        self.assertEqual((a.code, b.code), (404, 404))
        self.assertEqual(a.body, b.body)
        row = self.row("REFA1", "a.test")
        self.assertEqual((row.status, row.legal_hold), ("held", False))
        self.assertEqual(len(self.sink.messages), 0)
        self.assertEqual(self.store.audit_rows(domains=("a.test",)), [])

    async def test_superadmin_and_owner_see_the_item(self: Any) -> None:
        """The superadmin and A's admin open A's message: envelope, the
        check's result with its score, the text; each view is audited."""
        await self.start()
        row_id = self.row("REFA1", "a.test").id
        for name in (ROOT_NAME, ANNA):
            browser = await self.logged_in(name)
            page = await browser.get(f"/quarantine/{row_id}")
            self.assertEqual(page.code, 200)
            for text in ("REFA1", "sender@x.test", "u1@a.test", "clamav", "Eicar-Signature",
                         "9", "Hello.", "Passed: spf, dnsbl"):
                self.assertIn(text, page.text)
        viewers = {a["actor"] for a in self.store.audit_rows(action="view")}
        self.assertEqual(viewers, {ROOT_NAME, ANNA})

    async def test_release_from_the_web_reaches_the_route(self: Any) -> None:
        """A's admin releases A's message: the sink gets it once, for its
        recipient, the row is released, and the audit names the admin and
        web:127.0.0.1; "release and allow sender" also allows the sender."""
        await self.start()
        row = self.row("REFA1", "a.test")
        anna = await self.logged_in(ANNA)
        token = (await anna.get(f"/quarantine/{row.id}")).csrf()
        page = await anna.post(f"/quarantine/{row.id}/action",
                               {"action": "release", "csrf": token})
        self.assertEqual(page.code, 200, page.text[:500])
        self.assertIn("1 of 1 released", page.text)
        self.assertEqual(len(self.sink.messages), 1)
        sender, recipients, data = self.sink.messages[0]
        self.assertEqual((sender, recipients), ("sender@x.test", ["u1@a.test"]))
        self.assertIn(b"Subject: A one", data)
        self.assertEqual(self.row("REFA1", "a.test").status, "released")
        audit = self.store.audit_rows(queue_id="REFA1", action="release")
        self.assertEqual((audit[0]["actor"], audit[0]["origin"]), (ANNA, "web:127.0.0.1"))
        # Again: nothing is sent twice.
        page = await anna.post(f"/quarantine/{row.id}/action",
                               {"action": "release", "csrf": token})
        self.assertIn("0 of 1 released", page.text)
        self.assertEqual(len(self.sink.messages), 1)
        row2 = self.row("REFA2", "a.test")
        page = await anna.post(f"/quarantine/{row2.id}/action",
                               {"action": "release-allow", "csrf": token})
        self.assertIn("1 sender(s) put on the allow list", page.text)
        with open_allow_list(self.config.database, self.config.data_dir) as allow:
            self.assertIn(("a.test", "spam@spam.test"),
                          [(e.domain, e.sender) for e in allow.list("a.test")])

    async def test_bulk_actions_stay_in_scope(self: Any) -> None:
        """Bulk hold over "every matching row" and bulk delete of ticked
        ids change only rows of the admin's domain; forward sends a copy."""
        await self.start()
        bert = await self.logged_in(BERT)
        token = (await bert.get("/quarantine")).csrf()
        page = await bert.post("/quarantine/bulk", [("action", "hold"), ("csrf", token),
                                                    ("every", "1"), ("f_status", "current")])
        self.assertEqual(page.code, 200, page.text[:300])
        self.assertIn("2 of 2 put on legal hold", page.text)
        held = {(r.queue_id, r.rcpt_domain) for r in self.store.search(Search(status=None, limit=50))
                if r.legal_hold}
        self.assertEqual(held, {("REFAB", "b.test"), ("REFB1", "b.test")})
        ids = [str(self.row("REFB1", "b.test").id), str(self.row("REFA2", "a.test").id)]
        page = await bert.post("/quarantine/bulk", [("action", "unhold"), ("csrf", token)]
                               + [("id", i) for i in ids])
        self.assertIn("1 of 1 taken off legal hold", page.text)
        page = await bert.post("/quarantine/bulk", [("action", "delete"), ("csrf", token)]
                               + [("id", i) for i in ids])
        self.assertIn("1 of 1 deleted", page.text)
        self.assertEqual(self.row("REFB1", "b.test").status, "deleted")
        self.assertEqual(self.row("REFA2", "a.test").status, "held")
        row = self.row("REFAB", "b.test")
        page = await bert.post(f"/quarantine/{row.id}/action",
                               {"action": "forward", "csrf": token, "to": "help@b.test"})
        self.assertIn("1 of 1 forwarded to help@b.test", page.text)
        self.assertEqual(self.sink.messages[-1][1], ["help@b.test"])
        deleted = self.store.audit_rows(action="delete")
        self.assertEqual([(a["actor"], a["origin"]) for a in deleted],
                         [(BERT, "web:127.0.0.1")])


class ConsoleTests(StoreFacingTests, ConsoleCase):
    """Everything, on SQLite."""

    async def test_login_cookie_and_logout(self) -> None:
        """A wrong password is refused without saying which part was wrong;
        a right one sets an HttpOnly, SameSite=Strict, Path=/ session cookie
        (not Secure over plain HTTP); logout ends the session."""
        await self.start()
        browser = self.browser()
        page = await browser.login(ANNA, "wrong password")
        self.assertEqual(page.code, 200)
        self.assertIn("Wrong name or password.", page.text)
        page = await browser.login("nobody", PASSWORD)
        self.assertIn("Wrong name or password.", page.text)
        page = await browser.login(ANNA)
        self.assertEqual((page.code, page.header("location")), (303, "/quarantine"))
        cookie = [c for c in browser.set_cookies if c.startswith("mpp_session=") and "=;" not in c]
        self.assertTrue(cookie)
        attributes = cookie[-1].lower()
        for flag in ("httponly", "samesite=strict", "path=/"):
            self.assertIn(flag, attributes)
        self.assertNotIn("secure", attributes)
        page = await browser.get("/quarantine")
        self.assertEqual(page.code, 200)
        self.assertIn("anna", page.text)
        page = await browser.post("/logout", {"csrf": page.csrf()})
        self.assertEqual((page.code, page.header("location")), (303, "/login"))
        self.assertNotIn("mpp_session", browser.cookies)
        page = await browser.get("/quarantine")
        self.assertEqual((page.code, page.header("location")), (303, "/login"))

    async def test_security_headers_on_every_answer(self) -> None:
        """Login page, list, item, raw download and 404 all carry the
        security headers; pages with mail are not cached; the raw download
        is an attachment that cannot run."""
        await self.start()
        browser = await self.logged_in(ROOT_NAME)
        row_id = self.row("REFA1", "a.test").id
        for path in ("/login", "/quarantine", f"/quarantine/{row_id}", f"/quarantine/{row_id}/raw",
                     "/nothing-here"):
            page = await browser.get(path)
            policy = page.header("content-security-policy")
            self.assertIn("default-src 'none'" if path.endswith("/raw") else "default-src 'self'",
                          policy, path)
            self.assertEqual(page.header("x-frame-options"), "DENY", path)
            self.assertEqual(page.header("referrer-policy"), "no-referrer", path)
            self.assertEqual(page.header("x-content-type-options"), "nosniff", path)
            self.assertEqual(page.header("cache-control"), "no-store", path)
        page = await browser.get("/quarantine")
        self.assertIn("default-src 'self'", page.header("content-security-policy"))
        raw = await browser.get(f"/quarantine/{row_id}/raw")
        self.assertEqual(raw.header("content-type"), "message/rfc822")
        self.assertTrue(raw.header("content-disposition").startswith("attachment;"))
        self.assertIn("sandbox", raw.header("content-security-policy"))
        self.assertEqual(raw.body, self.store.raw(self.row("REFA1", "a.test")))
        audit = self.store.audit_rows(action="download")
        self.assertEqual((audit[0]["actor"], audit[0]["origin"]), (ROOT_NAME, "web:127.0.0.1"))

    async def test_every_route_logged_out(self) -> None:
        """Without a session (none, forged, from another key, expired) a
        GET of any console page goes to /login and a POST is refused;
        nothing is changed or audited."""
        await self.start()
        row_id = self.row("REFA1", "a.test").id
        secret = load_or_create_secret(secret_path(self.config.web, self.config.data_dir))
        codec = SessionCodec(secret, 1800, 43200)
        root = Accounts(self.store).by_name(ROOT_NAME)
        assert root is not None
        good = codec.encode(codec.issue(root.id, root.password_hash, time.time()))
        expired = codec.encode(Session(root.id, int(time.time() - 7200), int(time.time() - 3600),
                                       "00" * 16, codec.fingerprint(root.password_hash)))
        other_key = SessionCodec(b"x" * 32, 1800, 43200)
        forged = [
            None,
            good[:-2] + ("AA" if not good.endswith("AA") else "BB"),
            good.replace(f"v1.{root.id}.", f"v1.{root.id + 1}.", 1),
            other_key.encode(other_key.issue(root.id, root.password_hash, time.time())),
            expired,
        ]
        gets = ("/", "/password", "/quarantine", f"/quarantine/{row_id}",
                f"/quarantine/{row_id}/raw")
        posts = ("/logout", "/password", "/quarantine/bulk", f"/quarantine/{row_id}/action")
        for cookie in forged:
            browser = self.browser()
            if cookie is not None:
                browser.cookies["mpp_session"] = cookie
            for path in gets:
                page = await browser.get(path)
                self.assertEqual(page.code, 303, path)
                self.assertEqual(page.header("location"),
                                 "/quarantine" if path == "/" else "/login")
            browser.cookies.pop("mpp_login", None)
            for path in posts:
                if cookie is not None:
                    browser.cookies["mpp_session"] = cookie
                page = await browser.post(path, {"action": "delete", "csrf": "x", "id": str(row_id)})
                self.assertEqual(page.code, 403, path)
        # The genuine cookie works (the forgeries were not refused by accident).
        browser = self.browser()
        browser.cookies["mpp_session"] = good
        self.assertEqual((await browser.get("/quarantine")).code, 200)
        self.assertEqual(self.row("REFA1", "a.test").status, "held")
        self.assertEqual(self.store.audit_rows(action="delete"), [])

    async def test_csrf_tokens(self) -> None:
        """A state change without the token, with another session's token
        or with a foreign Origin is refused (403); a login without the
        login form's token is refused too."""
        await self.start()
        row_id = self.row("REFA1", "a.test").id
        anna = await self.logged_in(ANNA)
        other = await self.logged_in(ANNA)
        own = (await anna.get("/quarantine")).csrf()
        theirs = (await other.get("/quarantine")).csrf()
        self.assertNotEqual(own, theirs)
        path = f"/quarantine/{row_id}/action"
        for fields in ({"action": "hold"}, {"action": "hold", "csrf": ""},
                       {"action": "hold", "csrf": theirs}):
            page = await anna.post(path, fields)
            self.assertEqual(page.code, 403)
        page = await anna.post(path, {"action": "hold", "csrf": own},
                               headers={"origin": "http://evil.test"})
        self.assertEqual(page.code, 403)
        self.assertFalse(self.row("REFA1", "a.test").legal_hold)
        page = await anna.post(path, {"action": "hold", "csrf": own},
                               headers={"origin": f"http://127.0.0.1:{self.port}"})
        self.assertEqual(page.code, 200)
        self.assertTrue(self.row("REFA1", "a.test").legal_hold)
        page = await anna.post("/logout", {})
        self.assertEqual(page.code, 403)
        fresh = self.browser()
        page = await fresh.post("/login", {"name": ANNA, "password": PASSWORD})
        self.assertEqual(page.code, 403)
        form = await fresh.get("/login")
        page = await fresh.post("/login", {"name": ANNA, "password": PASSWORD,
                                           "csrf": form.csrf() + "0"})
        self.assertEqual(page.code, 403)
        self.assertNotIn("mpp_session", fresh.cookies)

    async def test_origin_null_needs_fetch_metadata(self) -> None:
        """Under Referrer-Policy no-referrer a browser sends "Origin: null"
        with the console's own forms (Chromium does): accepted with
        Sec-Fetch-Site: same-origin, refused with cross-site or without it."""
        await self.start()
        anna = await self.logged_in(ANNA)
        token = (await anna.get("/quarantine")).csrf()
        path = f"/quarantine/{self.row('REFA1', 'a.test').id}/action"
        for site in ("cross-site", "same-site", None):
            headers = {"origin": "null", **({"sec-fetch-site": site} if site else {})}
            page = await anna.post(path, {"action": "hold", "csrf": token}, headers=headers)
            self.assertEqual(page.code, 403, site)
        self.assertFalse(self.row("REFA1", "a.test").legal_hold)
        page = await anna.post(path, {"action": "hold", "csrf": token},
                               headers={"origin": "null", "sec-fetch-site": "same-origin"})
        self.assertEqual(page.code, 200)
        self.assertTrue(self.row("REFA1", "a.test").legal_hold)

    async def test_account_changes_end_sessions(self) -> None:
        """A new password, a disabled account and a removed account each
        end the sessions made before."""
        await self.start()
        accounts = Accounts(self.store)
        changes = (("passwd", lambda: accounts.set_password(ANNA, "another password", "t", "t")),
                   ("disable", lambda: accounts.set_disabled(ANNA, True, "t", "t")),
                   ("remove", lambda: accounts.remove(ANNA, "t", "t")))
        for change, do in changes:
            accounts.set_password(ANNA, PASSWORD, "t", "t")
            accounts.set_disabled(ANNA, False, "t", "t")
            browser = await self.logged_in(ANNA)
            self.assertEqual((await browser.get("/quarantine")).code, 200)
            do()
            page = await browser.get("/quarantine")
            self.assertEqual((page.code, page.header("location")), (303, "/login"), change)

    async def test_login_throttling(self) -> None:
        """After web.login_failures failures the next attempts wait (429,
        Retry-After), even with the right password; other names from the
        same address wait too."""
        await self.start()
        browser = self.browser()
        for _ in range(self.config.web.login_failures):
            page = await browser.login(ANNA, "wrong password")
            self.assertEqual(page.code, 200)
        page = await browser.login(ANNA)
        self.assertEqual(page.code, 429)
        self.assertIn("Too many failed logins", page.text)
        self.assertGreater(int(page.header("retry-after")), 0)
        page = await browser.login(BERT)
        self.assertEqual(page.code, 429)

    async def test_list_paging_filters_and_counts(self) -> None:
        """Newest first, five a page, "Older" pages by keyset without a row
        twice; filters by sender, subject, reason, reference, date and
        status; counts per verdict."""
        await self.start()
        root = await self.logged_in(ROOT_NAME)
        seen: list[str] = []
        path: Optional[str] = "/quarantine"
        for _ in range(5):
            assert path is not None
            page = await root.get(path)
            seen += re.findall(r'<a href="/quarantine/(\d+)">\d{4}-', page.text)
            found = re.search(r'href="(/quarantine\?[^"]*before=\d+)"', page.text)
            path = found.group(1).replace("&amp;", "&") if found else None
            if path is None:
                break
        self.assertEqual(len(seen), 7)
        self.assertEqual(len(set(seen)), 7)
        newest = self.store.search(Search(limit=50))
        self.assertEqual(seen, [str(r.id) for r in newest])
        page = await root.get("/quarantine")
        self.assertIn("reject</a> 6", page.text)
        self.assertIn("hold</a> 1", page.text)
        for query, count in (("sender=spam%40spam.test", 1), ("subject=both", 2),
                             ("reason=BAYES", 1), ("reason=hold", 1), ("ref=REFAB", 2),
                             ("domain=a.test", 5), ("status=released", 0), ("status=all", 7),
                             ("since=2000-01-01&until=2001-01-01", 0)):
            page = await root.get(f"/quarantine?{query}")
            self.assertIn(f"<strong>{count}</strong> matching", page.text, query)
        page = await root.get("/quarantine?since=yesterday")
        self.assertIn("is not a date", page.text)

    async def test_message_view_is_text_only(self) -> None:
        """HTML in a subject or body is shown escaped; an HTML-only message
        is shown as its text, with no script, no style and no remote image;
        its source on request, escaped."""
        await self.start()
        root = await self.logged_in(ROOT_NAME)
        page = await root.get(f"/quarantine/{self.row('REFA3', 'a.test').id}")
        self.assertIn("A three &lt;b&gt;bold&lt;/b&gt;", page.text)
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", page.text)
        self.assertNotIn("<script", page.text)
        html_id = self.row("REFHTML", "a.test").id
        page = await root.get(f"/quarantine/{html_id}")
        self.assertIn("Visible text", page.text)
        self.assertNotIn("evil()", page.text)
        self.assertNotIn("remote.test", page.text)
        self.assertNotIn("<img", page.text)
        page = await root.get(f"/quarantine/{html_id}?html=source")
        self.assertIn("&lt;img src=&#34;http://remote.test/pixel.png&#34;&gt;", page.text)
        self.assertNotIn("<img", page.text)

    async def test_routes_methods_and_limits(self) -> None:
        """Unknown paths are 404, a wrong method 405 with Allow, a form of
        another type 415, a body over the limit 413; the style sheet is
        served and may be cached."""
        await self.start()
        root = await self.logged_in(ROOT_NAME)
        self.assertEqual((await root.get("/etc/passwd")).code, 404)
        page = await root.request("GET", "/logout")
        self.assertEqual((page.code, page.header("allow")), (405, "POST"))
        page = await root.request("POST", "/quarantine/bulk", b"{}",
                                  headers={"content-type": "application/json"})
        self.assertIn(page.code, (403, 415))
        page = await root.post("/quarantine/bulk", {"csrf": "x", "pad": "y" * 300_000})
        self.assertEqual(page.code, 413)
        css = await root.get("/static/console.css")
        self.assertEqual((css.code, css.header("content-type")), (200, "text/css; charset=utf-8"))
        self.assertIn("max-age", css.header("cache-control"))

    async def test_first_start_makes_a_one_time_superadmin(self) -> None:
        """With no account the first start logs (warn) a one-time password
        for the superadmin 'admin', once; it logs in, must choose a new
        password before anything else, and then works."""
        for account in Accounts(self.store).list():
            Accounts(self.store).remove(account.name, "t", "t")
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        console = await self.start()
        for _ in range(100):
            if any("password" in e and e.get("name") == "admin" for e in events):
                break
            await deferToThread(time.sleep, 0.05)
        made = [e for e in events if "password" in e and e.get("name") == "admin"]
        self.assertEqual(len(made), 1)
        self.assertEqual(made[0]["log_level"].name, "warn")
        password = made[0]["password"]
        browser = self.browser()
        page = await browser.login("admin", password)
        self.assertEqual((page.code, page.header("location")), (303, "/password"))
        page = await browser.get("/quarantine")
        self.assertEqual((page.code, page.header("location")), (303, "/password"))
        form = await browser.get("/password")
        page = await browser.post("/password", {"csrf": form.csrf(), "current": password,
                                                "new": "my own password",
                                                "again": "my own password"})
        self.assertEqual((page.code, page.header("location")), (303, "/quarantine"))
        self.assertEqual((await browser.get("/quarantine")).code, 200)
        await console.stopService()
        events.clear()
        await self.start()
        await deferToThread(time.sleep, 0.3)
        self.assertEqual([e for e in events if "password" in e], [])

    async def test_https_sets_secure_cookies(self) -> None:
        """With web.tls_cert_file the console speaks HTTPS only, its cookies
        are Secure and it sends HSTS."""
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        pem = self.data / "web.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
        config = dataclasses.replace(self.config, web=dataclasses.replace(
            self.config.web, tls_cert_file=str(pem)))
        await self.start(config)
        context = ssl.create_default_context()
        ca.configure_trust(context)

        def fetch() -> tuple[int, list[tuple[str, str]]]:
            connection = HTTPSConnection("127.0.0.1", self.port, context=context, timeout=10)
            try:
                connection.request("GET", "/login")
                response = connection.getresponse()
                response.read()
                return response.status, response.getheaders()
            finally:
                connection.close()

        status, headers = await deferToThread(fetch)
        self.assertEqual(status, 200)
        cookies = [v for k, v in headers if k.lower() == "set-cookie"]
        self.assertTrue(cookies and all("secure" in c.lower() for c in cookies))
        self.assertIn("max-age", dict((k.lower(), v) for k, v in headers)
                      ["strict-transport-security"])


class MariaDBConsoleTests(StoreFacingTests, ConsoleCase):
    """The store-facing tests on MariaDB (tables with a prefix of their own)."""

    backend = "mariadb"


class ThrottleTests(unittest.SynchronousTestCase):
    """LoginThrottle alone, with times given."""

    def test_wait_doubles_and_clears(self) -> None:
        """Five failures: the sixth attempt waits 30 s, the next failure
        60 s; a success clears; another name from another address is free."""
        throttle = LoginThrottle(5, 30.0)
        keys = keys_for("Ann", "192.0.2.1")
        for n in range(5):
            self.assertEqual(throttle.wait(keys, 100.0 + n), 0.0)
            throttle.failed(keys, 100.0 + n)
        self.assertAlmostEqual(throttle.wait(keys, 104.0), 30.0)
        throttle.failed(keys, 140.0)
        self.assertAlmostEqual(throttle.wait(keys, 140.0), 60.0)
        self.assertEqual(throttle.wait(keys_for("bob", "192.0.2.2"), 140.0), 0.0)
        self.assertGreater(throttle.wait(keys_for("ann", "198.51.100.1"), 140.0), 0.0)
        throttle.succeeded(keys)
        self.assertEqual(throttle.wait(keys, 141.0), 0.0)

    def test_ipv6_counts_per_64(self) -> None:
        """Addresses of one IPv6 /64 share a count; IPv4-mapped addresses
        count as their IPv4 address."""
        self.assertEqual(address_key("2001:db8::1"), address_key("2001:db8::ffff:1"))
        self.assertNotEqual(address_key("2001:db8::1"), address_key("2001:db8:0:1::1"))
        self.assertEqual(address_key("::ffff:192.0.2.1"), address_key("192.0.2.1"))


class AllInOneTests(unittest.TestCase):
    """The console inside the all-in-one service (mppproxy/service.py)."""

    async def test_all_in_one_serves_the_console_and_makes_the_first_admin(self) -> None:
        """An all-in-one node with an empty store serves the console on
        web.listen and logs the one-time password of 'admin' once; with
        web.enabled false it serves none."""
        from mppproxy.service import ProxyService

        data = Path(tempfile.mkdtemp(prefix="mpp-web-aio-"))
        self.addCleanup(shutil.rmtree, data, True)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        mapping: dict[str, Any] = {"data_dir": str(data), "listen": ["tcp:0:interface=127.0.0.1"],
                                   "web": {"listen": ["tcp:0:interface=127.0.0.1"]}}
        service = ProxyService(from_mapping(mapping), reactor)
        service.startService()
        try:
            assert service.web is not None
            await service.web.listening
            for _ in range(200):
                if any(e.get("name") == "admin" and "password" in e for e in events):
                    break
                await deferToThread(time.sleep, 0.05)
            made = [e for e in events if e.get("name") == "admin" and "password" in e]
            self.assertEqual(len(made), 1)
            port = service.web.ports[0].getHost().port
            pool = HTTPConnectionPool(reactor, persistent=False)
            browser = Browser(f"http://127.0.0.1:{port}", pool)
            page = await browser.login("admin", made[0]["password"])
            self.assertEqual((page.code, page.header("location")), (303, "/password"))
            await pool.closeCachedConnections()
        finally:
            await service.stopService()
        off = ProxyService(from_mapping({**mapping, "web": {"enabled": False}}), reactor)
        off.startService()
        try:
            self.assertIsNone(off.web)
        finally:
            await off.stopService()

    async def test_archive_node_serves_the_console(self) -> None:
        """An archive node (--mode archive) serves the console on web.listen
        over its store: the first admin is made and can log in."""
        from test_archive_node import key_file

        from mppproxy.archivenode.service import ArchiveService

        data = Path(tempfile.mkdtemp(prefix="mpp-web-archive-"))
        self.addCleanup(shutil.rmtree, data, True)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        config = from_mapping({
            "mode": "archive", "data_dir": str(data / "data"), "tls": {"enabled": False},
            "archive_node": {"key_file": key_file(str(data)),
                             "listen": ["tcp:0:interface=127.0.0.1"]},
            "web": {"listen": ["tcp:0:interface=127.0.0.1"]}})
        service = ArchiveService(config, reactor)
        service.privilegedStartService()
        service.startService()
        try:
            assert service.web is not None
            await service.web.listening
            for _ in range(200):
                if any(e.get("name") == "admin" and "password" in e for e in events):
                    break
                await deferToThread(time.sleep, 0.05)
            made = [e for e in events if e.get("name") == "admin" and "password" in e]
            self.assertEqual(len(made), 1)
            pool = HTTPConnectionPool(reactor, persistent=False)
            browser = Browser(f"http://127.0.0.1:{service.web.ports[0].getHost().port}", pool)
            page = await browser.login("admin", made[0]["password"])
            self.assertEqual((page.code, page.header("location")), (303, "/password"))
            await pool.closeCachedConnections()
        finally:
            await service.stopService()
