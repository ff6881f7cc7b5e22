"""The archive node (issue 12, "Archive node" and "Bad input and faults"):
the receiver (mppproxy/archive/receiver.py) behind the project's own ESMTP
server on loopback, spoken to by the project's own SMTP client; the whole
service (mppproxy/archivenode/service.py) in this process; and
``twistd -n mppproxy --mode archive`` as a process.

The receiver tests open the node's real durable queue with no writer, so
what a copy leaves behind is there to read; the service tests store into
the real store (SQLite under the test's data directory).
"""
from __future__ import annotations

import base64
import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from twisted.internet import reactor as _reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from helpers import free_port, mount_tmpfs, stop_process, wait_for
from mppproxy.archive.keys import Key, KeyRing
from mppproxy.archive.receiver import ArchiveReceiver, ReceiverContext
from mppproxy.archive.state import BodyDigest, CopyState, render, sign
from mppproxy.archive.copies import state_of
from mppproxy.archivenode.service import ArchiveFactory, ArchiveService, tls_context
from mppproxy.config.archive import ArchiveNodeConfig, StoreConfig
from mppproxy.config.schema import BackendConfig, ProxyConfig, TLSConfig, spool_directory
from mppproxy.match import TrustedNetworks
from mppproxy.results import Disposition
from mppproxy.smtp.client import BackendError, connect_backend
from mppproxy.smtp.replies import Reply
from mppproxy.spool.queue import DurableQueue
from mppproxy.store.store import ArchiveStore, Search, StoreError

reactor: Any = _reactor

ROOT = Path(__file__).resolve().parents[1]
KEY = Key("2024-07", b"k" * 32)
KEYS = KeyRing.of(KEY)
EDGE_MESSAGE = (b"Received: from mail.example.org ([192.0.2.7])\r\n\tby edge-1 (mppproxy) with ESMTP id "
                b"Q1;\r\n\tMon, 1 Jan 2024 00:00:00 +0000\r\nSubject: held\r\n"
                b"X-Spam-Score: 7.5\r\n\r\nThe body.\r\n.leading dot\r\n")
WAIT = 20.0


def copy_state(queue_id: str = "Q1", **changes: Any) -> CopyState:
    base = CopyState(node="edge-1", queue_id=queue_id, received=1_700_000_000.25,
                     client="192.0.2.7", helo="mail.example.org", tls=True,
                     sender="alice@example.org", recipients=("bob@example.com",),
                     policy="default", verdict=Disposition.QUARANTINE,
                     disposition=Disposition.QUARANTINE, score=7.5, reasons=("listed in zen",))
    return replace(base, **changes)


def body_of(message: bytes) -> bytes:
    return message.partition(b"\r\n\r\n")[2]


def signed_copy(message: bytes = EDGE_MESSAGE, state: Optional[CopyState] = None,
                keys: KeyRing = KEYS, body: Optional[bytes] = None) -> bytes:
    """What an edge's forwarder sends: the signed state fields on top of the
    message it kept.  ``body``: the body the signature covers, when it is
    to differ from the one sent."""
    digest = BodyDigest.of([body_of(message) if body is None else body])
    return render(sign(state or copy_state(), digest, keys)) + message


def key_file(directory: str, *keys: Key) -> str:
    path = os.path.join(directory, "archive.keys")
    with open(path, "w") as f:
        for key in keys or (KEY,):
            f.write(f"{key.id} = {base64.b64encode(key.secret).decode()}\n")
    os.chmod(path, 0o600)
    return path


def events_of(case: unittest.TestCase) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    case.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def said(events: list[dict[str, Any]], start: str) -> list[dict[str, Any]]:
    return [e for e in events if (e.get("log_format") or "").startswith(start)]


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def send_copy(port: int, copy: bytes, tls: Any = None) -> tuple[Reply, Reply]:
    """(the reply to MAIL, the reply to the end of DATA, or to MAIL when
    that was refused) for one copy sent as the forwarder sends it, with the
    project's SMTP client."""
    cfg = BackendConfig(host="127.0.0.1", port=port, tls="required" if tls else "none",
                        connect_timeout=5, greeting_timeout=WAIT, mail_timeout=WAIT,
                        rcpt_timeout=WAIT, data_init_timeout=WAIT, data_block_timeout=WAIT,
                        data_done_timeout=WAIT)
    client = await connect_backend(reactor, cfg, "edge-1.test", tls)
    try:
        mail = await client.command(b"MAIL FROM:<>", WAIT)
        if mail.code != 250:
            return mail, mail
        rcpt = await client.command(b"RCPT TO:<archive@archive.invalid>", WAIT)
        assert rcpt.code == 250, str(rcpt)
        reply, sent = await client.send_message([copy], cfg)
        assert sent, str(reply)
        return mail, reply
    finally:
        client.close()


class Collect(Protocol):
    """Everything a server says until it closes the connection."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(self.data)


class NodeCase(unittest.TestCase):
    """A receiver on loopback with the node's queue, no writer."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mpp-node-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.events = events_of(self)
        self.queue: Optional[DurableQueue] = None

    def config(self, queue_dir: str = "", **node: Any) -> ProxyConfig:
        node.setdefault("key_file", key_file(self.dir))
        return ProxyConfig(mode="archive", data_dir=os.path.join(self.dir, "data"),
                           archive_node=ArchiveNodeConfig(queue_dir=queue_dir, **node))

    def start(self, config: Optional[ProxyConfig] = None, keys: KeyRing = KEYS) -> int:
        """Listen as the service does (its factory and TLS); the port."""
        config = config or self.config()
        os.makedirs(spool_directory(config), exist_ok=True)
        self.queue = DurableQueue(config.archive_node.queue_dir
                                  or os.path.join(config.data_dir, "archive-node-queue"))
        self.queue.open()
        self.addCleanup(self.queue.close)
        node = config.archive_node
        ctx = ReceiverContext(reactor=reactor, threadpool=reactor.getThreadPool(),
                              queue=self.queue, keys=keys, is_edge=TrustedNetworks(node.edges),
                              require_client_cert=node.require_client_cert,
                              max_message_size=config.limits.max_message_size)
        factory = ArchiveFactory(config, lambda: ArchiveReceiver(ctx), reactor,
                                 tls_context=tls_context(config, "archive.test"),
                                 is_trusted=ctx.is_edge, hostname="archive.test")
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.shut_down, 1.0)
        result: int = port.getHost().port
        return result

    async def send(self, port: int, copy: bytes, tls: Any = None) -> tuple[Reply, Reply]:
        return await send_copy(port, copy, tls)

    def items(self) -> list[Any]:
        """Every item the receiver queued (claimed here: nothing else reads)."""
        assert self.queue is not None
        out = []
        while True:
            item = self.queue.claim()
            if item is None:
                return out
            out.append(item)

    def assert_refused(self, reply: Reply, code: int, enhanced: str, reason: str) -> None:
        """A refusal with its reference, the log line with the reason, nothing queued."""
        self.assertEqual((reply.code, reply.enhanced), (code, enhanced), str(reply))
        self.assertRegex(reply.text, r"\(ref [0-9A-Z]+\)$")
        ref = reply.text.rsplit("(ref ", 1)[1].rstrip(")")
        logged = [e for e in said(self.events, "archive copy from {client} refused")
                  if e["queue_id"] == ref]
        self.assertEqual(len(logged), 1, self.events)
        self.assertIn(reason, logged[0]["reason"])
        self.assertEqual(self.items(), [])


class ReceiverTests(NodeCase):

    async def test_signed_copy_is_queued_as_the_edge_kept_it(self) -> None:
        """A signed copy is answered 250 after it is queued: its item holds the verified state and the message without the X-MPP state fields."""
        port = self.start()
        state = copy_state(recipients=("bob@example.com", "carol@example.net"))
        _, reply = await self.send(port, signed_copy(state=state))
        self.assertEqual((reply.code, reply.enhanced), (250, "2.0.0"), str(reply))
        self.assertIn("Q1", reply.text)
        [item] = self.items()
        self.assertEqual(item.message(), EDGE_MESSAGE)
        self.assertEqual(state_of(item.metadata), state)
        [line] = said(self.events, "archive copy {ref} from {node} queued")
        self.assertEqual((line["ref"], line["node"], line["item_id"]), ("Q1", "edge-1", item.id))

    async def test_folded_and_reordered_state_fields_are_removed_whole(self) -> None:
        """State fields refolded and spread among the edge's own fields are all removed, folded lines included, and the other fields stay as they came."""
        fields = render(sign(copy_state(), BodyDigest.of([body_of(EDGE_MESSAGE)]), KEYS))
        lines = fields.split(b"\r\n")
        # The edge's fields first, ours after; a space before one colon.
        head, _, body = EDGE_MESSAGE.partition(b"\r\n\r\n")
        copy = head + b"\r\n" + b"\r\n".join(lines).replace(b"X-MPP-TLS:", b"X-MPP-TLS :") + \
            b"\r\n" + body
        port = self.start()
        _, reply = await self.send(port, copy)
        self.assertEqual(reply.code, 250, str(reply))
        [item] = self.items()
        self.assertEqual(item.message(), EDGE_MESSAGE)

    async def test_unsigned_copy_is_554_5_7_1(self) -> None:
        """A copy without a signature is refused 554 5.7.1, logged with the reason, nothing queued."""
        port = self.start()
        _, reply = await self.send(port, EDGE_MESSAGE)
        self.assert_refused(reply, 554, "5.7.1", "unsigned")

    async def test_bad_hmac_is_554_5_7_7(self) -> None:
        """A copy signed with another secret under a known key id is refused 554 5.7.7."""
        port = self.start()
        forged = KeyRing.of(Key(KEY.id, b"f" * 32))
        _, reply = await self.send(port, signed_copy(keys=forged))
        self.assert_refused(reply, 554, "5.7.7", "bad signature")

    async def test_changed_readable_field_is_554_5_7_7(self) -> None:
        """A readable state field changed after signing is refused 554 5.7.7."""
        port = self.start()
        copy = signed_copy().replace(b"X-MPP-Score: 7.5", b"X-MPP-Score: 0")
        _, reply = await self.send(port, copy)
        self.assert_refused(reply, 554, "5.7.7", "X-MPP-Score")

    async def test_unknown_key_id_is_451_4_7_5(self) -> None:
        """A key id the node has not loaded defers the copy, 451 4.7.5 (a rotation that reached the edge first)."""
        port = self.start()
        _, reply = await self.send(port, signed_copy(keys=KeyRing.of(Key("2025-01", b"n" * 32))))
        self.assert_refused(reply, 451, "4.7.5", "unknown key id 2025-01")

    async def test_truncated_body_is_554_5_6_0(self) -> None:
        """A copy whose body is shorter than the signed one is refused 554 5.6.0."""
        port = self.start()
        cut = EDGE_MESSAGE[:-len(b".leading dot\r\n")]
        _, reply = await self.send(port, signed_copy(cut, body=body_of(EDGE_MESSAGE)))
        self.assert_refused(reply, 554, "5.6.0", "truncated")

    async def test_body_that_differs_from_the_digest_is_554_5_7_7(self) -> None:
        """A body of the signed length but other octets is refused 554 5.7.7."""
        port = self.start()
        changed = EDGE_MESSAGE.replace(b"The body.", b"The bodY.")
        _, reply = await self.send(port, signed_copy(changed, body=body_of(EDGE_MESSAGE)))
        self.assert_refused(reply, 554, "5.7.7", "body does not match")

    async def test_state_field_that_does_not_parse_is_554_5_6_0(self) -> None:
        """A state blob that is not base64url, a signature that does not parse and a state field given twice are each refused 554 5.6.0."""
        port = self.start()
        good = signed_copy()
        broken_state = good.replace(b"X-MPP-State: ", b"X-MPP-State: !")
        broken_signature = b"".join(
            b"X-MPP-Signature: v=1; b=%%%\r\n" if line.startswith(b"X-MPP-Signature:") else line
            for line in good.splitlines(keepends=True))
        twice = b"X-MPP-Node: edge-1\r\n" + good
        for copy, reason in ((broken_state, "not base64url"), (broken_signature, "not base64"),
                             (twice, "more than once")):
            _, reply = await self.send(port, copy)
            self.assert_refused(reply, 554, "5.6.0", reason)

    async def test_missing_or_huge_header_section_is_554_5_6_0(self) -> None:
        """A copy that starts with the empty line, and one whose header section passes the bound (6 MiB), are refused 554 5.6.0."""
        port = self.start()
        _, reply = await self.send(port, b"\r\n" + signed_copy())
        self.assert_refused(reply, 554, "5.6.0", "no header section")
        filler = b"X-Filler: " + b"a" * 900 + b"\r\n"
        huge = signed_copy().replace(b"Subject: held\r\n", filler * 7200 + b"Subject: held\r\n")
        _, reply = await self.send(port, huge)
        self.assert_refused(reply, 554, "5.6.0", "header section longer than")

    async def test_full_disk_is_452_4_3_1_and_nothing_is_queued(self) -> None:
        """A queue on a full file system answers 452 4.3.1 (never 250 without the copy on disk), logs the error, and leaves no part of the item."""
        queue_dir = os.path.join(mount_tmpfs(self, "256k"), "queue")
        port = self.start(self.config(queue_dir=queue_dir))
        big = EDGE_MESSAGE.replace(b"The body.\r\n", (b"x" * 998 + b"\r\n") * 400)
        _, reply = await self.send(port, signed_copy(big))
        self.assertEqual((reply.code, reply.enhanced), (452, "4.3.1"), str(reply))
        self.assertEqual(len(said(self.events, "archive copy from {client} not queued")), 1)
        for sub in ("new", "tmp", "claimed"):
            self.assertEqual(os.listdir(os.path.join(queue_dir, sub)), [], sub)
        # Room again: the same copy is taken.
        _, reply = await self.send(port, signed_copy())
        self.assertEqual(reply.code, 250, str(reply))
        self.assertEqual(len(self.items()), 1)

    async def test_client_that_is_no_edge_hears_554_instead_of_the_greeting(self) -> None:
        """A client outside archive_node.edges hears 554 5.7.1 at connect (RFC 5321 3.1), the connection closes, and a log line names it."""
        port = self.start(self.config(edges=("192.0.2.0/24",)))
        collect = Collect()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), collect)
        heard = await collect.closed.addTimeout(WAIT, reactor)
        self.assertTrue(heard.startswith(b"554 5.7.1 "), heard)
        [line] = said(self.events, "archive copy refused: {client} is not an edge")
        self.assertEqual(line["client"], "127.0.0.1")

    async def test_client_certificate_required(self) -> None:
        """With require_client_cert, MAIL is 530 5.7.0 without STARTTLS and after a handshake without a certificate; a certificate of the CA is taken; one of another CA fails the handshake."""
        import trustme

        ca, other = trustme.CA(), trustme.CA()
        server = ca.issue_cert("archive.test")
        server_cert = os.path.join(self.dir, "server.pem")
        server.private_key_and_cert_chain_pem.write_to_path(server_cert)
        ca_file = os.path.join(self.dir, "ca.pem")
        ca.cert_pem.write_to_path(ca_file)
        config = replace(self.config(require_client_cert=True, client_ca_file=ca_file),
                         tls=TLSConfig(cert_file=server_cert))
        port = self.start(config)

        def client_tls(issuer: Optional[trustme.CA]) -> Any:
            if issuer is None:
                return ssl.CertificateOptions()
            pem = issuer.issue_cert("edge-1.test").private_key_and_cert_chain_pem.bytes()
            return ssl.PrivateCertificate.loadPEM(pem).options()

        mail, _ = await self.send(port, signed_copy())
        self.assertEqual((mail.code, mail.enhanced), (530, "5.7.0"), str(mail))
        self.assertIn("STARTTLS", mail.text)
        mail, _ = await self.send(port, signed_copy(), tls=client_tls(None))
        self.assertEqual((mail.code, mail.enhanced), (530, "5.7.0"), str(mail))
        self.assertIn("certificate", mail.text)
        mail, reply = await self.send(port, signed_copy(), tls=client_tls(ca))
        self.assertEqual((mail.code, reply.code), (250, 250), str(reply))
        with self.assertRaises(BackendError):
            await self.send(port, signed_copy(), tls=client_tls(other))
        self.assertEqual(len(self.items()), 1)
        self.assertEqual(len(said(self.events, "archive copy refused: {client} sent MAIL")), 2)


class ServiceTests(unittest.TestCase):
    """The whole node in this process: receiver, queue, writer, store."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mpp-archive-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.events = events_of(self)

    def make(self, **node: Any) -> tuple[ArchiveService, int]:
        port = free_port()
        node.setdefault("key_file", key_file(self.dir))
        config = ProxyConfig(mode="archive", data_dir=os.path.join(self.dir, "data"),
                             tls=TLSConfig(enabled=False),
                             archive_node=ArchiveNodeConfig(
                                 listen=(f"tcp:{port}:interface=127.0.0.1",), writer_retry=0.2,
                                 **node))
        service = ArchiveService(config, reactor)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        return service, port

    async def send(self, port: int, copy: bytes) -> Reply:
        return (await send_copy(port, copy))[1]

    async def rows(self, service: ArchiveService, **search: Any) -> list[Any]:
        assert service.store is not None
        rows: list[Any] = await deferToThreadPool(reactor, reactor.getThreadPool(),
                                                  service.store.search, Search(**search))
        return rows

    async def until_stored(self, service: ArchiveService, n: int) -> list[Any]:
        deadline = time.monotonic() + WAIT
        while True:
            if service.writer is not None and service.writer.store_ready:
                rows = await self.rows(service)
                if len(rows) >= n:
                    return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"{n} rows not stored within {WAIT} s")
            await sleep(0.05)

    async def test_a_copy_is_stored_with_its_state_and_without_the_fields(self) -> None:
        """A signed copy sent to the node ends as a row per recipient domain, its raw message the one the edge kept, and leaves the node's queue."""
        service, port = self.make()
        state = copy_state(recipients=("bob@example.com", "carol@example.net"))
        reply = await self.send(port, signed_copy(state=state))
        self.assertEqual(reply.code, 250, str(reply))
        rows = await self.until_stored(service, 2)
        self.assertEqual(sorted(r.rcpt_domain for r in rows), ["example.com", "example.net"])
        assert service.store is not None
        raw = await deferToThreadPool(reactor, reactor.getThreadPool(), service.store.raw, rows[0])
        self.assertEqual(raw, EDGE_MESSAGE)
        queue = service.queue
        assert queue is not None
        # The writer removes a stored batch's items from the queue after the
        # transaction, while it goes on (archive/writer.py: finish overlapped
        # with the next batch), so the rows may be seen a moment before.
        deadline = time.monotonic() + WAIT
        while queue.stats().depth and time.monotonic() < deadline:
            await sleep(0.05)
        self.assertEqual(queue.stats().depth, 0)

    async def test_reload_applies_new_keys_to_new_sessions(self) -> None:
        """A copy signed with a key the node lacks is deferred 451 4.7.5; after a reload that adds the key it is taken."""
        service, port = self.make()
        new = Key("2025-01", b"n" * 32)
        copy = signed_copy(keys=KeyRing.of(KEY, new))
        self.assertEqual((await self.send(port, copy)).code, 451)
        config = service.config
        both = key_file(os.path.join(self.dir, "data"), KEY, new)
        service.apply(replace(config, archive_node=replace(config.archive_node, key_file=both)))
        self.assertEqual((await self.send(port, copy)).code, 250)
        await self.until_stored(service, 1)

    async def test_purge_removes_copies_past_retention_and_stop_closes_everything(self) -> None:
        """The retention purge removes a copy older than store.retention_days and keeps a new one; a stop then closes the queue and the store and ends the writer."""
        service, port = self.make()
        old = copy_state("OLD", received=time.time() - 3 * 86400)
        for state in (old, copy_state("NEW", received=time.time())):
            self.assertEqual((await self.send(port, signed_copy(state=state))).code, 250)
        await self.until_stored(service, 2)
        service.config = replace(service.config, store=replace(service.config.store,
                                                               retention_days=1))
        assert service.keeper is not None
        service.keeper.config = service.config
        await service.keeper.purge_once()
        self.assertEqual([r.queue_id for r in await self.rows(service)], ["NEW"])
        [line] = said(self.events, "archive retention purge: {purged} rows removed")
        self.assertEqual(line["purged"], 1)
        await service.stopService()
        assert service.queue is not None and service.writer is not None
        self.assertFalse(service.queue.is_open)
        with self.assertRaises(StoreError):
            service.store.engine  # type: ignore[union-attr]  # closed: no engine

    async def test_copies_are_taken_while_the_database_is_down(self) -> None:
        """With the store's database unreachable at start the node still answers 250 (the copies wait in its queue) and stores them once the database is there."""
        blocker = os.path.join(self.dir, "db")
        with open(blocker, "w") as f:
            f.write("in the way")
        port = free_port()
        config = ProxyConfig(mode="archive", data_dir=os.path.join(self.dir, "data"),
                             tls=TLSConfig(enabled=False),
                             store=StoreConfig(url=f"sqlite:///{blocker}/archive.sqlite"),
                             archive_node=ArchiveNodeConfig(
                                 listen=(f"tcp:{port}:interface=127.0.0.1",), writer_retry=0.1,
                                 key_file=key_file(self.dir)))
        service = ArchiveService(config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        for i in range(3):
            reply = await self.send(port, signed_copy(state=copy_state(f"D{i}")))
            self.assertEqual(reply.code, 250, str(reply))
        assert service.queue is not None
        self.assertEqual(service.queue.stats().depth, 3)
        os.unlink(blocker)
        os.mkdir(blocker)
        rows = await self.until_stored(service, 3)
        self.assertEqual(sorted(r.queue_id for r in rows), ["D0", "D1", "D2"])
        self.assertEqual(len(said(self.events, "archive store unavailable")), 1)


# --- twistd ----------------------------------------------------------------------------------

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]


def test_twistd_mode_archive_stores_a_signed_copy(tmp_path: Path) -> None:
    """`twistd -n mppproxy --mode archive --config archive.toml` takes a signed copy over SMTP (250), refuses an unsigned one (554), and the copy is in its store after a stop."""
    port = free_port()
    data = tmp_path / "data"
    keys = key_file(str(tmp_path))
    cfg = tmp_path / "archive.toml"
    cfg.write_text(f'mode = "archive"\ndata_dir = "{data}"\n[tls]\nenabled = false\n[timeouts]\nshutdown_grace = 5\n'
                   f'[archive_node]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n'
                   f'key_file = "{keys}"\n')
    check = subprocess.run([sys.executable, "-m", "mppproxy", "check-config", str(cfg)],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert check.returncode == 0, check.stderr
    assert "mode archive" in check.stdout and f"archive node on tcp:{port}" in check.stdout
    log = open(tmp_path / "twistd.log", "wb")
    proc = subprocess.Popen([*TWISTD, "mppproxy", "--mode", "archive", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), start_new_session=True)
    try:
        def connected() -> Optional[smtplib.SMTP]:
            try:
                return smtplib.SMTP("127.0.0.1", port, timeout=10)
            except OSError:
                return None

        smtp = wait_for(lambda: proc.poll() is not None or connected(), 30, what="archive node")
        assert proc.poll() is None, (tmp_path / "twistd.log").read_text()
        assert isinstance(smtp, smtplib.SMTP)
        with smtp:
            smtp.ehlo("edge-1.test")
            code, text = smtp.docmd("MAIL", "FROM:<>")
            assert code == 250, text
            assert smtp.docmd("RCPT", "TO:<archive@archive.invalid>")[0] == 250
            code, text = smtp.data(signed_copy(state=copy_state("TW1")))
            assert code == 250, text
            smtp.rset()
            smtp.docmd("MAIL", "FROM:<>")
            smtp.docmd("RCPT", "TO:<archive@archive.invalid>")
            code, text = smtp.data(EDGE_MESSAGE)
            assert code == 554 and b"5.7.1" in text, text

        def stored() -> list[Any]:
            store = ArchiveStore(StoreConfig(), str(data))
            try:
                store.open()
                return store.search(Search(ref="TW1"))
            except Exception:
                return []
            finally:
                store.close()

        rows = wait_for(stored, 30, what="the copy in the store")
        assert [r.rcpt_domain for r in rows] == ["example.com"]
    finally:
        stop_process(proc)
        log.close()
    # twistd ends with the signal that stopped it (mppproxy/reloading.py).
    assert proc.returncode in (0, -15), (tmp_path / "twistd.log").read_text()
    text = (tmp_path / "twistd.log").read_text()
    assert "Traceback" not in text, text
    assert "archive copy TW1 from edge-1 queued as" in text, text
