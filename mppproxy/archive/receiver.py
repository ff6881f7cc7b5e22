"""The archive node's receiver: the ``SessionHandler`` that takes copies
from the edges (issue 12, "Archive node").

Stage: in place of the edge handler, behind the proxy's own ESMTP state
machine (``smtp/server.py``), which spools DATA as it does for the edge
(memory, then a temporary file).  Hands each verified copy, as the edge
kept it, to the node's own durable queue; the writer (``writer.py``)
stores it.

* Edges only: a client outside ``archive_node.edges`` hears ``554 5.7.1``
  in place of the greeting (RFC 5321 3.1: "554 instead of 220" when a
  server will take no mail from that client), and the refusal is logged.
* With ``archive_node.require_client_cert``, MAIL needs a TLS client
  certificate that the handshake verified against
  ``archive_node.client_ca_file``: ``530 5.7.0`` otherwise, "Must issue a
  STARTTLS command first" (RFC 3207 section 4) before STARTTLS, and
  "Authentication required" (RFC 4954 section 6, the code it names for a
  server that needs the client authenticated) after a handshake without a
  certificate.  A certificate the CA did not sign fails the handshake.
* At the end of DATA: the header section (up to the first empty line,
  bounded by ``MAX_COPY_HEADER``) is parsed and the state verified with
  the keys of the moment (``state.verify``).  A refusal (``StateRefused``)
  answers its reply with our reference and logs the reason; nothing is
  queued.  A verified copy loses its state fields (``state.READABLE`` and
  ``state.SIGNED``: the state travels in the item's metadata) so the stored
  message is the one the edge kept, and is queued.  ``250`` only after
  ``enqueue`` returned (written, fsync'ed, renamed, directory fsync'ed);
  a disk that cannot take it answers ``452 4.3.1`` (RFC 5321 4.2.2,
  RFC 3463 4.3.1 "mail system full"), never ``250`` without the copy on
  disk (docs/design.md promise 1).

An edge that drops the connection before hearing ``250`` sends the copy
again: queued twice, it is stored once (the store is idempotent on node,
queue id and recipient domain).

The body the signature covers is the octets after the first empty line
(CRLF CRLF); a copy without one is all header and has an empty body.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from twisted.internet.threads import deferToThreadPool

from mppproxy.archive.copies import metadata_for
from mppproxy.archive.keys import KeyRing
from mppproxy.archive.state import (READABLE, SIGNED, BodyDigest, CopyState, StateRefused,
                                    parse_fields, verify)
from mppproxy.logsetup import Logger
from mppproxy.message import MAX_HEADER_BLOCK, OutboundMessage
from mppproxy.smtp import replies
from mppproxy.smtp.address import Address
from mppproxy.smtp.replies import Reply
from mppproxy.smtp.server import Capabilities
from mppproxy.smtp.session import Session, Transaction
from mppproxy.spool.queue import MAX_METADATA, DurableQueue
from mppproxy.spool.spool import Spool

log = Logger()

# The edge keeps a header section of up to MAX_HEADER_BLOCK; the copy adds
# the state fields, whose blob must fit the queue item's metadata
# (MAX_METADATA) and which the readable fields repeat in part.
MAX_COPY_HEADER = MAX_HEADER_BLOCK + 2 * MAX_METADATA
# The state fields add to the message the edge kept: the SIZE we announce
# is limits.max_message_size plus this, so a message the edge took whole
# is never too large here as a copy.
STATE_ALLOWANCE = 2 * MAX_METADATA

# --- replies -------------------------------------------------------------------
# RFC 5321 3.1: a server that will not take mail from a client may answer
# 554 in place of the 220 greeting; RFC 3463 5.7.1: not authorised.
NOT_AN_EDGE = Reply(554, "5.7.1", "Archive node: copies are taken from edge nodes only")
# RFC 3207 section 4: 530 "Must issue a STARTTLS command first".
NEED_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
# RFC 4954 section 6: 530 5.7.0 "Authentication required"; here the
# authentication is a TLS client certificate.
NEED_CLIENT_CERT = Reply(530, "5.7.0", "Authentication required: a TLS client certificate")
# RFC 5321 4.3.2 (554 after DATA) / RFC 3463 5.6.0: the content's form is
# wrong (the state.py refusals of the same kind).
NO_HEADER = Reply(554, "5.6.0", "Archive copy refused: no header section")
HEADER_TOO_LARGE = Reply(554, "5.6.0", "Archive copy refused: header section too large")
# RFC 5321 4.3.2 (552) / RFC 3463 5.3.4: message too big for the system;
# here the state, which must fit the queue item's metadata.
STATE_TOO_LARGE = Reply(552, "5.3.4", "Archive copy refused: state too large")

_STATE_FIELDS = frozenset(n.lower().encode("ascii") for n in READABLE + SIGNED)


@dataclass(frozen=True)
class ReceiverContext:
    """What the sessions of one configuration share; a reload makes a new
    one (new keys, new edges) and running sessions keep theirs."""

    reactor: Any
    threadpool: Any
    queue: DurableQueue
    keys: KeyRing
    # True for a client address that is an edge (archive_node.edges).
    is_edge: Callable[[str], bool]
    require_client_cert: bool
    max_message_size: int
    # Called after each copy is queued (the writer's wake).
    on_queued: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Queued:
    """A copy on the node's queue: its verified state and the item id."""

    state: CopyState
    item_id: str
    size: int


class ArchiveReceiver:
    """One edge's session (see the module docstring).  ``peer_certificate``
    answers the verified client certificate of the session's TLS, or None;
    the service binds it to the session's transport."""

    def __init__(self, ctx: ReceiverContext,
                 peer_certificate: Callable[[], Any] = lambda: None):
        self.ctx = ctx
        self.peer_certificate = peer_certificate

    def on_connect(self, session: Session) -> Optional[Reply]:
        if not self.ctx.is_edge(session.peer_host):
            log.warn("archive copy refused: {client} is not an edge (archive_node.edges)",
                     client=session.peer_host, session_id=session.id)
            return NOT_AN_EDGE
        return None

    def known_capabilities(self, session: Session) -> Optional[Capabilities]:
        # Nothing goes further: what we take is ours to say.
        return Capabilities(size=self.ctx.max_message_size + STATE_ALLOWANCE,
                            eightbitmime=True, smtputf8=True, dsn=False)

    async def capabilities(self, session: Session) -> Capabilities:
        caps = self.known_capabilities(session)
        assert caps is not None
        return caps

    async def on_mail(self, session: Session, txn: Transaction) -> Reply:
        if self.ctx.require_client_cert:
            refusal = None
            if not session.tls:
                refusal = NEED_STARTTLS
            elif self.peer_certificate() is None:
                refusal = NEED_CLIENT_CERT
            if refusal is not None:
                log.warn("archive copy refused: {client} sent MAIL without a TLS client "
                         "certificate", client=session.peer_host, tls=session.tls,
                         session_id=session.id, queue_id=txn.id)
                return refusal
        return replies.SENDER_OK

    async def on_rcpt(self, session: Session, txn: Transaction, rcpt: Address,
                      params: dict[str, Optional[str]]) -> Reply:
        # The recipients that count are the state's; the envelope only
        # carries the copy here.
        return replies.RECIPIENT_OK

    async def on_data_end(self, session: Session, txn: Transaction) -> Reply:
        assert txn.spool is not None
        ctx = self.ctx
        started = time.monotonic()
        try:
            queued: Queued = await deferToThreadPool(ctx.reactor, ctx.threadpool, receive_copy,
                                                     txn.spool, ctx.keys, ctx.queue)
        except StateRefused as e:
            reply = e.reply.with_reference(txn.id)
            log.warn("archive copy from {client} refused: {reason}", client=session.peer_host,
                     reason=e.reason, reply=str(reply), queue_id=txn.id, session_id=session.id,
                     size=txn.size)
            return reply
        except OSError as e:
            reply = replies.storage_failure(e)
            log.error("archive copy from {client} not queued: {error} in {path} (errno "
                      "{errno})", client=session.peer_host, error=e.strerror or str(e),
                      path=e.filename, errno=e.errno, queue_id=txn.id, session_id=session.id,
                      reply=str(reply))
            return reply.with_reference(txn.id)
        state = queued.state
        log.info("archive copy {ref} from {node} queued as {item_id}", ref=state.queue_id,
                 node=state.node, item_id=queued.item_id, client=session.peer_host,
                 queue_id=txn.id, session_id=session.id, size=queued.size,
                 recipients=len(state.recipients), verdict=str(state.verdict),
                 ms=round((time.monotonic() - started) * 1000, 2))
        ctx.on_queued()
        return replies.OK.with_text(f"Archive copy {state.queue_id} queued").with_reference(txn.id)

    def on_reset(self, session: Session, txn: Optional[Transaction], reason: str) -> None:
        pass

    def on_client_gone(self, session: Session) -> None:
        # The copy is queued all the same: the edge sends it again and the
        # store keeps one (idempotent on node and queue id).
        pass

    def on_disconnect(self, session: Session) -> None:
        pass


# --- the copy (blocking: the thread pool) ------------------------------------------

def receive_copy(spool: Spool, keys: KeyRing, queue: DurableQueue) -> Queued:
    """Verify the copy in ``spool`` and queue it without its state fields;
    ``StateRefused`` with the reply, or the ``OSError`` of the queue."""
    header, body_offset = header_section(spool)
    state = verify(parse_fields(header), BodyDigest.of(_from(spool, body_offset)), keys)
    metadata = metadata_for(state)
    if len(metadata["state"]) + 64 > MAX_METADATA:
        raise StateRefused(STATE_TOO_LARGE, f"state of {len(metadata['state'])} octets")
    kept = strip_state_fields(header)
    # The spool from the empty line on (the body streams, never in memory
    # whole), after the header fields the edge kept.
    message = OutboundMessage(kept, spool, len(header))
    item_id = queue.enqueue(message.chunks(), metadata)
    return Queued(state, item_id, message.size)


def header_section(spool: Spool, limit: int = MAX_COPY_HEADER) -> tuple[bytes, int]:
    """(the header fields, each line with its CRLF; where the body starts,
    after the empty line).  A copy without an empty line is all header.
    ``StateRefused`` for a copy that starts with the empty line, or whose
    header section is longer than ``limit``."""
    buf = bytearray()
    for chunk in spool.chunks():
        start = max(0, len(buf) - 3)
        buf += chunk
        if buf[:2] == b"\r\n":
            raise StateRefused(NO_HEADER, "no header section: the copy starts with an empty line")
        end = buf.find(b"\r\n\r\n", start)
        if end >= 0:
            if end + 2 > limit:
                break
            return bytes(buf[:end + 2]), end + 4
        if len(buf) > limit:
            break
    else:
        if not buf:
            raise StateRefused(NO_HEADER, "no header section: empty copy")
        return bytes(buf), len(buf)
    raise StateRefused(HEADER_TOO_LARGE, f"header section longer than {limit} octets")


def strip_state_fields(header: bytes) -> bytes:
    """``header`` without the state fields (folded lines included); every
    other octet kept as it came."""
    out: list[bytes] = []
    dropping = False
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                out.append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower()
        dropping = b":" in line and name in _STATE_FIELDS
        if not dropping:
            out.append(line)
    return b"".join(out)


def _from(spool: Spool, offset: int) -> Iterator[bytes]:
    """The spool's content from ``offset`` on."""
    return OutboundMessage(b"", spool, offset).chunks_after_header()
