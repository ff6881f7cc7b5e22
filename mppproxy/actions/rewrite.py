"""Rewrite: changes to the message itself before it goes on -- the Subject
prefix of a tagged message, then the policy's disclaimer.

Stage: an action (``mppproxy/actions/``), for the ``relay``, ``tag`` and
``quarantine`` dispositions, before the message is relayed or held.  The
``X-Spam-*`` fields of a tagged message come with the verdict
(``verdict.py``); the disclaimer's MIME work is ``disclaimer.py``'s, run in
the thread pool (it reads the spool and re-encodes up to ``max_size``
octets).
"""
from __future__ import annotations

from typing import Any, Optional

from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mppproxy import disclaimer
from mppproxy.config.policy import DisclaimerConfig, DisclaimerText, PolicyConfig
from mppproxy.logsetup import Logger
from mppproxy.match import SetCache
from mppproxy.message import HeaderBlockTooLarge, OutboundMessage
from mppproxy.results import Disposition
from mppproxy.smtp.session import Session, Transaction
from mppproxy.verdict import Verdict

log = Logger()


class Rewriter:
    """The rewrites of one configuration snapshot.  The edge asks only when
    the policy has disclaimers or the message is tagged with a Subject
    prefix: most messages need no rewrite, and no coroutine is made for
    them.  Construction does no I/O."""

    def __init__(self, reactor: Any, threadpool: ThreadPool, sets: SetCache):
        self.reactor = reactor
        self.threadpool = threadpool
        self.sets = sets

    async def rewrite(self, session: Session, txn: Transaction, message: OutboundMessage,
                      verdict: Verdict, policy: PolicyConfig) -> None:
        """The Subject prefix of a tagged message, then the disclaimer."""
        try:
            if verdict.action is Disposition.TAG and policy.scoring.subject_prefix:
                message.add_subject_prefix(policy.scoring.subject_prefix)
            if policy.disclaimers:
                await self._disclaim(session, txn, message, policy.disclaimers)
        except HeaderBlockTooLarge:
            # prepare() read the same header section within the same bound.
            log.warn("header section too large to rewrite for {queue_id}", queue_id=txn.id)

    async def _disclaim(self, session: Session, txn: Transaction, message: OutboundMessage,
                        disclaimers: tuple[DisclaimerConfig, ...]) -> None:
        """The first table whose senders match the envelope sender applies;
        the outcome lands in ``txn.disclaimer`` for the log line."""
        sender = txn.sender.text
        for table in disclaimers:
            if sender not in self.sets.address_set(table.senders):
                continue
            if message.size > table.max_size:
                why = f"size {message.size} > {table.max_size}"
                new = None
            else:
                header = message.header_section()
                # Reading the spool and re-encoding up to max_size octets:
                # off the reactor thread.
                new, why = await deferToThreadPool(
                    self.reactor, self.threadpool, _apply, message, header, table.texts)
            if new is None:
                log.info("no disclaimer on {queue_id}: {why}", queue_id=txn.id, why=why,
                         session_id=session.id)
                txn.disclaimer = f"skipped: {why}"
            else:
                message.replace_content(*new)
                txn.disclaimer = "added"
            return


def _apply(message: OutboundMessage, header: bytes, texts: tuple[DisclaimerText, ...]
           ) -> tuple[Optional[tuple[bytes, bytes]], str]:
    """``disclaimer.apply`` on the message's body, read in the thread pool."""
    return disclaimer.apply(header, message.body_bytes(), texts)
