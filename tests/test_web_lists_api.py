"""The console's lists and state pages, its API tokens and the JSON API
(``mppproxy/web/listpages.py``, ``tokenpages.py``, ``api.py``, issue 13),
served for real on loopback as test_web_console.py does (its ``ConsoleCase``:
a real archive store in SQLite, the three accounts), with the state
database a SQLite file in the same data directory, filled by the real
stores (``StateDatabase``'s greylist, ``StateAdmin``'s blacklist).

Every new route as a superadmin, as A's admin, as B's admin, logged out,
with a forged cookie and without the CSRF token; the API with no token, a
bad, a revoked and an expired one, and another administrator's scope.  A
domain administrator must never tell another domain's list or item from a
missing one.
"""
from __future__ import annotations

import io
import json
import time
from typing import Any, Optional

from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from mppproxy.cli import main as cli_main
from mppproxy.config.policy import GreylistConfig
from mppproxy.db import StateDatabase
from mppproxy.db.allowlist import open_allow_list
from mppproxy.db.stateadmin import open_state_admin
from mppproxy.store.accounts import Accounts
from mppproxy.store.tokens import Tokens
from test_web_console import ANNA, BERT, ROOT_NAME, ConsoleCase, Page, reactor

GREY = GreylistConfig(enabled=True, delay=300.0)


class ListsConsoleCase(ConsoleCase):
    """ConsoleCase with the state database's rows and API helpers."""

    def allow_admin(self) -> Any:
        admin = open_allow_list(self.config.database, str(self.data))
        self.addCleanup(admin.close)
        return admin

    async def fill_state(self) -> StateDatabase:
        """Two blacklisted networks and greylist triplets for a.test and b.test."""
        db = StateDatabase(self.config.database, str(self.data), reactor)
        self.addCleanup(db.stop)
        self.assertTrue(await db.start())
        for client, sender, rcpt in (("192.0.2.0/24", "s1@x.test", "u1@a.test"),
                                     ("198.51.100.0/24", "s2@y.test", "u2@a.test"),
                                     ("203.0.113.0/24", "s3@z.test", "v1@b.test")):
            self.assertIsNotNone(await db.greylist.check(client, sender, rcpt, GREY))
        with open_state_admin(self.config.database, str(self.data)) as state:
            state.add_blacklist("192.0.2.7/32", 3600, "spamtrap trap@a.test", time.time())
            state.add_blacklist("203.0.113.0/24", 7200, "threshold", time.time())
        return db

    def triplet_ids(self) -> dict[str, str]:
        with open_state_admin(self.config.database, str(self.data)) as state:
            return {r.recipient: r.id for r in state.triplets(time.time())}

    def token(self, name: str, label: str = "ci", days: Optional[float] = None,
              now: Optional[float] = None) -> tuple[int, str]:
        admin = Accounts(self.store).by_name(name)
        assert admin is not None
        made, token = Tokens(self.store).add(admin, label, days, "test", "test", now)
        return made.id, token

    async def api(self, method: str, path: str, token: Optional[str] = None,
                  body: Any = None, raw: Optional[bytes] = None,
                  content_type: str = "application/json") -> Page:
        headers = Headers()
        if token is not None:
            headers.setRawHeaders("authorization", [f"Bearer {token}"])
        producer = None
        if body is not None or raw is not None:
            data = raw if raw is not None else json.dumps(body).encode("utf-8")
            producer = FileBodyProducer(io.BytesIO(data))
            headers.setRawHeaders("content-type", [content_type])
        agent = Agent(reactor, pool=self.pool)
        response = await agent.request(method.encode("ascii"),
                                       f"http://127.0.0.1:{self.port}{path}".encode("ascii"),
                                       headers, producer)
        return Page(response.code, response.headers, await readBody(response))


def js(page: Page) -> Any:
    return json.loads(page.body)


class ListPagesTests(ListsConsoleCase):

    async def test_lists_scope_for_each_account(self) -> None:
        """The superadmin opens any domain's list; A's admin only a.test's:
        b.test's (with entries) and a name that is no domain answer the
        same 404, for the page, an add and a removal; nothing changes."""
        await self.start()
        allow = self.allow_admin()
        allow.add_entry("b.test", "block", "@spam.test", "bert")
        root = await self.logged_in(ROOT_NAME)
        for path in ("/lists", "/lists/a.test", "/lists/b.test", "/lists/c.test"):
            self.assertEqual((await root.get(path)).code, 200, path)
        self.assertIn("@spam.test", (await root.get("/lists/b.test")).text)
        page = await root.get("/lists?domain=B.Test")
        self.assertEqual((page.code, page.header("location")), (303, "/lists/b.test"))
        anna = await self.logged_in(ANNA)
        page = await anna.get("/lists")
        self.assertIn("a.test", page.text)
        self.assertNotIn("b.test</a>", page.text)
        self.assertEqual((await anna.get("/lists/a.test")).code, 200)
        foreign, missing = await anna.get("/lists/b.test"), await anna.get("/lists/-x-")
        self.assertEqual((foreign.code, missing.code), (404, 404))
        self.assertEqual(foreign.body, missing.body)
        self.assertNotIn("spam.test", foreign.text)
        token = (await anna.get("/lists/a.test")).csrf()
        for action in ("add", "remove"):
            a = await anna.post(f"/lists/b.test/{action}", {"csrf": token, "kind": "block",
                                                            "entry": "@spam.test"})
            b = await anna.post(f"/lists/-x-/{action}", {"csrf": token, "kind": "block",
                                                         "entry": "@spam.test"})
            self.assertEqual((a.code, a.body), (b.code, b.body))
            self.assertEqual(a.code, 404)
        page = await anna.get("/lists?domain=b.test")
        self.assertEqual(page.code, 404)
        self.assertEqual([(e.domain, e.entry) for e in allow.entries()],
                         [("b.test", "@spam.test")])
        bert = await self.logged_in(BERT)
        self.assertEqual((await bert.get("/lists/a.test")).code, 404)
        self.assertEqual((await bert.get("/lists/b.test")).code, 200)

    async def test_add_validate_remove_and_audit(self) -> None:
        """A's admin adds a block and an allow entry (stored normalised,
        the page says when they take effect), a bad value is refused
        naming its field, and a removal works; each change is audited
        with web:127.0.0.1 and the domain."""
        await self.start()
        anna = await self.logged_in(ANNA)
        token = (await anna.get("/lists/a.test")).csrf()
        page = await anna.post("/lists/a.test/add", {"csrf": token, "kind": "block",
                                                     "entry": "Boss@Partner.Example",
                                                     "note": "phish"})
        self.assertEqual(page.code, 200)
        self.assertIn("boss@partner.example added to the block list", page.text)
        self.assertIn("within 30 seconds (database.cache_seconds)", page.text)
        page = await anna.post("/lists/a.test/add", {"csrf": token, "kind": "allow",
                                                     "entry": "198.51.100.7"})
        self.assertIn("198.51.100.7/32 added to the allow list", page.text)
        for fields, field in (({"kind": "block", "entry": "postmaster@"}, "entry:"),
                              ({"kind": "maybe", "entry": "@x.test"}, "kind:"),
                              ({"kind": "allow", "entry": "0.0.0.0/0"}, "entry:"),
                              ({"kind": "block", "entry": "@x.test", "note": "a\x00b"}, "note:")):
            page = await anna.post("/lists/a.test/add", {"csrf": token, **fields})
            self.assertEqual(page.code, 400, fields)
            self.assertIn(field, page.text)
        entries = self.allow_admin().entries(["a.test"])
        self.assertEqual([(e.kind, e.entry, e.added_by, e.note) for e in entries],
                         [("allow", "198.51.100.7/32", ANNA, ""),
                          ("block", "boss@partner.example", ANNA, "phish")])
        page = await anna.post("/lists/a.test/remove", {"csrf": token, "kind": "block",
                                                        "entry": "boss@partner.example"})
        self.assertEqual(page.code, 200)
        self.assertIn("boss@partner.example removed", page.text)
        self.assertEqual(len(self.allow_admin().entries(["a.test"])), 1)
        audit = self.store.audit_rows(domains=("a.test",))
        self.assertEqual([(a["action"], a["actor"], a["origin"]) for a in audit],
                         [("list-remove", ANNA, "web:127.0.0.1"),
                          ("list-add", ANNA, "web:127.0.0.1"),
                          ("list-add", ANNA, "web:127.0.0.1")])

    async def test_new_routes_logged_out_forged_and_without_csrf(self) -> None:
        """Logged out or with a forged cookie a GET of each new page goes to
        /login and a POST is refused (403); logged in, a POST without the
        CSRF token is refused (403); nothing changes."""
        await self.start()
        await self.fill_state()
        ids = self.triplet_ids()
        gets = ("/lists", "/lists/a.test", "/state/blacklist", "/state/greylist", "/tokens")
        posts = {"/lists/a.test/add": {"kind": "block", "entry": "@x.test"},
                 "/lists/a.test/remove": {"kind": "block", "entry": "@x.test"},
                 "/state/blacklist/remove": {"network": "192.0.2.7/32"},
                 "/state/greylist/remove": {"id": ids["u1@a.test"]},
                 "/tokens/add": {"label": "x"}, "/tokens/1/revoke": {}}
        for cookie in (None, "v1.1.2.3.00.ff.forged"):
            browser = self.browser()
            if cookie:
                browser.cookies["mpp_session"] = cookie
            for path in gets:
                page = await browser.get(path)
                self.assertEqual((page.code, page.header("location")), (303, "/login"), path)
            for path, fields in posts.items():
                if cookie:
                    browser.cookies["mpp_session"] = cookie
                self.assertEqual((await browser.post(path, {"csrf": "x", **fields})).code, 403,
                                 path)
        root = await self.logged_in(ROOT_NAME)
        for path, fields in posts.items():
            self.assertEqual((await root.post(path, fields)).code, 403, path)
        self.assertEqual(self.allow_admin().entries(), [])
        self.assertEqual(len(self.triplet_ids()), 3)
        self.assertEqual(Tokens(self.store).list(), [])
        with open_state_admin(self.config.database, str(self.data)) as state:
            self.assertEqual(len(state.blacklist(time.time())), 2)

    async def test_state_tables_pages(self) -> None:
        """The superadmin searches and removes auto-blacklist entries; a
        domain admin gets 404 there.  The greylist: each domain admin sees
        and removes only triplets of their domains (another's id removes
        nothing); searches filter; a bad client is refused naming it; the
        page says when removals take effect; removals are audited."""
        await self.start()
        await self.fill_state()
        ids = self.triplet_ids()
        root = await self.logged_in(ROOT_NAME)
        page = await root.get("/state/blacklist")
        self.assertIn("192.0.2.7/32", page.text)
        self.assertIn("203.0.113.0/24", page.text)
        self.assertIn("database.cache_seconds", page.text)
        page = await root.get("/state/blacklist?client=203.0.113.9")
        self.assertNotIn("192.0.2.7/32", page.text)
        page = await root.get("/state/blacklist?client=nonsense")
        self.assertEqual(page.code, 400)
        self.assertIn("client:", page.text)
        token = page.csrf()
        page = await root.post("/state/blacklist/remove", {"csrf": token,
                                                           "network": "192.0.2.7/32"})
        self.assertIn("1 blacklist entry removed", page.text)
        anna = await self.logged_in(ANNA)
        atoken = (await anna.get("/state/greylist")).csrf()
        self.assertEqual((await anna.get("/state/blacklist")).code, 404)
        self.assertEqual((await anna.post("/state/blacklist/remove",
                                          {"csrf": atoken, "network": "203.0.113.0/24"})).code,
                         404)
        page = await anna.get("/state/greylist")
        self.assertIn("u1@a.test", page.text)
        self.assertIn("u2@a.test", page.text)
        self.assertNotIn("v1@b.test", page.text)
        page = await anna.get("/state/greylist?recipient=v1%40b.test")
        self.assertIn("Nothing matches.", page.text)
        page = await anna.get("/state/greylist?sender=s2%40y.test")
        self.assertNotIn("u1@a.test", page.text)
        self.assertIn("u2@a.test", page.text)
        page = await anna.post("/state/greylist/remove", {"csrf": atoken, "id": ids["v1@b.test"]})
        self.assertIn("0 triplet(s) removed", page.text)
        page = await anna.post("/state/greylist/remove", {"csrf": atoken, "id": ids["u1@a.test"]})
        self.assertIn("1 triplet(s) removed", page.text)
        self.assertEqual(sorted(self.triplet_ids()), ["u2@a.test", "v1@b.test"])
        bert = await self.logged_in(BERT)
        page = await bert.get("/state/greylist")
        self.assertIn("v1@b.test", page.text)
        self.assertNotIn("u2@a.test", page.text)
        root_page = await root.get("/state/greylist")
        self.assertIn("u2@a.test", root_page.text)
        self.assertIn("v1@b.test", root_page.text)
        actions = [(a["action"], a["actor"], a["rcpt_domain"]) for a in self.store.audit_rows()
                   if a["action"] in ("blacklist-remove", "greylist-remove")]
        self.assertEqual(actions, [("greylist-remove", ANNA, "a.test"),
                                   ("blacklist-remove", ROOT_NAME, None)])

    async def test_tokens_page(self) -> None:
        """A's admin makes a token (shown once, on that answer only),
        lists and revokes it; B's admin cannot revoke it (404) nor see it."""
        await self.start()
        anna = await self.logged_in(ANNA)
        token = (await anna.get("/tokens")).csrf()
        page = await anna.post("/tokens/add", {"csrf": token, "label": "backup script",
                                               "expires": "30"})
        self.assertEqual(page.code, 200)
        import re
        made = re.search(r"(mppt_[A-Za-z0-9_-]{43})", page.text)
        assert made is not None
        listing = await anna.get("/tokens")
        self.assertNotIn(made.group(1), listing.text)
        self.assertIn("backup script", listing.text)
        self.assertEqual((await anna.post("/tokens/add", {"csrf": token, "label": ""})).code, 400)
        self.assertIn("expires:", (await anna.post("/tokens/add", {"csrf": token, "label": "x",
                                                                   "expires": "soon"})).text)
        [mine] = Tokens(self.store).list()
        bert = await self.logged_in(BERT)
        btoken = (await bert.get("/tokens")).csrf()
        self.assertNotIn("backup script", (await bert.get("/tokens")).text)
        self.assertEqual((await bert.post(f"/tokens/{mine.id}/revoke", {"csrf": btoken})).code,
                         404)
        page = await anna.post(f"/tokens/{mine.id}/revoke", {"csrf": token})
        self.assertIn(f"Token {mine.id} revoked", page.text)
        self.assertEqual(Tokens(self.store).list(), [])
        self.assertEqual([a["action"] for a in self.store.audit_rows()
                          if a["action"].startswith("token-")], ["token-revoke", "token-add"])


class ApiTests(ListsConsoleCase):

    async def test_authentication(self) -> None:
        """No token, a malformed, unknown, revoked or expired token, or a
        disabled account: 401 with WWW-Authenticate, JSON, no cookie; a
        session cookie is no substitute for a token."""
        await self.start()
        _, good = self.token(ANNA)
        revoked_id, revoked = self.token(ANNA, "old")
        Tokens(self.store).revoke(revoked_id, "test", "test")
        _, expired = self.token(ANNA, "exp", days=1, now=time.time() - 2 * 86400)
        _, berts = self.token(BERT)
        Accounts(self.store).set_disabled(BERT, True, "test", "test")
        page = await self.api("GET", "/api/v1/quarantine")
        self.assertEqual(page.code, 401)
        self.assertEqual(page.header("www-authenticate"), 'Bearer realm="mppproxy"')
        self.assertIn("error", js(page))
        for bad in ("nonsense", good + "x", revoked, expired, berts):
            page = await self.api("GET", "/api/v1/quarantine", bad)
            self.assertEqual(page.code, 401, bad)
            self.assertIn('error="invalid_token"', page.header("www-authenticate"))
        anna = await self.logged_in(ANNA)
        page = await anna.get("/api/v1/quarantine")
        self.assertEqual(page.code, 401)
        page = await self.api("GET", "/api/v1/me", good)
        self.assertEqual(page.code, 200)
        self.assertEqual(js(page)["domains"], ["a.test"])
        self.assertEqual(page.header("set-cookie"), "")
        self.assertEqual(page.header("content-type"), "application/json")

    async def test_quarantine_scope_and_actions(self) -> None:
        """A's token lists a.test's rows only, with the page's filters; B's
        item, raw download, action and a bulk naming it answer 404 exactly
        as a missing id; its own item shows the checks; hold and bulk hold
        act in scope only and are audited as api:127.0.0.1 token ci."""
        await self.start()
        _, anna = self.token(ANNA)
        page = await self.api("GET", "/api/v1/quarantine", anna)
        self.assertEqual(js(page)["total"], 5)
        page = await self.api("GET", "/api/v1/quarantine?limit=2", anna)
        self.assertEqual(len(js(page)["items"]), 2)
        self.assertIsNotNone(js(page)["next_before"])
        self.assertNotIn("raw_key", js(page)["items"][0])
        page = await self.api("GET", "/api/v1/quarantine?ref=REFB1", anna)
        self.assertEqual(js(page)["total"], 0)
        page = await self.api("GET", "/api/v1/quarantine?since=yesterday", anna)
        self.assertEqual((page.code, js(page)["field"]), (400, "since"))
        page = await self.api("GET", "/api/v1/quarantine?limit=0", anna)
        self.assertEqual((page.code, js(page)["field"]), (400, "limit"))
        own, foreign, missing = (self.row("REFA1", "a.test").id, self.row("REFB1", "b.test").id,
                                 10 ** 9)
        for suffix in ("", "/raw"):
            a = await self.api("GET", f"/api/v1/quarantine/{foreign}{suffix}", anna)
            b = await self.api("GET", f"/api/v1/quarantine/{missing}{suffix}", anna)
            self.assertEqual((a.code, a.body), (b.code, b.body))
            self.assertEqual(a.code, 404)
        a = await self.api("POST", f"/api/v1/quarantine/{foreign}/hold", anna, {})
        b = await self.api("POST", f"/api/v1/quarantine/{missing}/hold", anna, {})
        self.assertEqual((a.code, a.body), (b.code, b.body))
        a = await self.api("POST", "/api/v1/quarantine/bulk", anna,
                           {"action": "hold", "ids": [str(foreign)]})
        self.assertEqual(a.code, 404)
        page = await self.api("GET", f"/api/v1/quarantine/{own}", anna)
        body = js(page)
        self.assertEqual(body["item"]["queue_id"], "REFA1")
        self.assertEqual(body["checks"][0]["name"], "clamav")
        self.assertEqual(body["passed"], ["spf", "dnsbl"])
        page = await self.api("GET", f"/api/v1/quarantine/{own}/raw", anna)
        self.assertEqual(page.header("content-type"), "message/rfc822")
        self.assertIn(b"Subject: A one", page.body)
        page = await self.api("POST", f"/api/v1/quarantine/{own}/hold", anna, {})
        self.assertEqual(page.code, 200, page.text)
        self.assertTrue(self.row("REFA1", "a.test").legal_hold)
        page = await self.api("POST", f"/api/v1/quarantine/{own}/explode", anna, {})
        self.assertEqual((page.code, js(page)["field"]), (400, "action"))
        page = await self.api("POST", "/api/v1/quarantine/bulk", anna,
                              {"action": "hold", "ids": [foreign, self.row("REFA2", "a.test").id]})
        self.assertEqual((page.code, js(page)["rows"]), (200, 1))
        self.assertFalse(self.row("REFB1", "b.test").legal_hold)
        page = await self.api("POST", "/api/v1/quarantine/bulk", anna,
                              {"action": "hold", "filters": {"sender": "spam@spam.test"}})
        self.assertEqual((page.code, js(page)["rows"]), (200, 1))
        origins = {(a["actor"], a["origin"]) for a in self.store.audit_rows(domains=("a.test",))}
        self.assertEqual(origins, {(ANNA, "api:127.0.0.1 token ci")})
        self.assertEqual(self.store.audit_rows(domains=("b.test",)), [])

    async def test_lists_and_state(self) -> None:
        """Lists CRUD through the API in scope (201 new, 200 again, 400 with
        the field, 404 for another domain as for a missing one); the state
        tables as on the pages: B's triplets untouchable by A's token, the
        blacklist superadmin only."""
        await self.start()
        await self.fill_state()
        _, anna = self.token(ANNA)
        _, root = self.token(ROOT_NAME, "ops")
        page = await self.api("POST", "/api/v1/lists/a.test", anna,
                              {"kind": "block", "entry": "@Spam.Test", "note": "n"})
        self.assertEqual((page.code, js(page)["entry"], js(page)["added"]),
                         (201, "@spam.test", True))
        self.assertIn("database.cache_seconds", js(page)["takes_effect"])
        page = await self.api("POST", "/api/v1/lists/a.test", anna,
                              {"kind": "block", "entry": "@spam.test"})
        self.assertEqual((page.code, js(page)["added"]), (200, False))
        for body, field in (({"kind": "block", "entry": "x@"}, "entry"),
                            ({"kind": "nope", "entry": "@x.test"}, "kind"),
                            ({"kind": "block"}, "entry"), ({"kind": 3, "entry": "@x"}, "kind")):
            page = await self.api("POST", "/api/v1/lists/a.test", anna, body)
            self.assertEqual((page.code, js(page)["field"]), (400, field), body)
        a = await self.api("POST", "/api/v1/lists/b.test", anna,
                           {"kind": "block", "entry": "@x.test"})
        b = await self.api("POST", "/api/v1/lists/-x-", anna, {"kind": "block", "entry": "@x.test"})
        self.assertEqual((a.code, a.body), (b.code, b.body))
        self.assertEqual(a.code, 404)
        self.assertEqual((await self.api("GET", "/api/v1/lists/b.test", anna)).code, 404)
        page = await self.api("GET", "/api/v1/lists", anna)
        self.assertEqual([(e["domain"], e["kind"], e["entry"]) for e in js(page)["entries"]],
                         [("a.test", "block", "@spam.test")])
        page = await self.api("POST", "/api/v1/lists/a.test/remove", anna,
                              {"kind": "block", "entry": "@spam.test"})
        self.assertEqual(js(page)["removed"], True)
        self.assertEqual(js(await self.api("GET", "/api/v1/lists/a.test", anna))["entries"], [])
        # The state tables.
        self.assertEqual((await self.api("GET", "/api/v1/state/blacklist", anna)).code, 404)
        page = await self.api("GET", "/api/v1/state/blacklist?client=192.0.2.7", root)
        self.assertEqual([e["network"] for e in js(page)["entries"]], ["192.0.2.7/32"])
        page = await self.api("POST", "/api/v1/state/blacklist/remove", root,
                              {"networks": ["192.0.2.7/32"]})
        self.assertEqual(js(page)["removed"], 1)
        page = await self.api("GET", "/api/v1/state/greylist", anna)
        self.assertEqual(sorted(e["recipient"] for e in js(page)["entries"]),
                         ["u1@a.test", "u2@a.test"])
        ids = self.triplet_ids()
        page = await self.api("POST", "/api/v1/state/greylist/remove", anna,
                              {"ids": [ids["v1@b.test"], ids["u1@a.test"]]})
        self.assertEqual(js(page)["removed"], 1)
        self.assertEqual(sorted(self.triplet_ids()), ["u2@a.test", "v1@b.test"])
        page = await self.api("POST", "/api/v1/state/greylist/remove", anna, {"ids": ["zz"]})
        self.assertEqual((page.code, js(page)["field"]), (400, "id"))
        audit = [(a["action"], a["origin"]) for a in self.store.audit_rows()
                 if a["action"] in ("list-add", "list-remove", "blacklist-remove",
                                    "greylist-remove")]
        self.assertEqual(audit, [("greylist-remove", "api:127.0.0.1 token ci"),
                                 ("blacklist-remove", "api:127.0.0.1 token ops"),
                                 ("list-remove", "api:127.0.0.1 token ci"),
                                 ("list-add", "api:127.0.0.1 token ci")])

    async def test_methods_sizes_and_bodies(self) -> None:
        """Unknown paths 404, another method 405 with Allow, a body over
        256 KiB 413, a form body 415, broken JSON 400 -- all as JSON."""
        await self.start()
        _, anna = self.token(ANNA)
        page = await self.api("GET", "/api/v1/nothing", anna)
        self.assertEqual((page.code, js(page)["error"]), (404, "not found"))
        page = await self.api("DELETE", "/api/v1/quarantine", anna)
        self.assertEqual((page.code, page.header("allow")), (405, "GET"))
        page = await self.api("POST", "/api/v1/lists/a.test", anna, raw=b"x" * (300 * 1024))
        self.assertEqual(page.code, 413)
        self.assertIn("256 KiB", js(page)["error"])
        page = await self.api("POST", "/api/v1/lists/a.test", anna, raw=b"kind=block",
                              content_type="application/x-www-form-urlencoded")
        self.assertEqual(page.code, 415)
        page = await self.api("POST", "/api/v1/lists/a.test", anna, raw=b"{broken")
        self.assertEqual(page.code, 400)
        page = await self.api("POST", "/api/v1/lists/a.test", anna, raw=b"[1]")
        self.assertEqual(page.code, 400)


class TokenCliTests(ListsConsoleCase):

    async def test_admin_token_commands(self) -> None:
        """mppproxy admin token add prints the token once (it works on the
        API), list shows it without the token, revoke ends it (401 next)."""
        await self.start()
        cfg = self.data / "mpp.toml"
        cfg.write_text(f'data_dir = "{self.data}"\n')
        import contextlib

        def run(*argv: str) -> tuple[int, str, str]:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli_main(["admin", "token", *argv, "--config", str(cfg)])
            return code, out.getvalue(), err.getvalue()

        code, out, err = await deferToThread(run, "add", ANNA, "--label", "nightly",
                                             "--expires", "7")
        self.assertEqual(code, 0, err)
        token = out.strip()
        self.assertTrue(token.startswith("mppt_"))
        self.assertIn("shown this once", err)
        self.assertEqual((await self.api("GET", "/api/v1/me", token)).code, 200)
        code, out, _ = await deferToThread(run, "list", "--json")
        [listed] = json.loads(out)
        self.assertEqual((listed["admin"], listed["label"]), (ANNA, "nightly"))
        self.assertNotIn(token, out)
        code, out, _ = await deferToThread(run, "revoke", str(listed["id"]))
        self.assertEqual(code, 0)
        self.assertEqual((await self.api("GET", "/api/v1/me", token)).code, 401)
        code, _, err = await deferToThread(run, "add", "nobody")
        self.assertEqual(code, 2)
        self.assertIn("no account named", err)
