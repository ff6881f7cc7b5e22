"""The edge session handler: what the session state machine asks at each
SMTP phase (``smtp/server.py``'s ``SessionHandler``).

Stage: composition, between the session and the actions (docs/design.md,
"The stages of one session").  For each session it applies relay control
(promise 3) and the pre-DATA policy, hands MAIL and RCPT to the lockstep
relay, and at the end of DATA prepares the outbound message (Received:,
X-MPP-* stripped; promise 7), has it scanned, takes the verdict and carries
it out with one of the actions (``mppproxy/actions/``).  Every transaction
gets its one log event (``txlog.py``; promise 5).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

from mppproxy import txlog
from mppproxy.actions.delete import delete
from mppproxy.actions.deliver import not_stored
from mppproxy.actions.discard import discard
from mppproxy.actions.notice import NoticeRoute
from mppproxy.actions.quarantine import hold, keep_copy
from mppproxy.actions.refuse import domain_of, refuse
from mppproxy.archive.released import released_mark
from mppproxy.config.schema import spool_directory
from mppproxy.edge.context import EdgeContext
from mppproxy.logsetup import Logger
from mppproxy.message import (HeaderBlockTooLarge, HeaderRules, OutboundMessage, TooManyHops,
                              format_header, header_rules, prepare)
from mppproxy.policy.base import Facts
from mppproxy.policy.counters import client_key
from mppproxy.policy.runtime import PolicyRuntime
from mppproxy.relay.lockstep import LockstepRelay
from mppproxy.results import CheckResult, Disposition, Recorded, TransactionRecord
from mppproxy.scan.base import ScanInput
from mppproxy.scan.factory import PolicyScanning
from mppproxy.scan.postdata import scan_and_decide
from mppproxy.smtp import replies
from mppproxy.smtp.address import Address, relay_refusal_reason
from mppproxy.smtp.replies import Reply
from mppproxy.smtp.server import Capabilities
from mppproxy.smtp.session import Session, Transaction
from mppproxy.templates import notice_dirs, notice_renderer
from mppproxy.verdict import Verdict, decide

log = Logger()

# Octets kept free under the backend's SIZE for the Received: header we add.
RECEIVED_ALLOWANCE = 1024

RELAY, TAG, QUARANTINE = Disposition.RELAY, Disposition.TAG, Disposition.QUARANTINE
REJECT, TEMPFAIL, DISCARD = Disposition.REJECT, Disposition.TEMPFAIL, Disposition.DISCARD
DELETE = Disposition.DELETE


def _note_refusal(txn: Transaction, rcpt: Address, decided_by: str, reply: Reply) -> None:
    """Remember a recipient refused before the backend heard of it, and
    what decided it, for the transaction's log line (txlog.py)."""
    refusals = txn.refusals
    if refusals is None:
        refusals = txn.refusals = []
    refusals.append((rcpt.text, decided_by, reply))


class EdgeSession:
    """The ``SessionHandler`` for one client session."""

    def __init__(self, ctx: EdgeContext):
        self.ctx = ctx
        backend = ctx.config.backend
        # A pool exists exactly when a backend is configured (make_context).
        self.relay = (LockstepRelay(ctx.pool, backend)
                      if ctx.pool is not None and backend is not None else None)

    def on_connect(self, session: Session) -> Optional[Reply]:
        return None

    def known_capabilities(self, session: Session) -> Optional[Capabilities]:
        """Capabilities without waiting, when the backend's EHLO is known."""
        if self.relay is None:
            limit = self.ctx.config.limits.max_message_size
            return Capabilities(size=limit, eightbitmime=True, smtputf8=True, dsn=False)
        exts = self.ctx.pool.extensions if self.ctx.pool is not None else None
        return None if exts is None else self._from_backend(exts)

    async def capabilities(self, session: Session) -> Capabilities:
        known = self.known_capabilities(session)
        if known is not None:
            return known
        assert self.relay is not None
        exts = await self.relay.extensions()
        if exts is None:
            # Backend unknown right now: promise nothing it may lack; MAIL
            # will find out and answer 4xx.
            return Capabilities(size=self.ctx.config.limits.max_message_size,
                                eightbitmime=False, smtputf8=False, dsn=False)
        return self._from_backend(exts)

    def _from_backend(self, exts: dict[str, str]) -> Capabilities:
        """Announce only what the backend announced too; SIZE the smaller."""
        limit = self.ctx.config.limits.max_message_size
        size_text = exts.get("SIZE", "")
        if size_text.isdigit() and int(size_text) > 0:
            # We add a Received: header (and XFORWARD adds nothing to the
            # size): leave room for it, or a message of exactly the announced
            # size would bounce at the backend (RFC 1870 section 6).
            limit = min(limit, int(size_text) - RECEIVED_ALLOWANCE)
        return Capabilities(size=limit, eightbitmime="8BITMIME" in exts,
                            smtputf8="SMTPUTF8" in exts, dsn="DSN" in exts)

    # -- before DATA ---------------------------------------------------------------

    async def on_mail(self, session: Session, txn: Transaction) -> Reply:
        txn.t_mail = time.monotonic()
        if self.relay is None:
            return replies.SENDER_OK
        return await self.relay.mail(session, txn)

    async def on_rcpt(self, session: Session, txn: Transaction, rcpt: Address,
                      params: dict[str, Optional[str]]) -> Reply:
        # An upstream MTA that forwarded the client with XFORWARD accepted
        # the recipient already (smtp/forwarded.py): relay control is its.
        if not (session.trusted or session.relay_checked):
            reason = relay_refusal_reason(rcpt, self.ctx.relay_domains)
            if reason is not None:
                log.info("relay denied for {rcpt} from {client}: {reason}", rcpt=rcpt.text,
                         client=session.peer_host, reason=reason, session_id=session.id,
                         queue_id=txn.id)
                refusal = replies.RELAY_DENIED.with_reference(txn.id)
                _note_refusal(txn, rcpt, "relay control", refusal)
                return refusal
        runtime = self.ctx.policy
        if runtime is not None and not (session.trusted and self.ctx.config.policy.skip_trusted):
            policy_refusal = await self._policy_rcpt(runtime, session, txn, rcpt)
            if policy_refusal is not None:
                return policy_refusal
        if self.relay is None:
            return replies.RECIPIENT_OK
        return await self.relay.rcpt(session, txn, rcpt, params)

    async def _policy_rcpt(self, runtime: PolicyRuntime, session: Session, txn: Transaction,
                           rcpt: Address) -> Optional[Reply]:
        record = txn.record
        if record is None:
            record = txn.record = TransactionRecord()
        facts = Facts(client_ip=session.peer_host, helo=session.helo or "",
                      sender=txn.sender.text, sender_domain=domain_of(txn.sender),
                      recipient=rcpt.text, recipient_domain=domain_of(rcpt),
                      session_id=session.id, queue_id=txn.id, tls=session.tls)
        refusal = await runtime.engine.on_recipient(facts, record)
        if refusal is not None:
            log.info("policy {policy} refused {rcpt} from {client}: {reply}",
                     policy=record.policy, rcpt=rcpt.text, client=session.peer_host,
                     reply=str(refusal), session_id=session.id, queue_id=txn.id)
            _note_refusal(txn, rcpt, record.refused_by or "policy", refusal)
        return refusal

    # -- end of DATA ---------------------------------------------------------------

    async def on_data_end(self, session: Session, txn: Transaction) -> Reply:
        t_data = time.monotonic()
        # The end of DATA as the copies' state gives it (X-MPP-Received).
        received = time.time()
        verdict = self._verdict(txn)
        if verdict.action is REJECT or verdict.action is TEMPFAIL:
            return self._refuse(session, txn, verdict)
        try:
            cfg = self.ctx.config
            message, stripped = prepare(session, txn, self.ctx.hostname if cfg.smtp.received_header else None,
                                        cfg.limits.memory_spool_bytes, spool_directory(cfg),
                                        rules=self._header_rules())
        except HeaderBlockTooLarge:
            reply = replies.HEADER_BLOCK_TOO_LARGE.with_reference(txn.id)
            self._reset_backend()
            txlog.log_transaction(session, txn, REJECT, reply, {}, decided_by="header size")
            return reply
        except TooManyHops as loop:
            # Refused before the backend hears DATA (or a Maildir file is
            # written): a looping message must stop here (RFC 5321 6.3).
            self._reset_backend()
            reply = loop.reply.with_reference(txn.id)
            txlog.log_transaction(session, txn, REJECT, reply, {},
                                  reason=f"mail loop: {loop}", decided_by="hop count")
            return reply
        except OSError as e:
            # The cleaned copy of the spool (X-MPP-* removed) met a full disk.
            reply = not_stored(session, txn, e, "spool copy")
            self._reset_backend()
            txlog.log_transaction(session, txn, TEMPFAIL, reply, {}, decided_by="storage")
            return reply
        txn.stripped_headers = stripped
        scanning = self._scanning_for(session, txn)
        scanned = None if scanning is None else await self._scan(session, txn, message, scanning)
        if scanned is not None:
            verdict = scanned
            if verdict.action is REJECT or verdict.action is TEMPFAIL:
                return self._refuse(session, txn, verdict)
        if verdict.action is QUARANTINE and message.released_fields:
            verdict = self._released(session, txn, message, verdict)
        # Result headers (Authentication-Results, X-Spam-*) go right below
        # our Received: (RFC 8601 2.1).
        for name, value in verdict.headers:
            message.prefix += format_header(name, value)
        action = verdict.action
        if action is RELAY or action is TAG or action is QUARANTINE:
            policy = cfg.policies[self._policy_name(txn)]
            # Most messages need no rewrite: no coroutine for them.
            if policy.disclaimers or (action is TAG and policy.scoring.subject_prefix):
                await self.ctx.rewriter.rewrite(session, txn, message, verdict, policy)
        if action is DISCARD:
            # Accepted and dropped on purpose (a policy's hard action): logged.
            self._reset_backend()
            return discard(session, txn, verdict)
        if action is DELETE:
            # A virus accepted and dropped (virus_action "delete" or a
            # per-engine rule): logged loudly, notices sent (actions/delete.py).
            self._reset_backend()
            return await self._delete(session, txn, message, verdict)
        archive = self.ctx.archive
        if action is QUARANTINE:
            # Held, not relayed: a durable copy in the archive queue
            # (docs/design.md promise 1) before the 250.
            self._reset_backend()
            reply = await hold(archive, session, txn, message, verdict, received)
        else:
            if self.relay is not None:
                # The relay action is the lockstep relay's DATA itself: the
                # client's 250 is the backend's (docs/design.md promise 1).
                reply = await self.relay.data(session, txn, message)
            else:
                reply = await self.ctx.delivery.deliver(session, txn, message)
                if action is RELAY:
                    action = Disposition.DELIVER
            # archive.copy "all"/"domains": a copy once the message is
            # accepted, never of refused mail (why after, not before: see
            # keep_copy).
            if reply.is_positive and archive.wants_copy(txn):
                await keep_copy(archive, session, txn, message, verdict, received, action)
        timings = {"data_ms": round((time.monotonic() - t_data) * 1000, 2)}
        if txn.t_mail is not None:
            timings["total_ms"] = round((time.monotonic() - txn.t_mail) * 1000, 2)
        txlog.log_transaction(session, txn, action if reply.is_positive else TEMPFAIL
                              if reply.is_transient else REJECT, reply, timings,
                              decided_by=None if reply.is_positive else
                              "backend" if self.relay is not None and action is not QUARANTINE
                              else "storage")
        return reply

    async def _delete(self, session: Session, txn: Transaction, message: OutboundMessage,
                      verdict: Verdict) -> Reply:
        """The delete action with the policy's notices, sent through the
        backend's own settings (none without a backend)."""
        cfg = self.ctx.config
        name = self._policy_name(txn)
        pool = self.ctx.pool
        route = (NoticeRoute(self.ctx.reactor, pool.config, pool.helo_name,
                             pool.tls_context_factory) if pool is not None else None)
        return await delete(session, txn, verdict, message, cfg.policies[name].scan.delete_notice,
                            notice_renderer(notice_dirs(cfg, name)), route, self.ctx.hostname,
                            name)

    def _released(self, session: Session, txn: Transaction, message: OutboundMessage,
                  verdict: Verdict) -> Verdict:
        """A message the verdict would hold that carries a valid
        X-MPP-Released mark (``mppproxy quarantine release`` re-injected it,
        after its own re-scan) is relayed, not held a second time; a mark
        that does not verify changes nothing (archive/released.py)."""
        keys = self.ctx.archive.keys
        found = released_mark(message, keys, time.time()) if keys is not None else None
        if found is None:
            log.warn("message {queue_id} carries an X-MPP-Released mark that does not verify "
                     "(forged, stale or another site's key): held as its verdict says",
                     queue_id=txn.id, session_id=session.id, client=session.peer_host)
            return verdict
        log.info("message {queue_id} was released from the quarantine (reference {ref}): "
                 "relayed, not held again", queue_id=txn.id, ref=found.ref, session_id=session.id)
        return dataclasses.replace(
            verdict, action=RELAY, reasons=verdict.reasons + (f"released from quarantine "
                                                              f"(reference {found.ref})",))

    def _header_rules(self) -> HeaderRules:
        """The edge's rules for the client's header section: fields to
        remove (smtp.strip_headers; Authentication-Results of our own
        authserv-id, the name our own carry, and smtp.authserv_ids) and
        limits.max_hop_count (docs/design.md promise 7)."""
        cfg = self.ctx.config
        return header_rules(cfg.limits.max_hop_count, cfg.smtp.strip_headers,
                            (self.ctx.hostname, *cfg.smtp.authserv_ids))

    def _policy_name(self, txn: Transaction) -> str:
        """The policy of the transaction (its first recipient's), or
        "default" when the policy engine did not run (trusted clients with
        policy.skip_trusted, or policy.enabled off)."""
        record = txn.record
        name = record.policy if record is not None and record.policy else "default"
        return name if name in self.ctx.config.policies else "default"

    def _refuse(self, session: Session, txn: Transaction, verdict: Verdict) -> Reply:
        self._reset_backend()
        return refuse(self.ctx.renderer, session, txn, verdict)

    def _verdict(self, txn: Transaction) -> Verdict:
        """What the pre-DATA results mean for the message (verdict.py)."""
        record = txn.record
        if record is None or record.policy is None or self.ctx.policy is None:
            return Verdict()
        if record.blacklisted_during:
            # The client hit a spam trap or a threshold after some of its
            # recipients were accepted: the whole message is refused.
            return Verdict(REJECT, record.score, ("client blacklisted during the transaction",),
                           "blacklist", (("reason", "policy violation"),))
        return decide(record, self.ctx.config.policies[record.policy].scoring)

    # -- scanning ------------------------------------------------------------------

    def _scanning_for(self, session: Session, txn: Transaction) -> Optional[PolicyScanning]:
        """The scanning of the transaction's policy, or None (it does not
        scan, or the policy engine skipped a trusted client): checked
        without a coroutine, as most messages on a busy relay are not
        scanned.  With the policy engine off, the default policy's
        scanning applies (as its disclaimers do)."""
        record = txn.record
        if record is not None and record.policy is not None:
            return self.ctx.scan.scanning.get(record.policy)
        if self.ctx.policy is None and not (session.trusted and self.ctx.config.policy.skip_trusted):
            return self.ctx.scan.scanning.get("default")
        return None

    async def _scan(self, session: Session, txn: Transaction, message: OutboundMessage,
                    scanning: PolicyScanning) -> Optional[Verdict]:
        """Post-DATA scanning of the policy, then the verdict on everything;
        None when a do-not-scan list skips it."""
        record = txn.record
        if record is None or record.policy is None:
            # The policy engine is off: the default policy judges alone.
            record = txn.record = TransactionRecord(policy="default")
        name = record.policy
        assert name is not None
        skip = self._skip_reason(session, txn, scanning)
        if skip is not None:
            record.recorded.append(Recorded("scan", CheckResult(), skipped=skip))
            return None
        scan_input = ScanInput(
            chunks=message.chunks, size=message.size, client_ip=session.peer_host,
            helo=session.helo or "", sender=txn.sender.text,
            recipients=tuple(r.text for r in txn.recipients), queue_id=txn.id,
            policy=name, smtputf8=txn.smtputf8)
        # The same post-DATA step as scan mode's (parse, guard, engines,
        # decide, result headers), so both give one message one verdict.
        policy = self.ctx.config.policies[name]
        scanned = await scan_and_decide(scanning, scan_input, record, policy.scoring)
        verdict = scanned.verdict
        # Engines not consulted, with why, for the transaction log line.
        txn.scan_skipped = scanned.skipped
        runtime = self.ctx.policy
        if (scanning.config.count_spam and policy.scoring.tag > 0
                and verdict.score >= policy.scoring.tag and runtime is not None):
            # Feeds the thresholds' max_spam (issue #4's counter API).
            t = policy.thresholds
            key = client_key(session.peer_host, t.ipv4_prefix, t.ipv6_prefix)
            if key is not None and runtime.services.counters is not None:
                runtime.services.counters.add_spam(key, name, t.period, shared=t.shared)
        return verdict

    def _skip_reason(self, session: Session, txn: Transaction,
                     scanning: PolicyScanning) -> Optional[str]:
        """Why the policy's do-not-scan lists exempt this transaction, or None."""
        config = scanning.config
        sets = self.ctx.sets
        if config.skip_clients and session.peer_host in sets.network_set(config.skip_clients):
            return "do-not-scan client"
        if config.skip_senders and txn.sender.text in sets.address_set(config.skip_senders):
            return "do-not-scan sender"
        if config.skip_recipients:
            rcpts = sets.address_set(config.skip_recipients)
            if any(r.text in rcpts for r in txn.recipients):
                return "do-not-scan recipient"
        return None

    # -- the end of a session ------------------------------------------------------

    def _reset_backend(self) -> None:
        if self.relay is not None:
            self.relay.reset()

    def on_reset(self, session: Session, txn: Optional[Transaction], reason: str) -> None:
        if txn is not None:
            # Every transaction that began with MAIL gets its one log event,
            # also when MAIL itself was refused or nothing was sent.
            refusals = txn.refusals
            if refusals and not txn.recipients:
                # Nothing accepted and something refused: policy or relay
                # control ended it, whatever the client said next (QUIT,
                # RSET); the line names the check and the refused recipients.
                txlog.log_transaction(session, txn, Disposition.REFUSED, refusals[-1][2], {},
                                      reason=reason)
            else:
                txlog.log_transaction(session, txn, Disposition.ABORTED, None, {}, reason=reason)
        self._reset_backend()

    def on_client_gone(self, session: Session) -> None:
        """The client hung up while its message was being relayed."""
        if self.relay is not None:
            self.relay.client_gone()

    def on_disconnect(self, session: Session) -> None:
        if self.relay is not None:
            self.relay.finish()
