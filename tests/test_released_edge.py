"""A message released from the quarantine is not held again at the edge
(issue 12, "Release done right"): edge/handler.py honours a valid
X-MPP-Released mark (archive/released.py) on a message its verdict would
hold, and ignores a forged, altered or stale one.

The proxy runs in-process on loopback in front of the fake backend, with
the Subject rule of tests/test_archive_edge.py that holds "Cheap meds".
"""
from __future__ import annotations

import time

from twisted.internet import reactor

from fakes_backend import poll_until
from mppproxy.archive.keys import load_keys
from mppproxy.archive.released import MARK_LIFETIME, mark, split_message
from mppproxy.archive.state import BodyDigest
from mppproxy.config.archive import ArchiveConfig
from test_archive_edge import POLICY, SPAM, EdgeCase, key_file, queued


class ReleasedMarkTests(EdgeCase):

    def marked(self, keys_path: str, at: float, message: bytes = SPAM,
               ref: str = "ref-1") -> bytes:
        header, body = split_message(message)
        return mark(ref, at, BodyDigest.of([body]), load_keys(keys_path)) + message

    async def test_a_valid_mark_is_relayed_not_held(self) -> None:
        """The held kind of message, marked as released with the node's keys: relayed to the backend, the mark removed, nothing queued."""
        path = key_file(self)
        fake, proxy = self.start(ArchiveConfig(key_file=path), POLICY)
        code, text = await self.send(proxy, message=self.marked(path, time.time()))
        self.assertEqual(code, 250, text)
        await poll_until(reactor, lambda: len(fake.messages) == 1, 10.0, "the backend has the message")
        self.assertNotIn(b"X-MPP-Released", fake.messages[0].data)
        self.assertIn(b"Cheap meds", fake.messages[0].data)
        queue = proxy.service.archive_queue
        assert queue is not None
        self.assertEqual(queued(queue), [])

    async def test_forged_altered_or_stale_marks_are_held(self) -> None:
        """A mark made with another key, for another body, or older than a day changes nothing: the message is held."""
        path = key_file(self)
        other = key_file(self, "edge-2024 = " + "b" * 43 + "=\n")
        fake, proxy = self.start(ArchiveConfig(key_file=path), POLICY)
        stale = time.time() - MARK_LIFETIME - 60
        forged = self.marked(other, time.time())
        altered = self.marked(path, time.time()).replace(b"body\r\n", b"body, changed\r\n")
        for message in (forged, altered, self.marked(path, stale)):
            code, text = await self.send(proxy, message=message)
            self.assertEqual(code, 250, text)
        queue = proxy.service.archive_queue
        assert queue is not None
        self.assertEqual(len(queued(queue)), 3)
        self.assertEqual(fake.messages, [])

    async def test_all_in_one_makes_its_own_key_file(self) -> None:
        """Without archive.key_file the node makes data_dir/archive.keys at start and honours marks made with it (mppproxy quarantine release on the same host)."""
        fake, proxy = self.start(ArchiveConfig(), POLICY)
        path = proxy.service.config.data_dir + "/archive.keys"
        code, text = await self.send(proxy, message=self.marked(path, time.time()))
        self.assertEqual(code, 250, text)
        await poll_until(reactor, lambda: len(fake.messages) == 1, 10.0, "the backend has the message")
