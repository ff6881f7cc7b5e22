"""The one structured log event per transaction (docs/design.md promise 5).

Every field is a stable snake_case key; client-supplied text travels only in
fields, never in the format string (a ``{`` in a HELO must not break it).
``mppproxy.logsetup`` can write these events as JSON lines.  It reads the
``Transaction``'s typed record; ``action`` is a ``Disposition``, printed as
its lowercase word.
"""
from __future__ import annotations

from typing import Any, Optional

from mppproxy.logsetup import Logger
from mppproxy.results import Disposition, checks_for_log
from mppproxy.smtp.replies import Reply
from mppproxy.smtp.session import Session, Transaction

log = Logger(namespace="mppproxy.transaction")
_NO_CHECKS: dict[str, Any] = {"checks": [], "checks_passed": []}
# The text line by action.  A refused transaction (no recipient accepted,
# some refused by policy or relay control) names its sender, the refused
# recipients and what decided, so the "(ref <queue id>)" of a refusal finds
# all of it in one line; the client's text comes in as fields only.
_FORMATS = {
    Disposition.REFUSED: ("transaction {queue_id} from {client}: refused <{sender}> to "
                          "{refused_text} by {decided_by} ({reply_text}; then {reason})"),
    # Refused or deferred after DATA: by the verdict (a check, an engine,
    # the score), the hop count, the disk, or the backend's own reply.
    Disposition.REJECT: ("transaction {queue_id} from {client}: refused <{sender}> to "
                         "{recipients_text} by {decided_by} ({reply_text})"),
    Disposition.TEMPFAIL: ("transaction {queue_id} from {client}: tempfailed <{sender}> to "
                           "{recipients_text} by {decided_by} ({reply_text})"),
}
_FORMAT = "transaction {queue_id} from {client}: {action} ({reply_text})"


def log_transaction(session: Session, txn: Transaction, action: Disposition,
                    reply: Optional[Reply], timings: dict[str, Any], reason: Optional[str] = None,
                    decided_by: Optional[str] = None, scanned: bool = False) -> None:
    """Log the transaction's one event.  ``decided_by`` names what refused
    or deferred a message after DATA (a check or engine, "score",
    "hop count", "storage", "backend"); before DATA it comes from the
    refused recipients.  ``scanned``: scan mode's verdict, logged as
    ``scanned:<action>`` (nothing was done with the message)."""
    record = txn.record
    # (recipient, what decided, reply) per recipient refused before the
    # backend heard of it.
    refusals = txn.refusals or ()
    recipients = [r.text for r in txn.recipients]
    log.info(
        _FORMAT if scanned else _FORMATS.get(action, _FORMAT),
        mpp_event="transaction",
        session_id=session.id,
        queue_id=txn.id,
        client=session.peer_host,
        client_port=session.peer_port,
        helo=session.helo,
        tls=session.tls,
        trusted=session.trusted,
        sender=txn.sender.text,
        recipients=recipients,
        recipients_text=", ".join(f"<{r}>" for r in recipients),
        rcpt_replies=txn.rcpt_log,
        size=txn.size,
        action=f"scanned:{action}" if scanned else action,
        reply_code=reply.code if reply else None,
        reply_text=str(reply) if reply else reason,
        reason=reason,
        refused_recipients=[r for r, _, _ in refusals],
        refused_text=", ".join(f"<{r}>" for r, _, _ in refusals),
        # Each check (or "relay control") that refused one, in order, once.
        decided_by=decided_by or ", ".join(dict.fromkeys(by for _, by, _ in refusals)) or None,
        stripped_headers=txn.stripped_headers,
        # "added", "skipped: why", or None when no disclaimer table matched.
        disclaimer=txn.disclaimer,
        # Scanner -> "kind: reason" of every scanner not consulted after
        # DATA (down, timeout, over max_size, garbage, not sent); {} when
        # all answered or nothing was scanned.
        scan_skipped=txn.scan_skipped or {},
        archive_item=txn.archive_item,
        timings=timings,
        policy=record.policy if record is not None else None,
        score=round(record.score, 2) if record is not None else None,
        **(checks_for_log(record.recorded) if record is not None else _NO_CHECKS),
    )
