"""The edge side of issue 12: held messages and archive copies into the
durable queue (actions/quarantine.py, archive/copies.py), the service's
wiring of the queue and the forwarder (service.py), and the [archive]
checks of the loader (config/load.py).

The proxy runs in-process on loopback (``loopback.start_proxy``) in front of
the fake backend; the queue is real, in the test's directory or on a tmpfs
that fills up (root only: skipped otherwise, failed under
``MPP_REQUIRE_SERVICES=1``); the archive node is the project's own ESMTP
server verifying each copy (``test_forwarder.ArchiveNode``).
"""
from __future__ import annotations

import base64
import errno
import os
import shutil
import tempfile
import time
from dataclasses import replace
from typing import Any, Optional

import pytest
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel
from twisted.trial import unittest

from fakes_backend import FakeBackend, poll_until
from helpers import mount_tmpfs
from loopback import InProcessProxy, proxy_config, start_proxy, wait_reactor_quiet
from mppproxy.archive.copies import state_of
from mppproxy.archive.forwarder import ForwarderState
from mppproxy.config.archive import ArchiveConfig
from mppproxy.config.errors import ConfigError
from mppproxy.config.load import check_files, from_mapping
from mppproxy.config.schema import ProxyConfig
from mppproxy.results import Disposition
from mppproxy.service import ProxyService
from mppproxy.spool.queue import DurableQueue, QueueItem
from test_disk_full import fill
from test_forwarder import ArchiveNode, Events, free_port
from test_policy_loopback import session

SPAM = b"From: <s@client.test>\r\nSubject: Cheap meds today\r\n\r\nbody\r\n"
CLEAN = b"From: <s@client.test>\r\nSubject: hello\r\n\r\nbody\r\n"
# A Subject rule scoring 6: over quarantine (6), under reject (15).
POLICY = {"policies": {"default": {
    "scan": {"enabled": True, "result_headers": True, "headers": {"rules": [
        {"pattern": "(?i)cheap meds", "header": "Subject", "action": "score:6",
         "name": "CHEAP_MEDS"}]}},
    "scoring": {"tag": 5, "quarantine": 6, "reject": 15}}}}
# The secret of test_forwarder.KEYS, the ring its ArchiveNode verifies with.
KEY_LINE = "edge-2024 = " + base64.b64encode(b"s" * 32).decode()


def key_file(case: Any, text: str = KEY_LINE + "\n", mode: int = 0o600) -> str:
    """A key file (mode 600 unless said) in a directory removed after the test."""
    directory = tempfile.mkdtemp(prefix="mpp-keys-")
    case.addCleanup(shutil.rmtree, directory, True)
    path = os.path.join(directory, "archive.keys")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def queued(queue: DurableQueue) -> list[str]:
    return sorted(os.listdir(os.path.join(queue.directory, "new")))


class EdgeCase(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        wait_reactor_quiet(self)

    def start(self, archive: Optional[ArchiveConfig] = None, policy: Optional[dict[str, Any]] = None,
              fake: Optional[FakeBackend] = None) -> tuple[FakeBackend, InProcessProxy]:
        fake = fake or FakeBackend()
        config = proxy_config(self.mktemp(), fake.start_for(self), policy=policy,
                              relay_domains=("example.com", "school.example"))
        config = replace(config, archive=archive or ArchiveConfig())
        proxy = start_proxy(self, config)
        keeper = proxy.service.keeper
        if keeper is not None:
            # Without archive.node the node's own writer stores what is
            # queued (archivenode/keeper.py; tests/test_local_archive.py):
            # these tests look at the queue itself, so it waits.
            keeper.writer.stop()
        return fake, proxy

    async def send(self, proxy: InProcessProxy, rcpts: tuple[str, ...] = ("a@example.com",),
                   message: bytes = CLEAN) -> tuple[int, bytes]:
        out = await deferToThread(session, proxy.port, rcpts, message=message)
        code, text = out["data"]
        return int(code), bytes(text)

    def claim(self, proxy: InProcessProxy) -> QueueItem:
        queue = proxy.service.archive_queue
        assert queue is not None
        item = queue.claim()
        assert item is not None, "nothing in the archive queue"
        self.addCleanup(queue.finish, item)
        return item


class HoldTests(EdgeCase):

    async def test_held_message_is_in_the_queue_with_its_state_when_250_comes(self) -> None:
        """A quarantined message gets 250 naming its queue id only with the item already in the queue: the octets the edge would relay, and the transaction's state."""
        fake, proxy = self.start(ArchiveConfig(node_name="edge-7"), POLICY)
        before = time.time()
        code, text = await self.send(proxy, ("a@example.com", "b@example.com"), SPAM)
        self.assertEqual(code, 250, text)
        self.assertTrue(text.startswith(b"2.0.0 Ok: queued as "), text)
        queue_id = text.split()[-1].decode()
        self.assertEqual(fake.messages, [])
        item = self.claim(proxy)
        state = state_of(item.metadata)
        self.assertEqual((state.node, state.queue_id, state.client, state.helo, state.tls),
                         ("edge-7", queue_id, "127.0.0.1", "client.test", False))
        self.assertEqual((state.sender, state.recipients, state.policy),
                         ("s@client.test", ("a@example.com", "b@example.com"), "default"))
        self.assertEqual((state.verdict, state.disposition, state.score),
                         (Disposition.QUARANTINE, Disposition.QUARANTINE, 6.0))
        self.assertTrue(any("CHEAP_MEDS" in r for c in state.checks for r in c.reasons),
                        state.checks)
        self.assertTrue(before <= state.received <= time.time())
        message = item.message()
        self.assertTrue(message.startswith(b"Received: from client.test"), message[:80])
        self.assertIn(b"X-MPP-Scan: score=6; action=quarantine\r\n", message)
        self.assertTrue(message.endswith(SPAM[SPAM.index(b"Subject"):]), message)

    async def test_node_name_defaults_to_the_hostname(self) -> None:
        """Without archive.node_name the state names the edge by smtp.hostname."""
        _, proxy = self.start(None, POLICY)
        code, _ = await self.send(proxy, message=SPAM)
        self.assertEqual(code, 250)
        self.assertEqual(state_of(self.claim(proxy).metadata).node, "proxy.test")

    async def test_full_disk_gets_452_and_leaves_nothing_queued(self) -> None:
        """With the queue's disk full a held message gets 452 4.3.1 naming the quarantine in the log and nothing of it stays queued; with room again the next one is held."""
        full = mount_tmpfs(self)
        _, proxy = self.start(ArchiveConfig(queue_dir=os.path.join(full, "queue")), POLICY)
        queue = proxy.service.archive_queue
        assert queue is not None
        filler = fill(full)
        events = Events(self)
        code, text = await self.send(proxy, message=SPAM)
        self.assertEqual((code, text[:6]), (452, b"4.3.1 "))
        [logged] = [e for e in events.events if e.get("log_level") == LogLevel.error
                    and e.get("what") == "quarantine"]
        self.assertEqual(logged["errno"], errno.ENOSPC)
        self.assertEqual(queue.stats().depth, 0)
        self.assertEqual(os.listdir(os.path.join(queue.directory, "tmp")), [])
        os.unlink(filler)
        code, _ = await self.send(proxy, message=SPAM)
        self.assertEqual(code, 250)
        self.assertEqual(queue.stats().depth, 1)


class CopyTests(EdgeCase):

    async def test_copy_all_is_queued_after_the_backends_250(self) -> None:
        """With archive.copy = "all" a relayed message is copied only after the backend said 250, and the copy holds the octets the backend got."""
        fake = FakeBackend(delays={"EOM": 0.5})
        _, proxy = self.start(ArchiveConfig(copy="all"), fake=fake)
        queue = proxy.service.archive_queue
        assert queue is not None
        sent = deferToThread(session, proxy.port, ("a@example.com",), message=CLEAN)
        await poll_until(reactor, lambda: fake.messages, 10.0, "the backend has the message")
        self.assertEqual(queued(queue), [])  # the backend has not answered yet
        out = await sent
        self.assertEqual(out["data"][0], 250)
        item = self.claim(proxy)
        self.assertEqual(item.message(), fake.messages[0].data)
        state = state_of(item.metadata)
        self.assertEqual((state.verdict, state.disposition), (Disposition.RELAY, Disposition.RELAY))

    async def test_tagged_message_copy_says_tag(self) -> None:
        """A tagged and relayed message's copy has disposition tag."""
        policy = {"policies": {"default": {**POLICY["policies"]["default"],  # type: ignore[index]
                                           "scoring": {"tag": 5, "reject": 15}}}}
        _, proxy = self.start(ArchiveConfig(copy="all"), policy)
        code, _ = await self.send(proxy, message=SPAM)
        self.assertEqual(code, 250)
        self.assertEqual(state_of(self.claim(proxy).metadata).disposition, Disposition.TAG)

    async def test_copy_domains_copies_only_mail_for_those_domains(self) -> None:
        """With archive.copy = "domains" only a message with a recipient in archive.domains is copied."""
        _, proxy = self.start(ArchiveConfig(copy="domains", domains=("school.example",)))
        queue = proxy.service.archive_queue
        assert queue is not None
        self.assertEqual((await self.send(proxy, ("a@example.com",)))[0], 250)
        self.assertEqual(queued(queue), [])
        self.assertEqual((await self.send(proxy, ("b@School.Example",)))[0], 250)
        self.assertEqual(state_of(self.claim(proxy).metadata).recipients, ("b@School.Example",))

    async def test_refused_and_deferred_mail_is_not_copied(self) -> None:
        """A message the backend refuses (554) or defers (451) gets that reply and no copy."""
        fake = FakeBackend(replies={"EOM": "554 5.7.1 no thanks"})
        _, proxy = self.start(ArchiveConfig(copy="all"), fake=fake)
        queue = proxy.service.archive_queue
        assert queue is not None
        self.assertEqual((await self.send(proxy))[0], 554)
        fake.replies["EOM"] = "451 4.3.0 later"
        self.assertEqual((await self.send(proxy))[0], 451)
        self.assertEqual(queue.stats().depth, 0)

    async def test_discarded_mail_is_not_copied(self) -> None:
        """A message discarded by the policy is not copied, even with copy = "all"."""
        policy = {"policies": {"default": {**POLICY["policies"]["default"],  # type: ignore[index]
                                           "scan": {**POLICY["policies"]["default"]["scan"],  # type: ignore[index]
                                                    "discard_score": 6},
                                           "scoring": {"tag": 5, "reject": 15}}}}
        fake, proxy = self.start(ArchiveConfig(copy="all"), policy)
        self.assertEqual((await self.send(proxy, message=SPAM))[0], 250)
        self.assertEqual(fake.messages, [])
        queue = proxy.service.archive_queue
        assert queue is not None
        self.assertEqual(queue.stats().depth, 0)

    async def test_copy_that_cannot_be_written_keeps_the_250_and_logs_an_error(self) -> None:
        """A copy that meets a full disk after the backend's 250: the client still hears the 250, and an error names the queue id."""
        full = mount_tmpfs(self)
        fake, proxy = self.start(ArchiveConfig(copy="all", queue_dir=os.path.join(full, "q")))
        filler = fill(full)
        self.addCleanup(os.unlink, filler)
        events = Events(self)
        code, text = await self.send(proxy)
        self.assertEqual(code, 250, text)
        self.assertEqual(len(fake.messages), 1)
        [logged] = events.matching("NOT kept", LogLevel.error)
        self.assertEqual((logged["errno"], logged["disposition"]), (errno.ENOSPC, "relay"))
        [transaction] = [e for e in events.events if e.get("mpp_event") == "transaction"]
        self.assertEqual(logged["queue_id"], transaction["queue_id"])
        self.assertIsNone(transaction["archive_item"])

    async def test_the_log_line_names_the_archive_item(self) -> None:
        """The transaction's log line names the queue item that holds a held message, and the one of a copy kept by copy-all."""
        fake, proxy = self.start(ArchiveConfig(copy="all"), POLICY)
        events = Events(self)
        for message in (SPAM, CLEAN):
            code, text = await self.send(proxy, message=message)
            self.assertEqual(code, 250, text)
        queue = proxy.service.archive_queue
        assert queue is not None
        items = {name.split("_")[1] for name in queued(queue)}
        logged = [e for e in events.events if e.get("mpp_event") == "transaction"]
        self.assertEqual([e["action"] for e in logged], ["quarantine", "relay"])
        self.assertEqual({e["archive_item"] for e in logged}, items)


class ForwardingTests(EdgeCase):

    async def test_node_down_mail_keeps_flowing_then_the_copy_arrives(self) -> None:
        """With the archive node down a held message still gets 250 and waits in the queue; once the node listens the forwarder delivers it, its state verified there."""
        port = await free_port()
        archive = ArchiveConfig(node=f"127.0.0.1:{port}", key_file=key_file(self),
                                retry_base=0.2, retry_max=0.4, connect_timeout=2.0)
        _, proxy = self.start(archive, POLICY)
        forwarder = proxy.service.forwarder
        assert forwarder is not None and forwarder.state is ForwarderState.RUNNING
        code, text = await self.send(proxy, message=SPAM)
        self.assertEqual(code, 250)
        queue = proxy.service.archive_queue
        assert queue is not None
        await poll_until(reactor, lambda: any(n.split("_")[2] != "0" for n in queued(queue)),
                         10.0, "a counted retry while the node is down")
        node = ArchiveNode()
        node.start(self, port)
        [copy] = await poll_until(reactor, lambda: node.copies, 10.0, "the copy at the node")
        self.assertEqual(copy.state.queue_id, text.split()[-1].decode())
        self.assertEqual(copy.state.disposition, Disposition.QUARANTINE)
        await poll_until(reactor, lambda: queue.stats().depth == 0, 10.0, "the item finished")

    async def test_reload_keeps_the_forwarder_or_rebuilds_it(self) -> None:
        """A reload with the same [archive] keeps the forwarder and takes the rotated key file; a changed [archive] replaces it; no node stops it."""
        keys = key_file(self)
        archive = ArchiveConfig(node="127.0.0.1:9", key_file=keys, retry_base=5.0)
        _, proxy = self.start(archive)
        service = proxy.service
        first = service.forwarder
        assert first is not None
        with open(keys, "a") as f:
            f.write("edge-2025 = " + base64.b64encode(b"t" * 32).decode() + "\n")
        service.apply(service.config)
        self.assertIs(service.forwarder, first)
        self.assertEqual(first.keys.signing.id, "edge-2025")
        service.apply(replace(service.config, archive=replace(archive, connections=3)))
        second = service.forwarder
        assert second is not None
        self.assertIsNot(second, first)
        self.assertEqual(second.config.connections, 3)
        await poll_until(reactor, lambda: first.state is ForwarderState.STOPPED, 10.0,
                         "the old forwarder stopped")
        queue = service.archive_queue
        service.apply(replace(service.config, archive=ArchiveConfig()))
        self.assertIsNone(service.forwarder)
        self.assertIs(service.archive_queue, queue)
        await poll_until(reactor, lambda: second.state is ForwarderState.STOPPED, 10.0,
                         "the second forwarder stopped")

    def test_a_worker_process_queues_but_does_not_forward(self) -> None:
        """In a worker process (listeners inherited) the archive queue is opened but no forwarder runs: the main process forwards."""
        config = replace(proxy_config(self.mktemp()),
                         archive=ArchiveConfig(node="127.0.0.1:9", key_file=key_file(self)))
        worker = ProxyService(config, reactor, inherited_fds=((1000, 2),))
        worker._update_archive(config)
        self.addCleanup(lambda: worker.archive.close() if worker.archive else None)
        self.assertIsNone(worker.forwarder)
        assert worker.archive_queue is not None
        self.assertTrue(worker.archive_queue.is_open)


# --- the [archive] checks ------------------------------------------------------------

def _errors(data: dict[str, Any], files: bool = False) -> list[str]:
    try:
        config = from_mapping(data, "test.toml")
        if files:
            check_files(config, "test.toml")
    except ConfigError as e:
        return e.errors
    return []


@pytest.mark.parametrize("archive, key, fragment", [
    ({"node": "archive.example:10025"}, "archive.key_file", "set it"),
    ({"copy": "domains"}, "archive.domains", "names none"),
    ({"domains": ["example.com"]}, "archive.domains", "does not read it"),
    ({"copy": "domains", "domains": ["*.example.com"]}, "archive.domains", "no wildcards"),
    ({"tls": "required", "tls_cert_file": "/c.pem"}, "archive.tls_key_file", "set the key"),
    ({"tls": "required", "tls_key_file": "/k.pem"}, "archive.tls_key_file",
     "archive.tls_cert_file is not"),
    ({"tls_cert_file": "/c.pem", "tls_key_file": "/k.pem"}, "archive.tls_cert_file",
     "archive.tls is 'none'"),
    ({"retry_base": 100, "retry_max": 10}, "archive.retry_base", "archive.retry_max"),
    ({"node": "archive.example:notaport", "key_file": "/k"}, "archive.node", "HOST:PORT"),
    ({"copy": "everything"}, "archive.copy", ""),
])
def test_archive_settings_that_cannot_work_are_named(archive: dict[str, Any], key: str,
                                                     fragment: str) -> None:
    """Each [archive] setting that cannot work is refused with its key named, no traceback."""
    errors = _errors({"archive": archive})
    assert any(e.startswith(f"test.toml: {key}:") and fragment in e for e in errors), errors


class KeyFileCheckTests(unittest.SynchronousTestCase):

    def test_key_file_problems_are_named_by_the_key(self) -> None:
        """An unreadable, group-readable or malformed key file is refused as archive.key_file: file:line: problem."""
        missing = os.path.join(tempfile.gettempdir(), "mpp-no-such-key-file")
        [error] = _errors({"archive": {"node": "a.example", "key_file": missing}}, files=True)
        self.assertTrue(error.startswith(f"test.toml: archive.key_file: {missing}: cannot open"),
                        error)
        loose = key_file(self, mode=0o644)
        [error] = _errors({"archive": {"node": "a.example", "key_file": loose}}, files=True)
        self.assertIn("chmod 600", error)
        self.assertTrue(error.startswith("test.toml: archive.key_file: "), error)
        bad = key_file(self, "edge = not base64!\n")
        [error] = _errors({"archive": {"node": "a.example", "key_file": bad}}, files=True)
        self.assertTrue(error.startswith(f"test.toml: archive.key_file: {bad}:1: "), error)
        self.assertEqual(_errors({"archive": {"node": "a.example", "key_file": key_file(self)}},
                                 files=True), [])

    def test_certificate_files_are_loaded(self) -> None:
        """A client certificate or CA file that does not load is named by its key."""
        nothing = os.path.join(tempfile.gettempdir(), "mpp-no-such-cert.pem")
        errors = _errors({"archive": {"tls": "required", "tls_cert_file": nothing,
                                      "tls_key_file": nothing, "tls_ca_file": nothing}},
                         files=True)
        self.assertEqual([e.split(":")[1].strip() for e in errors],
                         ["archive.tls_cert_file", "archive.tls_ca_file"], errors)

    def test_other_modes_do_not_read_archive(self) -> None:
        """The policy server does not read [archive], so it is not checked there."""
        self.assertEqual(_errors({"mode": "policy", "archive": {"copy": "domains"}}), [])

    def test_default_config_has_no_archive_problem(self) -> None:
        """The defaults pass: held mail is queued, nothing is forwarded."""
        self.assertEqual(ProxyConfig().archive, ArchiveConfig())
        self.assertEqual(_errors({}), [])
