"""The forwarder (mppproxy/archive/forwarder.py, issue 12 "Forwarder"): the
edge's durable queue to an archive node over ESMTP.

Everything is real and on loopback: the queue in a temporary directory,
the project's own SMTP client, and as the archive node the project's own
ESMTP server (``smtp/server.py``) with a handler that verifies each copy's
signed state (``archive.state.verify``) and records what it got.  Each wait
is bounded (``poll_until``).
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Union

from hypothesis import given, settings, strategies as st
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from fakes_backend import poll_until
from mppproxy.archive.copies import metadata_for, state_of
from mppproxy.archive.forwarder import (ARCHIVE_RCPT, NODE_PORT, Forwarder, ForwarderState,
                                        message_body_digest, node_backend_config)
from mppproxy.archive.keys import Key, KeyRing
from mppproxy.archive.state import (BodyDigest, CheckState, CopyState, StateRefused,
                                    parse_fields, verify)
from mppproxy.config.archive import ArchiveConfig
from mppproxy.config.schema import ProxyConfig
from mppproxy.results import Disposition
from mppproxy.smtp import replies
from mppproxy.smtp.address import Address
from mppproxy.smtp.replies import Reply
from mppproxy.smtp.server import Capabilities, SMTPServerFactory
from mppproxy.smtp.session import Session, Transaction
from mppproxy.spool.queue import DurableQueue

KEYS = KeyRing.of(Key("edge-2024", b"s" * 32))
MESSAGE = (b"Received: from client.test by proxy.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
           b"From: <alice@client.test>\r\nSubject: held\r\n\r\nbody line\r\n.leading dot\r\n")
STATE = CopyState(node="edge-1", queue_id="QID0000001", received=1700000000.5,
                  client="192.0.2.7", helo="client.test", tls=False, sender="alice@client.test",
                  recipients=("bob@example.com", "carol@example.com"), policy="default",
                  verdict=Disposition.QUARANTINE, disposition=Disposition.QUARANTINE, score=12.0,
                  reasons=("CHEAP_MEDS",), checks=(CheckState("scan:headers", 12.0, ("CHEAP_MEDS",)),),
                  checks_passed=("dnsbl",))

Answer = Union[Reply, Deferred[Reply]]


@dataclass
class Copy:
    """One copy the node took: its verified state and what came over the wire."""

    state: CopyState
    data: bytes
    tls: bool
    sender: str
    recipients: list[str]


class NodeHandler:
    """The archive node's ``SessionHandler``: every copy is verified with
    the node's keys; a refusal answers the verifier's reply."""

    def __init__(self, node: "ArchiveNode"):
        self.node = node

    def on_connect(self, session: Session) -> Optional[Reply]:
        self.node.sessions.append(session)
        return None

    def known_capabilities(self, session: Session) -> Optional[Capabilities]:
        return Capabilities(size=10_000_000, eightbitmime=True, smtputf8=True, dsn=False)

    async def capabilities(self, session: Session) -> Capabilities:
        return Capabilities(size=10_000_000)

    async def on_mail(self, session: Session, txn: Transaction) -> Reply:
        self.node.commands.append(f"MAIL {txn.sender.text} {sorted(txn.mail_params)}")
        return await self.node.answer("MAIL", replies.SENDER_OK)

    async def on_rcpt(self, session: Session, txn: Transaction, rcpt: Address,
                      params: dict[str, Optional[str]]) -> Reply:
        self.node.commands.append(f"RCPT {rcpt.text}")
        return await self.node.answer("RCPT", replies.RECIPIENT_OK)

    async def on_data_end(self, session: Session, txn: Transaction) -> Reply:
        assert txn.spool is not None
        data = b"".join(txn.spool.chunks())
        self.node.received.append(data)
        header, found, body = data.partition(b"\r\n\r\n")
        try:
            state = verify(parse_fields(header + b"\r\n"), [body if found else b""],
                           self.node.keys)
        except StateRefused as e:
            self.node.refused.append(e.reason)
            return e.reply
        reply = await self.node.answer("EOM", Reply(250, "2.0.0", "stored"))
        if reply.is_positive:
            self.node.copies.append(Copy(state, data, session.tls, txn.sender.text,
                                         [r.text for r in txn.recipients]))
        return reply

    def on_reset(self, session: Session, txn: Optional[Transaction], reason: str) -> None:
        pass

    def on_client_gone(self, session: Session) -> None:
        pass

    def on_disconnect(self, session: Session) -> None:
        pass


class ArchiveNode:
    """The project's ESMTP server on 127.0.0.1 as a recording archive node.
    ``answers[verb]`` lists replies (or Deferreds of one) given in turn
    before the default; verbs MAIL, RCPT and EOM (end of DATA)."""

    def __init__(self, keys: KeyRing = KEYS, tls_context: Any = None):
        self.keys = keys
        self.answers: dict[str, list[Answer]] = {}
        self.sessions: list[Session] = []
        self.commands: list[str] = []
        self.received: list[bytes] = []
        self.refused: list[str] = []
        self.copies: list[Copy] = []
        self.factory = SMTPServerFactory(ProxyConfig(), lambda: NodeHandler(self), reactor,
                                         tls_context=tls_context, is_trusted=lambda host: True,
                                         hostname="archive.test")
        self.port: Any = None

    async def answer(self, verb: str, default: Reply) -> Reply:
        queued = self.answers.get(verb)
        if not queued:
            return default
        reply = queued.pop(0)
        return await reply if isinstance(reply, Deferred) else reply

    def start(self, case: unittest.TestCase, port: int = 0) -> int:
        self.port = reactor.listenTCP(port, self.factory, interface="127.0.0.1")

        async def stop() -> None:
            await self.port.stopListening()
            # The forwarder's QUIT ends its sessions (a TLS one a moment later).
            try:
                await poll_until(reactor, lambda: not self.factory.sessions, 5.0,
                                 "the node's sessions closed")
            except TimeoutError:
                pass  # cut below
            await self.factory.shut_down(1.0)

        case.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        return int(self.port.getHost().port)


def free_port() -> Deferred[int]:
    """A loopback port that was free a moment ago (listened on, then closed)."""
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number = port.getHost().port
    d = port.stopListening()
    d.addCallback(lambda _: number)
    return d


def temp_queue_dir(case: unittest.TestCase) -> str:
    parent = tempfile.mkdtemp(prefix="mpp-fwd-")
    case.addCleanup(shutil.rmtree, parent, True)
    return os.path.join(parent, "queue")


def new_names(queue: DurableQueue) -> list[tuple[float, int, int]]:
    """(due, attempts, recoveries) of each item waiting in new/."""
    out = []
    for name in sorted(os.listdir(os.path.join(queue.directory, "new"))):
        due, _, attempts, recoveries = name.split("_")
        out.append((int(due) / 1e6, int(attempts), int(recoveries)))
    return out


def bad_reasons(queue: DurableQueue) -> list[dict[str, Any]]:
    bad = os.path.join(queue.directory, "bad")
    reasons = []
    for name in sorted(os.listdir(bad)):
        if name.endswith(".reason.json"):
            with open(os.path.join(bad, name)) as f:
                reasons.append(json.load(f))
    return reasons


class Events:
    """Log events of the test's duration (the global publisher)."""

    def __init__(self, case: unittest.TestCase):
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def matching(self, fragment: str, level: Optional[LogLevel] = None) -> list[dict[str, Any]]:
        return [e for e in self.events if fragment in (e.get("log_format") or "")
                and (level is None or e.get("log_level") == level)]


class ForwarderCase(unittest.TestCase):
    timeout = 30

    def make(self, port: int, keys: KeyRing = KEYS, **archive: Any
             ) -> tuple[Forwarder, DurableQueue]:
        """A forwarder to 127.0.0.1:``port`` over a fresh queue, stopped
        after the test."""
        settings: dict[str, Any] = {
            "node": f"127.0.0.1:{port}", "key_file": "unused", "connections": 1,
            "retry_base": 0.2, "retry_max": 0.4, "connect_timeout": 2.0, "reply_timeout": 5.0}
        settings.update(archive)
        config = ArchiveConfig(**settings)
        queue = DurableQueue(temp_queue_dir(self), base_delay=config.retry_base,
                             max_delay=config.retry_max, max_age=config.max_age)
        queue.open()
        self.addCleanup(queue.close)
        forwarder = Forwarder(reactor, reactor.getThreadPool(), queue, config, keys, "edge.test",
                              grace=2.0, poll_interval=0.05)
        self.addCleanup(forwarder.stop)
        return forwarder, queue

    def put(self, queue: DurableQueue, message: bytes = MESSAGE, **changes: Any) -> str:
        return queue.enqueue(message, metadata_for(replace(STATE, **changes)))

    async def until(self, predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
        return await poll_until(reactor, predicate, timeout, what)


class DeliveryTests(ForwarderCase):

    async def test_copy_is_signed_sent_verified_and_finished(self) -> None:
        """A queued copy reaches the node with MAIL FROM:<> and the .invalid recipient, its state verifies, the message follows the X-MPP-* fields octet for octet, and the item is finished."""
        node = ArchiveNode()
        forwarder, queue = self.make(node.start(self))
        self.put(queue)
        forwarder.start()
        [copy] = await self.until(lambda: node.copies, "the copy stored")
        self.assertEqual(copy.state, STATE)
        self.assertEqual((copy.sender, copy.recipients), ("", [ARCHIVE_RCPT.decode()]))
        self.assertTrue(node.commands[0].startswith("MAIL  "), node.commands)
        self.assertTrue(copy.data.endswith(MESSAGE))
        header = copy.data[:-len(MESSAGE)]
        names = [n for n, _ in parse_fields(header)]
        self.assertTrue(names and all(n.startswith("X-MPP-") for n in names), names)
        await self.until(lambda: queue.stats().depth == 0, "the item finished")
        self.assertEqual(queue.stats().bad, 0)

    async def test_copies_share_one_connection_with_rset_between(self) -> None:
        """Three copies with one connection arrive in one session, in queue order."""
        node = ArchiveNode()
        forwarder, queue = self.make(node.start(self))
        for n in range(3):
            self.put(queue, queue_id=f"QID{n}")
        forwarder.start()
        await self.until(lambda: len(node.copies) == 3, "three copies stored")
        self.assertEqual([c.state.queue_id for c in node.copies], ["QID0", "QID1", "QID2"])
        self.assertEqual(len(node.sessions), 1)

    async def test_two_connections_share_the_work(self) -> None:
        """With archive.connections = 2 both connections carry copies, each copy once."""
        node = ArchiveNode()
        hold = [Deferred[Reply]() for _ in range(2)]
        node.answers["EOM"] = list(hold)
        forwarder, queue = self.make(node.start(self), connections=2)
        for n in range(4):
            self.put(queue, queue_id=f"QID{n}")
        forwarder.start()
        # Both first copies wait for their reply at once: two sessions.
        await self.until(lambda: len(node.received) == 2, "two copies in flight")
        for d in hold:
            d.callback(Reply(250, "2.0.0", "stored"))
        await self.until(lambda: len(node.copies) == 4, "four copies stored")
        self.assertEqual(sorted(c.state.queue_id for c in node.copies),
                         ["QID0", "QID1", "QID2", "QID3"])
        self.assertEqual(len(node.sessions), 2)

    async def test_wake_sends_a_new_copy_at_once(self) -> None:
        """An idle forwarder polling every 30 s sends a copy as soon as wake() is called."""
        node = ArchiveNode()
        forwarder, queue = self.make(node.start(self))
        forwarder.poll_interval = 30.0
        forwarder.start()
        await self.until(lambda: forwarder._sleeping, "the sender idle")
        self.put(queue)
        started = time.monotonic()
        forwarder.wake()
        await self.until(lambda: node.copies, "the copy stored", timeout=5.0)
        self.assertLess(time.monotonic() - started, 5.0)

    async def test_eight_bit_and_utf8_state_travel(self) -> None:
        """A UTF-8 sender and 8-bit body travel with BODY=8BITMIME and SMTPUTF8 and verify."""
        node = ArchiveNode()
        forwarder, queue = self.make(node.start(self))
        message = "Subject: caf\u00e9\r\n\r\nna\u00efve body\r\n".encode()
        self.put(queue, message, sender="j\u00f6rg@client.test", smtputf8=True)
        forwarder.start()
        [copy] = await self.until(lambda: node.copies, "the copy stored")
        self.assertEqual(copy.state.sender, "j\u00f6rg@client.test")
        self.assertTrue(copy.data.endswith(message))
        self.assertIn("BODY", node.commands[0])
        self.assertIn("SMTPUTF8", node.commands[0])


class FailureTests(ForwarderCase):

    async def test_node_down_retries_with_backoff_then_delivers(self) -> None:
        """With the node down the copy is retried with the queue's backoff (counted, due later), one warning says so, and once the node listens the copy is delivered."""
        events = Events(self)
        port = await free_port()
        forwarder, queue = self.make(port)
        self.put(queue)
        forwarder.start()
        waiting = await self.until(lambda: [n for n in new_names(queue) if n[1] >= 1],
                                   "a counted retry")
        self.assertGreater(waiting[0][0], time.time() - 1.0)  # due after the failure
        [warning] = events.matching("unreachable", LogLevel.warn)
        self.assertEqual(warning["node"], f"127.0.0.1:{port}")
        node = ArchiveNode()
        node.start(self, port)
        [copy] = await self.until(lambda: node.copies, "the copy stored once the node is up")
        self.assertEqual(copy.state.queue_id, STATE.queue_id)
        await self.until(lambda: queue.stats().depth == 0, "the item finished")
        self.assertTrue(events.matching("reachable again"))

    async def test_deferred_copy_is_retried_and_then_finished(self) -> None:
        """A 451 at the end of DATA puts the copy back (one attempt counted); the next try is stored."""
        node = ArchiveNode()
        node.answers["EOM"] = [Reply(451, "4.3.0", "try later")]
        forwarder, queue = self.make(node.start(self))
        self.put(queue)
        forwarder.start()
        await self.until(lambda: node.copies, "the copy stored on the second try")
        self.assertEqual(len(node.received), 2)
        await self.until(lambda: queue.stats().depth == 0, "the item finished")

    async def test_copy_the_node_refuses_goes_to_bad_with_the_reply(self) -> None:
        """A copy signed with a key the node does not share gets the node's 554 5.7.7 and goes to bad/ with that reply as its reason."""
        node = ArchiveNode(keys=KeyRing.of(Key("edge-2024", b"x" * 32)))
        events = Events(self)
        forwarder, queue = self.make(node.start(self))
        self.put(queue)
        forwarder.start()
        [reason] = await self.until(lambda: bad_reasons(queue), "the item in bad/")
        self.assertIn("554 5.7.7", reason["reason"])
        self.assertIn(STATE.queue_id, reason["reason"])
        self.assertEqual(node.copies, [])
        self.assertEqual(len(node.refused), 1)
        self.assertTrue(events.matching("moved to bad/", LogLevel.error))
        self.assertEqual(queue.stats().depth, 0)

    async def test_refusal_before_the_content_is_retried_not_bad(self) -> None:
        """A 550 to MAIL (the node does not take our copies at all) retries the copy and logs an error saying what to fix; the copy is not given up."""
        node = ArchiveNode()
        node.answers["MAIL"] = [Reply(550, "5.7.1", "not an edge")]
        events = Events(self)
        forwarder, queue = self.make(node.start(self))
        self.put(queue)
        forwarder.start()
        await self.until(lambda: node.copies, "the copy stored after the retry")
        self.assertTrue(events.matching("refuses our copies before their content", LogLevel.error))
        self.assertEqual(queue.stats().bad, 0)

    async def test_item_without_a_state_goes_to_bad(self) -> None:
        """An item whose metadata is not a version-1 state goes to bad/ and nothing is sent."""
        node = ArchiveNode()
        forwarder, queue = self.make(node.start(self))
        queue.enqueue(MESSAGE, {"v": 2, "state": "x"})
        forwarder.start()
        [reason] = await self.until(lambda: bad_reasons(queue), "the item in bad/")
        self.assertIn("version 2", reason["reason"])
        self.assertEqual(node.received, [])

    async def test_stats_line_gives_depth_and_oldest_age(self) -> None:
        """Every archive.stats_interval the queue's depth and oldest age are logged, also while the node is down."""
        events = Events(self)
        forwarder, queue = self.make(await free_port(), stats_interval=1.0)
        self.put(queue)
        self.put(queue)
        forwarder.start()
        [line, *_] = await self.until(lambda: events.matching("item(s), oldest"), "a stats line",
                                      timeout=5.0)
        self.assertEqual(line["depth"], 2)
        self.assertIsNotNone(line["oldest_age"])


class StopTests(ForwarderCase):

    async def test_stop_during_a_send_hands_the_copy_back_uncounted(self) -> None:
        """A stop while the node sits on the end of DATA cuts the send at the grace and puts the item back with no attempt and no recovery counted."""
        node = ArchiveNode()
        never: Deferred[Reply] = Deferred()
        node.answers["EOM"] = [never]
        self.addCleanup(lambda: never.called or never.callback(Reply(421, "4.3.0", "bye")))
        forwarder, queue = self.make(node.start(self))
        self.put(queue)
        forwarder.start()
        await self.until(lambda: node.received, "the copy in flight")
        started = time.monotonic()
        await forwarder.stop(grace=0.3)
        self.assertLess(time.monotonic() - started, 3.0)
        self.assertIs(forwarder.state, ForwarderState.STOPPED)
        [(due, attempts, recoveries)] = new_names(queue)
        self.assertEqual((attempts, recoveries), (0, 0))
        self.assertEqual(os.listdir(os.path.join(queue.directory, "claimed")), [])

    async def test_stop_lets_a_send_within_the_grace_finish(self) -> None:
        """A copy whose reply comes within the grace is finished before stop() fires, and nothing new is claimed."""
        node = ArchiveNode()
        slow: Deferred[Reply] = Deferred()
        node.answers["EOM"] = [slow]
        forwarder, queue = self.make(node.start(self))
        self.put(queue, queue_id="FIRST")
        forwarder.start()
        await self.until(lambda: node.received, "the copy in flight")
        self.put(queue, queue_id="SECOND")
        stopped = forwarder.stop(grace=5.0)
        reactor.callLater(0.2, slow.callback, Reply(250, "2.0.0", "stored"))
        await stopped
        self.assertEqual([c.state.queue_id for c in node.copies], ["FIRST"])
        self.assertEqual([a for _, a, _ in new_names(queue)], [0])  # SECOND waits, untouched
        self.assertEqual(queue.stats().depth, 1)

    async def test_stopped_forwarder_starts_again(self) -> None:
        """stop() then start() sends what was queued meanwhile."""
        node = ArchiveNode()
        forwarder, queue = self.make(node.start(self))
        forwarder.start()
        await forwarder.stop()
        self.put(queue)
        forwarder.start()
        await self.until(lambda: node.copies, "the copy stored after the restart")


class TLSTests(ForwarderCase):

    async def test_client_certificate_over_starttls(self) -> None:
        """With archive.tls required, a CA to verify the node and a client certificate, the copy goes over STARTTLS to a node that demands a client certificate."""
        import trustme

        server_ca, client_ca = trustme.CA(), trustme.CA()
        server = server_ca.issue_cert("localhost")
        client = client_ca.issue_cert("edge.test")
        tmp = tempfile.mkdtemp(prefix="mpp-fwd-tls-")
        self.addCleanup(shutil.rmtree, tmp, True)
        paths = {n: os.path.join(tmp, n) for n in ("ca.pem", "cert.pem", "key.pem")}
        server_ca.cert_pem.write_to_path(paths["ca.pem"])
        client.cert_chain_pems[0].write_to_path(paths["cert.pem"])
        client.private_key_pem.write_to_path(paths["key.pem"])
        mine = ssl.PrivateCertificate.loadPEM(server.private_key_and_cert_chain_pem.bytes())
        demanding = ssl.CertificateOptions(
            privateKey=mine.privateKey.original, certificate=mine.original, verify=True,
            caCerts=[ssl.Certificate.loadPEM(client_ca.cert_pem.bytes()).original],
            requireCertificate=True)
        node = ArchiveNode(tls_context=demanding)
        port = node.start(self)
        forwarder, queue = self.make(port, node=f"localhost:{port}", tls="required",
                                     tls_verify=True, tls_ca_file=paths["ca.pem"],
                                     tls_cert_file=paths["cert.pem"],
                                     tls_key_file=paths["key.pem"])
        self.put(queue)
        forwarder.start()
        [copy] = await self.until(lambda: node.copies, "the copy stored over TLS")
        self.assertTrue(copy.tls)


# --- pure parts -------------------------------------------------------------------------

def _reference_body(message: bytes) -> bytes:
    """The body as the archive node's receiver finds it: after the first
    CRLF CRLF of the copy, whose header section is ours on top."""
    copy = b"X-MPP-Node: edge\r\n" + message
    _, found, body = copy.partition(b"\r\n\r\n")
    return body if found else b""


BODY_CASES = [MESSAGE, b"\r\nbody only\r\n", b"Subject: no body\r\n", b"Subject: x\r\n\r\n",
              b"", b"A: b\r\n\r\n\r\n\r\nbody\r\n", b"A: b\r\n\r\r\n\r\nb"]


def test_body_digest_matches_the_receivers_split() -> None:
    """The digest covers the octets after the first empty line, as the receiver splits the copy (empty header, no body, blank lines in the body)."""
    for message in BODY_CASES:
        assert message_body_digest([message]) == BodyDigest.of([_reference_body(message)]), message


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(BODY_CASES), st.lists(st.integers(1, 8), min_size=1, max_size=40))
def test_body_digest_does_not_depend_on_the_chunks(message: bytes, sizes: list[int]) -> None:
    """However the queued message is cut into chunks, the digest is the same."""
    chunks, at = [], 0
    for size in itertools.cycle(sizes):
        if at >= len(message):
            break
        chunks.append(message[at:at + size])
        at += size
    assert message_body_digest(iter(chunks)) == BodyDigest.of([_reference_body(message)])


def test_node_backend_config_from_the_archive_keys() -> None:
    """archive.node gives host and port (10025 when none; [v6]:port), and every wait is archive.reply_timeout."""
    cfg = node_backend_config(ArchiveConfig(node="archive.example", connect_timeout=3.0,
                                            reply_timeout=7.0, tls="required"), "edge.test")
    assert (cfg.host, cfg.port, cfg.tls, cfg.helo_name) == ("archive.example", NODE_PORT,
                                                           "required", "edge.test")
    assert cfg.connect_timeout == 3.0
    assert {cfg.greeting_timeout, cfg.mail_timeout, cfg.rcpt_timeout, cfg.data_init_timeout,
            cfg.data_block_timeout, cfg.data_done_timeout} == {7.0}
    v6 = node_backend_config(ArchiveConfig(node="[2001:db8::1]:2525"), "e")
    assert (v6.host, v6.port) == ("2001:db8::1", 2525)


def test_metadata_round_trip_and_refusals() -> None:
    """The queue metadata gives the state back; another version or no state is a ValueError."""
    assert state_of(metadata_for(STATE)) == STATE
    for bad in ({"v": 2, "state": "x"}, {"v": 1}, {"v": 1, "state": "!!"}):
        try:
            state_of(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} was accepted")
