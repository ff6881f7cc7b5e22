"""The edge's archive copies: a held message or an archive copy as one item
of the durable queue (issue 12, "Edge side").

Stage: archive (floor 2), after the verdict.  The hold action
(``actions/quarantine.py``) and the edge's copy of relayed mail hand over
the transaction's facts and its outbound message; this module turns them
into a queue item -- the message octets exactly as the edge passes them on
(our Received:, the result headers, a disclaimer: ``OutboundMessage.chunks``)
and the metadata ``{"v": 1, "state": <encode_state(CopyState)>}`` -- and
writes it in the thread pool.  Whoever takes items off the queue (the
forwarder to the archive node, or the node's own writer in all-in-one mode)
reads the state back with ``state_of``; the state is signed only when a copy
leaves the node (``forwarder.py``), with the keys of that moment.

Construction does no I/O.  The service opens the queue at start (its
``recover`` runs then); a context built without a service (tests, tools)
opens it at the first enqueue, in the thread pool.
"""
from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Union

from mppproxy.archive.keys import KeyRing
from mppproxy.archive.state import CopyState, StateRefused, decode_state_text, encode_state, state_from
from mppproxy.config.archive import ArchiveConfig
from mppproxy.message import OutboundMessage
from mppproxy.results import Disposition
from mppproxy.smtp.address import RelayDomains
from mppproxy.smtp.session import Session, Transaction
from mppproxy.spool.committer import GroupCommitter, PoolCommitter
from mppproxy.spool.queue import DurableQueue

if TYPE_CHECKING:
    from mppproxy.verdict import Verdict

# The version of the metadata dict; a reader refuses another (the item goes
# to bad/, kept for a person, rather than being sent half-understood).
METADATA_VERSION = 1
# Below data_dir when archive.queue_dir is empty.
DEFAULT_QUEUE_DIR = "archive-queue"


def queue_directory(config: ArchiveConfig, data_dir: str) -> str:
    """Where the edge's queue lives: archive.queue_dir, or data_dir/archive-queue."""
    return config.queue_dir or os.path.join(data_dir, DEFAULT_QUEUE_DIR)


def open_queue(config: ArchiveConfig, data_dir: str) -> DurableQueue:
    """The edge's queue with the retry and age limits of ``config``, not
    opened (no I/O): the caller opens it (``open`` runs ``recover``)."""
    return DurableQueue(queue_directory(config, data_dir), base_delay=config.retry_base,
                        max_delay=config.retry_max, max_age=config.max_age)


def node_name(config: ArchiveConfig, hostname: str) -> str:
    """This edge's name in the copies' state: archive.node_name, or the
    edge's hostname (smtp.hostname, or the host's FQDN)."""
    return config.node_name or hostname


def copy_state(node: str, session: Session, txn: Transaction, verdict: "Verdict",
               received: float, disposition: Optional[Disposition] = None) -> CopyState:
    """The state of ``txn`` as it travels with its copy: the facts of the
    transaction's log line (``state_from`` splits hits and misses as the
    log line does).  ``received``: time.time() at the end of DATA."""
    return state_from(node=node, queue_id=txn.id, received=received, client=session.peer_host,
                      helo=session.helo, tls=session.tls, sender=txn.sender.text,
                      recipients=[r.text for r in txn.recipients], record=txn.record,
                      verdict=verdict, disposition=disposition, smtputf8=txn.smtputf8)


def metadata_for(state: CopyState) -> dict[str, Any]:
    """The queue item's metadata for ``state``."""
    return {"v": METADATA_VERSION, "state": encode_state(state)}


def state_of(metadata: Mapping[str, Any]) -> CopyState:
    """The state of a queue item's metadata; ``ValueError`` naming what is
    wrong (another version, no state, a state that does not parse)."""
    return state_and_text(metadata)[0]


def state_and_text(metadata: Mapping[str, Any]) -> tuple[CopyState, str]:
    """``state_of``, and the state's JSON text (what the store keeps)."""
    if metadata.get("v") != METADATA_VERSION:
        raise ValueError(f"queue item metadata version {metadata.get('v')!r}, "
                         f"not {METADATA_VERSION}")
    blob = metadata.get("state")
    if not isinstance(blob, str):
        raise ValueError("queue item metadata without a state")
    try:
        return decode_state_text(blob)
    except StateRefused as e:
        raise ValueError(e.reason) from None


class ArchiveCopies:
    """The queue of one edge process and what it copies.

    ``wake`` is called on the reactor thread after each enqueue: the
    forwarder's ``wake`` when this process forwards, so a copy leaves at
    once instead of at the next poll.

    The items are written by the queue's group committer
    (``spool/committer.py``), one thread writing the copies of all sessions
    in batches; a reload that keeps the queue passes the committer on
    (``committer``), so one thread writes each queue."""

    def __init__(self, reactor: Any, queue: DurableQueue, config: ArchiveConfig, node: str,
                 committer: Optional[Union[GroupCommitter, PoolCommitter]] = None):
        self.reactor = reactor
        self.queue = queue
        self.committer: Union[GroupCommitter, PoolCommitter] = (
            committer if committer is not None
            else GroupCommitter(reactor, queue, prepare=self.open))
        self.config = config
        self.node = node
        self.wake: Callable[[], None] = lambda: None
        # The archive keys, which verify the X-MPP-Released mark of a
        # message released from the quarantine (archive/released.py); None:
        # no mark is honoured.
        self.keys: Optional[KeyRing] = None
        self._domains = RelayDomains(config.domains)
        self._open_lock = threading.Lock()

    def wants_copy(self, txn: Transaction) -> bool:
        """Whether an accepted message (not held) gets an archive copy too:
        archive.copy "all", or "domains" with a recipient in archive.domains
        (relay_domains notation: ".example.com" for its subdomains)."""
        copy = self.config.copy
        if copy == "all":
            return True
        if copy != "domains":
            return False
        return any(r.domain and r.domain in self._domains for r in txn.recipients)

    async def enqueue(self, message: OutboundMessage, state: CopyState) -> str:
        """Write ``message`` with ``state`` as one item, in the committer's
        thread; the item's id once it is durable (docs/design.md promise
        1).  The ``OSError`` of a write that failed (ENOSPC...) propagates,
        and nothing of the item is visible."""
        # chunks() is a generator: the message is read in the committer's
        # thread, as it is written.
        item_id: str = await self.committer.submit(message.chunks(), metadata_for(state))
        self.wake()
        return item_id

    def open(self) -> None:
        """Open the queue if it is not open yet (blocking; ``recover`` runs)."""
        with self._open_lock:
            if not self.queue.is_open:
                self.queue.open()

    def close(self) -> None:
        """End the committer's thread, then drop this process's hold on the
        queue (blocking; quick once the sessions have ended)."""
        self.committer.stop()
        with self._open_lock:
            self.queue.close()
