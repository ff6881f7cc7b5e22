"""Verdict actions and disclaimers through the proxy on loopback: client ->
proxy -> fake backend (the pattern of test_policy_loopback.ScanTests)."""
from __future__ import annotations

import email
import email.policy
from typing import Any, Optional

from twisted.logger import capturedLogs

from fakes_backend import FakeBackend
from loopback import proxy_config, start_proxy
from test_policy_loopback import PolicyCase

SPAM = b"From: <s@client.test>\r\nSubject: Cheap meds today\r\n\r\nbody\r\n"
DISCLAIMER = {"senders": ["client.test"], "texts": [
    {"charset": "us-ascii", "plain": "-- \nSent through ACME"},
    {"charset": "utf-8", "plain": "-- \nGesendet über ACME", "html": "<p>ACME</p>"}]}


def _policy(scan: Optional[dict[str, Any]] = None, scoring: Optional[dict[str, Any]] = None,
            **extra: Any) -> dict[str, Any]:
    return {"policies": {"default": {
        "scan": {"enabled": True, "headers": {"rules": [
            {"pattern": "(?i)cheap meds", "header": "Subject", "action": "score:6",
             "name": "CHEAP_MEDS"}]}, **(scan or {})},
        "scoring": {"tag": 5, "reject": 15, **(scoring or {})}, **extra}}}


def _header(data: bytes, name: str) -> list[str]:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    return [str(v) for v in msg.get_all(name, [])]


class ActionTests(PolicyCase):

    async def test_tagged_message_gets_subject_prefix_and_result_headers(self) -> None:
        """A tagged message's Subject gets the prefix and the result headers name the rule."""
        fake, proxy = self.start(_policy({"result_headers": True}, {"subject_prefix": "[SPAM] "}))
        forged = b"X-MPP-Scan: score=0; action=relay\r\n" + SPAM
        out = await self.run_session(proxy.port, ("a@example.com",), message=forged)
        self.assertEqual(out["data"][0], 250)
        [relayed] = fake.messages
        self.assertIn(b"\r\nSubject: [SPAM] Cheap meds today\r\n", relayed.data)
        self.assertEqual(_header(relayed.data, "X-MPP-Scan"), ["score=6; action=tag"])
        self.assertEqual(_header(relayed.data, "X-MPP-Scan-Rules"), ["headers=CHEAP_MEDS"])
        self.assertTrue(relayed.data.endswith(b"\r\n\r\nbody\r\n"))

    async def test_result_headers_on_clean_mail_and_no_prefix_when_not_tagged(self) -> None:
        """Every relayed message carries the result headers; an untagged Subject is unchanged."""
        fake, proxy = self.start(_policy({"result_headers": True}, {"subject_prefix": "[SPAM] "}))
        out = await self.run_session(proxy.port, ("a@example.com",))
        self.assertEqual(out["data"][0], 250)
        [relayed] = fake.messages
        self.assertEqual(_header(relayed.data, "X-MPP-Scan"), ["score=0; action=relay"])
        self.assertEqual(_header(relayed.data, "X-MPP-Scan-Rules"), ["none"])
        self.assertEqual(_header(relayed.data, "Subject"), ["policy"])

    async def test_no_result_headers_by_default(self) -> None:
        """Without result_headers no X-MPP-Scan fields are added."""
        fake, proxy = self.start(_policy())
        await self.run_session(proxy.port, ("a@example.com",), message=SPAM)
        [relayed] = fake.messages
        self.assertNotIn(b"X-MPP-Scan", relayed.data)
        self.assertIn(b"\r\nSubject: Cheap meds today\r\n", relayed.data)

    async def test_discard_score_accepts_and_drops(self) -> None:
        """At or above discard_score the client hears 250 and nothing is relayed."""
        fake, proxy = self.start(_policy({"discard_score": 6}))
        out = await self.run_session(proxy.port, ("a@example.com",), message=SPAM)
        self.assertEqual(out["data"][0], 250)
        self.assertEqual(fake.messages, [])
        out = await self.run_session(proxy.port, ("a@example.com",))
        self.assertEqual(len(fake.messages), 1)

    async def test_do_not_scan_sender_recipient_client(self) -> None:
        """A listed sender, recipient or client is not scanned, so the message is not tagged."""
        for scan, kw in (({"skip_senders": ["client.test"]}, {}),
                         ({"skip_recipients": ["postmaster@"]}, {"rcpts": ("postmaster@example.com",)}),
                         ({"skip_clients": ["127.0.0.77/32"]}, {"source": "127.0.0.77"})):
            fake, proxy = self.start(_policy(scan))
            rcpts = kw.pop("rcpts", ("a@example.com",))
            with capturedLogs() as events:
                out = await self.run_session(proxy.port, rcpts, message=SPAM, **kw)
            self.assertEqual(out["data"][0], 250)
            [relayed] = fake.messages
            self.assertNotIn(b"X-Spam-Flag", relayed.data, scan)
            [event] = [e for e in events if e.get("mpp_event") == "transaction"]
            what = next(iter(scan)).removeprefix("skip_").rstrip("s")
            self.assertIn({"check": "scan", "score": 0.0, "skipped": f"do-not-scan {what}"},
                          event["checks"])
            # others are still scanned
            await self.run_session(proxy.port, ("b@example.com",), message=SPAM,
                                   sender="x@other.test", source="127.0.0.78")
            self.assertIn(b"X-Spam-Flag: YES", fake.messages[1].data, scan)


class DisclaimerTests(PolicyCase):

    async def test_disclaimer_appended_for_listed_sender_only(self) -> None:
        """Mail from a listed sender gets the text of its charset; other senders' mail does not."""
        fake, proxy = self.start(_policy(disclaimers=[DISCLAIMER]))
        with capturedLogs() as events:
            out = await self.run_session(proxy.port, ("a@example.com",))
            self.assertEqual(out["data"][0], 250)
            await self.run_session(proxy.port, ("a@example.com",), sender="x@other.test")
        mine, other = fake.messages
        self.assertEqual([e["disclaimer"] for e in events if e.get("mpp_event") == "transaction"],
                         ["added", None])
        self.assertTrue(mine.data.endswith(b"\r\n\r\nbody\r\n-- \r\nSent through ACME\r\n"),
                        mine.data)
        self.assertTrue(other.data.endswith(b"\r\n\r\nbody\r\n"))

    async def test_disclaimer_on_multipart_alternative(self) -> None:
        """Both alternatives of a UTF-8 message get the text."""
        fake, proxy = self.start(_policy(disclaimers=[DISCLAIMER]))
        msg = (b"From: <s@client.test>\r\nSubject: hi\r\nMIME-Version: 1.0\r\n"
               b"Content-Type: multipart/alternative; boundary=\"a\"\r\n\r\n"
               b"--a\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n"
               b"--a\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
               b"<html><body>hello</body></html>\r\n--a--\r\n")
        out = await self.run_session(proxy.port, ("a@example.com",), message=msg)
        self.assertEqual(out["data"][0], 250)
        [relayed] = fake.messages
        parsed = email.message_from_bytes(relayed.data, policy=email.policy.default)
        plain, html = parsed.iter_parts()
        self.assertIn("Gesendet über ACME", plain.get_content())
        self.assertIn("<p>ACME</p>\n</body>", html.get_content().replace("\r\n", "\n"))

    async def test_signed_message_left_alone(self) -> None:
        """A signed message from a listed sender passes unchanged."""
        fake, proxy = self.start(_policy(disclaimers=[DISCLAIMER]))
        body = (b"--s\r\nContent-Type: text/plain\r\n\r\nsigned text\r\n"
                b"--s\r\nContent-Type: application/pgp-signature\r\n\r\nSIG\r\n--s--\r\n")
        msg = (b"From: <s@client.test>\r\nSubject: hi\r\nMIME-Version: 1.0\r\n"
               b"Content-Type: multipart/signed; protocol=\"application/pgp-signature\"; "
               b"boundary=\"s\"\r\n\r\n" + body)
        with capturedLogs() as events:
            await self.run_session(proxy.port, ("a@example.com",), message=msg)
        [relayed] = fake.messages
        self.assertTrue(relayed.data.endswith(b"\r\n\r\n" + body))
        self.assertNotIn(b"ACME", relayed.data)
        [event] = [e for e in events if e.get("mpp_event") == "transaction"]
        self.assertEqual(event["disclaimer"], "skipped: multipart/signed is signed or encrypted")

    async def test_large_message_left_alone(self) -> None:
        """A message over the disclaimer's max_size passes unchanged."""
        fake, proxy = self.start(_policy(disclaimers=[{**DISCLAIMER, "max_size": 1000}]))
        msg = b"From: <s@client.test>\r\nSubject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 0
        msg += (b"y" * 70 + b"\r\n") * 30
        await self.run_session(proxy.port, ("a@example.com",), message=msg)
        [relayed] = fake.messages
        self.assertNotIn(b"ACME", relayed.data)

    async def test_trusted_client_uses_default_policy(self) -> None:
        """Outgoing mail from a trusted client (no policy run) gets the default policy's disclaimer."""
        fake = FakeBackend()
        port = fake.start_for(self)
        config = proxy_config(self.mktemp(), port, policy=_policy(disclaimers=[DISCLAIMER]),
                              trusted_networks=("127.0.0.60/32",))
        proxy = start_proxy(self, config)
        out = await self.run_session(proxy.port, ("someone@elsewhere.test",), source="127.0.0.60")
        self.assertEqual(out["data"][0], 250)
        [relayed] = fake.messages
        self.assertIn(b"Sent through ACME", relayed.data)
