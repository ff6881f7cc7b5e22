"""User digests (issue 13): who gets one and what it says, the signed
one-shot release token, the no-login release page, the daily scheduler
and ``mppproxy digest send``.

Everything real on loopback: the archive store (SQLite in the test's data
directory, filled as test_web_console.py fills it, plus rows of our own),
the console (``WebConsole`` spoken to by Twisted's HTTP client), the
project's SMTP client sending digests and releases to ``SmtpSink`` (a
loopback SMTP server in a thread, test_quarantine_cli.py).  Time for the
scheduler comes from a ``task.Clock``.
"""
from __future__ import annotations

import dataclasses
import email
import email.policy
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from test_db_stores import require_mariadb
from test_web_console import ANNA, ConsoleCase, copy
from mppproxy.config.archive import StoreConfig
from mppproxy.config.digest import DigestConfig
from mppproxy.config.errors import ConfigError
from mppproxy.config.load import from_mapping
from mppproxy.config.web import secret_path
from mppproxy.store.digests import DigestLedger
from mppproxy.store.store import ArchiveStore, NewCopy
from mppproxy.web.digestmail import day_of, send_digests
from mppproxy.web.digestrun import DigestScheduler, due
from mppproxy.web.digesttoken import TokenError, TokenSigner
from mppproxy.web.secret import load_or_create_secret

reactor: Any = _reactor
ROOT = Path(__file__).resolve().parents[1]
BASE = "https://console.a.test"
SENDER = "quarantine@a.test"
# Seconds one CLI run may take (imports included) on a loaded 2-core machine.
RUN_TIMEOUT = 60

# Rows beside test_web_console's (u1..u5 at a.test one each, v1/v4 at
# b.test): u1 gets three, u2 two; an old one (past digest.days) and an
# archive copy of delivered mail are never listed.
EXTRA = (
    copy("REFD1", ("u1@a.test",), "Second for u1", 0.5),
    copy("REFD2", ("u1@a.test", "u2@a.test"), "Shared <i>new</i>", 0.2,
         sender="evil@x.test"),
    copy("REFOLD", ("u1@a.test",), "Three days old", 72),
)
ARCHIVED = dataclasses.replace(copy("REFARCH", ("u1@a.test",), "Delivered copy", 0.1),
                               disposition="relay")


def parts(data: bytes) -> tuple[EmailMessage, str, str]:
    """The message and its text and HTML parts."""
    message = email.message_from_bytes(data, _class=EmailMessage, policy=email.policy.default)
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    return message, str(text.get_content()), str(html.get_content())


class DigestCase(ConsoleCase):
    """The console's store and config, with digests on for a.test."""

    def setUp(self) -> None:
        super().setUp()
        extra: tuple[NewCopy, ...] = (*EXTRA, ARCHIVED)
        self.assertEqual(self.store.add_copies(extra), len(extra))
        self.config = dataclasses.replace(self.config, digest=DigestConfig(
            domains=("a.test",), sender=SENDER, base_url=BASE, max_items=2))
        secret = load_or_create_secret(secret_path(self.config.web, self.config.data_dir))
        self.signer = TokenSigner(secret)
        self.secret = secret

    async def send(self, **kwargs: Any) -> Any:
        return await send_digests(self.config, self.store, reactor, self.signer, time.time(),
                                  **kwargs)

    def by_recipient(self) -> dict[str, tuple[str, list[str], bytes]]:
        return {rcpts[0]: (sender, rcpts, data) for sender, rcpts, data in self.sink.messages}

    def link_of(self, data: bytes, subject: str) -> str:
        """The release link of the item with ``subject`` in a digest."""
        _, text, _ = parts(data)
        lines = text.splitlines()
        at = lines.index(f"  Subject: {subject}")
        self.assertTrue(lines[at + 2].startswith("  Release it: "), text)
        return lines[at + 2].split()[-1]


class DigestContentTests(DigestCase):

    async def test_two_recipients_of_one_domain(self) -> None:
        """Each recipient of a.test with held mail gets one digest: u1 its
        newest two of three (the old row and the archive copy left out)
        with "1 more", u2 its two; text and an escaped HTML part, a link
        per item, From/To/Subject/Auto-Submitted set; b.test's get none."""
        report = await self.send()
        self.assertEqual((report.sent, report.failed), (5, 0))
        got = self.by_recipient()
        self.assertEqual(sorted(got), ["u1@a.test", "u2@a.test", "u3@a.test", "u4@a.test",
                                       "u5@a.test"])
        sender, rcpts, data = got["u1@a.test"]
        self.assertEqual((sender, rcpts), (SENDER, ["u1@a.test"]))
        message, text, html = parts(data)
        self.assertEqual((message["From"], message["To"]), (SENDER, "u1@a.test"))
        self.assertEqual(message["Subject"],
                         "Quarantine digest: 3 held message(s) for u1@a.test")
        self.assertEqual(message["Auto-Submitted"], "auto-generated")
        self.assertLess(text.index("Shared <i>new</i>"), text.index("Second for u1"))
        self.assertIn("... and 1 more", text)
        for absent in ("A one", "Three days old", "Delivered copy"):
            self.assertNotIn(absent, text)
        self.assertEqual(text.count(f"Release it: {BASE}/digest/d1."), 2)
        self.assertIn("evil@x.test", text)
        self.assertIn("Shared &lt;i&gt;new&lt;/i&gt;", html)
        self.assertNotIn("<i>new", html)
        self.assertEqual(html.count(f'href="{BASE}/digest/d1.'), 2)
        _, text2, _ = parts(got["u2@a.test"][2])
        self.assertIn("Shared <i>new</i>", text2)
        self.assertIn("A two", text2)
        self.assertNotIn("more, not listed", text2)
        _, _, html3 = parts(got["u3@a.test"][2])
        self.assertIn("A three &lt;b&gt;bold&lt;/b&gt;", html3)

    async def test_no_digest_without_digest_domains(self) -> None:
        """b.test has no digests: its recipients get none; with
        digest.domains empty the scheduler sends nothing at all."""
        await self.send(domains=["a.test"])
        self.assertFalse([m for m in self.sink.messages if m[1][0].endswith("@b.test")])
        count = len(self.sink.messages)
        self.config = dataclasses.replace(self.config, digest=DigestConfig())
        clock = Clock()
        clock.advance(datetime(2030, 1, 2, 9, 0, tzinfo=timezone.utc).timestamp())
        scheduler = self.scheduler(clock)
        self.assertIsNone(await scheduler.tick())
        self.assertEqual(len(self.sink.messages), count)

    async def test_dry_run_sends_nothing(self) -> None:
        """A dry run composes every digest and sends and records none."""
        report = await self.send(dry_run=True)
        self.assertEqual(len(report.digests), 5)
        self.assertEqual(self.sink.messages, [])
        self.assertFalse(DigestLedger(self.store).is_claimed(day_of(time.time()), "u1@a.test"))

    def scheduler(self, clock: Clock) -> DigestScheduler:
        async def ready() -> bool:
            return True
        return DigestScheduler(lambda: self.config, reactor, self.store, self.secret, ready,
                               clock=clock)

    async def test_no_second_digest_after_a_restart(self) -> None:
        """Before send_at nothing goes; after it the day's digests go once;
        a new scheduler (a restart) the same day sends nothing; one whose
        run died after claiming u1 sends the others only."""
        clock = Clock()
        morning = datetime(2030, 1, 2, 6, 59, tzinfo=timezone.utc).timestamp()
        clock.advance(morning)
        first = self.scheduler(clock)
        self.assertIsNone(await first.tick())
        clock.advance(60)
        report = await first.tick()
        self.assertIsNotNone(report)
        self.assertEqual(len(self.sink.messages), 0, "rows are newer than the clock's day")
        # The clock's "now" decides which rows are recent: run at today's
        # time instead, the day after a run that died having claimed u1.
        clock = Clock()
        now = time.time()
        clock.advance(now)
        self.config = dataclasses.replace(self.config, digest=dataclasses.replace(
            self.config.digest, send_at="00:00"))
        ledger = DigestLedger(self.store)
        self.assertTrue(ledger.claim(day_of(now), "U1@a.test"))
        report = await self.scheduler(clock).tick()
        assert report is not None
        self.assertEqual((report.sent, report.skipped), (4, 1))
        self.assertNotIn("u1@a.test", self.by_recipient())
        self.assertTrue(ledger.run_done(day_of(now)))
        sent = len(self.sink.messages)
        restarted = self.scheduler(clock)
        self.assertIsNone(await restarted.tick())
        # An hour later, or just before midnight UTC when that comes first:
        # the same digest day (past midnight a new day's run is due, and
        # this test failed when CI ran it at 23:01).
        end_of_day = (now // 86400 + 1) * 86400
        clock.advance(max(0.0, min(3600.0, end_of_day - now - 1)))
        self.assertEqual(day_of(clock.seconds()), day_of(now))
        self.assertIsNone(await restarted.tick())
        self.assertEqual(len(self.sink.messages), sent)

    async def test_failed_send_is_tried_again(self) -> None:
        """A relay that is down: nothing is recorded as sent, the run is not
        done, and the next try after RETRY sends every digest."""
        self.config = dataclasses.replace(self.config, digest=dataclasses.replace(
            self.config.digest, send_at="00:00", relay="127.0.0.1:1"))
        clock = Clock()
        clock.advance(time.time())
        scheduler = self.scheduler(clock)
        report = await scheduler.tick()
        assert report is not None
        self.assertEqual((report.sent, report.failed), (0, 5))
        self.assertFalse(DigestLedger(self.store).run_done(day_of(clock.seconds())))
        self.assertIsNone(await scheduler.tick())  # not before RETRY
        self.config = dataclasses.replace(self.config, digest=dataclasses.replace(
            self.config.digest, relay=f"127.0.0.1:{self.sink.port}"))
        clock.advance(901)
        report = await scheduler.tick()
        assert report is not None
        self.assertEqual(report.sent, 5)


class TokenTests(unittest.SynchronousTestCase):

    def test_signature_expiry_and_recipient(self) -> None:
        """A token verifies with its key before expiry, giving its row and
        recipient; changing any part, or another key, makes it forged; at
        its expiry it is expired."""
        signer = TokenSigner(b"k" * 32)
        token = signer.make(42, "u1@a.test", 2000)
        found = signer.verify(token, 1000)
        self.assertEqual((found.row_id, found.recipient, found.expires), (42, "u1@a.test", 2000))
        self.assertEqual(len(found.digest), 64)
        self.assertNotIn(token, found.digest)
        version, row, expires, rcpt, mac = token.split(".")
        other = TokenSigner(b"k" * 32).make(43, "u2@a.test", 2000).split(".")
        forgeries = [
            ".".join((version, "43", expires, rcpt, mac)),
            ".".join((version, row, "9999", rcpt, mac)),
            ".".join((version, row, expires, other[3], mac)),
            ".".join((version, row, expires, rcpt, mac[:-1] + ("A" if mac[-1] != "A" else "B"))),
            TokenSigner(b"x" * 32).make(42, "u1@a.test", 2000),
            "garbage", "", token + ".",
        ]
        for forged in forgeries:
            with self.assertRaises(TokenError) as caught:
                signer.verify(forged, 1000)
            self.assertEqual(caught.exception.reason, "forged", forged)
        with self.assertRaises(TokenError) as caught:
            signer.verify(token, 2000)
        self.assertEqual(caught.exception.reason, "expired")

    def test_due_is_utc(self) -> None:
        """send_at is compared with the UTC time of day."""
        at = datetime(2030, 1, 2, 7, 0, tzinfo=timezone.utc).timestamp()
        self.assertTrue(due(at, "07:00"))
        self.assertFalse(due(at - 1, "07:00"))
        self.assertTrue(due(at, "00:00"))

    def test_config_is_checked_with_the_key_named(self) -> None:
        """Bad [digest] values and a missing sender or base_url are errors
        naming the key."""
        cases = {
            "digest.send_at": {"domains": ["a.test"], "sender": SENDER, "base_url": BASE,
                               "send_at": "7am"},
            "digest.sender": {"domains": ["a.test"], "base_url": BASE},
            "digest.base_url": {"domains": ["a.test"], "sender": SENDER,
                                "base_url": "console.a.test"},
            "digest.subject": {"subject": "{{ count"},
            "digest.token_days": {"token_days": 0},
            "digest.relay": {"relay": "nohost"},
            "digest.domains": {"domains": ["*.a.test"]},
        }
        for key, section in cases.items():
            with self.assertRaises(ConfigError) as caught:
                from_mapping({"digest": section})
            self.assertTrue(any(f"{key}:" in e for e in caught.exception.errors),
                            (key, caught.exception.errors))
        config = from_mapping({"digest": {"domains": ["a.test"], "sender": SENDER,
                                          "base_url": BASE}})
        self.assertEqual(config.digest.send_at, "07:00")


class DigestPageTests(DigestCase):

    async def digest_for(self, recipient: str) -> bytes:
        await self.send()
        return self.by_recipient()[recipient][2]

    def path_of(self, link: str) -> str:
        self.assertTrue(link.startswith(BASE))
        return link[len(BASE):]

    async def test_release_through_the_link(self) -> None:
        """GET shows the summary and a button and changes nothing (as often
        as a scanner fetches it); POST releases to the recipient through the
        route, audited as the recipient from digest:127.0.0.1; the link is
        then spent: a second POST and a GET say so and send nothing."""
        data = await self.digest_for("u1@a.test")
        path = self.path_of(self.link_of(data, "Second for u1"))
        await self.start()
        browser = self.browser()
        for _ in range(3):
            page = await browser.get(path)
            self.assertEqual(page.code, 200, page.text[:300])
            self.assertIn("Second for u1", page.text)
            self.assertIn(f'action="{path}"', page.text)
            self.assertEqual(page.header("referrer-policy"), "no-referrer")
        self.assertEqual(self.row("REFD1", "a.test").status, "held")
        digests = len(self.sink.messages)
        page = await browser.post(path, {})
        self.assertEqual(page.code, 200, page.text[:500])
        self.assertIn("on its way", page.text)
        self.assertEqual(len(self.sink.messages), digests + 1)
        sender, rcpts, body = self.sink.messages[-1]
        self.assertEqual((sender, rcpts), ("sender@x.test", ["u1@a.test"]))
        self.assertIn(b"Subject: Second for u1", body)
        self.assertEqual(self.row("REFD1", "a.test").status, "released")
        audit = self.store.audit_rows(queue_id="REFD1", action="release")
        self.assertEqual((audit[0]["actor"], audit[0]["origin"]),
                         ("u1@a.test", "digest:127.0.0.1"))
        for method in ("POST", "GET"):
            page = await (browser.post(path, {}) if method == "POST" else browser.get(path))
            self.assertEqual(page.code, 410, method)
            self.assertIn("already been used", page.text)
        self.assertEqual(len(self.sink.messages), digests + 1)

    async def test_forged_and_foreign_tokens_are_refused(self) -> None:
        """A token for u1 naming u2's row, for a b.test row, signed with
        another key, or garbled gets the one "not valid" page (404, the
        same body); an expired one says expired; nothing is released."""
        await self.start()
        browser = self.browser()
        u2_row = self.row("REFA2", "a.test").id
        b_row = self.row("REFB1", "b.test").id
        later = time.time() + 3600
        paths = [
            f"/digest/{self.signer.make(u2_row, 'u1@a.test', later)}",
            f"/digest/{self.signer.make(b_row, 'u1@a.test', later)}",
            f"/digest/{self.signer.make(10 ** 9, 'u1@a.test', later)}",
            f"/digest/{TokenSigner(b'z' * 32).make(u2_row, 'u2@a.test', later)}",
            "/digest/d1.garbage",
        ]
        bodies = set()
        for path in paths:
            for method in ("GET", "POST"):
                page = await (browser.post(path, {}) if method == "POST" else browser.get(path))
                self.assertEqual(page.code, 404, (path, method))
                self.assertIn("This link is not valid", page.text)
                bodies.add(page.body)
        self.assertEqual(len(bodies), 1)
        expired = f"/digest/{self.signer.make(u2_row, 'u2@a.test', time.time() - 1)}"
        page = await browser.post(expired, {})
        self.assertEqual(page.code, 410)
        self.assertIn("expired", page.text)
        self.assertNotIn("A two", page.text)
        self.assertEqual(self.sink.messages, [])
        self.assertEqual(self.row("REFA2", "a.test").status, "held")
        # The right recipient's own token for the same row works.
        page = await browser.post(f"/digest/{self.signer.make(u2_row, 'u2@a.test', later)}", {})
        self.assertEqual(page.code, 200, page.text[:300])
        self.assertEqual(self.row("REFA2", "a.test").status, "released")

    async def test_a_release_that_cannot_be_done_keeps_the_link(self) -> None:
        """The route is down: the page says try later (503), the row stays
        held and the same link works once the route is back."""
        row = self.row("REFA1", "a.test").id
        path = f"/digest/{self.signer.make(row, 'u1@a.test', time.time() + 3600)}"
        down = dataclasses.replace(self.config, release=dataclasses.replace(
            self.config.release, default_route="127.0.0.1:1"))
        console = await self.start(down)
        browser = self.browser()
        page = await browser.post(path, {})
        self.assertEqual(page.code, 503, page.text[:300])
        self.assertEqual(self.row("REFA1", "a.test").status, "held")
        console.apply(self.config)
        page = await browser.post(path, {})
        self.assertEqual(page.code, 200, page.text[:300])
        self.assertEqual(self.row("REFA1", "a.test").status, "released")

    async def test_an_admin_session_changes_nothing(self) -> None:
        """A logged-in domain admin opening a link is no more than the
        recipient: a token for a row of another recipient is not valid."""
        await self.start()
        anna = await self.logged_in(ANNA)
        other = self.row("REFA2", "a.test").id
        page = await anna.post(
            f"/digest/{self.signer.make(other, 'u1@a.test', time.time() + 60)}", {})
        self.assertEqual(page.code, 404)


class DigestCliTests(DigestCase):

    def write_config(self) -> Path:
        path = self.data / "mppproxy.toml"
        path.write_text(
            f'data_dir = "{self.data}"\n'
            f'[release]\ndefault_route = "127.0.0.1:{self.sink.port}"\nrescan = false\n'
            f'[digest]\ndomains = ["a.test"]\nsender = "{SENDER}"\nbase_url = "{BASE}"\n'
            f'max_items = 2\n', encoding="utf-8")
        return path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "MPP_HOME"}
        return subprocess.run([sys.executable, "-m", "mppproxy", "digest", "send", *args],
                              capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=ROOT,
                              env=env)

    def test_send_and_dry_run(self) -> None:
        """--dry-run prints the digests and sends nothing; send sends each
        (exit 0) and records it for today; a domain outside digest.domains
        is a usage error (exit 2)."""
        config = self.write_config()
        done = self.cli("--config", str(config), "--dry-run")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("To: u1@a.test (3 held, 2 listed)", done.stdout)
        self.assertIn("5 digest(s) would be sent", done.stdout)
        self.assertEqual(self.sink.messages, [])
        done = self.cli("--config", str(config), "--domain", "b.test")
        self.assertEqual(done.returncode, 2)
        self.assertIn("not in digest.domains", done.stderr)
        done = self.cli("--config", str(config), "--domain", "A.test")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("5 digest(s) sent", done.stdout)
        self.assertEqual(len(self.sink.messages), 5)
        self.assertTrue(DigestLedger(self.store).is_claimed(day_of(time.time()), "u2@a.test"))


class LedgerTests(unittest.SynchronousTestCase):

    def check(self, store: ArchiveStore) -> None:
        ledger = DigestLedger(store)
        self.assertTrue(ledger.spend("a" * 64, 1, "u1@a.test", time.time() + 60, "digest:x"))
        self.assertFalse(ledger.spend("a" * 64, 1, "u1@a.test", time.time() + 60, "digest:y"))
        self.assertTrue(ledger.spent("a" * 64))
        ledger.unspend("a" * 64)
        self.assertFalse(ledger.spent("a" * 64))
        self.assertTrue(ledger.claim("2030-01-02", "U1@a.test"))
        self.assertFalse(ledger.claim("2030-01-02", "u1@A.TEST"))
        self.assertTrue(ledger.claim("2030-01-03", "u1@a.test"))
        ledger.unclaim("2030-01-03", "u1@a.test")
        self.assertFalse(ledger.is_claimed("2030-01-03", "u1@a.test"))
        self.assertFalse(ledger.run_done("2030-01-02"))
        ledger.mark_run_done("2030-01-02")
        self.assertTrue(ledger.run_done("2030-01-02"))
        self.assertTrue(ledger.spend("b" * 64, 1, "u1@a.test", time.time() - 1, "digest:x"))
        self.assertEqual(ledger.purge(time.time(), "2030-01-03"), 3)
        self.assertFalse(ledger.spent("b" * 64))

    def test_spend_and_claim_once_on_sqlite_and_mariadb(self) -> None:
        """A token is spent once and can be given back; a (day, recipient)
        claimed once, case aside; the purge drops expired tokens and old
        days: on SQLite and on MariaDB (the primary keys decide)."""
        tmp = tempfile.mkdtemp(prefix="mpp-digest-ledger-")
        self.addCleanup(shutil.rmtree, tmp, True)
        store = ArchiveStore(StoreConfig(), tmp)
        store.open()
        self.addCleanup(store.close)
        self.check(store)
        url = require_mariadb()
        maria = ArchiveStore(StoreConfig(url=url), tmp, table_prefix=f"t{uuid.uuid4().hex[:10]}_")
        maria.open()
        self.addCleanup(maria.close)
        self.addCleanup(maria.drop_all)
        self.check(maria)
