"""Hold (quarantine) and archive copies: the message, with the transaction's
state, into the durable queue that feeds the archive (issue 12, "Edge side").

Stage: an action (``mppproxy/actions/``).  Two uses:

* ``hold``, the action of a QUARANTINE verdict: the message is not relayed;
  the client hears ``250`` only once the copy is in the queue (written,
  fsync'ed, renamed, directory fsync'ed: docs/design.md promise 1), and the
  4xx of ``deliver.not_stored`` when the disk cannot take it -- nothing of it
  is then left in the queue, and the client keeps its message.
* ``keep_copy``, after a message was relayed, delivered or tagged and got its
  positive reply, when ``archive.copy`` asks for a copy of it (see the
  ordering note there).

From the queue the forwarder sends each item to the archive node
(``archive/forwarder.py``), or, without an archive node, the node's own
writer stores it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mppproxy.actions.deliver import not_stored
from mppproxy.archive.copies import ArchiveCopies, copy_state
from mppproxy.logsetup import Logger
from mppproxy.message import OutboundMessage
from mppproxy.results import Disposition
from mppproxy.smtp.replies import Reply
from mppproxy.smtp.session import Session, Transaction

if TYPE_CHECKING:
    from mppproxy.verdict import Verdict

log = Logger()


async def hold(archive: ArchiveCopies, session: Session, txn: Transaction,
               message: OutboundMessage, verdict: "Verdict", received: float) -> Reply:
    """The message held in the archive queue: 250 naming the queue id (the
    reference of the log line and of the copy's state), or the 4xx of a
    write that failed.  ``received``: time.time() at the end of DATA."""
    state = copy_state(archive.node, session, txn, verdict, received, Disposition.QUARANTINE)
    try:
        item_id = await archive.enqueue(message, state)
    except OSError as e:
        # DurableQueue.enqueue removed what it wrote: nothing is visible.
        return not_stored(session, txn, e, "quarantine")
    txn.archive_item = item_id
    log.info("message {queue_id} held as archive queue item {item_id}", queue_id=txn.id,
             item_id=item_id, session_id=session.id)
    return Reply(250, "2.0.0", f"Ok: queued as {txn.id}")


async def keep_copy(archive: ArchiveCopies, session: Session, txn: Transaction,
                    message: OutboundMessage, verdict: "Verdict", received: float,
                    disposition: Disposition) -> bool:
    """An archive copy of a message that was already accepted (``disposition``:
    relay, deliver or tag); True once it is in the queue.

    Why after the positive reply and not before the relay: a copy made first
    would be a false archive entry whenever the backend then refused or
    deferred the message (the client sends it again, and a second copy
    follows).  The price: a copy that cannot be written after the backend's
    250 cannot take that 250 back -- the message is delivered, only its copy
    is missing.  So the failure is logged as an error naming the queue id
    and why, and the client still hears the 250.  The copy is written before
    that 250 goes out, so a message acknowledged to the client has its copy
    on disk (a crash right after the reply loses neither)."""
    state = copy_state(archive.node, session, txn, verdict, received, disposition)
    try:
        txn.archive_item = await archive.enqueue(message, state)
    except OSError as e:
        log.error("archive copy of message {queue_id} NOT kept ({disposition} already "
                  "acknowledged): the queue write failed on {path}: {error} (errno {errno})",
                  queue_id=txn.id, disposition=str(disposition), path=e.filename,
                  error=e.strerror or str(e), errno=e.errno, session_id=session.id)
        return False
    except Exception:
        # Not a disk error (a bug): the 250 stands all the same, as above.
        log.failure("archive copy of message {queue_id} NOT kept ({disposition} already "
                    "acknowledged)", queue_id=txn.id, disposition=str(disposition),
                    session_id=session.id)
        return False
    return True
