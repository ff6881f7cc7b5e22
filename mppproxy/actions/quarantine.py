"""Hold (quarantine): accept the message and keep a durable copy in the
local quarantine instead of relaying it.

Stage: an action (``mppproxy/actions/``).  The copy is written and fsync'ed
before the ``250`` (docs/design.md promise 1); it waits there until the
archive node exists to take it.
"""
from __future__ import annotations

from mppproxy.actions.deliver import LocalDelivery
from mppproxy.message import OutboundMessage
from mppproxy.smtp.replies import Reply
from mppproxy.smtp.session import Session, Transaction

# Where held messages wait for the archive node (below data_dir; the Maildir
# macros of delivery.maildir apply).
QUARANTINE_MAILDIR = "quarantine/%D%/%U%"


async def hold(delivery: LocalDelivery, session: Session, txn: Transaction,
               message: OutboundMessage) -> Reply:
    """The message held in the local quarantine: 250, or the 4xx of a write
    that failed."""
    return await delivery.deliver(session, txn, message, QUARANTINE_MAILDIR, "quarantine")
