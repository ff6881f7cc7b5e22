"""The pre-DATA policy engine: runs the checks of one policy, records every
result, sums the scores and turns them into one reply (STYLE.md: the
engine decides, the checks only report).

The edge (SMTP proxy) and the Postfix policy server (``policyd/``) both
ask ``PolicyEngine.on_recipient`` for each recipient.  A transaction gets
the policy of its first recipient; a recipient of another policy is answered
``452 4.5.3`` so the client sends it in a later transaction (docs/design.md).

Order per recipient:
  1. the checks in ``SCORING_ORDER`` (access lists, auto-blacklist, spam
     traps, thresholds, DNS lists, SPF); a whitelist ends the list, a hard
     action ends it with a refusal;
  2. the score so far against the policy's reject threshold;
  3. the checks in ``FINAL_ORDER`` (greylisting), which should only see
     mail that would otherwise be accepted.

A recipient let through is noted on the record (``passed_recipients``); one
that the database allow list let through also in ``allowed_recipients``:
when the two agree, the verdict relays the message as whitelisted
(``TransactionRecord.allowed_for_all``, ``db/allowlist.py``).

A check still waiting after ``policy.check_timeout`` gets what its
section's ``on_timeout`` says: "pass" (DNS lists, SPF) or "tempfail", 451
4.3.0 (the state-database checks; docs/design.md promise 4), logged with
the check, the seconds, the client and the queue id.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

from twisted.internet import defer
from twisted.python.failure import Failure

from mppproxy import probes
from mppproxy._async import as_deferred_started
from mppproxy.logsetup import Logger
from mppproxy.policy.base import Check, Facts, Scope
from mppproxy.policy.checks import REGISTRY
from mppproxy.results import CheckResult, HardAction, Recorded, TransactionRecord
from mppproxy.config.policy import PolicyConfig, PolicyEngineConfig
from mppproxy.policy.deadlines import Deadlines
from mppproxy.match import AddressSet, NetworkSet
from mppproxy.policy.router import PolicyRouter
from mppproxy.smtp.replies import Reply
from mppproxy.templates import ReplyRenderer

log = Logger()

# Config section of a policy -> the check that reads it, in the order they
# run.  Adding a check: one module in policy/checks/, one section in
# PolicyConfig, one name here.
SCORING_ORDER = ("access", "blacklist", "spamtrap", "thresholds", "dnsbl", "spf")
FINAL_ORDER = ("greylisting",)


def check_classes() -> dict[str, type[Check]]:
    return REGISTRY


class Exemptions:
    """A feature's own whitelists (``whitelist_clients``/``_senders``/
    ``_recipients`` in its section): exempt from that feature only."""

    def __init__(self, settings: Any):
        if settings is None:
            settings = object()
        self.clients = NetworkSet(getattr(settings, "whitelist_clients", ()))
        self.senders = AddressSet(getattr(settings, "whitelist_senders", ()))
        self.recipients = AddressSet(getattr(settings, "whitelist_recipients", ()))
        # Most features have no exemptions: the engine then asks nothing.
        self.active = bool(self.clients or self.senders or self.recipients)

    def why(self, facts: Facts) -> Optional[str]:
        if facts.client_ip in self.clients:
            return "client"
        if self.senders and facts.sender in self.senders:
            return "sender"
        if self.recipients and facts.recipient in self.recipients:
            return "recipient"
        return None


@dataclass
class _PolicyRuntime:
    name: str
    config: PolicyConfig
    scoring: list[tuple[Check, Exemptions]]
    final: list[tuple[Check, Exemptions]]


class PolicyEngine:
    """One per configuration; shared by every session of it.

    ``services`` is a ``PolicyServices`` (DNS resolver, stores, counters,
    clock); ``renderer`` renders the refusals."""

    def __init__(self, engine_config: PolicyEngineConfig, policies: Mapping[str, PolicyConfig],
                 services: Any, renderer: ReplyRenderer, reactor: Any):
        self.config = engine_config
        self.services = services
        self.renderer = renderer
        self.reactor = reactor
        # policy.check_timeout for the checks that wait (one timer).
        self.deadlines = Deadlines(reactor, engine_config.check_timeout)
        classes = check_classes()
        self._policies: dict[str, _PolicyRuntime] = {}
        self.router = PolicyRouter(policies)
        # The policy of a recipient domain: the named policy listing it (or
        # a parent as ``.parent``), else "default".  The router's own bound
        # method, so asking per recipient costs no extra call.
        self.policy_for: Callable[[str], str] = self.router.policy_for
        # The policy of one recipient: per-recipient policies first.
        self.policy_for_recipient: Callable[[str, str], str] = self.router.policy_for_recipient
        for name, policy in policies.items():
            # Only the checks this policy turns on (a reload builds a new engine).
            self._policies[name] = _PolicyRuntime(
                name, policy,
                [self._build(classes[s], getattr(policy, s)) for s in SCORING_ORDER
                 if getattr(policy, s).enabled],
                [self._build(classes[s], getattr(policy, s)) for s in FINAL_ORDER
                 if getattr(policy, s).enabled])

    def _build(self, cls: type[Check], settings: Any) -> tuple[Check, Exemptions]:
        return cls(settings, self.services), Exemptions(settings if cls.exemptible else None)

    def policy(self, name: str) -> PolicyConfig:
        return self._policies[name].config

    # -- one recipient ---------------------------------------------------------

    async def on_recipient(self, facts: Facts, record: TransactionRecord) -> Optional[Reply]:
        """None when policy lets the recipient through (the backend then has
        its say), else the refusal.  Every result lands in ``record``."""
        policy_name = self.policy_for_recipient(facts.recipient, facts.recipient_domain)
        if record.policy is None:
            record.policy = policy_name
        elif record.policy != policy_name:
            record.recorded.append(Recorded("policy_group", CheckResult(reasons=(
                f"policy {policy_name} differs from the transaction's {record.policy}",)),
                facts.recipient))
            record.refused_by = "policy_group"
            return self._render("policy_group", facts, record.policy)
        facts = _with_policy(facts, policy_name)
        if record.blacklisted_during:
            # A spam trap or threshold listed the client in this very
            # transaction: its other recipients are refused too.
            record.refused_by = "blacklist"
            return self._render("blacklist", facts, policy_name, reason="policy violation")
        if record.whitelisted:
            return None
        runtime = self._policies[policy_name]
        refusal = await self._run(runtime.scoring, facts, record)
        if refusal is not None or record.whitelisted:
            return refusal
        if record.rcpt_whitelisted:
            record.rcpt_whitelisted = False
            record.passed_recipients.add(facts.recipient)
            return None
        reject_at = runtime.config.scoring.reject
        if reject_at > 0 and record.score >= reject_at:
            reasons = [r for rec in record.recorded if rec.result.score > 0 for r in rec.result.reasons]
            record.refused_by = "score"
            return self._render("score", facts, policy_name, score=round(record.score, 2),
                                reasons=_public(reasons))
        refusal = await self._run(runtime.final, facts, record)
        record.rcpt_whitelisted = False
        if refusal is None:
            record.passed_recipients.add(facts.recipient)
        return refusal

    async def _run(self, checks: Iterable[tuple[Check, Exemptions]], facts: Facts,
                   record: TransactionRecord) -> Optional[Reply]:
        for check, exemptions in checks:
            name = check.name
            once = check.scope is Scope.TRANSACTION
            result = record.once.get(name) if once else None
            if result is None:
                exempt = exemptions.why(facts) if exemptions.active else None
                if exempt is not None:
                    record.recorded.append(Recorded(name, CheckResult(), facts.recipient,
                                                    skipped=f"exempt {exempt}"))
                    continue
                coro = check.check(facts)
                try:
                    # Most checks finish without waiting (set lookups, cached
                    # answers): those need no Deferred, no time limit, no
                    # clock reading and no driver (_async.py's fast path).
                    awaited = coro.send(None)
                except StopIteration as done:
                    result = done.value
                except Exception:
                    result = await self._wait(check, defer.fail(), facts, record,
                                              time.monotonic())
                else:
                    result = await self._wait(check, as_deferred_started(coro, awaited), facts,
                                              record, time.monotonic())
                if result is None:
                    if self.config.on_error == "tempfail":
                        record.refused_by = name
                        return self._render("tempfail", facts, facts.policy)
                    continue
                if once:
                    # A timeout too: later recipients get its outcome at
                    # once instead of waiting check_timeout again.
                    record.once[name] = result
                record.score += result.score
                if result.headers:
                    record.headers.extend(result.headers)
                if result.blacklisted:
                    record.blacklisted_during = True
                # Identity, not equality: every result of the hot path is recorded.
                record.recorded.append(Recorded(
                    name, result, facts.recipient,
                    "timeout" if result is _TIMEOUT_PASS or result is _TIMEOUT_TEMPFAIL else ""))
            action = result.action
            if action is None:  # most results: the score decides
                continue
            if action in (HardAction.WHITELIST, HardAction.WHITELIST_RECIPIENT):
                if action is HardAction.WHITELIST:
                    record.whitelisted = True
                else:
                    record.rcpt_whitelisted = True
                    if result.sender_allowed:
                        # Counts towards the message's whitelisting
                        # (TransactionRecord.allowed_for_all).
                        record.allowed_recipients.add(facts.recipient)
                log.info("{check} whitelisted {what} for {recipient} from {client}", check=name,
                         what="; ".join(result.reasons), recipient=facts.recipient,
                         client=facts.client_ip, session_id=facts.session_id,
                         queue_id=facts.queue_id)
                return None
            if action in (HardAction.REJECT, HardAction.TEMPFAIL):
                record.refused_by = name
                return self._render(result.template or ("tempfail" if action is HardAction.TEMPFAIL
                                                        else "access"),
                                    facts, facts.policy, **dict(result.template_vars))
        return None

    async def _wait(self, check: Check, d: defer.Deferred[CheckResult], facts: Facts,
                    record: TransactionRecord, started: float) -> Optional[CheckResult]:
        """The result of a check that waits (``d``, cancellable, drives the
        rest of it): on a timeout, the result its section's ``on_timeout``
        asks for; another failure gives None (the caller applies
        policy.on_error) after a log line saying why."""
        self.deadlines.watch(d)
        outcome = "error"
        try:
            result = await d
            outcome = "ok"
            return result
        except defer.CancelledError:
            if not self.deadlines.expired(d):
                self._failed(check, facts, record, started, sys.exc_info()[1])
                return None
            outcome = "timeout"
            return self._timed_out(check, facts)
        except Exception as e:  # a failing check must never take the session with it
            self._failed(check, facts, record, started, e)
            return None
        finally:
            if probes.check_timers:  # the metrics (probes.py); an empty list when off
                probes.check_done(check.name, time.monotonic() - started, outcome)

    def _timed_out(self, check: Check, facts: Facts) -> CheckResult:
        """The outcome of a check past policy.check_timeout, logged with
        what the operator needs to find the transaction.  Checks that never
        wait (access lists) have no ``on_timeout``: tempfail, the safe side
        (docs/design.md promise 4)."""
        outcome = getattr(check.settings, "on_timeout", "tempfail")
        log.warn("check {check} timed out after {seconds}s for {client} (queue {queue_id}): "
                 "{outcome}", mpp_event="check_timeout", check=check.name,
                 seconds=self.config.check_timeout, client=facts.client_ip, outcome=outcome,
                 recipient=facts.recipient, session_id=facts.session_id,
                 queue_id=facts.queue_id)
        return _TIMEOUT_TEMPFAIL if outcome == "tempfail" else _TIMEOUT_PASS

    def _failed(self, check: Check, facts: Facts, record: TransactionRecord, started: float,
                error: Any) -> None:
        log.failure("check {check} failed for {client} after {ms} ms: {error}",
                    failure=Failure(error),  # type: ignore[no-untyped-call]  # Twisted's Failure() is unannotated
                    check=check.name, client=facts.client_ip,
                    error=str(error), ms=round((time.monotonic() - started) * 1000, 1),
                    session_id=facts.session_id, queue_id=facts.queue_id)
        record.recorded.append(Recorded(check.name, CheckResult(), facts.recipient, skipped="error"))

    def _render(self, template: str, facts: Facts, policy: str, **extra: Any) -> Reply:
        context = {"client_ip": facts.client_ip, "helo": facts.helo, "sender": facts.sender,
                   "sender_domain": facts.sender_domain, "recipient": facts.recipient,
                   "recipient_domain": facts.recipient_domain, "policy": policy,
                   "queue_id": facts.queue_id, "reason": "", "what": "", "reasons": [],
                   "retry_seconds": 0, "score": 0}
        context.update(extra)
        return self.renderer.reply(template, context, policy)


# The results of a timeout, by the section's on_timeout (config/policy.py).
_TIMEOUT_PASS = CheckResult(reasons=("timed out",))
# 451 4.3.0 from the "tempfail" template (templates.py cites the RFCs).
_TIMEOUT_TEMPFAIL = CheckResult(reasons=("timed out",), action=HardAction.TEMPFAIL, template="tempfail")


def _with_policy(facts: Facts, policy: str) -> Facts:
    if facts.policy == policy:
        return facts
    from dataclasses import replace

    return replace(facts, policy=policy)


def _public(reasons: list[str]) -> list[str]:
    # Reasons shown to the client: the check's short texts, bounded.
    return reasons[:5]
