"""SMTP smuggling through the proxy (docs/design.md promise 2: one message in, at most one out).

Each case sends, after ``DATA``, a legitimate message whose end is a look-alike
terminator followed by a whole second transaction (``MAIL FROM:<smuggled@evil.test>``,
``RCPT``, ``DATA``, content) and then the real ``CRLF . CRLF``.  The backend is the
fake MTA in its *lenient* mode: it ends DATA at any line break, dot, line break, as
the MTAs smuggling exploits do, so any look-alike the proxy let through would show up
there as a second MAIL FROM.  Cases run with ``smtp.bare_newline = "reject"`` (the
default: the message is refused with 550 5.5.2 and the session closed) and
``"normalise"`` (the proxy itself takes the look-alike as the end, so the rest is the
client's own next transaction, which the client sees answered and which is relayed as
a message of its own, CRLF only).  Each variant is sent in one write and a byte at a
time.  Modelled on aiosmtpd's ``tests/test_smtpsmuggling.py``.
"""
from __future__ import annotations

import re
import select
import socket
import time
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from fakes_backend import FakeBackend, ReceivedMessage
from loopback import RawClient, proxy_config, start_proxy, wait_reactor_quiet

LEGIT = (b"From: <legit@client.test>\r\n"
         b"To: <rcpt@example.com>\r\n"
         b"Subject: legit\r\n"
         b"\r\n"
         b"legit body")
SMUGGLED_CONTENT = (b"From: <smuggled@evil.test>\r\n"
                    b"To: <victim@example.com>\r\n"
                    b"Subject: smuggled\r\n"
                    b"\r\n"
                    b"smuggled body\r\n")
SMUGGLED = (b"MAIL FROM:<smuggled@evil.test>\r\n"
            b"RCPT TO:<victim@example.com>\r\n"
            b"DATA\r\n" + SMUGGLED_CONTENT)

# name: (payload after 354 up to and including the real CRLF.CRLF,
#        has a bare CR or LF,
#        what the proxy relays first in normalise mode (None: the whole payload is one message))
VARIANTS: dict[str, tuple[bytes, bool, Any]] = {
    "lf_dot_lf": (LEGIT + b"\n.\n" + SMUGGLED + b".\r\n", True, LEGIT + b"\r\n"),
    "lf_dot_crlf": (LEGIT + b"\n.\r\n" + SMUGGLED + b".\r\n", True, LEGIT + b"\r\n"),
    "cr_dot_cr": (LEGIT + b"\r.\r" + SMUGGLED + b".\r\n", True, LEGIT + b"\r\n"),
    "crlf_dot_cr": (LEGIT + b"\r\n.\r" + SMUGGLED + b".\r\n", True, LEGIT + b"\r\n"),
    "cr_dot_crlf": (LEGIT + b"\r.\r\n" + SMUGGLED + b".\r\n", True, LEGIT + b"\r\n"),
    "crlf_dot_lf": (LEGIT + b"\r\n.\n" + SMUGGLED + b".\r\n", True, LEGIT + b"\r\n"),
    "crlf_nul_dot_crlf": (LEGIT + b"\r\n\x00.\r\n" + SMUGGLED + b".\r\n", False, None),
    "dot_lf_at_start": (b".\n" + SMUGGLED + b".\r\n", True, b""),
    "dot_stuffed_lines": (LEGIT + b"\r\n..\r\n...\r\n" + SMUGGLED + b"..\r\n.\r\n", False, None),
}
# Variants refused for a NUL in the content (RFC 5322 2.3): a backend that
# strips NULs would otherwise see "CRLF . CRLF" there.  The session goes on.
NUL_VARIANTS = {"crlf_nul_dot_crlf"}
DOCS = {
    "lf_dot_lf": "LF . LF",
    "lf_dot_crlf": "LF . CRLF",
    "cr_dot_cr": "CR . CR",
    "crlf_dot_cr": "CRLF . CR",
    "cr_dot_crlf": "CR . CRLF",
    "crlf_dot_lf": "CRLF . LF",
    "crlf_nul_dot_crlf": "CRLF NUL . CRLF",
    "dot_lf_at_start": ". LF at the start of the data",
    "dot_stuffed_lines": "dot-stuffed lines (.. and ...) around the smuggled text",
}

_ANY_END = re.compile(rb"(?:\r\n|\n|\r)\.(?:\r\n|\n|\r)")


def unstuff(payload: bytes) -> bytes:
    """The content of a CRLF-only payload that ends with CRLF.CRLF."""
    assert payload.endswith(b"\r\n.\r\n") or payload == b".\r\n"
    body = (b"\r\n" + payload[:-3])
    return body.replace(b"\r\n.", b"\r\n")[2:]


def assert_one_clean_message(case: unittest.TestCase, msg: ReceivedMessage) -> None:
    """What the proxy sent has CRLF line ends only and, read as leniently as
    any MTA might, exactly one end of data: its last line."""
    raw = msg.raw
    case.assertEqual(raw.count(b"\r"), raw.count(b"\r\n"), raw)
    case.assertEqual(raw.count(b"\n"), raw.count(b"\r\n"), raw)
    ends = [m.end() for m in _ANY_END.finditer(b"\r\n" + raw)]
    case.assertEqual(ends, [len(raw) + 2], raw)


def client_session(port: int, payload: bytes, bytewise: bool) -> list[tuple[int, bytes]]:
    """Greet, one transaction, the payload and QUIT; every reply after 354."""
    with RawClient(port) as c:
        c.reply()
        c.expect(b"EHLO client.test", 250)
        c.expect(b"MAIL FROM:<legit@client.test>", 250)
        c.expect(b"RCPT TO:<rcpt@example.com>", 250)
        c.expect(b"DATA", 354)
        data = payload + b"QUIT\r\n"
        try:
            if bytewise:
                for i in range(len(data)):
                    # Like a real client: stop talking once the server has
                    # closed the connection (after refusing a bare newline).
                    if (select.select([c.sock], [], [], 0)[0]
                            and c.sock.recv(1, socket.MSG_PEEK) == b""):
                        break
                    c.send(data[i:i + 1])
                    time.sleep(0.0005)
            else:
                c.send(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return c.replies_until_close(limit=50)


class SmugglingCase(unittest.TestCase):
    timeout = 60
    bare_newline = "reject"

    def setUp(self) -> None:
        wait_reactor_quiet(self)

    async def relay(self, payload: bytes, bytewise: bool) -> tuple[list[tuple[int, bytes]], FakeBackend]:
        fake = FakeBackend(lenient_end=True)
        port = fake.start_for(self)
        proxy = start_proxy(self, proxy_config(self.mktemp(), port,
                                               smtp={"bare_newline": self.bare_newline}))
        replies = await deferToThread(client_session, proxy.port, payload, bytewise)
        # The proxy may still be tidying the backend connection (RSET, QUIT).
        await fake.wait_until(lambda: True, 0.1)
        return replies, fake

    def body_of(self, msg: ReceivedMessage) -> bytes:
        return msg.split_received()[1]

    def assert_refused_for_nul(self, replies: list[tuple[int, bytes]], fake: FakeBackend) -> None:
        self.assertEqual([code for code, _ in replies], [550, 221], replies)
        self.assertTrue(replies[0][1].startswith(b"5.6.0 "), replies)
        self.assertEqual(fake.messages, [])


class StrictSmugglingTests(SmugglingCase):
    """``smtp.bare_newline = "reject"`` (the default)."""

    async def check(self, name: str, bytewise: bool) -> None:
        payload, bare, _ = VARIANTS[name]
        replies, fake = await self.relay(payload, bytewise)
        self.assertNotIn(b"smuggled@evil.test", b"\n".join(fake.commands()))
        if name in NUL_VARIANTS:
            self.assert_refused_for_nul(replies, fake)
            return
        self.assertEqual(fake.senders(), [b"legit@client.test"])
        if bare:
            # Refused, and the session closed: nothing after the look-alike is
            # ever read as a command.
            self.assertEqual([code for code, _ in replies], [550], replies)
            self.assertTrue(replies[0][1].startswith(b"5.5.2 "), replies)
            self.assertEqual(fake.messages, [])
            self.assertNotIn("DATA", fake.verbs())
        else:
            self.assertEqual([code for code, _ in replies], [250, 221], replies)
            [msg] = fake.messages
            self.assertTrue(msg.accepted)
            self.assertEqual(self.body_of(msg), unstuff(payload))
            assert_one_clean_message(self, msg)


class NormaliseSmugglingTests(SmugglingCase):
    """``smtp.bare_newline = "normalise"``."""

    bare_newline = "normalise"

    async def check(self, name: str, bytewise: bool) -> None:
        payload, bare, first = VARIANTS[name]
        replies, fake = await self.relay(payload, bytewise)
        if name in NUL_VARIANTS:
            self.assert_refused_for_nul(replies, fake)
            return
        codes = [code for code, _ in replies]
        for msg in fake.messages:
            assert_one_clean_message(self, msg)
        if first is None:
            self.assertEqual(codes, [250, 221], replies)
            [msg] = fake.messages
            self.assertEqual(self.body_of(msg), unstuff(payload))
            self.assertEqual(fake.senders(), [b"legit@client.test"])
            return
        # The proxy took the look-alike for the end, as the backend will: the
        # rest is the client's next transaction, answered to the client and
        # relayed as its own message, never hidden inside the first.
        self.assertEqual(codes, [250, 250, 250, 354, 250, 221], replies)
        self.assertEqual(fake.senders(), [b"legit@client.test", b"smuggled@evil.test"])
        first_msg, second_msg = fake.messages
        self.assertTrue(first_msg.accepted and second_msg.accepted)
        self.assertEqual((first_msg.sender, first_msg.recipients),
                         (b"legit@client.test", [b"rcpt@example.com"]))
        self.assertEqual(self.body_of(first_msg), first)
        self.assertEqual((second_msg.sender, second_msg.recipients),
                         (b"smuggled@evil.test", [b"victim@example.com"]))
        self.assertEqual(self.body_of(second_msg), SMUGGLED_CONTENT)


def _make(name: str, bytewise: bool, mode: str) -> Any:
    async def test(self: Any) -> None:
        await self.check(name, bytewise)

    how = "a byte at a time" if bytewise else "in one write"
    if name in NUL_VARIANTS:
        outcome = "is refused with 550 5.6.0 and nothing reaches the backend"
    elif mode == "reject":
        outcome = ("is refused with 550 5.5.2 and nothing reaches the backend"
                   if VARIANTS[name][1] else
                   "reaches the backend as exactly one message")
    else:
        outcome = ("ends the message at the proxy too, so the backend gets at most one "
                   "message per transaction the client was answered for, CRLF only"
                   if VARIANTS[name][1] else
                   "reaches the backend as exactly one message")
    test.__doc__ = (f"{DOCS[name]} sent {how} {outcome}; no smuggled MAIL FROM is "
                    f"hidden from the proxy.")
    test.__name__ = f"test_{name}_{'bytewise' if bytewise else 'whole'}"
    return test


for _name in VARIANTS:
    for _bytewise in (False, True):
        for _cls, _mode in ((StrictSmugglingTests, "reject"), (NormaliseSmugglingTests, "normalise")):
            _t = _make(_name, _bytewise, _mode)
            setattr(_cls, _t.__name__, _t)
del _name, _bytewise, _cls, _mode, _t


class FramingEdgeTests(SmugglingCase):

    async def _split_terminator(self) -> list[tuple[int, bytes]]:
        fake = FakeBackend()
        port = fake.start_for(self)
        proxy = start_proxy(self, proxy_config(self.mktemp(), port,
                                               smtp={"bare_newline": self.bare_newline}))

        def client() -> list[tuple[int, bytes]]:
            with RawClient(proxy.port) as c:
                c.reply()
                c.expect(b"EHLO client.test", 250)
                c.expect(b"MAIL FROM:<legit@client.test>", 250)
                c.expect(b"RCPT TO:<rcpt@example.com>", 250)
                c.expect(b"DATA", 354)
                c.send(b"Subject: split\r\n\r\nbody\r\n.\r")
                time.sleep(0.2)
                c.send(b"\nQUIT\r\n")
                return c.replies_until_close(limit=10)

        replies = await deferToThread(client)
        self.assertEqual(len(fake.messages), 1)
        return replies

    async def test_terminator_split_between_cr_and_lf_strict(self) -> None:
        """CRLF.CRLF arriving in two reads split between CR and LF ends the
        message once, and the LF is not read as a command (strict mode)."""
        replies = await self._split_terminator()
        self.assertEqual([code for code, _ in replies], [250, 221], replies)

    async def test_terminator_split_between_cr_and_lf_normalise(self) -> None:
        """CRLF.CRLF arriving in two reads split between CR and LF ends the
        message once, and the LF is not read as a command (normalise mode)."""
        self.bare_newline = "normalise"
        replies = await self._split_terminator()
        self.assertEqual([code for code, _ in replies], [250, 221], replies)

    async def test_dot_line_at_spool_chunk_boundaries(self) -> None:
        """A "." line of content that falls on or next to a 64 KiB spool chunk
        boundary is dot-stuffed again on the way out: each message reaches the
        backend whole and alone, and the text after the dot is never a command."""
        fake = FakeBackend(lenient_end=True)
        port = fake.start_for(self)
        proxy = start_proxy(self, proxy_config(self.mktemp(), port))
        head = b"Subject: boundary\r\n\r\n"
        contents = []
        for target in range(65531, 65542):
            lines, r = divmod(target - len(head), 100)
            filler = (b"x" * 98 + b"\r\n") * (lines - 1) + b"y" * (98 + r) + b"\r\n"
            content = head + filler + b".\r\nMAIL FROM:<smuggled@evil.test>\r\n.\r\n..\r\ntail\r\n"
            assert len(head + filler) == target, (target, len(head + filler))
            contents.append(content)

        def client() -> list[tuple[int, bytes]]:
            got = []
            with RawClient(proxy.port) as c:
                c.reply()
                c.expect(b"EHLO client.test", 250)
                for content in contents:
                    c.expect(b"MAIL FROM:<legit@client.test>", 250)
                    c.expect(b"RCPT TO:<rcpt@example.com>", 250)
                    c.expect(b"DATA", 354)
                    c.send((b"\r\n" + content).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n")
                    got.append(c.reply())
                c.command(b"QUIT")
            return got

        got = await deferToThread(client)
        self.assertEqual([code for code, _ in got], [250] * len(contents), got)
        self.assertEqual(fake.senders(), [b"legit@client.test"] * len(contents))
        self.assertEqual(len(fake.messages), len(contents))
        for msg, content in zip(fake.messages, contents):
            self.assertEqual(msg.split_received()[1], content)
            assert_one_clean_message(self, msg)


class LenientFakeSanityTests(unittest.TestCase):
    """The cases above have teeth: sent straight to the lenient fake (no proxy),
    every bare CR/LF variant does smuggle a second MAIL FROM into it."""

    timeout = 30

    def setUp(self) -> None:
        wait_reactor_quiet(self)

    async def test_bare_variants_smuggle_into_lenient_fake(self) -> None:
        """Each look-alike terminator, sent directly, makes the lenient fake
        receive MAIL FROM:<smuggled@evil.test> and two messages."""
        for name, (payload, bare, _) in VARIANTS.items():
            if not bare:
                continue
            fake = FakeBackend(lenient_end=True)
            port = fake.start()
            try:
                await deferToThread(client_session, port, payload, False)
                self.assertIn(b"smuggled@evil.test", fake.senders(), name)
                self.assertEqual(len(fake.messages), 2, name)
            finally:
                await fake.stop()
