"""The policy engine through the proxy on loopback: client -> proxy -> fake backend.

Each check is driven by a real SMTP client (smtplib, in a thread) against the
in-process proxy; the state database is SQLite in the test's directory; DNS
lists are served by the real Twisted Names server of test_dnsbl on
127.0.0.1.  Clients connect from chosen loopback source addresses (all of
127/8 is local) so a test can be a "listed" client.  127.0.0.0/8 is not
trusted here, so the checks apply.
"""
from __future__ import annotations

import smtplib
import time
from typing import Any, Optional

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from fakes_backend import FakeBackend, poll_until
from loopback import CLIENT_TIMEOUT, InProcessProxy, proxy_config, start_proxy, wait_reactor_quiet
from test_dnsbl import start_dns_server

MESSAGE = b"From: <s@client.test>\r\nSubject: policy\r\n\r\nbody\r\n"


def session(port: int, rcpts: tuple[str, ...], sender: str = "s@client.test",
            source: str = "127.0.0.1", helo: str = "client.test",
            message: bytes = MESSAGE) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=CLIENT_TIMEOUT,
                      source_address=(source, 0)) as s:
        s.ehlo(helo)
        out["mail"] = s.mail(sender)
        out["rcpt"] = [s.rcpt(r) for r in rcpts]
        if any(code == 250 for code, _ in out["rcpt"]):
            out["data"] = s.data(message)
        s.quit()
    return out


class PolicyCase(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        wait_reactor_quiet(self)

    def start(self, policy: dict[str, Any], fake: Optional[FakeBackend] = None
              ) -> tuple[FakeBackend, InProcessProxy]:
        fake = fake or FakeBackend()
        port = fake.start_for(self)
        config = proxy_config(self.mktemp(), port, policy=policy,
                              relay_domains=("example.com", "school.example"))
        return fake, start_proxy(self, config)

    async def run_session(self, *args: Any, **kw: Any) -> dict[str, Any]:
        return await deferToThread(session, *args, **kw)


class AccessTests(PolicyCase):

    async def test_blacklisted_client_refused_before_the_backend_hears(self) -> None:
        """A blacklisted client's RCPT gets 554 5.7.1 through the proxy and never reaches the
        backend, while another client's mail is relayed."""
        fake, proxy = self.start({"policies": {"default": {"access": {
            "blacklist_clients": ["127.0.0.5/32"]}}}})
        out = await self.run_session(proxy.port, ("a@example.com",), source="127.0.0.5")
        code, text = out["rcpt"][0]
        self.assertEqual(code, 554)
        self.assertTrue(text.startswith(b"5.7.1 Access denied"), text)
        self.assertNotIn(b"RCPT TO:<a@example.com>", fake.commands())
        # another client is fine
        out = await self.run_session(proxy.port, ("a@example.com",), source="127.0.0.6")
        self.assertEqual(out["data"][0], 250)
        self.assertEqual(len(fake.messages), 1)

    async def test_blacklisted_sender_and_whitelisted_recipient(self) -> None:
        """A blacklisted sender's RCPT is refused with 554, and a whitelisted recipient skips
        the later checks (here a spamtrap matching it) and gets the message."""
        fake, proxy = self.start({"policies": {"default": {"access": {
            "blacklist_senders": [".spam.example"], "whitelist_recipients": ["postmaster@"]},
            "spamtrap": {"enabled": True, "patterns": ["^postmaster@"]}}}})
        out = await self.run_session(proxy.port, ("a@example.com",), sender="x@mx.spam.example")
        self.assertEqual(out["rcpt"][0][0], 554)
        # the whitelisted recipient skips the (deliberately silly) trap
        out = await self.run_session(proxy.port, ("postmaster@example.com",))
        self.assertEqual(out["rcpt"][0][0], 250)
        self.assertEqual(out["data"][0], 250)


class PolicyGroupTests(PolicyCase):

    async def test_recipient_of_another_policy_gets_452_4_5_3(self) -> None:
        """A recipient of another policy than the first one gets 452 4.5.3 through the proxy,
        and the message reaches the backend for the others only."""
        fake, proxy = self.start({"policies": {"school": {"domains": ["school.example"]}}})
        out = await self.run_session(proxy.port, ("a@school.example", "b@example.com",
                                                  "c@school.example"))
        self.assertEqual([c for c, _ in out["rcpt"]], [250, 452, 250])
        self.assertTrue(out["rcpt"][1][1].startswith(b"4.5.3 "))
        [msg] = fake.messages
        self.assertEqual(msg.recipients, [b"a@school.example", b"c@school.example"])


class SpamtrapTests(PolicyCase):

    async def test_trap_refuses_recipient_then_everything_from_the_client(self) -> None:
        """A spamtrap recipient is refused with 550 without naming the trap; the client's later
        recipients, its DATA and its next sessions get 554, and nothing is relayed, while other
        clients are unaffected."""
        fake, proxy = self.start({"policies": {"default": {"spamtrap": {
            "enabled": True, "patterns": [r"^trap@example\.com$"], "blacklist_seconds": 600}}}})
        out = await self.run_session(proxy.port, ("good@example.com", "trap@example.com",
                                                  "other@example.com"), source="127.0.0.7")
        self.assertEqual([c for c, _ in out["rcpt"]], [250, 550, 554])
        self.assertNotIn(b"trap", out["rcpt"][1][1].lower())
        # the recipient accepted before the trap does not get the message through
        self.assertEqual(out["data"][0], 554)
        self.assertEqual(fake.messages, [])
        # a new session from the same client is refused at once
        out = await self.run_session(proxy.port, ("good@example.com",), source="127.0.0.7")
        self.assertEqual(out["rcpt"][0][0], 554)
        # other clients are not affected
        out = await self.run_session(proxy.port, ("good@example.com",), source="127.0.0.8")
        self.assertEqual(out["data"][0], 250)


class ThresholdTests(PolicyCase):

    async def test_too_many_messages_blacklist_the_client(self) -> None:
        """Past max_messages within the period the client's next RCPTs are refused with 554, and
        only the messages before that reach the backend."""
        fake, proxy = self.start({"policies": {"default": {"thresholds": {
            "enabled": True, "max_messages": 3, "period": 60}}}})
        codes = []
        for _ in range(5):
            out = await self.run_session(proxy.port, ("a@example.com",), source="127.0.0.9")
            codes.append(out["rcpt"][0][0])
        self.assertEqual(codes, [250, 250, 250, 554, 554])
        self.assertEqual(len(fake.messages), 3)

    async def test_exempt_relay_host_is_never_blacklisted(self) -> None:
        """A client exempt from the thresholds keeps getting its messages through past
        max_messages."""
        fake, proxy = self.start({"policies": {"default": {"thresholds": {
            "enabled": True, "max_messages": 1, "whitelist_clients": ["127.0.0.10"]}}}})
        for _ in range(3):
            out = await self.run_session(proxy.port, ("a@example.com",), source="127.0.0.10")
            self.assertEqual(out["data"][0], 250)


class DnsblTests(PolicyCase):

    def dnsbl_policy(self, score: float, **scoring: float) -> dict[str, Any]:
        _, dns_port = start_dns_server(self)
        return {"dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": 2},
                "policies": {"default": {
                    "dnsbl": {"enabled": True, "lists": [{"zone": "zen.test", "score": score}]},
                    "scoring": {"tag": 5, "reject": 15, **scoring}}}}

    async def test_listed_client_over_reject_score_is_refused(self) -> None:
        """A client listed in a DNS list whose score reaches the reject threshold gets 550 5.7.1
        naming the list at RCPT; an unlisted client is relayed."""
        fake, proxy = self.start(self.dnsbl_policy(20))
        # zen.test lists 127.0.0.2
        out = await self.run_session(proxy.port, ("a@example.com",), source="127.0.0.2")
        code, text = out["rcpt"][0]
        self.assertEqual(code, 550)
        self.assertIn(b"5.7.1", text)
        self.assertIn(b"listed in zen.test", text)
        out = await self.run_session(proxy.port, ("a@example.com",), source="127.0.0.20")
        self.assertEqual(out["data"][0], 250)

    async def test_listed_client_under_reject_is_tagged(self) -> None:
        """A listed client scoring between the tag and reject thresholds is relayed with
        X-Spam-Flag, X-Spam-Score and the check's name added."""
        fake, proxy = self.start(self.dnsbl_policy(6))
        out = await self.run_session(proxy.port, ("a@example.com",), source="127.0.0.2")
        self.assertEqual(out["data"][0], 250)
        [msg] = fake.messages
        self.assertIn(b"X-Spam-Flag: YES\r\n", msg.data)
        self.assertIn(b"X-Spam-Score: 6\r\n", msg.data)
        self.assertIn(b"tests=dnsbl", msg.data)

    async def test_listed_client_over_quarantine_is_held_not_relayed(self) -> None:
        """A listed client scoring over the quarantine threshold gets 250, and the message is
        held (archive queue, then the node's own store), with the DNS list hit in its state,
        instead of relayed."""
        from mppproxy.store.store import Search

        fake, proxy = self.start(self.dnsbl_policy(11, quarantine=10))
        out = await self.run_session(proxy.port, ("a@example.com",), source="127.0.0.2")
        self.assertEqual(out["data"][0], 250)
        self.assertEqual(fake.messages, [])
        queue_id = bytes(out["data"][1]).split()[-1].decode()
        keeper = proxy.service.keeper
        assert keeper is not None
        rows = await poll_until(reactor, lambda: keeper.writer.store_ready and keeper.store.search(
            Search(ref=queue_id)), 20.0, "the held message in the store")
        self.assertEqual((rows[0].recipients, rows[0].verdict, rows[0].score),
                         (("a@example.com",), "quarantine", 11.0))
        state = keeper.store.state(rows[0])
        self.assertIn("dnsbl", [c["check"] for c in state["checks"]])

    async def test_dead_dns_server_scores_nothing_and_mail_flows(self) -> None:
        """With the DNS server silent, the DNS list check times out, scores nothing, and the
        message is relayed within seconds."""
        from test_dnsbl import start_silent_server

        silent = start_silent_server(self)
        fake, proxy = self.start({"dns": {"nameservers": [f"127.0.0.1:{silent}"], "timeout": 0.5},
                                  "policies": {"default": {"dnsbl": {
                                      "enabled": True, "lists": [{"zone": "zen.test", "score": 20}]}}}})
        started = time.monotonic()
        out = await self.run_session(proxy.port, ("a@example.com",), source="127.0.0.2")
        self.assertEqual(out["data"][0], 250)
        self.assertLess(time.monotonic() - started, 5)


class GreylistTests(PolicyCase):

    async def test_first_attempt_deferred_retry_after_delay_passes(self) -> None:
        """The first attempt is greylisted with 451 4.7.1 before the backend hears of it; a
        retry after the delay passes, and so does a client of the same /24."""
        fake, proxy = self.start({"policies": {"default": {"greylisting": {
            "enabled": True, "delay": 1}}}})
        out = await self.run_session(proxy.port, ("a@example.com",), source="127.0.0.11")
        code, text = out["rcpt"][0]
        self.assertEqual(code, 451)
        self.assertTrue(text.startswith(b"4.7.1 "), text)
        self.assertNotIn(b"RCPT TO:<a@example.com>", fake.commands())
        await deferToThread(time.sleep, 1.2)
        out = await self.run_session(proxy.port, ("a@example.com",), source="127.0.0.11")
        self.assertEqual(out["data"][0], 250)
        # the same /24 is the same greylisting client: the passed triplet holds
        out = await self.run_session(proxy.port, ("a@example.com",), source="127.0.0.12")
        self.assertEqual(out["data"][0], 250)


class TrustedTests(PolicyCase):

    async def test_trusted_clients_skip_the_checks(self) -> None:
        """A client of the trusted networks skips the policy checks: a blacklist covering it
        does not refuse its message."""
        fake = FakeBackend()
        port = fake.start_for(self)
        config = proxy_config(self.mktemp(), port, trusted_networks=("127.0.0.0/8",), policy={
            "policies": {"default": {"access": {"blacklist_clients": ["127.0.0.0/8"]}}}})
        proxy = start_proxy(self, config)
        out = await self.run_session(proxy.port, ("a@example.com",))
        self.assertEqual(out["data"][0], 250)


class SpfTests(PolicyCase):

    def spf_policy(self, **spf: Any) -> dict[str, Any]:
        from test_spf import start_server

        _, dns_port = start_server(self)
        return {"dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": 2},
                "policies": {"default": {"spf": {"enabled": True, **spf}}}}

    async def test_fail_refused_with_5_7_23_when_configured(self) -> None:
        """With reject_fail set, a sender whose SPF record fails for the client gets 550 5.7.23
        and nothing is relayed."""
        fake, proxy = self.start(self.spf_policy(reject_fail=True))
        # the test zone's example.net says "v=spf1 -all ..."
        out = await self.run_session(proxy.port, ("a@example.com",), sender="x@example.net")
        code, text = out["rcpt"][0]
        self.assertEqual(code, 550)
        self.assertTrue(text.startswith(b"5.7.23 "), text)
        self.assertEqual(fake.messages, [])

    async def test_pass_adds_authentication_results(self) -> None:
        """An SPF pass is relayed with an Authentication-Results field naming our authserv-id,
        the result, the client and the sender."""
        fake, proxy = self.start(self.spf_policy())
        # "v=spf1 +all"
        out = await self.run_session(proxy.port, ("a@example.com",), sender="x@e7.all.example.com")
        self.assertEqual(out["data"][0], 250)
        [msg] = fake.messages
        self.assertIn(b"Authentication-Results: proxy.test; spf=pass (client 127.0.0.1)\r\n"
                      b"\tsmtp.mailfrom=x@e7.all.example.com\r\n", msg.data)

    async def test_fail_scores_and_tags_by_default(self) -> None:
        """By default an SPF fail only scores: the message is relayed tagged, with spf=fail in
        its headers and the score in X-Spam-Score."""
        fake, proxy = self.start(self.spf_policy(score_fail=6))
        out = await self.run_session(proxy.port, ("a@example.com",), sender="x@example.net")
        self.assertEqual(out["data"][0], 250)
        [msg] = fake.messages
        self.assertIn(b"spf=fail", msg.data)
        self.assertIn(b"X-Spam-Score: 6\r\n", msg.data)


class ScanTests(PolicyCase):
    """Post-DATA scanning (MIME, attachments, header rules) through the proxy."""

    def scan_policy(self, **extra: Any) -> dict[str, Any]:
        return {"policies": {"default": {
            "scan": {"enabled": True, "headers": {"rules": [
                {"pattern": "(?i)cheap meds", "header": "Subject", "action": "score:6",
                 "name": "CHEAP_MEDS"}]}},
            "scoring": {"tag": 5, "reject": 15}, **extra}}}

    async def test_clean_message_relayed(self) -> None:
        """A clean message passes the scan and is relayed."""
        fake, proxy = self.start(self.scan_policy())
        out = await self.run_session(proxy.port, ("a@example.com",))
        self.assertEqual(out["data"][0], 250)
        self.assertEqual(len(fake.messages), 1)

    async def test_malformed_message_refused_at_end_of_data(self) -> None:
        """A message with a malformed header section gets 550 5.6.0 at the end of DATA and is
        not relayed."""
        fake, proxy = self.start(self.scan_policy())
        bad = b"From: <s@client.test>\r\nthis line has no colon\r\nSubject: x\r\n\r\nbody\r\n"
        out = await self.run_session(proxy.port, ("a@example.com",), message=bad)
        code, text = out["data"]
        self.assertEqual(code, 550)
        self.assertTrue(text.startswith(b"5.6.0 "), text)
        self.assertEqual(fake.messages, [])

    async def test_executable_attachment_refused(self) -> None:
        """An executable attachment under a double extension gets 550 5.7.1 at the end of DATA,
        without its file name in the reply, and is not relayed."""
        import base64

        fake, proxy = self.start(self.scan_policy())
        exe = base64.encodebytes(b"MZ\x90\x00" + b"\x00" * 200).replace(b"\n", b"\r\n")
        msg = (b"From: <s@client.test>\r\nSubject: invoice\r\nMIME-Version: 1.0\r\n"
               b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
               b"--b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
               b"--b1\r\nContent-Type: application/octet-stream\r\n"
               b"Content-Disposition: attachment; filename=\"invoice.pdf.exe\"\r\n"
               b"Content-Transfer-Encoding: base64\r\n\r\n" + exe + b"--b1--\r\n")
        out = await self.run_session(proxy.port, ("a@example.com",), message=msg)
        code, text = out["data"]
        self.assertEqual(code, 550)
        self.assertTrue(text.startswith(b"5.7.1 "), text)
        self.assertNotIn(b"invoice", text)
        self.assertEqual(fake.messages, [])

    async def test_header_rule_score_tags_the_message(self) -> None:
        """A header rule's score over the tag threshold relays the message with X-Spam-Flag and
        X-Spam-Score."""
        fake, proxy = self.start(self.scan_policy())
        msg = b"From: <s@client.test>\r\nSubject: Cheap meds today\r\n\r\nbody\r\n"
        out = await self.run_session(proxy.port, ("a@example.com",), message=msg)
        self.assertEqual(out["data"][0], 250)
        [relayed] = fake.messages
        self.assertIn(b"X-Spam-Flag: YES\r\n", relayed.data)
        self.assertIn(b"X-Spam-Score: 6\r\n", relayed.data)

    async def test_spam_verdicts_feed_the_thresholds(self) -> None:
        """Spam verdicts after DATA count towards max_spam: past it, the client's next RCPT is
        refused with 554."""
        fake, proxy = self.start(self.scan_policy(thresholds={
            "enabled": True, "max_spam": 2, "period": 60}))
        msg = b"From: <s@client.test>\r\nSubject: Cheap meds today\r\n\r\nbody\r\n"
        for _ in range(3):
            out = await self.run_session(proxy.port, ("a@example.com",), message=msg,
                                         source="127.0.0.40")
            self.assertEqual(out["data"][0], 250)
        out = await self.run_session(proxy.port, ("a@example.com",), source="127.0.0.40")
        self.assertEqual(out["rcpt"][0][0], 554)
