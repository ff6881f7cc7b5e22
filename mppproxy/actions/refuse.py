"""Refuse: the message's 4xx or 5xx, rendered from a reply template and
carrying the queue id as its reference.

Stage: an action (``mppproxy/actions/``), for the ``reject`` and
``tempfail`` dispositions.  The text comes from the verdict's template
(``templates/replies/<name>.txt``, the policy's own first) with the
transaction's facts; the log line names what decided (docs/design.md
promise 5).
"""
from __future__ import annotations

from typing import Any

from mppproxy import txlog
from mppproxy.smtp.address import Address
from mppproxy.smtp.replies import Reply
from mppproxy.smtp.session import Session, Transaction
from mppproxy.templates import ReplyRenderer
from mppproxy.verdict import Verdict


def domain_of(address: Address) -> str:
    """The domain as the policies match it: lower-cased, no trailing dot."""
    return address.domain.rstrip(".").lower()


def render_refusal(renderer: ReplyRenderer, session: Session, txn: Transaction,
                   verdict: Verdict) -> Reply:
    """The reply of the verdict's template for this transaction."""
    record = txn.record
    policy = (record.policy if record is not None else None) or "default"
    first = txn.recipients[0] if txn.recipients else None
    context: dict[str, Any] = {
        "client_ip": session.peer_host, "helo": session.helo or "",
        "sender": txn.sender.text, "sender_domain": domain_of(txn.sender),
        "recipient": first.text if first else "",
        "recipient_domain": domain_of(first) if first else "",
        "policy": policy, "queue_id": txn.id, "reason": "",
        "what": "", "reasons": [], "retry_seconds": 0, "score": verdict.score,
        "virus": ""}
    context.update(dict(verdict.template_vars))
    return renderer.reply(verdict.template, context, policy)


def refuse(renderer: ReplyRenderer, session: Session, txn: Transaction,
           verdict: Verdict) -> Reply:
    """The refusal of the message, after its log event."""
    refusal = render_refusal(renderer, session, txn, verdict)
    txlog.log_transaction(session, txn, verdict.action, refusal, {},
                          reason="; ".join(verdict.reasons) or None,
                          decided_by=verdict.template or verdict.action)
    return refusal
