"""Deliver: fsync'ed Maildir copies on our own disk, for local delivery (no
backend) and for held (quarantined) messages.

Stage: an action (``mppproxy/actions/``).  A ``250`` only after every copy
and its directory are on disk; a failed write removes every copy and gives a
4xx (docs/design.md promise 1).  The Maildir format itself is
``delivery/maildir.py``'s.
"""
from __future__ import annotations

from typing import Any, Optional

from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mppproxy.delivery import maildir
from mppproxy.logsetup import Logger
from mppproxy.message import OutboundMessage
from mppproxy.smtp import replies
from mppproxy.smtp.replies import Reply
from mppproxy.smtp.session import Session, Transaction

log = Logger()


def not_stored(session: Session, txn: Transaction, error: OSError, what: str) -> Reply:
    """Log a write of the message that failed as our fault (the path and
    errno, the queue id) and give the client's 4xx: 452 4.3.1 for a full
    disk, 451 4.3.0 otherwise (``replies.storage_failure``); never a 250."""
    log.error("message {queue_id} not stored: {what} failed on {path}: {error} (errno {errno})",
              queue_id=txn.id, what=what, path=error.filename, error=error.strerror or str(error),
              errno=error.errno, session_id=session.id)
    return replies.storage_failure(error)


class LocalDelivery:
    """Maildir copies under ``data_dir``, written in ``threadpool`` (the
    reactor never waits on a disk).  ``maildir_template`` is
    ``delivery.maildir``.  Construction does no I/O."""

    def __init__(self, reactor: Any, threadpool: ThreadPool, data_dir: str,
                 maildir_template: str):
        self.reactor = reactor
        self.threadpool = threadpool
        self.data_dir = data_dir
        self.maildir_template = maildir_template

    async def deliver(self, session: Session, txn: Transaction, message: OutboundMessage,
                      template: Optional[str] = None, what: str = "maildir delivery") -> Reply:
        """One copy per recipient under ``template`` (default
        ``delivery.maildir``): 250 with the paths in ``txn.delivered_to``,
        or the 4xx of ``not_stored`` naming ``what`` failed."""
        try:
            paths = await deferToThreadPool(
                self.reactor, self.threadpool, maildir.deliver, message.chunks,
                txn.sender, list(txn.recipients), template or self.maildir_template,
                self.data_dir)
        except OSError as e:
            # deliver() removed every copy: nothing of it is on disk.
            return not_stored(session, txn, e, what)
        txn.delivered_to = paths
        return Reply(250, "2.0.0", f"Ok: queued as {txn.id}")
