"""Delete: a message carrying a virus is accepted with ``250``, dropped,
logged loudly, and -- when the policy asks -- its recipients and/or
administrators get a notice.

Stage: an action (``mppproxy/actions/``), for the ``delete`` disposition,
which only ``verdict.py`` gives, and only for a virus (``scan.virus_action
= "delete"``) or a per-engine rule ("delete"; ``config/scan.py`` refuses it
for a clean verdict): a clean message is never deleted (docs/design.md
promise 1).  Why 250 and not a refusal: the original product's "delete"
spared the recipients a bounce (with a forged sender, the bounce is
backscatter to an innocent).

The transaction log line says DELETED, to whom it was addressed, and why
(every hard hit); a warning names the notices' outcomes.  The notices go
before the 250 (each bounded by ``delete_notice.timeout``), so a stop that
carries the message to its end carries its notices too.
"""
from __future__ import annotations

import time
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from typing import Any, Optional

from mppproxy import txlog
from mppproxy.actions.notice import NoticeRoute, compose, send_all
from mppproxy.config.scan import DeleteNoticeConfig
from mppproxy.logsetup import Logger
from mppproxy.message import OutboundMessage
from mppproxy.results import Disposition
from mppproxy.smtp.replies import Reply
from mppproxy.smtp.session import Session, Transaction
from mppproxy.templates import NoticeRenderer
from mppproxy.verdict import Verdict

log = Logger()


async def delete(session: Session, txn: Transaction, verdict: Verdict, message: OutboundMessage,
                 notice: DeleteNoticeConfig, renderer: NoticeRenderer,
                 route: Optional[NoticeRoute], hostname: str, policy: str) -> Reply:
    """The ``250`` of a deleted message, after its notices and its log event."""
    reply = Reply(250, "2.0.0", f"Ok: queued as {txn.id}")
    why = "; ".join(verdict.reasons) or "virus"
    recipients = [r.text for r in txn.recipients]
    targets = (recipients if notice.recipients else []) + [
        a for a in notice.admins if not (notice.recipients and a in recipients)]
    outcomes: list[str] = []
    if targets:
        context = _context(session, txn, verdict, message, hostname, policy)
        sender = notice.sender or f"postmaster@{hostname}"
        admins = set(notice.admins)

        def build(to: str) -> bytes:
            return compose(renderer, notice.template,
                           {**context, "to": to, "admin": to in admins}, to, sender, hostname)

        outcomes = await send_all(route, targets, build, notice.timeout)
    log.warn("message {queue_id} from <{sender}> DELETED (virus), not delivered to "
             "{recipients}: {why}; notices: {notices}", queue_id=txn.id,
             sender=txn.sender.text, recipients=", ".join(f"<{r}>" for r in recipients),
             why=why, notices="; ".join(outcomes) or "none configured",
             session_id=session.id)
    txlog.log_transaction(session, txn, Disposition.DELETE, reply, {}, reason=why,
                          decided_by="virus_action delete" if not verdict.reasons or
                          not verdict.reasons[0].startswith("engine_actions:")
                          else "engine_actions")
    return reply


def _context(session: Session, txn: Transaction, verdict: Verdict, message: OutboundMessage,
             hostname: str, policy: str) -> dict[str, Any]:
    """What a notice template may show (client-given text included, which
    the notice is plain text, so it cannot carry markup anywhere)."""
    found = dict(verdict.template_vars).get("virus", "")
    return {"sender": txn.sender.text, "recipients": [r.text for r in txn.recipients],
            "client_ip": session.peer_host, "helo": session.helo or "", "queue_id": txn.id,
            "policy": policy, "virus": str(found or ""), "reasons": list(verdict.reasons),
            "subject": _subject(message), "hostname": hostname,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def _subject(message: OutboundMessage) -> str:
    """The deleted message's Subject:, decoded, one line; "" when none or
    unreadable (the notice goes without it)."""
    try:
        header = message.header_section()
        value = BytesHeaderParser(policy=default_policy).parsebytes(header + b"\r\n")["subject"]
    except Exception:  # a header too large or odd: the notice is still sent
        return ""
    text = " ".join(str(value or "").split())
    return "".join(c if c.isprintable() else "?" for c in text)[:200]
