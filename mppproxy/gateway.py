"""The gateway: what the session state machine asks at each SMTP phase.

Stage: between the session and the actions.  For each session it applies
relay control (docs/design.md promise 3), hands MAIL/RCPT/message to the lockstep
relay or the local Maildir, prepares the outbound message (Received:, X-MPP-*
stripped) and writes the one structured log line per transaction (promise 5).
The pre-DATA policy engine and the post-DATA scanners hook in here.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from twisted.internet.threads import deferToThreadPool

from mppproxy.config.schema import ProxyConfig, spool_directory
from mppproxy.delivery import maildir
from mppproxy.logsetup import Logger
from mppproxy.message import (HeaderBlockTooLarge, HeaderRules, TooManyHops, format_header, header_rules,
                              prepare)
from mppproxy import disclaimer
from mppproxy.policy.base import CheckResult, Facts, Recorded, TransactionRecord
from mppproxy.policy.counters import client_key
from mppproxy.policy.patterns import AddressSet, NetworkSet
from mppproxy.policy.runtime import PolicyRuntime
from mppproxy.scan.base import ScanInput
from mppproxy.scan.postdata import scan_and_decide
from mppproxy.verdict import Verdict, decide
from mppproxy.relay.lockstep import LockstepRelay
from mppproxy.relay.pool import BackendPool
from mppproxy.smtp import replies
from mppproxy.smtp.address import Address, RelayDomains, relay_refusal_reason
from mppproxy.smtp.replies import Reply
from mppproxy.smtp.server import Capabilities
from mppproxy.smtp.session import Session, Transaction
from mppproxy import txlog

log = Logger()

# Octets kept free under the backend's SIZE for the Received: header we add.
RECEIVED_ALLOWANCE = 1024


class TrustedNetworks:
    """Client addresses that may relay anywhere (Postfix's mynetworks)."""

    def __init__(self, networks: tuple[str, ...]):
        # The policy lists' matcher: a set probe per prefix length, on the
        # address parse the policy checks share (parse_ip's cache).
        self._nets = NetworkSet(networks)

    def __call__(self, host: str) -> bool:
        return host in self._nets


def resolve_hostname(config: ProxyConfig) -> str:
    return config.smtp.hostname or socket.getfqdn()


@dataclass
class GatewayContext:
    """What all sessions of one configuration share."""

    config: ProxyConfig
    reactor: Any
    threadpool: Any
    hostname: str
    relay_domains: RelayDomains
    trusted: TrustedNetworks
    pool: Optional[BackendPool]
    # The pre-DATA policy engine and its services; None when policy.enabled
    # is false.
    policy: Optional[PolicyRuntime] = None
    # Matchers of the do-not-scan and disclaimer lists, built on first use.
    address_sets: dict = field(default_factory=dict)
    network_sets: dict = field(default_factory=dict)


def make_context(config: ProxyConfig, reactor: Any, threadpool: Any,
                 backend_tls_context: Any = None,
                 policy: Optional[PolicyRuntime] = None) -> GatewayContext:
    hostname = resolve_hostname(config)
    pool = None
    if config.backend is not None:
        pool = BackendPool(reactor, config.backend, config.backend.helo_name or hostname,
                           backend_tls_context)
    return GatewayContext(config, reactor, threadpool, hostname,
                          RelayDomains(config.relay_domains),
                          TrustedNetworks(config.trusted_networks), pool, policy)


# Where quarantined messages are held until the archive node takes them
# (below data_dir; the Maildir macros of delivery.maildir apply).
QUARANTINE_MAILDIR = "quarantine/%D%/%U%"


def _not_stored(session: Session, txn: Transaction, error: OSError, what: str) -> Reply:
    """Log a write of the message that failed as our fault (the path and
    errno, the queue id) and give the client's 4xx: 452 4.3.1 for a full
    disk, 451 4.3.0 otherwise (``replies.storage_failure``); never a 250."""
    log.error("message {queue_id} not stored: {what} failed on {path}: {error} (errno {errno})",
              queue_id=txn.id, what=what, path=error.filename, error=error.strerror or str(error),
              errno=error.errno, session_id=session.id)
    return replies.storage_failure(error)


def _domain_of(address: Address) -> str:
    return address.domain.rstrip(".").lower()


def _note_refusal(txn: Transaction, rcpt: Address, decided_by: str, reply: Reply) -> None:
    """Remember a recipient refused before the backend heard of it, and
    what decided it, for the transaction's log line (txlog.py)."""
    txn.facts.setdefault("refusals", []).append((rcpt.text, decided_by, reply))


class SessionGateway:
    """The ``SessionHandler`` for one client session."""

    def __init__(self, ctx: GatewayContext):
        self.ctx = ctx
        self.relay = LockstepRelay(ctx.pool, ctx.config.backend) if ctx.pool is not None else None

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

    async def on_mail(self, session: Session, txn: Transaction) -> Reply:
        txn.facts["t_mail"] = time.monotonic()
        if self.relay is None:
            return replies.SENDER_OK
        return await self.relay.mail(session, txn)

    async def on_rcpt(self, session: Session, txn: Transaction, rcpt: Address,
                      params: dict[str, Optional[str]]) -> Reply:
        if not session.trusted:
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
            refusal = await self._policy_rcpt(runtime, session, txn, rcpt)
            if refusal is not None:
                return refusal
        if self.relay is None:
            return replies.RECIPIENT_OK
        return await self.relay.rcpt(session, txn, rcpt, params)

    async def _policy_rcpt(self, runtime: PolicyRuntime, session: Session, txn: Transaction,
                           rcpt: Address) -> Optional[Reply]:
        record = txn.facts.get("policy")
        if record is None:
            record = txn.facts["policy"] = TransactionRecord()
        facts = Facts(client_ip=session.peer_host, helo=session.helo or "",
                      sender=txn.sender.text, sender_domain=_domain_of(txn.sender),
                      recipient=rcpt.text, recipient_domain=_domain_of(rcpt),
                      session_id=session.id, queue_id=txn.id, tls=session.tls)
        refusal = await runtime.engine.on_recipient(facts, record)
        if refusal is not None:
            log.info("policy {policy} refused {rcpt} from {client}: {reply}",
                     policy=record.policy, rcpt=rcpt.text, client=session.peer_host,
                     reply=str(refusal), session_id=session.id, queue_id=txn.id)
            _note_refusal(txn, rcpt, record.refused_by or "policy", refusal)
        return refusal

    async def on_data_end(self, session: Session, txn: Transaction) -> Reply:
        t_data = time.monotonic()
        verdict = self._verdict(txn)
        if verdict.action in ("reject", "tempfail"):
            return self._refuse(session, txn, verdict)
        try:
            cfg = self.ctx.config
            message, stripped = prepare(session, txn, self.ctx.hostname if cfg.smtp.received_header else None,
                                        cfg.limits.memory_spool_bytes, spool_directory(cfg),
                                        rules=self._header_rules())
        except HeaderBlockTooLarge:
            reply = replies.HEADER_BLOCK_TOO_LARGE.with_reference(txn.id)
            self._reset_backend()
            txlog.log_transaction(session, txn, "reject", reply, {}, decided_by="header size")
            return reply
        except TooManyHops as loop:
            # Refused before the backend hears DATA (or a Maildir file is
            # written): a looping message must stop here (RFC 5321 6.3).
            self._reset_backend()
            reply = loop.reply.with_reference(txn.id)
            txlog.log_transaction(session, txn, "reject", reply, {},
                                  reason=f"mail loop: {loop}", decided_by="hop count")
            return reply
        except OSError as e:
            # The cleaned copy of the spool (X-MPP-* removed) met a full disk.
            reply = _not_stored(session, txn, e, "spool copy")
            self._reset_backend()
            txlog.log_transaction(session, txn, "tempfail", reply, {}, decided_by="storage")
            return reply
        txn.facts["stripped_headers"] = stripped
        scanning = self._scanning_for(txn)
        scanned = None if scanning is None else await self._scan(session, txn, message, scanning)
        if scanned is not None:
            verdict = scanned
            if verdict.action in ("reject", "tempfail"):
                return self._refuse(session, txn, verdict)
        # Result headers (Authentication-Results, X-Spam-*) go right below
        # our Received: (RFC 8601 2.1).
        for name, value in verdict.headers:
            message.prefix += format_header(name, value)
        if verdict.action in ("relay", "tag", "quarantine"):
            policy = self.ctx.config.policies[self._policy_name(txn)]
            # Most messages need no rewrite: no coroutine for them.
            if policy.disclaimers or (verdict.action == "tag" and policy.scoring.subject_prefix):
                await self._rewrite(session, txn, message, verdict, policy)
        if verdict.action == "discard":
            # Accepted and dropped on purpose (a policy's hard action): logged.
            self._reset_backend()
            reply = Reply(250, "2.0.0", f"Ok: queued as {txn.id}")
            txlog.log_transaction(session, txn, "discard", reply, {},
                                  reason="; ".join(verdict.reasons) or None)
            return reply
        if verdict.action == "quarantine":
            # Held, not relayed: a durable copy in the local quarantine
            # (docs/design.md promise 1) before the 250.
            self._reset_backend()
            reply = await self._deliver_local(session, txn, message, QUARANTINE_MAILDIR)
            action = "quarantine"
        elif self.relay is not None:
            reply = await self.relay.data(session, txn, message)
            action = verdict.action
        else:
            reply = await self._deliver_local(session, txn, message)
            action = "deliver" if verdict.action == "relay" else verdict.action
        timings = {"data_ms": round((time.monotonic() - t_data) * 1000, 2)}
        if "t_mail" in txn.facts:
            timings["total_ms"] = round((time.monotonic() - txn.facts["t_mail"]) * 1000, 2)
        txlog.log_transaction(session, txn, action if reply.is_positive else "tempfail"
                              if reply.is_transient else "reject", reply, timings,
                              decided_by=None if reply.is_positive else
                              "backend" if self.relay is not None and action != "quarantine"
                              else "storage")
        return reply

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
        record: Optional[TransactionRecord] = txn.facts.get("policy")
        name = record.policy if record is not None and record.policy else "default"
        return name if name in self.ctx.config.policies else "default"

    async def _rewrite(self, session: Session, txn: Transaction, message: Any,
                       verdict: Verdict, policy: Any) -> None:
        """Changes to the message itself: the Subject prefix of a tagged
        message, then the policy's disclaimer."""
        try:
            if verdict.action == "tag" and policy.scoring.subject_prefix:
                message.add_subject_prefix(policy.scoring.subject_prefix)
            if policy.disclaimers:
                await self._disclaim(session, txn, message, policy.disclaimers)
        except HeaderBlockTooLarge:
            # prepare() read the same header section within the same bound.
            log.warn("header section too large to rewrite for {queue_id}", queue_id=txn.id)

    async def _disclaim(self, session: Session, txn: Transaction, message: Any,
                        disclaimers: Any) -> None:
        sender = txn.sender.text
        for table in disclaimers:
            if sender not in self._address_set(table.senders):
                continue
            if message.size > table.max_size:
                why = f"size {message.size} > {table.max_size}"
                new = None
            else:
                header = message.header_section()
                # Reading the spool and re-encoding up to max_size octets:
                # off the reactor thread.
                new, why = await deferToThreadPool(
                    self.ctx.reactor, self.ctx.threadpool,
                    lambda texts=table.texts: disclaimer.apply(header, message.body_bytes(), texts))
            if new is None:
                log.info("no disclaimer on {queue_id}: {why}", queue_id=txn.id, why=why,
                         session_id=session.id)
                txn.facts["disclaimer"] = f"skipped: {why}"
            else:
                message.replace_content(*new)
                txn.facts["disclaimer"] = "added"
            return

    def _address_set(self, patterns: tuple[str, ...]) -> AddressSet:
        # Built once per configuration snapshot: the tuples live as long as it.
        cache = self.ctx.address_sets
        found = cache.get(patterns)
        if found is None:
            found = cache[patterns] = AddressSet(patterns)
        return found

    def _refuse(self, session: Session, txn: Transaction, verdict: Verdict) -> Reply:
        refusal = self._render_refusal(session, txn, verdict)
        self._reset_backend()
        txlog.log_transaction(session, txn, verdict.action, refusal, {},
                              reason="; ".join(verdict.reasons) or None,
                              decided_by=verdict.template or verdict.action)
        return refusal

    def _scanning_for(self, txn: Transaction) -> Any:
        """The scanning of the transaction's policy, or None (no policy ran,
        or it does not scan): checked without a coroutine, as most
        messages on a busy relay are not scanned."""
        record: Optional[TransactionRecord] = txn.facts.get("policy")
        runtime = self.ctx.policy
        if record is None or record.policy is None or runtime is None:
            return None
        return runtime.scanning.get(record.policy)

    async def _scan(self, session: Session, txn: Transaction, message: Any,
                    scanning: Any) -> Optional[Verdict]:
        """Post-DATA scanning of the policy, then the verdict on everything;
        None when a do-not-scan list skips it."""
        record: TransactionRecord = txn.facts["policy"]
        runtime = self.ctx.policy
        assert runtime is not None
        skip = self._skip_reason(session, txn, scanning.config)
        if skip is not None:
            record.recorded.append(Recorded("scan", CheckResult(), skipped=skip))
            return None
        scan_input = ScanInput(
            chunks=message.chunks, size=message.size, client_ip=session.peer_host,
            helo=session.helo or "", sender=txn.sender.text,
            recipients=tuple(r.text for r in txn.recipients), queue_id=txn.id,
            policy=record.policy, smtputf8=txn.smtputf8)
        # The same post-DATA step as scan mode's (parse, guard, engines,
        # decide, result headers), so both give one message one verdict.
        policy = runtime.engine.policy(record.policy)
        scanned = await scan_and_decide(scanning, scan_input, record, policy.scoring)
        verdict = scanned.verdict
        # Engines not consulted, with why, for the transaction log line.
        txn.facts["scan_skipped"] = scanned.skipped
        if (scanning.config.count_spam and policy.scoring.tag > 0
                and verdict.score >= policy.scoring.tag):
            # Feeds the thresholds' max_spam (issue #4's counter API).
            t = policy.thresholds
            key = client_key(session.peer_host, t.ipv4_prefix, t.ipv6_prefix)
            if key is not None and runtime.services.counters is not None:
                runtime.services.counters.add_spam(key, record.policy, t.period)
        return verdict

    def _skip_reason(self, session: Session, txn: Transaction, config: Any) -> Optional[str]:
        """Why the policy's do-not-scan lists exempt this transaction, or None."""
        if config.skip_clients and session.peer_host in self._network_set(config.skip_clients):
            return "do-not-scan client"
        if config.skip_senders and txn.sender.text in self._address_set(config.skip_senders):
            return "do-not-scan sender"
        if config.skip_recipients:
            rcpts = self._address_set(config.skip_recipients)
            if any(r.text in rcpts for r in txn.recipients):
                return "do-not-scan recipient"
        return None

    def _network_set(self, networks: tuple[str, ...]) -> NetworkSet:
        cache = self.ctx.network_sets
        found = cache.get(networks)
        if found is None:
            found = cache[networks] = NetworkSet(networks)
        return found

    def _verdict(self, txn: Transaction) -> Verdict:
        """What the pre-DATA results mean for the message (verdict.py)."""
        record: Optional[TransactionRecord] = txn.facts.get("policy")
        runtime = self.ctx.policy
        if record is None or record.policy is None or runtime is None:
            return Verdict()
        if record.blacklisted_during:
            # The client hit a spam trap or a threshold after some of its
            # recipients were accepted: the whole message is refused.
            return Verdict("reject", record.score, ("client blacklisted during the transaction",),
                           "blacklist", (("reason", "policy violation"),))
        return decide(record, runtime.engine.policy(record.policy).scoring)

    def _render_refusal(self, session: Session, txn: Transaction, verdict: Verdict) -> Reply:
        record: Optional[TransactionRecord] = txn.facts.get("policy")
        assert self.ctx.policy is not None and record is not None
        first = txn.recipients[0] if txn.recipients else None
        context = {"client_ip": session.peer_host, "helo": session.helo or "",
                   "sender": txn.sender.text, "sender_domain": _domain_of(txn.sender),
                   "recipient": first.text if first else "",
                   "recipient_domain": _domain_of(first) if first else "",
                   "policy": record.policy or "default", "queue_id": txn.id, "reason": "",
                   "what": "", "reasons": [], "retry_seconds": 0, "score": verdict.score,
                   "virus": ""}
        context.update(dict(verdict.template_vars))
        return self.ctx.policy.engine.renderer.reply(verdict.template, context,
                                                     record.policy or "default")

    async def _deliver_local(self, session: Session, txn: Transaction, message: Any,
                             template: Optional[str] = None) -> Reply:
        cfg = self.ctx.config
        try:
            paths = await deferToThreadPool(
                self.ctx.reactor, self.ctx.threadpool, maildir.deliver, message.chunks,
                txn.sender, list(txn.recipients), template or cfg.delivery.maildir, cfg.data_dir)
        except OSError as e:
            # deliver() removed every copy: nothing of it is on disk.
            return _not_stored(session, txn, e,
                               "quarantine" if template == QUARANTINE_MAILDIR else "maildir delivery")
        txn.facts["delivered_to"] = paths
        return Reply(250, "2.0.0", f"Ok: queued as {txn.id}")

    def _reset_backend(self) -> None:
        if self.relay is not None:
            self.relay.reset()

    def on_reset(self, session: Session, txn: Optional[Transaction], reason: str) -> None:
        if txn is not None:
            # Every transaction that began with MAIL gets its one log event,
            # also when MAIL itself was refused or nothing was sent.
            refusals = txn.facts.get("refusals")
            if refusals and not txn.recipients:
                # Nothing accepted and something refused: policy or relay
                # control ended it, whatever the client said next (QUIT,
                # RSET); the line names the check and the refused recipients.
                txlog.log_transaction(session, txn, "refused", refusals[-1][2], {}, reason=reason)
            else:
                txlog.log_transaction(session, txn, "aborted", None, {}, reason=reason)
        self._reset_backend()

    def on_client_gone(self, session: Session) -> None:
        """The client hung up while its message was being relayed."""
        if self.relay is not None:
            self.relay.client_gone()

    def on_disconnect(self, session: Session) -> None:
        if self.relay is not None:
            self.relay.finish()
