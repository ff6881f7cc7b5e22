"""The whole decision on one stored message, offline: what the edge would
do with it under one configuration.

Stage: composition (docs/design.md, "Floors"), the offline twin of
``edge/handler.py``'s chain for one transaction: relay control (promise 3)
and the pre-DATA ``PolicyEngine.on_recipient`` for each recipient; the
pre-DATA verdict; the message as the edge passes it on
(``message.prepare_content``: our Received: on top, X-MPP-* and the other
trust fields removed, a loop refused); the policy's scanning through the
same ``scan.postdata.scan_and_decide`` the edge and scan mode call; and
``verdict.decide``'s disposition.  What it leaves out acts after the
verdict and changes no disposition: the backend's own answer, disclaimers,
the quarantine queue, the release mark.  A change to the edge's order of
stages belongs here too.

Nothing live is touched (issue 14): the state database is replaced by the
scratch stores of ``replay/scratch.py`` (fresh for every message, or kept
for the whole replay with ``shared_state``), rate counters count in
memory.  DNS is live (dnsbl, SPF, DKIM, DMARC ask the configured servers)
unless ``dns`` is off: those checks are then turned off in every policy,
the same for both configurations compared.  The engines of ``[scanners]``
are asked live, or with ``recorded`` answer from the results the message's
X-MPP state recorded for them (``RecordedScanner``), live where it has none.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from twisted.internet import defer

from mppproxy.archive.state import CheckState
from mppproxy.config.schema import ProxyConfig, spool_directory
from mppproxy.edge.context import resolve_hostname
from mppproxy.match import SetCache, TrustedNetworks
from mppproxy.message import (HeaderBlockTooLarge, OutboundMessage, TooManyHops, header_rules,
                              prepare_content, trace_header)
from mppproxy.policy.base import Facts
from mppproxy.policy.counters import RateCounters, client_key
from mppproxy.policy.runtime import PolicyRuntime
from mppproxy.replay.envelope import Envelope, Past
from mppproxy.replay.scratch import PassingGreylist, ScratchBlacklist
from mppproxy.results import CheckResult, Disposition, HardAction, TransactionRecord
from mppproxy.scan.base import ScanInput, Scanner
from mppproxy.scan.factory import PolicyScanning
from mppproxy.scan.postdata import scan_and_decide
from mppproxy.scan.runtime import ScanStage
from mppproxy.smtp.address import AddressError, RelayDomains, parse_path, relay_refusal_reason
from mppproxy.smtp.session import new_id
from mppproxy.spool.spool import Spool
from mppproxy.verdict import Verdict, decide

REJECT, TEMPFAIL = Disposition.REJECT, Disposition.TEMPFAIL


@dataclass(frozen=True)
class Options:
    """How the replay runs (the command line's switches)."""

    dns: bool = True
    recorded: bool = False
    shared_state: bool = False


@dataclass(frozen=True)
class Judgement:
    """What the configuration would do with the message, and why."""

    disposition: Disposition
    score: float = 0.0
    # The check or scanner that decided ("access", "spamtrap",
    # "scan:clamd", "score", "relay control", ...); "" when nothing
    # stood in the message's way.
    decided_by: str = ""
    reasons: tuple[str, ...] = ()
    policy: Optional[str] = None
    # (recipient, what refused it and the reply) before DATA.
    refused: tuple[tuple[str, str], ...] = ()
    # Engine -> "live", "recorded" or "skipped: why".
    engines: dict[str, str] = field(default_factory=dict)


def offline(config: ProxyConfig) -> ProxyConfig:
    """``config`` with every check that asks DNS turned off: DNS lists and
    SPF before DATA, DKIM and DMARC after."""
    policies = {}
    for name, policy in config.policies.items():
        scan = dataclasses.replace(policy.scan,
                                   dkim=dataclasses.replace(policy.scan.dkim, enabled=False),
                                   dmarc=dataclasses.replace(policy.scan.dmarc, enabled=False))
        policies[name] = dataclasses.replace(
            policy, dnsbl=dataclasses.replace(policy.dnsbl, enabled=False),
            spf=dataclasses.replace(policy.spf, enabled=False), scan=scan)
    return dataclasses.replace(config, policies=policies)


class RecordedScanner(Scanner):
    """An engine that answers with what the message's state recorded for
    it (``Judge.recorded``, by queue id), or asks the live engine when
    nothing was recorded.  A recorded score is the weighted one: it is
    divided by the weight the judging configuration gave the engine, so
    this configuration's weight applies to the engine's own score."""

    external = True

    def __init__(self, inner: Scanner, judge: "Judge"):
        super().__init__(inner.settings, inner.reactor)
        self.name = inner.name
        self.inner = inner
        self.judge = judge

    async def scan(self, message: ScanInput) -> CheckResult:
        found = self.judge.recorded.get(message.queue_id)
        if found is None or self.name not in found[0]:
            return await self.inner.scan(message)
        engines, divisors = found
        self.judge.answered.setdefault(message.queue_id, set()).add(self.name)
        state = engines[self.name]
        if state is None:
            return CheckResult()
        divisor = divisors.get(self.name, 1.0)
        score = state.score / divisor if divisor else 0.0
        return _result_of(state, score)

    def close(self) -> Any:
        close = getattr(self.inner, "close", None)
        return close() if close is not None else None


def _result_of(state: CheckState, score: float) -> CheckResult:
    """The ``CheckResult`` of a recorded engine result.  A recorded refusal
    whose reason names a virus gets the ``virus`` template back, so a
    policy's ``virus_action`` applies to it as it did live."""
    template = ""
    template_vars: tuple[tuple[str, Any], ...] = ()
    if state.action is HardAction.REJECT and state.reasons and state.reasons[0].startswith("virus "):
        template, template_vars = "virus", (("virus", state.reasons[0][6:]),)
    return CheckResult(score, state.reasons, state.action, template, template_vars)


class Judge:
    """The stages of one configuration, built once for a whole replay.
    ``weights``: the configuration that judged the corpus (for
    ``RecordedScanner``); None takes recorded scores as weight 1.
    Construction does no I/O; ``stop`` closes DNS and engine sockets."""

    def __init__(self, config: ProxyConfig, reactor: Any, options: Options,
                 weights: Optional[ProxyConfig] = None):
        if not options.dns:
            config = offline(config)
        self.config = config
        self.reactor = reactor
        self.options = options
        self.weights = weights
        self.hostname = resolve_hostname(config)
        self.trusted = TrustedNetworks(config.trusted_networks)
        self.relay_domains = RelayDomains(config.relay_domains)
        self.sets = SetCache()
        self.rules = header_rules(config.limits.max_hop_count, config.smtp.strip_headers,
                                  (self.hostname, *config.smtp.authserv_ids))
        # The pre-DATA engine with the scratch stores (no database at all).
        self.policy: Optional[PolicyRuntime] = None
        if config.policy.enabled:
            self.policy = PolicyRuntime(config, reactor, self.hostname)
            self._fresh_state()
        self.stage = ScanStage(config, reactor)
        self.engines = set(self.stage.engines)
        # queue id -> (engine -> recorded result, engine -> weight divisor).
        self.recorded: dict[str, tuple[dict[str, Optional[CheckState]], dict[str, float]]] = {}
        # queue id -> the engines that answered from the record.
        self.answered: dict[str, set[str]] = {}
        if options.recorded:
            self._wrap_engines()

    def _fresh_state(self) -> None:
        assert self.policy is not None
        services = self.policy.services
        services.blacklist = ScratchBlacklist(self.reactor)
        services.greylist = PassingGreylist()
        services.counters = RateCounters(self.reactor)

    def _wrap_engines(self) -> None:
        wrapped: dict[int, Scanner] = {}
        for built in self.stage.scanning.values():
            if built is None:
                continue
            slots = []
            for scanner, settings in built.engine.slots:
                if scanner.external:
                    scanner = wrapped.setdefault(id(scanner), RecordedScanner(scanner, self))
                slots.append((scanner, settings))
            built.engine.slots = slots

    def stop(self) -> defer.Deferred[Any]:
        waits: list[defer.Deferred[Any]] = [self.stage.stop()]
        if self.policy is not None:
            waits.append(self.policy.stop())
        return defer.gatherResults(waits, consumeErrors=True)

    # -- one message -----------------------------------------------------------------

    def too_large(self, size: int) -> Optional[Judgement]:
        """The refusal of a message over ``limits.max_message_size`` (the
        edge's 552 5.3.4, RFC 1870 / RFC 5321 4.5.3.1.7), or None."""
        limit = self.config.limits.max_message_size
        if size <= limit:
            return None
        return Judgement(REJECT, decided_by="size",
                         reasons=(f"{size} octets, over limits.max_message_size {limit}",))

    async def judge(self, data: bytes, envelope: Envelope, past: Optional[Past]) -> Judgement:
        refusal = self.too_large(len(data))
        if refusal is not None:
            return refusal
        if self.policy is not None and not self.options.shared_state:
            self._fresh_state()
        queue_id = new_id()
        if self.options.recorded and past is not None and past.engines:
            self.recorded[queue_id] = (past.engines, self._divisors(past))
        try:
            return await self._judge(data, envelope, queue_id)
        finally:
            self.recorded.pop(queue_id, None)
            self.answered.pop(queue_id, None)

    def _divisors(self, past: Past) -> dict[str, float]:
        if self.weights is None or past.policy not in self.weights.policies:
            return {}
        slots = self.weights.policies[past.policy].scan.engines
        return {name: slot.weight for name, slot in slots.items()}

    async def _judge(self, data: bytes, envelope: Envelope, queue_id: str) -> Judgement:
        config = self.config
        trusted = self.trusted(envelope.client_ip)
        try:
            sender = parse_path(f"<{envelope.sender}>", allow_null=True)
        except AddressError as e:
            return Judgement(Disposition.REFUSED, decided_by="sender address",
                             reasons=(f"envelope sender {envelope.sender!r}: {e}",))
        skip_policy = trusted and config.policy.skip_trusted
        record = TransactionRecord() if self.policy is not None and not skip_policy else None
        refused: list[tuple[str, str]] = []
        deciders: list[str] = []
        replies: list[str] = []
        accepted: list[str] = []
        for rcpt in envelope.recipients:
            try:
                address = parse_path(f"<{rcpt}>", allow_null=False)
            except AddressError as e:
                refused.append((rcpt, f"bad address: {e}"))
                deciders.append("recipient address")
                replies.append(f"bad address: {e}")
                continue
            if not trusted:
                reason = relay_refusal_reason(address, self.relay_domains)
                if reason is not None:
                    refused.append((rcpt, f"relay control: {reason}"))
                    deciders.append("relay control")
                    replies.append(f"relay denied: {reason}")
                    continue
            if record is not None:
                assert self.policy is not None
                facts = Facts(client_ip=envelope.client_ip, helo=envelope.helo,
                              sender=sender.text, sender_domain=_domain(sender.domain),
                              recipient=address.text, recipient_domain=_domain(address.domain),
                              session_id="replay", queue_id=queue_id)
                reply = await self.policy.engine.on_recipient(facts, record)
                if reply is not None:
                    by = record.refused_by or "policy"
                    refused.append((rcpt, f"{by}: {reply}"))
                    deciders.append(by)
                    replies.append(str(reply))
                    continue
            accepted.append(address.text)
        policy_name = record.policy if record is not None else None
        score = round(record.score, 2) + 0.0 if record is not None else 0.0
        if not accepted:
            return Judgement(Disposition.REFUSED, score, deciders[0] if deciders else "",
                             tuple(dict.fromkeys(replies)), policy_name, tuple(refused))
        verdict = self._before_data(record)
        if verdict is not None and verdict.action.refuses:
            return Judgement(verdict.action, verdict.score, _decider(record, verdict, None),
                             verdict.reasons, policy_name, tuple(refused))
        scanning = self._scanning_for(record, trusted)
        if scanning is None:
            verdict = verdict or Verdict()
            return Judgement(verdict.action, verdict.score, _decider(record, verdict, None),
                             verdict.reasons, policy_name, tuple(refused))
        if record is None or record.policy is None:
            record = TransactionRecord(policy="default")
        return await self._scan(data, envelope, sender.text, tuple(accepted), queue_id,
                                record, scanning, tuple(refused))

    def _before_data(self, record: Optional[TransactionRecord]) -> Optional[Verdict]:
        """The edge's ``_verdict``: what the pre-DATA results alone say."""
        if record is None or record.policy is None:
            return None
        if record.blacklisted_during:
            return Verdict(REJECT, record.score, ("client blacklisted during the transaction",),
                           "blacklist")
        return decide(record, self.config.policies[record.policy].scoring)

    def _scanning_for(self, record: Optional[TransactionRecord],
                      trusted: bool) -> Optional[PolicyScanning]:
        """The edge's ``_scanning_for``: the policy's scanning, or the
        default policy's when the policy engine is off."""
        if record is not None and record.policy is not None:
            return self.stage.scanning.get(record.policy)
        if self.policy is None and not (trusted and self.config.policy.skip_trusted):
            return self.stage.scanning.get("default")
        return None

    async def _scan(self, data: bytes, envelope: Envelope, sender: str,
                    recipients: tuple[str, ...], queue_id: str, record: TransactionRecord,
                    scanning: PolicyScanning, refused: tuple[tuple[str, str], ...]) -> Judgement:
        config = self.config
        name = record.policy
        assert name is not None
        skip = self._skip_reason(envelope.client_ip, sender, recipients, scanning)
        if skip is not None:
            verdict = self._before_data(record) or Verdict()
            return Judgement(verdict.action, verdict.score, _decider(record, verdict, None),
                             verdict.reasons + (skip,), name, refused)
        spool = Spool(config.limits.memory_spool_bytes, spool_directory(config))
        message: Optional[OutboundMessage] = None
        try:
            spool.write(data)
            proto = "UTF8ESMTP" if envelope.smtputf8 else "ESMTP"  # RFC 6531 3.7.3
            prefix = trace_header(self.hostname, envelope.helo or "unknown", envelope.client_ip,
                                  proto, queue_id, recipients[0] if len(recipients) == 1 else None)
            try:
                message, _ = prepare_content(spool, prefix, self.rules,
                                             config.limits.memory_spool_bytes,
                                             spool_directory(config))
            except TooManyHops as loop:
                # RFC 5321 6.3: a looping message stops here.
                return Judgement(REJECT, record.score, "hop count", (f"mail loop: {loop}",),
                                 name, refused)
            except HeaderBlockTooLarge:
                return Judgement(REJECT, record.score, "header size",
                                 ("message header block too large",), name, refused)
            scan_input = ScanInput(
                chunks=message.chunks, size=message.size, client_ip=envelope.client_ip,
                helo=envelope.helo, sender=sender, recipients=recipients, queue_id=queue_id,
                policy=name, smtputf8=envelope.smtputf8)
            policy = config.policies[name]
            scanned = await scan_and_decide(scanning, scan_input, record, policy.scoring)
        finally:
            spool.close()
            if message is not None and message.spool is not spool:
                message.spool.close()
        verdict = scanned.verdict
        self._count_spam(envelope.client_ip, name, scanning, verdict)
        return Judgement(verdict.action, verdict.score, _decider(record, verdict, scanned.report),
                         verdict.reasons, name, refused, self._engines(record, queue_id))

    def _skip_reason(self, client: str, sender: str, recipients: tuple[str, ...],
                     scanning: PolicyScanning) -> Optional[str]:
        """The edge's do-not-scan lists (``_skip_reason``)."""
        c = scanning.config
        if c.skip_clients and client in self.sets.network_set(c.skip_clients):
            return "not scanned: do-not-scan client"
        if c.skip_senders and sender in self.sets.address_set(c.skip_senders):
            return "not scanned: do-not-scan sender"
        if c.skip_recipients:
            listed = self.sets.address_set(c.skip_recipients)
            if any(r in listed for r in recipients):
                return "not scanned: do-not-scan recipient"
        return None

    def _count_spam(self, client: str, policy_name: str, scanning: PolicyScanning,
                    verdict: Verdict) -> None:
        """As the edge does: a spam verdict counts for the thresholds'
        max_spam (in the scratch counters; only ``shared_state`` keeps them)."""
        policy = self.config.policies[policy_name]
        if self.policy is None or not scanning.config.count_spam or policy.scoring.tag <= 0:
            return
        if verdict.score < policy.scoring.tag:
            return
        t = policy.thresholds
        key = client_key(client, t.ipv4_prefix, t.ipv6_prefix)
        counters = self.policy.services.counters
        if key is not None and counters is not None:
            counters.add_spam(key, policy_name, t.period)

    def _engines(self, record: TransactionRecord, queue_id: str) -> dict[str, str]:
        answered = self.answered.get(queue_id, set())
        found: dict[str, str] = {}
        for rec in record.recorded:
            name = rec.check[5:] if rec.check.startswith("scan:") else ""
            if name in self.engines:
                found[name] = (f"skipped: {rec.skipped}" if rec.skipped
                               else "recorded" if name in answered else "live")
        return found


def _domain(domain: str) -> str:
    # As the policies match it (actions/refuse.py's domain_of).
    return domain.rstrip(".").lower()


def _decider(record: Optional[TransactionRecord], verdict: Verdict, report: Any) -> str:
    """What decided ``verdict``, in the words of the transaction log."""
    if report is not None:
        if report.hard is not None:
            return f"scan:{report.hard[0]}"
        if report.failures:
            return "scan:" + ",".join(name for name, _ in report.failures)
    if verdict.template == "blacklist":
        return "blacklist"
    if verdict.reasons == ("whitelisted",):
        return "whitelist"
    if verdict.reasons == ("sender allowed",):
        return "allow list"
    holds = getattr(report, "holds", None)
    if holds and verdict.action is Disposition.QUARANTINE:
        return f"scan:{holds[0][0]}"
    if verdict.action is Disposition.RELAY:
        return ""
    return "score"
