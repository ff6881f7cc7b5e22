"""The transaction's text line (mppproxy/txlog.py, issue 16 "Logs an operator
can use"): whatever happened, it names the client, the sender, the
recipients, the disposition, what decided it and the reference id."""
from __future__ import annotations

from twisted.logger import capturedLogs, formatEvent

from mppproxy.results import CheckResult, Disposition, Recorded, TransactionRecord
from mppproxy.smtp import replies
from mppproxy.smtp.address import parse_path
from mppproxy.smtp.session import Session, Transaction
from mppproxy.txlog import log_transaction


def _text(action: Disposition, record: TransactionRecord | None = None, **kwargs: object) -> str:
    session = Session("192.0.2.7", 40000, "192.0.2.25", 25)
    txn = Transaction(parse_path("<alice@example.org>", allow_null=True), {})
    txn.recipients = [parse_path("<bob@example.com>", allow_null=False),
                      parse_path("<carol@example.com>", allow_null=False)]
    txn.record = record
    with capturedLogs() as events:
        log_transaction(session, txn, action, replies.OK.with_reference(txn.id), {}, **kwargs)
    [event] = [e for e in events if e.get("mpp_event") == "transaction"]
    text = formatEvent(event)
    assert txn.id in text
    return text


def test_relayed_line_names_everything() -> None:
    """A relayed message's line names client, sender, both recipients, the disposition and "-" as nothing decided it."""
    text = _text(Disposition.RELAY)
    assert "from 192.0.2.7: relay <alice@example.org> to <bob@example.com>, <carol@example.com>" in text
    assert "decided by -" in text


def test_held_line_names_the_deciding_check() -> None:
    """A held message names the check that weighed most (or asked for the hold)."""
    record = TransactionRecord()
    record.recorded.append(Recorded("dnsbl", CheckResult(score=2.0, reasons=("listed",))))
    record.recorded.append(Recorded("spamd", CheckResult(score=9.0, reasons=("spam",))))
    text = _text(Disposition.QUARANTINE, record)
    assert "quarantine <alice@example.org>" in text and "decided by spamd" in text


def test_refused_after_data_names_what_decided() -> None:
    """A refusal after DATA names decided_by, as before."""
    text = _text(Disposition.REJECT, decided_by="clamd")
    assert "refused <alice@example.org>" in text and "by clamd" in text
