"""The edge handler without a backend (``mppproxy.edge``), the outbound
message (``mppproxy.message.prepare``) and Maildir delivery
(``mppproxy.delivery.maildir``).

docs/design.md promises tested here: 3 (not an open relay, whatever the address
holds), 7 (X-MPP-* from outside stripped) and 1 for local delivery (a 250
only after the copy is on disk; a 4xx when it cannot be written).
"""
from __future__ import annotations

import re

import os
import shutil
import tempfile
from dataclasses import replace
from typing import Any, Callable, Iterator, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mppproxy.config.schema import DeliveryConfig, ProxyConfig, SmtpConfig
from mppproxy.delivery import maildir
from mppproxy.edge.context import EdgeContext, make_context
from mppproxy.edge.handler import EdgeSession
from mppproxy.match import TrustedNetworks
from mppproxy.message import MAX_HEADER_BLOCK, prepare, strip_trust_headers
from mppproxy.smtp import replies
from mppproxy.smtp.address import Address, parse_path
from mppproxy.smtp.server import SMTPServerFactory
from mppproxy.smtp.session import Session, Transaction
from mppproxy.spool.spool import Spool

HOSTNAME = "mx.example.test"


class InlineThreadPool:
    """Runs "thread pool" work at once, in the calling thread."""

    def callInThreadWithCallback(self, on_result: Callable[[bool, Any], None], func: Callable[..., Any],
                                 *args: Any, **kwargs: Any) -> None:
        try:
            result = func(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class InlineReactor(MemoryReactorClock):
    """A memory reactor whose callFromThread runs the call at once."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


def temp_dir(case: SynchronousTestCase) -> str:
    """A fresh directory outside the work tree, removed after the test."""
    path = tempfile.mkdtemp(prefix="mpp-test-")
    case.addCleanup(shutil.rmtree, path, True)
    return path


def make_config(data_dir: str = "/nonexistent/mppproxy-test-data", **fields: Any) -> ProxyConfig:
    base = ProxyConfig(data_dir=data_dir, relay_domains=("example.com", ".example.org"),
                       smtp=replace(SmtpConfig(), hostname=HOSTNAME))
    return replace(base, **fields)


def make_gateway(config: Optional[ProxyConfig] = None) -> tuple[EdgeSession, EdgeContext]:
    config = config or make_config()
    assert config.backend is None
    ctx = make_context(config, InlineReactor(), InlineThreadPool())
    return EdgeSession(ctx), ctx


def make_session(trusted: bool = False, host: str = "198.51.100.7", helo: str = "client.example",
                 esmtp: bool = True) -> Session:
    s = Session(host, 40000, "192.0.2.25", 25, trusted=trusted)
    s.helo, s.esmtp = helo, esmtp
    return s


def make_txn(message: bytes = b"", sender: str = "<sender@client.example>",
             recipients: tuple[str, ...] = ("<r@example.com>",), memory_limit: int = 1 << 20) -> Transaction:
    txn = Transaction(parse_path(sender, allow_null=True), {})
    txn.recipients = [parse_path(r, allow_null=False) for r in recipients]
    txn.rcpt_params = [{} for _ in recipients]
    txn.spool = Spool(memory_limit)
    txn.spool.write(message)
    txn.size = len(message)
    return txn


def outbound(message: bytes, hostname: Optional[str] = HOSTNAME, **kw: Any) -> tuple[bytes, int]:
    txn = make_txn(message, **kw)
    msg, removed = prepare(make_session(), txn, hostname)
    data = b"".join(msg.chunks())
    assert msg.size == len(data)
    return data, removed


def split_received(data: bytes) -> tuple[bytes, bytes]:
    """The Received: field (with its folded lines) and the rest."""
    assert data.startswith(b"Received: "), data[:80]
    lines = data.split(b"\r\n")
    n = 1
    while lines[n][:1] in (b" ", b"\t"):
        n += 1
    return b"\r\n".join(lines[:n]) + b"\r\n", b"\r\n".join(lines[n:])


# --- relay control ---------------------------------------------------------------------

OUTSIDE = [
    "<user@evil.example>",
    "<user@example.com.evil.example>",
    "<user@sub.example.com>",
    "<user@example.org>",
    "<@example.com:user@evil.example>",
    "<user%evil.example@example.com>",
    "<evil.example!user@example.com>",
    '<"user@evil.example"@example.com>',
    '<"user%evil.example"@example.com>',
    "<user@[192.0.2.1]>",
    "<user@[IPv6:2001:db8::1]>",
    "<user>",
]

INSIDE = [
    "<user@example.com>",
    "<USER@Example.COM.>",
    "<user@mail.example.org>",
    "<@evil.example:user@example.com>",
    '<"john doe"@example.com>',
    "<Postmaster>",
]


class RelayControlTests(SynchronousTestCase):
    """docs/design.md promise 3 at the edge."""

    def rcpt(self, gateway: EdgeSession, session: Session, path: str) -> replies.Reply:
        txn = make_txn()
        d = Deferred.fromCoroutine(gateway.on_rcpt(session, txn, parse_path(path, False), {}))
        return self.successResultOf(d)

    def test_untrusted_outside_refused(self) -> None:
        """An untrusted client gets 554 5.7.1 for every recipient outside the relay domains, whatever trick the address holds."""
        gateway, _ = make_gateway()
        session = make_session(trusted=False)
        for path in OUTSIDE:
            self.assertRelayDenied(self.rcpt(gateway, session, path), path)
        self.assertEqual((replies.RELAY_DENIED.code, replies.RELAY_DENIED.enhanced), (554, "5.7.1"))

    def assertRelayDenied(self, reply: replies.Reply, path: str = "") -> None:
        """The relay refusal, ending with the transaction's reference."""
        self.assertEqual((reply.code, reply.enhanced), (554, "5.7.1"), path)
        self.assertRegex(reply.text, r"^Relay access denied \(ref \S+\)$", path)

    def test_untrusted_inside_allowed(self) -> None:
        """An untrusted client may send to the relay domains and to Postmaster."""
        gateway, _ = make_gateway()
        session = make_session(trusted=False)
        for path in INSIDE:
            self.assertEqual(self.rcpt(gateway, session, path), replies.RECIPIENT_OK, path)

    def test_trusted_anywhere(self) -> None:
        """A trusted client may send anywhere."""
        gateway, _ = make_gateway()
        session = make_session(trusted=True, host="127.0.0.1")
        for path in OUTSIDE + INSIDE:
            self.assertEqual(self.rcpt(gateway, session, path), replies.RECIPIENT_OK, path)

    def test_no_relay_domains(self) -> None:
        """With no relay domains an untrusted client can send nowhere but Postmaster."""
        gateway, _ = make_gateway(make_config(relay_domains=()))
        session = make_session()
        self.assertRelayDenied(self.rcpt(gateway, session, "<user@example.com>"))
        self.assertEqual(self.rcpt(gateway, session, "<postmaster>"), replies.RECIPIENT_OK)

    def test_refusal_logged(self) -> None:
        """A relay refusal is logged with the recipient, the client and the reason as fields."""
        gateway, _ = make_gateway()
        with capturedLogs() as events:
            self.rcpt(gateway, make_session(), "<user%evil.example@example.com>")
        [event] = [e for e in events if e.get("rcpt") is not None]
        self.assertEqual(event["rcpt"], "user%evil.example@example.com")
        self.assertEqual(event["client"], "198.51.100.7")
        self.assertEqual(event["reason"], "routing characters in the local part")
        self.assertNotIn("user%evil", event["log_format"])

    def test_mail_and_capabilities_without_backend(self) -> None:
        """Without a backend, MAIL gets 250 2.1.0 and EHLO announces the configured size with 8BITMIME and SMTPUTF8."""
        gateway, ctx = make_gateway()
        session = make_session()
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(gateway.on_mail(session, make_txn()))),
                         replies.SENDER_OK)
        caps = self.successResultOf(Deferred.fromCoroutine(gateway.capabilities(session)))
        self.assertEqual((caps.size, caps.eightbitmime, caps.smtputf8, caps.dsn),
                         (ctx.config.limits.max_message_size, True, True, False))


class TrustedNetworksTests(SynchronousTestCase):
    """``TrustedNetworks``: Postfix's mynetworks."""

    def test_default_loopback(self) -> None:
        """The default trusts loopback only, IPv4-mapped IPv6 included."""
        trusted = TrustedNetworks(ProxyConfig().trusted_networks)
        for host in ("127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"):
            self.assertTrue(trusted(host), host)
        for host in ("198.51.100.7", "2001:db8::1", "::ffff:198.51.100.7", "10.0.0.1", "unknown", ""):
            self.assertFalse(trusted(host), host)

    def test_set_list_replaces_default(self) -> None:
        """A configured list replaces loopback rather than adding to it (docs/design.md promise 3)."""
        trusted = TrustedNetworks(("192.0.2.0/24",))
        self.assertTrue(trusted("192.0.2.77"))
        self.assertFalse(trusted("127.0.0.1"))
        self.assertFalse(trusted("::1"))

    def test_scoped_ipv6(self) -> None:
        """A scoped IPv6 address (fe80::1%eth0) is judged by its address."""
        trusted = TrustedNetworks(("fe80::/10",))
        self.assertTrue(trusted("fe80::1%eth0"))


class EdgeThroughServerTests(SynchronousTestCase):
    """The edge handler as the server's handler, trust decided from the peer address."""

    def converse(self, peer: str, data: bytes) -> bytes:
        gateway, ctx = make_gateway()
        factory = SMTPServerFactory(ctx.config, lambda: EdgeSession(ctx), MemoryReactorClock(),
                                    is_trusted=ctx.trusted, hostname=ctx.hostname)
        proto = factory.buildProtocol(IPv4Address("TCP", peer, 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
        proto.makeConnection(transport)
        transport.clear()
        proto.dataReceived(data)
        return transport.value()

    def test_untrusted_peer(self) -> None:
        """An internet client gets 554 5.7.1 for a recipient outside the relay domains and 250 inside."""
        out = self.converse("198.51.100.7", b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n"
                                            b"RCPT TO:<victim@evil.example>\r\nRCPT TO:<user@example.com>\r\n")
        self.assertRegex(out, rb"554 5\.7\.1 Relay access denied \(ref \S+\)\r\n"
                              + re.escape(replies.RECIPIENT_OK.to_bytes()) + rb"$")

    def test_trusted_peer(self) -> None:
        """A loopback client may relay anywhere."""
        out = self.converse("127.0.0.1", b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n"
                                         b"RCPT TO:<victim@evil.example>\r\n")
        self.assertTrue(out.endswith(replies.RECIPIENT_OK.to_bytes()), out)


# --- message.prepare ---------------------------------------------------------------------

class PrepareTests(SynchronousTestCase):
    """``prepare``: our Received: first, X-MPP-* removed, everything else untouched."""

    def test_received_first(self) -> None:
        """The Received: header comes first, naming the HELO, client address, our host and the queue id; the message follows unchanged."""
        message = b"From: a@c.example\r\nSubject: hi\r\n\r\nbody\r\n"
        txn = make_txn(message)
        msg, removed = prepare(make_session(), txn, HOSTNAME)
        data = b"".join(msg.chunks())
        received, rest = split_received(data)
        self.assertEqual(removed, 0)
        self.assertEqual(rest, message)
        self.assertTrue(received.startswith(b"Received: from client.example ([198.51.100.7])\r\n"
                                            b"\tby mx.example.test (mppproxy) with ESMTP id " + txn.id.encode()))
        self.assertIn(b"\tfor <r@example.com>;", received)

    def test_received_protocols(self) -> None:
        """The with clause says SMTP, ESMTP, ESMTPS or UTF8ESMTPS (RFC 3848, RFC 6531)."""
        cases = [(False, False, False, b"with SMTP "), (True, False, False, b"with ESMTP "),
                 (True, True, False, b"with ESMTPS "), (True, True, True, b"with UTF8ESMTPS ")]
        for esmtp, tls, utf8, expected in cases:
            session = make_session(esmtp=esmtp)
            session.tls = tls
            txn = make_txn(b"S: x\r\n\r\nb\r\n")
            txn.smtputf8 = utf8
            received, _ = split_received(b"".join(prepare(session, txn, HOSTNAME)[0].chunks()))
            self.assertIn(expected, received)

    def test_no_for_clause_with_several_recipients(self) -> None:
        """With several recipients the Received: field names none of them."""
        data, _ = outbound(b"S: x\r\n\r\nb\r\n", recipients=("<a@example.com>", "<b@example.com>"))
        received, _ = split_received(data)
        self.assertNotIn(b"for <", received)

    def test_helo_cannot_inject_headers(self) -> None:
        """CR and LF in the client's HELO cannot start a new header line."""
        session = make_session(helo="evil.example\r\nX-MPP-Verdict: clean")
        data = b"".join(prepare(session, make_txn(b"S: x\r\n\r\nb\r\n"), HOSTNAME)[0].chunks())
        received, rest = split_received(data)
        self.assertEqual(rest, b"S: x\r\n\r\nb\r\n")
        self.assertNotIn(b"\r\nX-MPP", data)

    def test_no_received_when_off(self) -> None:
        """Without a hostname (received_header off) nothing is added."""
        message = b"Subject: hi\r\n\r\nbody\r\n"
        self.assertEqual(outbound(message, hostname=None), (message, 0))

    def test_trust_headers_removed(self) -> None:
        """X-MPP-* headers in any letter case, with their folded lines, are removed; other headers keep their order and bytes."""
        message = (b"From: a@c.example\r\n"
                   b"X-MPP-Verdict: clean\r\n"
                   b"Subject: folded\r\n\tsubject line\r\n"
                   b"x-mpp-score: -100\r\n"
                   b"X-Mpp-Reasons: one,\r\n two,\r\n\tthree\r\n"
                   b"X-MPPish: kept\r\n"
                   b"X-Not-MPP-Header: kept\r\n"
                   b"X-MPP-Last: gone\r\n"
                   b"\r\n"
                   b"X-MPP-In-Body: kept, the body is not headers\r\n")
        data, removed = outbound(message, hostname=None)
        self.assertEqual(removed, 4)
        self.assertEqual(data, b"From: a@c.example\r\n"
                               b"Subject: folded\r\n\tsubject line\r\n"
                               b"X-MPPish: kept\r\n"
                               b"X-Not-MPP-Header: kept\r\n"
                               b"\r\n"
                               b"X-MPP-In-Body: kept, the body is not headers\r\n")

    def test_trust_headers_removed_after_received(self) -> None:
        """With a Received: header added, X-MPP-* are still removed and the Received: stays first."""
        data, removed = outbound(b"X-MPP-Verdict: clean\r\nSubject: s\r\n\r\nb\r\n")
        received, rest = split_received(data)
        self.assertEqual(removed, 1)
        self.assertEqual(rest, b"Subject: s\r\n\r\nb\r\n")

    def test_first_header_is_trust_header(self) -> None:
        """An X-MPP-* header on the very first line, folded, is removed."""
        data, removed = outbound(b"X-MPP-A: 1\r\n 2\r\nSubject: s\r\n\r\nb\r\n", hostname=None)
        self.assertEqual((data, removed), (b"Subject: s\r\n\r\nb\r\n", 1))

    def test_headers_only_message(self) -> None:
        """A message of headers only, without a blank line, still loses its X-MPP-* headers."""
        data, removed = outbound(b"Subject: s\r\nX-MPP-A: 1\r\n", hostname=None)
        self.assertEqual((data, removed), (b"Subject: s\r\n", 1))

    def test_body_only_message(self) -> None:
        """A message that starts with the blank line has no headers and is passed on as it is."""
        message = b"\r\nX-MPP-A: 1\r\n"
        self.assertEqual(outbound(message, hostname=None), (message, 0))

    def test_empty_message(self) -> None:
        """An empty message gets just the Received: header."""
        data, removed = outbound(b"")
        received, rest = split_received(data)
        self.assertEqual((rest, removed), (b"", 0))

    def test_large_header_block_on_disk(self) -> None:
        """A header block larger than one spool read, spooled to disk, is cleaned across chunks and the body is untouched."""
        filler = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"f" * 40) for i in range(3000))
        body = b"".join(b"line %06d\r\n" % i for i in range(20000))
        message = b"X-MPP-First: 1\r\n" + filler + b"X-MPP-Last: 2\r\n\tfolded\r\n\r\n" + body
        txn = make_txn(message, memory_limit=1024)
        assert txn.spool is not None
        self.assertTrue(txn.spool.on_disk)
        msg, removed = prepare(make_session(), txn, None)
        self.assertEqual(removed, 2)
        self.assertEqual(b"".join(msg.chunks()), filler + b"\r\n" + body)

    def test_header_block_too_large(self) -> None:
        """A header block over MAX_HEADER_BLOCK is refused with 552 5.3.4 at the edge."""
        gateway, _ = make_gateway(make_config(data_dir=temp_dir(self)))
        line = b"X-Filler: " + b"f" * 1000 + b"\r\n"
        # Past the bound by more than one spool read (the check runs per read).
        message = line * (MAX_HEADER_BLOCK // len(line) + 200) + b"\r\nbody\r\n"
        txn = make_txn(message, memory_limit=1 << 16)
        reply = self.successResultOf(Deferred.fromCoroutine(gateway.on_data_end(make_session(), txn)))
        self.assertEqual((reply.code, reply.enhanced), (552, "5.3.4"))

    def test_strip_without_trust_headers_is_identity(self) -> None:
        """A message without X-MPP- headers is relayed from the client's own spool, unchanged."""
        txn = make_txn(b"From: a\r\nSubject: b\r\n\r\nbody\r\n")
        spool = txn.spool
        msg, removed = prepare(make_session(), txn, None)
        self.assertEqual(removed, 0)
        self.assertIs(txn.spool, spool)
        self.assertEqual(b"".join(msg.chunks()), b"From: a\r\nSubject: b\r\n\r\nbody\r\n")

    def test_leading_folded_line_does_not_hide_trust_headers(self) -> None:
        """A message that starts with a folded line still has its X-MPP- fields
        removed: under our Received: header that line is a continuation and the
        fields after it are headers downstream."""
        message = b" folded-first-line\r\nX-MPP-Verdict: clean\r\nSubject: s\r\n\r\nbody\r\n"
        msg, removed = prepare(make_session(), make_txn(message), HOSTNAME)
        self.assertEqual(removed, 1)
        self.assertNotIn(b"X-MPP", b"".join(msg.chunks()))

    def test_header_section_ends_at_first_non_header_line(self) -> None:
        """A line that is neither a field nor a continuation ends the header section,
        as Postfix and Python's email parser read it: what follows is body."""
        message = b"From: a\r\nnot a header line\r\nX-MPP-Score: 1\r\n\r\nbody\r\n"
        msg, removed = prepare(make_session(), make_txn(message), None)
        self.assertEqual(removed, 0)
        self.assertEqual(b"".join(msg.chunks()), message)

    def test_large_message_without_headers_is_not_a_header_block(self) -> None:
        """6 MB of text with no blank line is body after its first line, not an oversized header."""
        gateway, _ = make_gateway(make_config(data_dir=temp_dir(self)))
        message = b"line of text without header syntax\r\n" * 170000
        reply = self.successResultOf(Deferred.fromCoroutine(
            gateway.on_data_end(make_session(), make_txn(message, memory_limit=1 << 16))))
        self.assertNotEqual(reply.code, 552)

    def test_cleaned_copy_is_a_bounded_spool(self) -> None:
        """When X-MPP- headers are removed, the cleaned message goes to a new spool
        that moves to disk past its memory bound (no unbounded copy in memory)."""
        headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 60) for i in range(20000))
        txn = make_txn(headers + b"X-MPP-Score: 1\r\n\r\nbody\r\n", memory_limit=1 << 16)
        msg, removed = prepare(make_session(), txn, None, spool_limit=1 << 16)
        self.assertEqual(removed, 1)
        self.assertTrue(txn.spool.on_disk)
        self.assertIs(msg.spool, txn.spool)
        self.assertEqual(b"".join(msg.chunks()), headers + b"\r\nbody\r\n")


# --- Maildir delivery ---------------------------------------------------------------------

def _chunks(*parts: bytes) -> Callable[[], Iterator[bytes]]:
    return lambda: iter(parts)


class MaildirTests(SynchronousTestCase):
    """``maildir.deliver``: one file per recipient under the expanded path, never outside the root."""

    def setUp(self) -> None:
        self.root = temp_dir(self)

    def deliver(self, recipients: list[str], template: str = "maildir/%D%/%U%",
                chunks: Optional[Callable[[], Iterator[bytes]]] = None) -> list[str]:
        addrs = [parse_path(r, allow_null=False) for r in recipients]
        sender = parse_path("<sender@client.example>", allow_null=True)
        return maildir.deliver(chunks or _chunks(b"Subject: s\r\n\r\nbody\r\n"), sender, addrs,
                               template, self.root)

    def assertUnderRoot(self, path: str) -> None:
        real = os.path.realpath(path)
        self.assertTrue(real.startswith(os.path.realpath(self.root) + os.sep), path)

    def test_one_file_per_recipient(self) -> None:
        """Each recipient gets one file in new/ with Return-Path, Delivered-To and the message with LF line ends."""
        paths = self.deliver(["<bob@example.com>", "<alice@example.org>"])
        self.assertEqual(len(paths), 2)
        self.assertEqual(os.path.dirname(paths[0]), os.path.join(self.root, "maildir", "example.com", "bob", "new"))
        self.assertEqual(os.path.dirname(paths[1]), os.path.join(self.root, "maildir", "example.org", "alice", "new"))
        with open(paths[0], "rb") as f:
            self.assertEqual(f.read(), b"Return-Path: <sender@client.example>\nDelivered-To: bob@example.com\n"
                                       b"Subject: s\n\nbody\n")
        for p in paths:
            root = os.path.dirname(os.path.dirname(p))
            self.assertEqual(sorted(os.listdir(root)), ["cur", "new", "tmp"])
            self.assertEqual(os.listdir(os.path.join(root, "tmp")), [])
            self.assertEqual(os.listdir(os.path.join(root, "new")), [os.path.basename(p)])

    def test_same_mailbox_twice(self) -> None:
        """Two recipients that map to one Maildir get two distinct files."""
        paths = self.deliver(["<bob@example.com>", "<BOB@Example.COM>"])
        self.assertEqual(len(set(paths)), 2)
        self.assertEqual(len(os.listdir(os.path.dirname(paths[0]))), 2)

    def test_macros(self) -> None:
        """%U% %D% %U1% %U2% %D1% %D2% expand to user, domain and their first and second letters, lower-cased."""
        [path] = self.deliver(["<Bob@Example.COM>"], template="m/%D1%/%D2%/%D%/%U1%/%U2%/%U%")
        self.assertEqual(os.path.dirname(path),
                         os.path.join(self.root, "m", "e", "x", "example.com", "b", "o", "bob", "new"))

    def test_short_names(self) -> None:
        """A one-letter user or domain gets ``_`` for its second letter."""
        expanded = maildir.expand_path("%U1%/%U2%/%D2%", parse_path("<x@y>", False), self.root)
        self.assertEqual(expanded, os.path.join(self.root, "x", "_", "_"))

    def test_absolute_template(self) -> None:
        """An absolute template is used as it is, not below data_dir."""
        elsewhere = temp_dir(self)
        expanded = maildir.expand_path(elsewhere + "/%D%/%U%", parse_path("<bob@example.com>", False), self.root)
        self.assertEqual(expanded, os.path.join(elsewhere, "example.com", "bob"))

    def test_idna_and_utf8(self) -> None:
        """A UTF-8 domain is stored under its A-label; non-ASCII in the user becomes ``_`` and hex."""
        expanded = maildir.expand_path("%D%/%U%", parse_path("<jürgen@bücher.example>", False), self.root)
        self.assertEqual(expanded, os.path.join(self.root, "xn--bcher-kva.example", "j_C3_BCrgen"))

    def test_distinct_addresses_get_distinct_maildirs(self) -> None:
        """Addresses that differ only in characters that need escaping never share a Maildir."""
        paths = {maildir.expand_path("%D%/%U%", parse_path(f"<{local}@example.com>", False), self.root)
                 for local in ('"a/b"', '"a b"', "a_b", "a%b", "a.b", '".ab"', "_2Eab")}
        self.assertEqual(len(paths), 7, paths)

    def test_partial_failure_delivers_nothing(self) -> None:
        """When one recipient's copy cannot be written, no recipient gets a copy (no duplicates on retry)."""
        os.makedirs(os.path.join(self.root, "maildir", "example.com"), exist_ok=True)
        # A file where bob's Maildir directory should be: writing his copy fails.
        open(os.path.join(self.root, "maildir", "example.com", "bob"), "w").close()
        rcpts = [parse_path("<alice@example.com>", False), parse_path("<bob@example.com>", False)]
        with self.assertRaises(OSError):
            maildir.deliver(lambda: iter([b"Subject: x\r\n\r\nbody\r\n"]), parse_path("<s@x.test>", True),
                            rcpts, "maildir/%D%/%U%", self.root)
        alice = os.path.join(self.root, "maildir", "example.com", "alice")
        self.assertEqual(os.listdir(os.path.join(alice, "new")), [])
        self.assertEqual(os.listdir(os.path.join(alice, "tmp")), [])

    def test_postmaster_without_domain(self) -> None:
        """Postmaster without a domain is stored under ``localhost``."""
        expanded = maildir.expand_path("%D%/%U%", parse_path("<Postmaster>", False), self.root)
        self.assertEqual(expanded, os.path.join(self.root, "localhost", "postmaster"))

    def test_no_path_traversal(self) -> None:
        """Local parts with ``../``, ``/``, dots or NUL-free oddities never lead outside the root."""
        locals_ = ['"../../../etc"', '"a/b"', '"/etc/passwd"', '".."', '"."', '"..\\/.."', '".hidden"',
                   '"a/../../b"', "a/b", "..a", '"\\\\.."']
        for template in ("maildir/%D%/%U%", "maildir/%U1%/%U2%/%U%", "%U%", "%U%/%D%"):
            for local in locals_:
                try:
                    rcpt = parse_path(f"<{local}@example.com>", False)
                except Exception:
                    continue
                expanded = maildir.expand_path(template, rcpt, self.root)
                self.assertUnderRoot(expanded)
                rel = os.path.relpath(expanded, self.root)
                self.assertNotIn("..", rel.split(os.sep), (template, local, rel))
                for part in rel.split(os.sep):
                    self.assertFalse(part.startswith(".") and part not in (".",), (template, local, rel))
        paths = self.deliver(['<"../../../etc"@example.com>', '<"a/b"@example.com>'])
        for p in paths:
            self.assertUnderRoot(p)

    def test_crlf_split_across_chunks(self) -> None:
        """A CR LF pair split between two chunks becomes one LF."""
        [path] = self.deliver(["<bob@example.com>"], chunks=_chunks(b"S: x\r", b"\n\r", b"\nbody\r", b"\n"))
        with open(path, "rb") as f:
            self.assertTrue(f.read().endswith(b"S: x\n\nbody\n"))


class LocalDeliveryTests(SynchronousTestCase):
    """The edge's end of DATA without a backend."""

    def setUp(self) -> None:
        self.data_dir = temp_dir(self)

    def test_delivered_after_write(self) -> None:
        """End of data writes one copy per recipient, with Received: first and X-MPP-* gone, and only then answers 250."""
        gateway, _ = make_gateway(make_config(data_dir=self.data_dir))
        txn = make_txn(b"X-MPP-Verdict: clean\r\nSubject: s\r\n\r\nbody\r\n",
                       recipients=("<bob@example.com>", "<carol@example.com>"))
        with capturedLogs() as events:
            reply = self.successResultOf(Deferred.fromCoroutine(gateway.on_data_end(make_session(), txn)))
        self.assertEqual((reply.code, reply.enhanced), (250, "2.0.0"))
        self.assertIn(txn.id, reply.text)
        paths = txn.delivered_to
        self.assertEqual(len(paths), 2)
        for p in paths:
            with open(p, "rb") as f:
                lines = f.read().split(b"\n")
            self.assertTrue(lines[2].startswith(b"Received: from client.example"), lines[:3])
            self.assertNotIn(b"X-MPP-Verdict: clean", b"\n".join(lines))
            self.assertIn(b"Subject: s", lines)
        [tx] = [e for e in events if e.get("mpp_event") == "transaction"]
        self.assertEqual((tx["action"], tx["reply_code"], tx["stripped_headers"]), ("deliver", 250, 1))

    def test_disk_failure_tempfails(self) -> None:
        """When the Maildir cannot be made (its data_dir is a file: not a full disk) the client gets 451 4.3.0, never 250."""
        blocker = os.path.join(self.data_dir, "not-a-dir")
        with open(blocker, "w") as f:
            f.write("x")
        gateway, _ = make_gateway(make_config(data_dir=blocker))
        reply = self.successResultOf(Deferred.fromCoroutine(gateway.on_data_end(make_session(), make_txn(b"S: s\r\n\r\nb\r\n"))))
        # A full disk is 452 4.3.1 (tests/test_disk_full.py); ENOTDIR is not.
        self.assertEqual(reply, replies.LOCAL_ERROR)
        self.assertEqual((reply.code, reply.enhanced), (451, "4.3.0"))

    def test_template_from_config(self) -> None:
        """The delivery.maildir template from the configuration decides the path."""
        config = make_config(data_dir=self.data_dir, delivery=DeliveryConfig(maildir="boxes/%D1%/%U%"))
        gateway, _ = make_gateway(config)
        txn = make_txn(b"S: s\r\n\r\nb\r\n", recipients=("<bob@example.com>",))
        self.successResultOf(Deferred.fromCoroutine(gateway.on_data_end(make_session(), txn)))
        [path] = txn.delivered_to
        self.assertEqual(os.path.dirname(path), os.path.join(self.data_dir, "boxes", "e", "bob", "new"))

    def test_reset_logs_aborted_transaction(self) -> None:
        """A reset transaction that had recipients is logged once as aborted with its reason."""
        gateway, _ = make_gateway()
        txn = make_txn()
        txn.rcpt_log.append(("r@example.com", "250"))
        with capturedLogs() as events:
            gateway.on_reset(make_session(), txn, "RSET")
        [tx] = [e for e in events if e.get("mpp_event") == "transaction"]
        self.assertEqual((tx["action"], tx["reason"]), ("aborted", "RSET"))


def test_xtext_encodes_what_could_break_the_command():
    """XFORWARD/XCLIENT values are xtext (RFC 3461 4): '+', '=', space and non-ASCII become +HH."""
    from mppproxy.relay.lockstep import _xtext
    assert _xtext("odd=helo+name x") == "odd+3Dhelo+2Bname+20x"
    assert _xtext("é") == "+C3+A9"
