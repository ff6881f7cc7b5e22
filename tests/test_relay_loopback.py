"""The lockstep relay on real loopback sockets: client -> in-process proxy -> fake backend.

The proxy is ``ProxyService`` started in the test's reactor; the backend is the
scripted ``FakeBackend``; clients (smtplib or ``RawClient``) run in a thread.
127.0.0.1 is an untrusted client here (trusted_networks = 10.255.255.0/24), so relay
control applies and recipients are in example.com.
"""
from __future__ import annotations

import hashlib
import re
import smtplib
import time
from typing import Any, Callable, Optional

from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from fakes_backend import FakeBackend
from helpers import free_port
from mppproxy.edge.handler import RECEIVED_ALLOWANCE
from loopback import (CLIENT_TIMEOUT, InProcessProxy, RawClient, proxy_config, start_proxy,
                      wait_reactor_quiet)

MESSAGE = (
    b"From: Sender <sender@client.test>\r\n"
    b"To: <rcpt@example.com>\r\n"
    b"Subject: relayed byte for byte\r\n"
    b"Message-ID: <byte-exact@client.test>\r\n"
    b"X-Spacing:   three leading, two trailing  \r\n"
    b"X-Folded: first part\r\n"
    b"\tsecond part\r\n"
    b"\r\n"
    b"line one\r\n"
    b".a line that starts with a dot\r\n"
    b".\r\n"
    b"..\r\n"
    b"\r\n"
    b"tab\there, 8-bit caf\xc3\xa9, trailing spaces   \r\n"
    b"last line\r\n"
)

#: A backend's extensions without XFORWARD/XCLIENT, for tests that add one.
DEFAULT_X = ("PIPELINING", "SIZE 52428800", "8BITMIME", "ENHANCEDSTATUSCODES")

RECEIVED = re.compile(
    rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n"
    rb"\tby proxy\.test \(mppproxy\) with ESMTP id [A-Za-z0-9]+\r\n"
    rb"\tfor <rcpt@example\.com>;\r\n"
    rb"\t[A-Z][a-z]{2}, \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\r\n$")


def stuffed(data: bytes) -> bytes:
    """``data`` as it must appear on the wire in DATA, terminator included."""
    return (b"\r\n" + data).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"


def smtp_client(port: int) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=CLIENT_TIMEOUT)


class RelayCase(unittest.TestCase):
    """Starts a fake backend and the in-process proxy in front of it."""

    timeout = 60

    def setUp(self) -> None:
        wait_reactor_quiet(self)

    def start(self, fake: Optional[FakeBackend] = None, *, backend_port: Optional[int] = None,
              **config: Any) -> tuple[FakeBackend, InProcessProxy]:
        fake = fake or FakeBackend()
        port = backend_port if backend_port is not None else fake.start_for(self)
        proxy = start_proxy(self, proxy_config(self.mktemp(), port, **config))
        return fake, proxy

    async def in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await deferToThread(fn, *args)


def send_one(port: int, message: bytes = MESSAGE, sender: str = "sender@client.test",
             rcpts: tuple[str, ...] = ("rcpt@example.com",),
             mail_options: tuple[str, ...] = ()) -> dict[str, Any]:
    """One smtplib session with one transaction; every reply, in order."""
    out: dict[str, Any] = {}
    with smtp_client(port) as s:
        out["ehlo"] = s.ehlo("client.test")
        out["mail"] = s.mail(sender, list(mail_options))
        out["rcpt"] = [s.rcpt(r) for r in rcpts]
        if any(code == 250 for code, _ in out["rcpt"]):
            out["data"] = s.data(message)
        out["quit"] = s.quit()
    return out


class RelayTests(RelayCase):

    async def test_message_relayed_byte_exact(self) -> None:
        """The backend receives the client's message byte for byte under one
        added Received: header, and the client hears the backend's own replies."""
        fake, proxy = self.start(FakeBackend(replies={
            "MAIL": "250 2.1.0 fake: sender looks fine",
            "RCPT": "250 2.1.5 fake: recipient looks fine",
            "EOM": "250 2.0.0 Ok: queued as 4XyZ9 by the fake",
        }))
        out = await self.in_thread(send_one, proxy.port, MESSAGE, "sender@client.test",
                                   ("rcpt@example.com",), ("BODY=8BITMIME",))
        self.assertEqual(out["mail"], (250, b"2.1.0 fake: sender looks fine"))
        self.assertEqual(out["rcpt"], [(250, b"2.1.5 fake: recipient looks fine")])
        self.assertEqual(out["data"], (250, b"2.0.0 Ok: queued as 4XyZ9 by the fake"))
        [msg] = fake.messages
        self.assertEqual(msg.sender, b"sender@client.test")
        self.assertEqual(msg.recipients, [b"rcpt@example.com"])
        received, rest = msg.split_received()
        self.assertEqual(rest, MESSAGE)
        self.assertRegex(received, RECEIVED)
        # Dot-stuffing was undone on the way in and redone on the way out.
        self.assertEqual(msg.raw, stuffed(msg.data))
        self.assertIn(b"MAIL FROM:<sender@client.test> BODY=8BITMIME", fake.commands())

    async def test_pipelined_commands_get_backend_replies_in_order(self) -> None:
        """MAIL, two RCPTs and DATA sent in one write get the backend's replies in
        order, and only the recipient the backend took is in the relayed envelope."""
        def rcpt(conn: Any, line: bytes) -> Optional[str]:
            if b"nobody@" in line:
                return "550 5.1.1 <nobody@example.com>: Recipient address rejected: User unknown"
            return None

        fake, proxy = self.start(FakeBackend(replies={"RCPT": rcpt}))

        def client() -> list[tuple[int, bytes]]:
            with RawClient(proxy.port) as c:
                c.reply()
                c.expect(b"EHLO client.test", 250)
                c.send(b"MAIL FROM:<sender@client.test>\r\nRCPT TO:<nobody@example.com>\r\n"
                       b"RCPT TO:<rcpt@example.com>\r\nDATA\r\n")
                got = [c.reply() for _ in range(4)]
                got.append(c.command(b"Subject: x\r\n\r\nhello\r\n."))
                got.append(c.command(b"QUIT"))
                return got

        got = await self.in_thread(client)
        self.assertEqual([code for code, _ in got], [250, 550, 250, 354, 250, 221])
        self.assertEqual(got[1][1], b"5.1.1 <nobody@example.com>: Recipient address rejected: "
                                    b"User unknown")
        [msg] = fake.messages
        self.assertEqual(msg.recipients, [b"rcpt@example.com"])

    async def test_pooled_connection_replies_stay_in_order_and_current(self) -> None:
        """Across two sessions sharing one pooled backend connection and two
        transactions each, pipelined MAIL/RCPT/DATA get the backend's replies in
        order, each with the text the backend gave that time (repeated texts and
        texts that change are both passed on as sent)."""
        counter = {"n": 0}

        def rcpt(conn: Any, line: bytes) -> Optional[str]:
            counter["n"] += 1
            if counter["n"] % 3 == 0:
                return "550 5.1.1 no such user (try %d)" % counter["n"]
            return "250 2.1.5 fine (try %d)" % counter["n"]

        fake, proxy = self.start(FakeBackend(replies={"RCPT": rcpt, "MAIL": "250 2.1.0 same text"}))

        def session(first: int) -> list[tuple[int, bytes]]:
            got = []
            with RawClient(proxy.port) as c:
                c.reply()
                c.expect(b"EHLO client.test", 250)
                for t in range(2):
                    c.send(b"MAIL FROM:<s@client.test>\r\nRCPT TO:<a@example.com>\r\n"
                           b"RCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n")
                    got += [c.reply() for _ in range(5)]
                    got.append(c.command(b"Subject: t%d\r\n\r\nhi\r\n." % (first + t)))
                got.append(c.command(b"QUIT"))
            return got

        one = await self.in_thread(session, 0)
        two = await self.in_thread(session, 2)
        for got, base in ((one, 0), (two, 6)):
            expected = []
            for t in range(2):
                n = base + 3 * t
                expected += [(250, b"2.1.0 same text"),
                             (250, b"2.1.5 fine (try %d)" % (n + 1)),
                             (250, b"2.1.5 fine (try %d)" % (n + 2)),
                             (550, b"5.1.1 no such user (try %d)" % (n + 3))]
                expected.append((354, got[len(expected)][1]))
                expected.append((250, got[len(expected)][1]))
            expected.append((221, got[-1][1]))
            self.assertEqual(got, expected)
        self.assertEqual(len(fake.connections), 1)
        self.assertEqual([m.recipients for m in fake.messages],
                         [[b"a@example.com", b"b@example.com"]] * 4)

    async def test_backend_rcpt_550_text_reaches_client(self) -> None:
        """A backend's 550 to RCPT reaches the client with its enhanced code and
        text unchanged, and nothing is relayed."""
        text = "5.1.1 <rcpt@example.com>: Recipient address rejected: User unknown in virtual mailbox table"
        fake, proxy = self.start(FakeBackend(replies={"RCPT": "550 " + text}))
        out = await self.in_thread(send_one, proxy.port)
        self.assertEqual(out["rcpt"], [(550, text.encode())])
        self.assertNotIn("data", out)
        self.assertEqual(fake.messages, [])

    async def test_backend_reply_without_enhanced_code_gets_one(self) -> None:
        """A backend reply without an enhanced code reaches the client with the
        generic one of its class, since the proxy announced ENHANCEDSTATUSCODES."""
        fake, proxy = self.start(FakeBackend(replies={"RCPT": "550 no such user here"}))
        out = await self.in_thread(send_one, proxy.port)
        self.assertEqual(out["rcpt"], [(550, b"5.0.0 no such user here")])

    async def test_backend_multiline_reply_reaches_client(self) -> None:
        """A multi-line backend reply reaches the client with every line."""
        fake, proxy = self.start(FakeBackend(replies={
            "RCPT": "550-5.7.1 first line of the refusal\n550 5.7.1 second line, see https://x.test"}))
        out = await self.in_thread(send_one, proxy.port)
        self.assertEqual(out["rcpt"], [(550, b"5.7.1 first line of the refusal\n"
                                              b"5.7.1 second line, see https://x.test")])

    async def test_backend_refuses_message_text_reaches_client(self) -> None:
        """A 554 at the end of data from the backend reaches the client verbatim;
        the next transaction on the same session is relayed."""
        fake, proxy = self.start(FakeBackend(replies={"EOM": "554 5.7.1 Message refused as spam by the fake"}))

        def client() -> tuple[Any, Any]:
            with smtp_client(proxy.port) as s:
                s.ehlo("client.test")
                s.mail("sender@client.test")
                s.rcpt("rcpt@example.com")
                first = s.data(MESSAGE)
                fake.replies.clear()
                s.mail("sender@client.test")
                s.rcpt("rcpt@example.com")
                second = s.data(MESSAGE)
            return first, second

        first, second = await self.in_thread(client)
        self.assertEqual(first, (554, b"5.7.1 Message refused as spam by the fake"))
        self.assertEqual(second[0], 250)
        self.assertEqual([m.accepted for m in fake.messages], [False, True])

    async def test_foreign_recipient_never_reaches_backend(self) -> None:
        """An untrusted client's recipient outside the relay domains gets 554 5.7.1
        from the proxy and the backend never hears that RCPT."""
        fake, proxy = self.start()
        out = await self.in_thread(send_one, proxy.port, MESSAGE, "sender@client.test",
                                   ("victim@elsewhere.test", "user%victim@example.com"))
        self.assertEqual([code for code, _ in out["rcpt"]], [554, 554])
        self.assertFalse([c for c in fake.commands() if c.upper().startswith(b"RCPT")])
        self.assertEqual(fake.messages, [])

    async def test_x_mpp_headers_stripped(self) -> None:
        """X-MPP-* fields (any case, with continuation lines) are removed from the
        header block; look-alikes and the body are left alone."""
        fake, proxy = self.start()
        message = (b"X-MPP-Verdict: clean\r\n"
                   b"Subject: keep me\r\n"
                   b"x-mpp-score: -100\r\n"
                   b"\tfolded continuation of the score\r\n"
                   b"X-Mppish: keep (not the X-MPP- prefix)\r\n"
                   b"X-Mpp-Action: relay\r\n"
                   b"\r\n"
                   b"X-MPP-Verdict: in the body, stays\r\n")
        out = await self.in_thread(send_one, proxy.port, message)
        self.assertEqual(out["data"][0], 250)
        [msg] = fake.messages
        _, rest = msg.split_received()
        self.assertEqual(rest, b"Subject: keep me\r\n"
                               b"X-Mppish: keep (not the X-MPP- prefix)\r\n"
                               b"\r\n"
                               b"X-MPP-Verdict: in the body, stays\r\n")

    async def test_x_mpp_header_stripped_from_headers_only_message(self) -> None:
        """A message that is only a header block loses its X-MPP-* field too."""
        fake, proxy = self.start()
        out = await self.in_thread(send_one, proxy.port,
                                   b"Subject: no body\r\nX-MPP-Verdict: clean\r\n")
        self.assertEqual(out["data"][0], 250)
        [msg] = fake.messages
        _, rest = msg.split_received()
        self.assertEqual(rest, b"Subject: no body\r\n")

    async def test_large_message_relayed_intact(self) -> None:
        """A 5 MiB message (spooled to disk on the way) reaches the backend with
        the same SHA-256, dot lines included."""
        fake, proxy = self.start()
        line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/0123456789ab\r\n"
        body = bytearray(b"Subject: large\r\n\r\n")
        i = 0
        while len(body) < 5 * 1024 * 1024:
            body += b"." + line if i % 997 == 0 else line
            i += 1
        message = bytes(body)
        expected = hashlib.sha256(message).hexdigest()
        out = await self.in_thread(send_one, proxy.port, message)
        self.assertEqual(out["data"][0], 250)
        [msg] = fake.messages
        _, rest = msg.split_received()
        self.assertEqual(len(rest), len(message))
        self.assertEqual(hashlib.sha256(rest).hexdigest(), expected)


class BackendFailureTests(RelayCase):

    async def test_backend_unreachable_4xx_at_mail(self) -> None:
        """With nothing listening at the backend's address the client gets a 4xx
        to MAIL, before it could send a body, and EHLO promises no 8BITMIME."""
        fake, proxy = self.start(backend_port=free_port(), backend={"connect_timeout": 2.0})

        def client() -> list[tuple[int, bytes]]:
            with RawClient(proxy.port) as c:
                c.reply()
                got = [c.command(b"EHLO client.test"),
                       c.command(b"MAIL FROM:<sender@client.test>"),
                       c.command(b"RCPT TO:<rcpt@example.com>"),
                       c.command(b"DATA"),
                       c.command(b"QUIT")]
                return got

        ehlo, mail, rcpt, data, quit_ = await self.in_thread(client)
        self.assertEqual(ehlo[0], 250)
        self.assertNotIn(b"8BITMIME", ehlo[1])
        self.assertEqual(mail[0], 451)
        self.assertTrue(mail[1].startswith(b"4.4.1 "), mail)
        self.assertEqual(rcpt[0], 503)
        self.assertNotEqual(data[0], 354)
        self.assertEqual(quit_[0], 221)

    async def _drop_mid_data(self, abort: bool) -> None:
        fake = FakeBackend(drop_at="CONTENT", drop_after_bytes=20000, abort_on_drop=abort)
        fake, proxy = self.start(fake)
        message = b"Subject: dropped\r\n\r\n" + b"x" * 998 + b"\r\n"
        message = message * 200

        def client() -> tuple[Any, Any]:
            with smtp_client(proxy.port) as s:
                s.ehlo("client.test")
                s.mail("sender@client.test")
                s.rcpt("rcpt@example.com")
                first = s.data(message)
                fake.drop_at = None
                s.mail("sender@client.test")
                s.rcpt("rcpt@example.com")
                second = s.data(message)
            return first, second

        first, second = await self.in_thread(client)
        self.assertEqual(first[0], 451, first)
        self.assertEqual(fake.drops, 1)
        self.assertEqual(second[0], 250, second)
        [msg] = fake.messages
        self.assertTrue(msg.accepted)

    async def test_backend_closes_mid_data(self) -> None:
        """The backend closing (FIN) in the middle of the message gives the client
        451 at the end of data, nothing is delivered, and the session goes on."""
        await self._drop_mid_data(abort=False)

    async def test_backend_resets_mid_data(self) -> None:
        """The backend resetting (RST) in the middle of the message gives the
        client 451 at the end of data, nothing is delivered, and the session goes on."""
        await self._drop_mid_data(abort=True)

    async def test_backend_drops_after_message_before_reply(self) -> None:
        """The backend closing after the whole message but before its reply gives
        the client a 4xx: the message is never reported delivered."""
        fake, proxy = self.start(FakeBackend(drop_at="EOM"))
        out = await self.in_thread(send_one, proxy.port)
        self.assertEqual(out["data"][0], 451, out)
        [msg] = fake.messages
        self.assertIsNone(msg.reply)

    async def test_backend_rcpt_timeout_is_4xx(self) -> None:
        """A backend that never answers RCPT gives the client 451 4.4.2 after
        backend.rcpt_timeout, and the stuck connection is closed."""
        fake, proxy = self.start(FakeBackend(delays={"RCPT": None}),
                                 backend={"rcpt_timeout": 0.5})
        t0 = time.monotonic()
        out = await self.in_thread(send_one, proxy.port)
        self.assertLess(time.monotonic() - t0, 5.0)
        [rcpt] = out["rcpt"]
        self.assertEqual(rcpt[0], 451)
        self.assertTrue(rcpt[1].startswith(b"4.4.2 "), rcpt)
        await fake.wait_until(lambda: not fake.open_connections, 5.0, "stuck backend session closed")
        self.assertEqual(fake.messages, [])

    async def test_backend_end_of_data_timeout_is_4xx(self) -> None:
        """A backend that takes the message but never answers gives the client
        451 after backend.data_done_timeout, never 250."""
        fake, proxy = self.start(FakeBackend(delays={"EOM": None}),
                                 backend={"data_done_timeout": 0.5})
        out = await self.in_thread(send_one, proxy.port)
        self.assertEqual(out["data"][0], 451, out)
        self.assertEqual([m.reply for m in fake.messages], [None])

    async def test_backend_greeting_timeout_is_4xx_at_mail(self) -> None:
        """A backend that accepts the connection but never greets gives the client
        a 4xx to MAIL after backend.greeting_timeout."""
        fake, proxy = self.start(FakeBackend(delays={"GREETING": None}),
                                 backend={"greeting_timeout": 0.5})
        out = await self.in_thread(send_one, proxy.port)
        self.assertEqual(out["ehlo"][0], 250)
        self.assertEqual(out["mail"][0], 451, out)
        self.assertEqual(fake.messages, [])

    async def test_backend_421_at_mail_is_4xx_then_recovers(self) -> None:
        """A backend's 421 to MAIL reaches the client as a 4xx (never a 5xx), and
        the next MAIL of the session gets a fresh backend connection."""
        fake, proxy = self.start(FakeBackend(replies={"MAIL": "421 4.3.2 fake.backend Service shutting down"}))

        def client() -> tuple[Any, Any, Any]:
            with smtp_client(proxy.port) as s:
                s.ehlo("client.test")
                first = s.mail("sender@client.test")
                fake.replies.clear()
                second = s.mail("sender@client.test")
                s.rcpt("rcpt@example.com")
                data = s.data(MESSAGE)
            return first, second, data

        first, second, data = await self.in_thread(client)
        self.assertEqual(first[0], 451, first)
        self.assertIn(b"Service shutting down", first[1])
        self.assertEqual(second[0], 250, second)
        self.assertEqual(data[0], 250, data)
        self.assertEqual(len(fake.messages), 1)

    async def test_rset_pipelined_with_mail_is_relayed(self) -> None:
        """RSET and MAIL pipelined in one write (RFC 2920) after an open
        transaction: the new MAIL is relayed after the backend's RSET, not refused
        with a local 451 (pool_size 0: the connection was not reused, so no retry
        hides the problem)."""
        fake, proxy = self.start(backend={"pool_size": 0})

        def client() -> list[tuple[int, bytes]]:
            with RawClient(proxy.port) as c:
                c.reply()
                c.expect(b"EHLO client.test", 250)
                c.expect(b"MAIL FROM:<first@client.test>", 250)
                c.expect(b"RCPT TO:<first@example.com>", 250)
                c.send(b"RSET\r\nMAIL FROM:<second@client.test>\r\n")
                got = [c.reply(), c.reply()]
                got.append(c.command(b"RCPT TO:<second@example.com>"))
                got.append(c.command(b"DATA"))
                got.append(c.command(b"Subject: after RSET\r\n\r\nhi\r\n."))
                c.command(b"QUIT")
                return got

        got = await self.in_thread(client)
        self.assertEqual([code for code, _ in got], [250, 250, 250, 354, 250], got)
        [msg] = fake.messages
        self.assertEqual((msg.sender, msg.recipients), (b"second@client.test", [b"second@example.com"]))

    async def test_rset_then_mail_at_once_is_relayed(self) -> None:
        """MAIL sent as soon as the proxy answered RSET (which it does before the
        backend answered its own RSET) is relayed, not refused with a local 451,
        also on a backend connection that was not reused (pool_size 0)."""
        fake, proxy = self.start(FakeBackend(delays={"RSET": 0.3}), backend={"pool_size": 0})

        def client() -> list[Any]:
            with smtp_client(proxy.port) as s:
                s.ehlo("client.test")
                s.mail("first@client.test")
                s.rcpt("first@example.com")
                s.rset()
                got = [s.mail("second@client.test"), s.rcpt("second@example.com")]
                if got[1][0] == 250:
                    got.append(s.data(MESSAGE))
            return got

        got = await self.in_thread(client)
        self.assertEqual([code for code, _ in got], [250, 250, 250], got)

    async def test_pooled_connection_dropped_at_mail_is_retried(self) -> None:
        """When a reused backend connection turns out dead at MAIL, one fresh
        connection is tried and the client never notices."""
        fake, proxy = self.start(FakeBackend(drop_at=lambda conn, verb: verb == "MAIL" and conn.index == 0))
        out = await self.in_thread(send_one, proxy.port)
        self.assertEqual(out["mail"][0], 250, out)
        self.assertEqual(out["data"][0], 250, out)
        self.assertEqual(len(fake.connections), 2)
        self.assertEqual(len(fake.messages), 1)

    async def test_idle_backend_421_then_next_session_relays(self) -> None:
        """An idle pooled connection the backend closes with an unsolicited 421 is
        not reused; the next session is relayed on a new connection."""
        fake, proxy = self.start()
        first = await self.in_thread(send_one, proxy.port)
        self.assertEqual(first["data"][0], 250)
        fake.close_idle()
        await fake.wait_until(lambda: not fake.open_connections, 5.0, "backend sessions closed")
        second = await self.in_thread(send_one, proxy.port)
        self.assertEqual(second["mail"][0], 250, second)
        self.assertEqual(second["data"][0], 250, second)
        self.assertEqual(len(fake.messages), 2)
        self.assertEqual(len(fake.connections), 2)

    async def test_backend_tls_required_but_not_offered_is_4xx(self) -> None:
        """With backend.tls = "required" and a backend that offers no STARTTLS,
        MAIL gets 451 4.7.5 and nothing is relayed in clear."""
        fake, proxy = self.start(backend={"tls": "required"})
        out = await self.in_thread(send_one, proxy.port)
        self.assertEqual(out["mail"][0], 451, out)
        self.assertTrue(out["mail"][1].startswith(b"4.7.5"), out)
        self.assertNotIn("MAIL", fake.verbs())


class MoreBackendFailureTests(RelayCase):

    async def test_backend_refuses_data_command_then_next_transaction(self) -> None:
        """A backend's 452 to the DATA command reaches the client after its
        message, and the client's next transaction in the same session is relayed
        (the backend's half-open transaction is reset first, no nested MAIL)."""
        fake, proxy = self.start(FakeBackend(replies={"DATA": "452 4.3.1 Insufficient system storage"}))

        def client() -> list[Any]:
            with smtp_client(proxy.port) as s:
                s.ehlo("client.test")
                got = [s.mail("sender@client.test"), s.rcpt("rcpt@example.com"), s.data(MESSAGE)]
                fake.replies.clear()
                got += [s.mail("second@client.test"), s.rcpt("second@example.com")]
                if got[-1][0] == 250:
                    got.append(s.data(MESSAGE))
            return got

        got = await self.in_thread(client)
        self.assertEqual(got[2], (452, b"4.3.1 Insufficient system storage"))
        self.assertEqual([code for code, _ in got[3:]], [250, 250, 250], got)
        [msg] = fake.messages
        self.assertEqual((msg.sender, msg.recipients), (b"second@client.test", [b"second@example.com"]))

    async def test_out_of_protocol_codes_are_4xx(self) -> None:
        """A 2xx to DATA, a 354 after the dot or a 3xx to MAIL never reaches the
        client as success: it gets 451 4.5.0 and keeps its message."""
        for replies, step in (({"DATA": "250 2.0.0 sure"}, "data"),
                              ({"EOM": "354 huh"}, "data"),
                              ({"MAIL": "354 what"}, "mail")):
            fake, proxy = self.start(FakeBackend(replies=replies))
            out = await self.in_thread(send_one, proxy.port)
            got = out[step] if step == "data" else out["mail"]
            self.assertEqual(got[0], 451, (replies, out))
            self.assertTrue(got[1].startswith(b"4.5.0 "), out)

    async def test_backend_garbage_reply_is_4xx(self) -> None:
        """A backend answering RCPT with something that is not an SMTP reply gives
        the client 451, and its connection is closed."""
        fake, proxy = self.start(FakeBackend(replies={"RCPT": "this is not SMTP"}))
        out = await self.in_thread(send_one, proxy.port)
        self.assertEqual(out["rcpt"][0][0], 451, out)
        await fake.wait_until(lambda: not fake.open_connections, 5.0, "backend session closed")

    async def test_large_message_backend_drops_midway(self) -> None:
        """The backend vanishing while a 5 MiB message is streamed to it (the
        proxy's writes backed up) gives the client 451, promptly."""
        fake, proxy = self.start(FakeBackend(drop_at="CONTENT", drop_after_bytes=300000, abort_on_drop=True))
        message = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 5300
        t0 = time.monotonic()
        out = await self.in_thread(send_one, proxy.port, message)
        self.assertEqual(out["data"][0], 451, out)
        self.assertLess(time.monotonic() - t0, 20.0)
        self.assertEqual(fake.messages, [])

    async def test_backend_stops_reading_data_block_timeout(self) -> None:
        """A backend that stops reading in the middle of a large message gives the
        client a 4xx after about backend.data_block_timeout, never 250."""
        fake, proxy = self.start(FakeBackend(stall_after_bytes=200000),
                                 backend={"data_block_timeout": 1.0})
        message = b"Subject: stalled\r\n\r\n" + (b"z" * 998 + b"\r\n") * 8000
        t0 = time.monotonic()
        out = await self.in_thread(send_one, proxy.port, message)
        self.assertEqual(out["data"][0] // 100, 4, out)
        self.assertLess(time.monotonic() - t0, 20.0)
        self.assertEqual(fake.messages, [])

    async def test_message_over_backend_size_refused_before_backend_data(self) -> None:
        """A message larger than the backend's SIZE (no SIZE= given) is refused by
        the proxy with 552 and the backend never gets DATA."""
        fake, proxy = self.start(FakeBackend(extensions=("SIZE 100000", "8BITMIME")))
        message = b"Subject: too big\r\n\r\n" + (b"w" * 998 + b"\r\n") * 150
        out = await self.in_thread(send_one, proxy.port, message)
        self.assertEqual(out["data"][0], 552, out)
        self.assertNotIn("DATA", fake.verbs())
        self.assertEqual(fake.messages, [])

    async def test_client_vanishes_while_backend_answers_data(self) -> None:
        """A client that disconnects while the backend is still answering its
        message does not leave that backend connection in the pool; the next
        session is relayed normally."""
        fake, proxy = self.start(FakeBackend(delays={"EOM": 0.5}))

        def vanish() -> None:
            with RawClient(proxy.port) as c:
                c.reply()
                c.expect(b"EHLO client.test", 250)
                c.expect(b"MAIL FROM:<gone@client.test>", 250)
                c.expect(b"RCPT TO:<rcpt@example.com>", 250)
                c.expect(b"DATA", 354)
                c.send(b"Subject: gone\r\n\r\nbye\r\n.\r\n")
                time.sleep(0.1)

        await self.in_thread(vanish)
        await fake.wait_until(lambda: fake.messages, 5.0, "message at the backend")
        fake.delays.clear()
        out = await self.in_thread(send_one, proxy.port)
        self.assertEqual(out["data"][0], 250, out)
        self.assertEqual(fake.messages[-1].sender, b"sender@client.test")
        self.assertTrue(fake.messages[-1].accepted)

    async def test_client_gone_before_final_dot_abandons_message(self) -> None:
        """When the client hangs up while its large message is still being sent
        to a slow backend, the proxy never sends the final dot: the backend does
        not deliver a message whose sender will retry it."""
        fake, proxy = self.start(FakeBackend(stall_after_bytes=200_000))
        body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 5000

        def send_and_vanish() -> None:
            with RawClient(proxy.port) as c:
                c.reply()
                c.expect(b"EHLO client.test", 250)
                c.expect(b"MAIL FROM:<big@client.test>", 250)
                c.expect(b"RCPT TO:<rcpt@example.com>", 250)
                c.expect(b"DATA", 354)
                c.send(body + b".\r\n")
                time.sleep(0.5)

        await self.in_thread(send_and_vanish)
        await fake.wait_until(lambda: fake.connections and fake.connections[0].stalled, 5.0, "stall")
        fake.connections[0].transport.resumeProducing()
        await fake.wait_until(lambda: not fake.open_connections, 10.0, "backend connection dropped")
        self.assertEqual([m for m in fake.messages if m.accepted], [])

    async def test_concurrent_sessions_keep_their_envelopes(self) -> None:
        """Eight sessions relayed at once each reach the backend with their own
        sender, recipient and body."""
        fake, proxy = self.start(FakeBackend(delays={"RCPT": 0.05, "EOM": 0.05}))

        def session(i: int) -> Any:
            body = b"Subject: concurrent %d\r\n\r\n" % i + ((b"%d " % i) * 50 + b"\r\n") * 100
            return send_one(proxy.port, body, f"s{i}@client.test", (f"r{i}@example.com",))

        from twisted.internet import defer
        outs = await defer.gatherResults([deferToThread(session, i) for i in range(8)])
        self.assertEqual([o["data"][0] for o in outs], [250] * 8)
        self.assertEqual(len(fake.messages), 8)
        for msg in fake.messages:
            i = int(msg.sender[1:msg.sender.index(b"@")])
            self.assertEqual(msg.recipients, [b"r%d@example.com" % i])
            self.assertTrue(msg.split_received()[1].startswith(b"Subject: concurrent %d\r\n" % i))
            self.assertTrue(msg.data.endswith(((b"%d " % i) * 50 + b"\r\n") * 100))


class ConnectionReuseTests(RelayCase):

    async def test_two_sessions_share_one_backend_connection(self) -> None:
        """Two sequential client sessions are relayed over one backend connection."""
        fake, proxy = self.start()
        for _ in range(2):
            out = await self.in_thread(send_one, proxy.port)
            self.assertEqual(out["data"][0], 250)
        self.assertEqual(len(fake.connections), 1)
        self.assertEqual([m.connection for m in fake.messages], [0, 0])
        self.assertEqual(proxy.pool.opened, 1)

    async def test_open_transaction_is_reset_before_reuse(self) -> None:
        """A session that ends after MAIL and RCPT leaves no trace in the next
        session's transaction: the backend hears RSET first, and the relayed
        envelope holds only the second session's recipient."""
        fake, proxy = self.start()

        def abandoned() -> None:
            with smtp_client(proxy.port) as s:
                s.ehlo("client.test")
                s.mail("first@client.test")
                s.rcpt("first@example.com")

        await self.in_thread(abandoned)
        await fake.wait_until(lambda: "RSET" in fake.verbs(), 5.0, "RSET at the backend")
        out = await self.in_thread(send_one, proxy.port, MESSAGE, "second@client.test",
                                   ("second@example.com",))
        self.assertEqual(out["data"][0], 250)
        [msg] = fake.messages
        self.assertEqual((msg.sender, msg.recipients), (b"second@client.test", [b"second@example.com"]))
        verbs = fake.verbs()
        self.assertLess(verbs.index("RSET"), len(verbs) - 1 - verbs[::-1].index("MAIL"))
        self.assertEqual(len(fake.connections), 1)

    async def test_client_gone_while_mail_pending_leaves_clean_connection(self) -> None:
        """A client that disconnects while its MAIL is still at the backend does
        not leave that transaction open for the next session on the connection."""
        fake, proxy = self.start(FakeBackend(delays={"MAIL": 0.5}))

        def vanish() -> None:
            c = RawClient(proxy.port)
            c.reply()
            c.expect(b"EHLO client.test", 250)
            c.send(b"MAIL FROM:<gone@client.test>\r\n")
            c.close()

        await self.in_thread(vanish)
        await fake.wait_until(lambda: "MAIL" in fake.verbs(), 5.0, "first MAIL at the backend")
        fake.delays.clear()
        out = await self.in_thread(send_one, proxy.port, MESSAGE, "second@client.test",
                                   ("second@example.com",))
        self.assertEqual(out["mail"][0], 250, out)
        self.assertEqual(out["data"][0], 250, out)
        [msg] = fake.messages
        self.assertEqual((msg.sender, msg.recipients), (b"second@client.test", [b"second@example.com"]))

    async def test_connection_with_pending_rset_not_handed_out(self) -> None:
        """A backend connection whose RSET is still unanswered is not used for the
        next session's MAIL: the next session is relayed with its own envelope."""
        fake, proxy = self.start(FakeBackend(delays={"RSET": 1.0}))

        def abandoned() -> None:
            with smtp_client(proxy.port) as s:
                s.ehlo("client.test")
                s.mail("first@client.test")
                s.rcpt("first@example.com")

        await self.in_thread(abandoned)
        out = await self.in_thread(send_one, proxy.port, MESSAGE, "second@client.test",
                                   ("second@example.com",))
        self.assertEqual(out["mail"][0], 250, out)
        self.assertEqual(out["data"][0], 250, out)
        [msg] = fake.messages
        self.assertEqual((msg.sender, msg.recipients), (b"second@client.test", [b"second@example.com"]))
        for conn in fake.connections:
            # On no connection may a MAIL follow the first session's RCPT without
            # the RSET in between.
            cmds = [c.split(b" ", 1)[0].upper() for c in conn.commands]
            if b"RCPT" in cmds:
                tail = cmds[cmds.index(b"RCPT") + 1:]
                if b"MAIL" in tail:
                    self.assertIn(b"RSET", tail[:tail.index(b"MAIL")])


class ExtensionTests(RelayCase):

    async def _ehlo(self, port: int) -> list[bytes]:
        def client() -> list[bytes]:
            with RawClient(port) as c:
                c.reply()
                code, text = c.command(b"EHLO client.test")
                c.command(b"QUIT")
            assert code == 250, (code, text)
            return text.split(b"\n")[1:]

        return await self.in_thread(client)

    async def test_only_backend_extensions_announced(self) -> None:
        """Against a backend with SIZE 1000000 and no 8BITMIME/SMTPUTF8/DSN the
        proxy announces SIZE 1000000 less room for its Received: header, and none
        of the three."""
        fake, proxy = self.start(FakeBackend(extensions=("PIPELINING", "SIZE 1000000", "ENHANCEDSTATUSCODES")))
        lines = await self._ehlo(proxy.port)
        self.assertIn(b"SIZE %d" % (1000000 - RECEIVED_ALLOWANCE), lines)
        for ext in (b"8BITMIME", b"SMTPUTF8", b"DSN", b"STARTTLS"):
            self.assertNotIn(ext, [ln.split(b" ")[0] for ln in lines])

    async def test_size_is_the_smaller_limit(self) -> None:
        """SIZE is the smaller of the backend's and limits.max_message_size."""
        fake, proxy = self.start(FakeBackend(extensions=("SIZE 100000000", "8BITMIME")),
                                 limits={"max_message_size": 2000000})
        lines = await self._ehlo(proxy.port)
        self.assertIn(b"SIZE 2000000", lines)
        self.assertIn(b"8BITMIME", lines)

    async def test_backend_size_without_value_means_our_limit(self) -> None:
        """A backend's SIZE without a number (no fixed limit, RFC 1870) leaves the
        proxy's own limit."""
        fake, proxy = self.start(FakeBackend(extensions=("SIZE",)), limits={"max_message_size": 3000000})
        lines = await self._ehlo(proxy.port)
        self.assertIn(b"SIZE 3000000", lines)

    async def test_unsupported_parameters_refused_before_backend(self) -> None:
        """BODY=8BITMIME and a SIZE= over the backend's SIZE are refused by the
        proxy at MAIL; the backend never hears those MAIL commands."""
        fake, proxy = self.start(FakeBackend(extensions=("SIZE 1000000",)))

        def client() -> list[tuple[int, bytes]]:
            with RawClient(proxy.port) as c:
                c.reply()
                c.expect(b"EHLO client.test", 250)
                got = [c.command(b"MAIL FROM:<a@client.test> BODY=8BITMIME"),
                       c.command(b"MAIL FROM:<a@client.test> SIZE=2000000"),
                       c.command(b"MAIL FROM:<a@client.test> SMTPUTF8")]
                c.command(b"QUIT")
                return got

        got = await self.in_thread(client)
        self.assertEqual([code // 100 for code, _ in got], [5, 5, 5])
        self.assertEqual(got[1][0], 552)
        self.assertNotIn("MAIL", fake.verbs())

    async def test_dsn_parameters_passed_through(self) -> None:
        """With a backend that offers DSN, RET/ENVID and NOTIFY/ORCPT reach it as sent."""
        fake, proxy = self.start(FakeBackend(extensions=("SIZE 1000000", "DSN", "8BITMIME")))

        def client() -> None:
            with smtp_client(proxy.port) as s:
                s.ehlo("client.test")
                assert s.has_extn("dsn")
                assert s.mail("a@client.test", ["RET=HDRS", "ENVID=abc123"])[0] == 250
                assert s.rcpt("rcpt@example.com", ["NOTIFY=SUCCESS,FAILURE",
                                                   "ORCPT=rfc822;rcpt@example.com"])[0] == 250

        await self.in_thread(client)
        cmds = fake.commands()
        self.assertIn(b"MAIL FROM:<a@client.test> RET=HDRS ENVID=abc123", cmds)
        self.assertIn(b"RCPT TO:<rcpt@example.com> NOTIFY=SUCCESS,FAILURE "
                      b"ORCPT=rfc822;rcpt@example.com", cmds)


class ClientAnnouncementTests(RelayCase):

    async def test_xforward_sent_when_configured_and_offered(self) -> None:
        """With backend.xforward and a backend offering XFORWARD, each transaction
        starts with XFORWARD naming the real client (only offered attributes, xtext)."""
        fake, proxy = self.start(FakeBackend(extensions=DEFAULT_X + ("XFORWARD NAME ADDR PROTO HELO",)),
                                 backend={"xforward": True})

        def client() -> None:
            with smtplib.SMTP("127.0.0.1", proxy.port, local_hostname="odd_helo-name",
                              timeout=CLIENT_TIMEOUT) as s:
                s.ehlo()
                for _ in range(2):
                    s.mail("a@client.test")
                    s.rcpt("rcpt@example.com")
                    assert s.data(MESSAGE)[0] == 250

        await self.in_thread(client)
        xf = [c for c in fake.commands() if c.startswith(b"XFORWARD")]
        self.assertEqual(xf, [b"XFORWARD NAME=[UNAVAILABLE] ADDR=127.0.0.1 PROTO=ESMTP "
                              b"HELO=odd_helo-name"] * 2)
        verbs = fake.verbs()
        for i, v in enumerate(verbs):
            if v == "MAIL":
                self.assertEqual(verbs[i - 1], "XFORWARD")

    async def test_xforward_not_sent_unless_offered(self) -> None:
        """backend.xforward does nothing against a backend without XFORWARD."""
        fake, proxy = self.start(backend={"xforward": True})
        out = await self.in_thread(send_one, proxy.port)
        self.assertEqual(out["data"][0], 250)
        self.assertNotIn("XFORWARD", fake.verbs())

    async def test_xforward_not_sent_unless_configured(self) -> None:
        """A backend offering XFORWARD gets none unless backend.xforward is set."""
        fake, proxy = self.start(FakeBackend(extensions=DEFAULT_X + ("XFORWARD NAME ADDR PROTO HELO",)))
        out = await self.in_thread(send_one, proxy.port)
        self.assertEqual(out["data"][0], 250)
        self.assertNotIn("XFORWARD", fake.verbs())

    async def test_xclient_sent_then_ehlo_again(self) -> None:
        """With backend.xclient and a backend offering XCLIENT, the proxy sends
        XCLIENT, greets again with EHLO in the client's own name, then MAIL."""
        fake, proxy = self.start(FakeBackend(extensions=DEFAULT_X + ("XCLIENT NAME ADDR PORT PROTO HELO",)),
                                 backend={"xclient": True})
        out = await self.in_thread(send_one, proxy.port)
        self.assertEqual(out["data"][0], 250)
        cmds = fake.connections[0].commands
        i = next(i for i, c in enumerate(cmds) if c.startswith(b"XCLIENT "))
        self.assertRegex(cmds[i], rb"^XCLIENT NAME=\[UNAVAILABLE\] ADDR=127\.0\.0\.1 PORT=\d+ "
                                  rb"PROTO=ESMTP HELO=client\.test$")
        self.assertEqual(cmds[i + 1], b"EHLO client.test")
        self.assertTrue(cmds[i + 2].startswith(b"MAIL FROM:"))

