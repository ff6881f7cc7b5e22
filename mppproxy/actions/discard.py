"""Discard: accept the message and drop it on purpose, logged.

Stage: an action (``mppproxy/actions/``), chosen by the verdict at or above
a policy's ``scan.discard_score``.  The client hears the ``250`` it would
for a delivered message; the log line says what was dropped and why
(docs/design.md promise 5).
"""
from __future__ import annotations

from mppproxy import txlog
from mppproxy.results import Disposition
from mppproxy.smtp.replies import Reply
from mppproxy.smtp.session import Session, Transaction
from mppproxy.verdict import Verdict


def discard(session: Session, txn: Transaction, verdict: Verdict) -> Reply:
    """The ``250`` of a dropped message, after its log event."""
    reply = Reply(250, "2.0.0", f"Ok: queued as {txn.id}")
    txlog.log_transaction(session, txn, Disposition.DISCARD, reply, {},
                          reason="; ".join(verdict.reasons) or None)
    return reply
