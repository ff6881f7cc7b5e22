"""The ``SessionHandler`` of ``--mode scan``: the proxy's own ESMTP state
machine (``smtp/server.py``) in front of ``ScanRuntime``.

Stage: in place of the edge handler.  MAIL and RCPT are taken without relay
control or pre-DATA checks (any recipient: nothing is relayed), but only
from ``trusted_networks`` (554 5.7.1 at MAIL otherwise): the service tells
its client what the filters think, which is for the site's own scripts.
At the end of DATA the message is scanned with the policy of the first
recipient's domain and the reply carries the verdict: 250 for every
verdict (the exchange succeeded), 451 4.3.0 when a scanner could not
answer and the policy tempfails.  Nothing is relayed or stored; each
transaction gets its one log line (docs/design.md promise 5).
"""
from __future__ import annotations

import time
from typing import Callable, Optional


from mppproxy import txlog
from mppproxy.logsetup import Logger
from mppproxy.results import Disposition
from mppproxy.scanservice.core import ScanRequest, ScanRuntime
from mppproxy.smtp import replies
from mppproxy.smtp.address import Address
from mppproxy.smtp.replies import Reply
from mppproxy.smtp.server import Capabilities
from mppproxy.smtp.session import Session, Transaction

log = Logger()

# RFC 5321 3.6.2 / RFC 3463 5.7.1: delivery not authorized.
NOT_TRUSTED = Reply(554, "5.7.1", "Scanning is only for trusted clients")


class ScanSessionHandler:
    """One client session of the scan service.  ``runtime`` is called for
    the ``ScanRuntime`` of the moment at the end of DATA (a reload swaps it)."""

    def __init__(self, runtime: Callable[[], ScanRuntime], max_message_size: int):
        self.runtime = runtime
        self.max_message_size = max_message_size

    def on_connect(self, session: Session) -> Optional[Reply]:
        return None

    def known_capabilities(self, session: Session) -> Optional[Capabilities]:
        # Nothing goes further, so nothing further limits what we announce.
        return Capabilities(size=self.max_message_size, eightbitmime=True, smtputf8=True,
                            dsn=False)

    async def capabilities(self, session: Session) -> Capabilities:
        caps = self.known_capabilities(session)
        assert caps is not None
        return caps

    async def on_mail(self, session: Session, txn: Transaction) -> Reply:
        if not session.trusted:
            log.info("scan refused for untrusted client {client}", client=session.peer_host,
                     session_id=session.id, queue_id=txn.id)
            return NOT_TRUSTED
        txn.t_mail = time.monotonic()
        return replies.SENDER_OK

    async def on_rcpt(self, session: Session, txn: Transaction, rcpt: Address,
                      params: dict[str, Optional[str]]) -> Reply:
        return replies.RECIPIENT_OK

    async def on_data_end(self, session: Session, txn: Transaction) -> Reply:
        t_data = time.monotonic()
        assert txn.spool is not None
        spool = txn.spool
        runtime = self.runtime()
        request = ScanRequest(
            chunks=spool.chunks, size=txn.size, client_ip=session.peer_host,
            helo=session.helo or "", sender=txn.sender.text,
            recipients=tuple(r.text for r in txn.recipients), queue_id=txn.id,
            smtputf8=txn.smtputf8)
        outcome = await runtime.scan(request)
        txn.record = outcome.record
        txn.scan_skipped = outcome.skipped
        reply = runtime.reply(outcome)
        timings = {"data_ms": round((time.monotonic() - t_data) * 1000, 2)}
        txlog.log_transaction(session, txn, outcome.action, reply, timings,
                              reason="; ".join(outcome.verdict.reasons) or None, scanned=True)
        return reply

    def on_reset(self, session: Session, txn: Optional[Transaction], reason: str) -> None:
        if txn is not None:
            txlog.log_transaction(session, txn, Disposition.ABORTED, None, {}, reason=reason)

    def on_client_gone(self, session: Session) -> None:
        pass

    def on_disconnect(self, session: Session) -> None:
        pass
