"""The one structured log event per transaction (docs/design.md promise 5).

Every field is a stable snake_case key; client-supplied text travels only in
fields, never in the format string (a ``{`` in a HELO must not break it).
``mppproxy.logsetup`` can write these events as JSON lines.  It reads the
``Transaction``'s typed record; ``action`` is a ``Disposition``, printed as
its lowercase word.

Every transaction passes here, so here it is also counted: what it counts
as and its reason go to the tallies of ``db/traffic.py`` (the dashboard's
hourly counts; the metrics later), one dict increment each.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from mppproxy.db import traffic
from mppproxy.logsetup import Logger
from mppproxy.results import (Disposition, HardAction, TransactionRecord,
                              checks_for_log)
from mppproxy.smtp.replies import Reply
from mppproxy.smtp.session import Session, Transaction

log = Logger(namespace="mppproxy.transaction")
# Who hears of every transaction logged (not scan mode's verdicts), with
# (transaction, action, reply, decided_by, timings): the metrics
# (mppproxy/metrics/) count refusals per check and time transactions here.
# Empty while nobody listens (metrics off): one test per transaction.
Observer = Callable[[Transaction, Disposition, Optional[Reply], Optional[str], dict[str, Any]],
                    None]
observers: list[Observer] = []
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
    # Accepted with 250 and never delivered (actions/delete.py): said loudly.
    Disposition.DELETE: ("transaction {queue_id} from {client}: DELETED <{sender}> to "
                         "{recipients_text}, not delivered: {reason} ({reply_text})"),
}
# Every other line (relayed, tagged, held, discarded, delivered, scan
# mode's verdict) names the same facts: client, sender, recipients, what
# was done, what decided it (the check that weighed most; "-" for none)
# and the reference id.
_FORMAT = ("transaction {queue_id} from {client}: {action} <{sender}> to {recipients_text}, "
           "decided by {deciding_check} ({reply_text})")


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
        recipients_text=", ".join(f"<{r}>" for r in recipients) or "(none)",
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
        # What the text line names as deciding: decided_by, or the check
        # that asked for the action or weighed most; "-" when none did.
        deciding_check=(decided_by or _deciding_check(record)
                        or ", ".join(dict.fromkeys(by for _, by, _ in refusals)) or "-"),
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
    if traffic.tallies and not scanned:
        _count(txn, action, reply, decided_by)
    if observers and not scanned:
        for observe in observers:
            observe(txn, action, reply, decided_by, timings)


_BY_SCORE = (traffic.Counted.TAGGED, traffic.Counted.QUARANTINED, traffic.Counted.DISCARDED)


def _count(txn: Transaction, action: Disposition, reply: Optional[Reply],
           decided_by: Optional[str]) -> None:
    """Hand the transaction to the tallies: what it counts as (db/traffic.py
    maps the dispositions) and its reason: the check that refused the last
    recipient before DATA, what decided a refusal after DATA (as the log
    line's ``decided_by``), or, for tagged, held and discarded mail, the
    check that weighed most (``_deciding_check``); "" for relayed mail."""
    what = traffic.counted(action, reply.code if reply is not None else None)
    if what is None:
        return
    reason: Optional[str] = None
    if action is Disposition.REFUSED and txn.refusals:
        reason = txn.refusals[-1][1]
    elif decided_by:
        reason = decided_by
    elif what in _BY_SCORE:
        reason = _deciding_check(txn.record)
    key = traffic.reason_key(reason)
    for tally in traffic.tallies:
        tally(what, key)


def _deciding_check(record: Optional[TransactionRecord]) -> Optional[str]:
    """The first check or engine that asked to hold or refuse the message,
    else the one with the highest score."""
    if record is None:
        return None
    best, best_score = None, 0.0
    for r in record.recorded:
        result = r.result
        if result.action is HardAction.QUARANTINE or result.action is HardAction.REJECT:
            return r.check
        if result.score > best_score:
            best, best_score = r.check, result.score
    return best
