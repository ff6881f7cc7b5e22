"""Message authentication after DATA (scanner ``authentication``): every
DKIM signature verified (RFC 6376, RFC 8463), DMARC evaluated for the
From: domain (RFC 7489), and one Authentication-Results field (RFC 8601)
with SPF, DKIM and DMARC, written by the authres library.

Stage: scanning, a message check of the policy (``policies.NAME.scan.dkim``
and ``.dmarc``, ``config/authentication.py``); the scan engine runs it
beside the other scanners, applies its timeout and failure action and adds
its score.  The order of work:

1. The message (up to ``dkim.thread_above`` octets; above it only the
   header section, bounded) is read and split into fields once; its
   DKIM-Signature and From: fields are parsed from that split; no DNS yet.
2. At once, through our resolver (``dns/resolver.py``, its cache and
   timeout): the key record of every signature, and the DMARC policy of the
   From: domain (then of its organisational domain).  Answered from the
   cache, neither waits: both run inline, no Deferred is waited on.
3. Each signature is verified against the prefetched key
   (``scan/auth/dkim.py``: our lean check, dkimpy for unusual messages), on
   the reactor thread for a message up to ``dkim.thread_above`` octets, in
   the thread pool above it (hashing a big body is CPU work that would
   stall every other session).
4. DMARC aligns the passing DKIM domains and the pre-DATA SPF check's
   result (``ScanInput.spf``; none when it did not run) with From:.

Scores: the DKIM outcome of the message (the most favourable of its
signatures) and the DMARC result (a fail by the policy applied after pct=)
each add their ``score_*``.  A DMARC fail under p=reject or p=quarantine
does what ``dmarc.reject_action`` / ``dmarc.quarantine_action`` say:
score only (the default), hold the message (``HardAction.QUARANTINE``) or
refuse it with 550 5.7.1 (template ``dmarc``; RFC 7489 10.3: refuse during
the SMTP transaction rather than bounce).  The Authentication-Results value
is written here to the letter of authres's output (authres builds it in
the tests, as the reference).  DNS failures are temperror
results (scored, never a crash); a malformed signature, key or From: is a
permerror with its reason, in the header comment and the log.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import authres  # no stubs: pyproject.toml [tool.mypy] overrides ignore its imports
import authres.dmarc
from twisted.internet import defer, threads

from mppproxy._async import as_deferred_started
from mppproxy.config.authentication import DkimConfig, DmarcConfig
from mppproxy.logsetup import Logger
from mppproxy.results import CheckResult, HardAction
from mppproxy.scan.auth import canon
from mppproxy.scan.auth import dkim as dkim_
from mppproxy.scan.auth import dmarc as dmarc_
from mppproxy.scan.auth.psl import PublicSuffixList
from mppproxy.scan.base import ScanInput, Scanner

log = Logger()

# The header section is read up to here at most (the MIME check refuses
# larger ones by default, scan.mime.max_header_bytes 256 KiB).
MAX_HEADER = 1024 * 1024
# The DKIM outcome of a message is its most favourable signature's result
# (RFC 6376 6.1: one good signature is enough), in this order.
_BEST_FIRST = ("pass", "temperror", "fail", "policy", "neutral", "permerror")
_VALUE = re.compile(r"[A-Za-z0-9._@+=-]+\Z")


@dataclass(frozen=True)
class AuthSettings:
    """The two sections the scanner reads."""

    dkim: DkimConfig
    dmarc: DmarcConfig


def dkim_outcome(results: Sequence[dkim_.DkimResult]) -> str:
    """The message's DKIM result: "none" when unsigned, else the most
    favourable of its signatures'."""
    if not results:
        return "none"
    found = {r.result for r in results}
    return next(r for r in _BEST_FIRST if r in found)


class AuthenticationScanner(Scanner):
    """DKIM and DMARC for one policy.  ``resolver`` answers every query
    (anything with ``async query(name, rdtype)``); ``authserv_id`` names us
    in Authentication-Results (the name whose forged fields the edge
    strips, ``message.py``).  ``threadpool`` runs big verifications (the
    reactor's by default); ``psl`` and ``sample`` are for tests."""

    name = "authentication"

    def __init__(self, settings: AuthSettings, reactor: Any, resolver: Any, authserv_id: str,
                 threadpool: Any = None, psl: Optional[PublicSuffixList] = None,
                 sample: Callable[[], float] = random.random):
        super().__init__(settings, reactor)
        self.resolver = resolver
        self.authserv_id = authserv_id
        self.threadpool = threadpool
        self.psl = psl
        self.sample: Optional[Callable[[], float]] = sample if settings.dmarc.honour_pct else None

    async def scan(self, message: ScanInput) -> CheckResult:
        dkim_cfg: DkimConfig = self.settings.dkim
        dmarc_cfg: DmarcConfig = self.settings.dmarc
        # A message verified here is read once and split once: the same
        # fields serve the signatures, DMARC's From: and the verification.
        data: Optional[bytes] = None
        split: Optional[canon.Message] = None
        if message.size <= dkim_cfg.thread_above:
            data = message.as_bytes()
            split = canon.split(data)
        if split is not None:
            fields: Sequence[tuple[bytes, bytes]] = split.fields
        else:
            fields = dkim_.header_fields(_header_section(message) if data is None
                                         else _header_of(data))
        sigs = dkim_.signatures(fields, dkim_cfg.max_signatures)
        # Keys and the DMARC policy are asked at once; each runs inline
        # until it waits (from the resolver's cache, neither does).
        keys_d = as_deferred_started(dkim_.fetch_keys(self.resolver, sigs), None)
        policy_d: Optional[defer.Deferred[dmarc_.Discovery]] = None
        if dmarc_cfg.enabled:
            policy_d = as_deferred_started(
                dmarc_.discover_policy(self.resolver, fields, self.psl), None)
        keys = await keys_d
        results = await self._verify(message, data, split, sigs, keys, dkim_cfg)
        spf = dict(message.spf)
        dmarc: Optional[dmarc_.DmarcResult] = None
        if policy_d is not None:
            dmarc = dmarc_.judge(await policy_d, results, spf.get("result", ""),
                                 spf.get("domain", ""), self.psl, self.sample)
        return self._result(message, results, dmarc, spf)

    async def _verify(self, message: ScanInput, data: Optional[bytes],
                      split: Optional[canon.Message], sigs: Sequence[dkim_.DkimSignature],
                      keys: dict[str, dkim_.KeyLookup],
                      cfg: DkimConfig) -> list[dkim_.DkimResult]:
        if not sigs:
            return []
        args = (sigs, keys, cfg.min_rsa_bits, cfg.partial_body, cfg.allow_sha1)
        if data is not None:
            return dkim_.verify(data, *args, split=split)
        pool = self.threadpool or self.reactor.getThreadPool()

        def work() -> list[dkim_.DkimResult]:
            # The message is read in the thread too: a big one may be a
            # spool file.
            return dkim_.verify(message.as_bytes(), *args)

        verified: list[dkim_.DkimResult] = await threads.deferToThreadPool(
            self.reactor, pool, work)
        return verified

    def _result(self, message: ScanInput, results: list[dkim_.DkimResult],
                dmarc: Optional[dmarc_.DmarcResult], spf: dict[str, str]) -> CheckResult:
        dkim_cfg: DkimConfig = self.settings.dkim
        dmarc_cfg: DmarcConfig = self.settings.dmarc
        score = 0.0
        reasons: list[str] = []
        outcome = dkim_outcome(results)
        if dkim_cfg.enabled:
            score += float(getattr(dkim_cfg, f"score_{outcome}", 0.0))
            reasons += [f"DKIM {r.result} {r.domain or '?'}"
                        + (f" ({r.reason})" if r.reason else "") for r in results] or ["DKIM none"]
        action: Optional[HardAction] = None
        template = ""
        template_vars: tuple[tuple[str, Any], ...] = ()
        if dmarc is not None:
            if dmarc.result == "fail":
                score += float(getattr(dmarc_cfg, f"score_fail_{dmarc.applied}"))
                choice = {"reject": dmarc_cfg.reject_action,
                          "quarantine": dmarc_cfg.quarantine_action}.get(dmarc.applied, "score")
                if choice == "reject":
                    action, template = HardAction.REJECT, "dmarc"
                    template_vars = (("domain", dmarc.domain), ("policy", dmarc.applied))
                elif choice == "quarantine":
                    action = HardAction.QUARANTINE
            else:
                score += float(getattr(dmarc_cfg, f"score_{dmarc.result}", 0.0))
            reasons.append(f"DMARC {dmarc.result}" + (f" {dmarc.domain}" if dmarc.domain else "")
                           + (f" p={dmarc.applied}" if dmarc.result == "fail" else "")
                           + (f" ({dmarc.reason})" if dmarc.reason else ""))
            if dmarc.result in ("temperror", "permerror"):
                log.info("DMARC {result} for {queue_id}: {reason}", result=dmarc.result,
                         queue_id=message.queue_id, reason=dmarc.reason)
        for r in results:
            if r.result in ("temperror", "permerror"):
                log.info("DKIM {result} for {queue_id} (d={domain} s={selector}): {reason}",
                         result=r.result, queue_id=message.queue_id, domain=r.domain,
                         selector=r.selector, reason=r.reason)
        header = authentication_results(self.authserv_id, results, dmarc, spf)
        return CheckResult(score, tuple(reasons), action, template, template_vars,
                           (("Authentication-Results", header),))


def _header_section(message: ScanInput, limit: int = MAX_HEADER) -> bytes:
    """The message's header section (with its final CRLF), at most ``limit``
    octets: enough for the DKIM-Signature and From: fields."""
    data = b""
    for chunk in message.iter_chunks():
        data += bytes(chunk)
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            return data[:end + 2]
        if len(data) >= limit:
            break
    return data[:limit]


def _header_of(data: bytes, limit: int = MAX_HEADER) -> bytes:
    """``_header_section`` of a message already in memory."""
    end = data.find(b"\r\n\r\n", 0, limit)
    return data[:end + 2] if end >= 0 else data[:limit]


def _value(text: str) -> str:
    """A property value authres writes as it is: a token of safe
    characters (a hostile d= or From: domain cannot break the field)."""
    if _VALUE.match(text):
        return text
    clean = "".join(c for c in text if c.isprintable() and not c.isspace())
    return clean if clean and _VALUE.match(clean) else "invalid"


# authres's quoting (QuotableValue.quote_if_needed): a value with "@" or
# an RFC 2045 token as it is, anything else a quoted-string.
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+\Z")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def _quoted(value: str) -> str:
    if "@" in value or _TOKEN.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _reason(reason: str) -> str:
    return f" reason={_quoted(_UNPRINTABLE.sub('?', reason))}" if reason else ""


def authentication_results(authserv_id: str, dkim_results: Sequence[dkim_.DkimResult],
                           dmarc: Optional[dmarc_.DmarcResult], spf: dict[str, str]) -> str:
    """The value of one Authentication-Results field (RFC 8601 2.2): SPF
    (RFC 7208 9.1 properties) when the SPF check ran, each DKIM signature
    (RFC 6376 7.x: header.d, header.i, header.a, header.s; "dkim=none" when
    unsigned), and DMARC (RFC 7489 11.2: header.from).

    Written here, to the letter of what authres writes
    (``authentication_results_authres``, which the tests compare it with):
    building authres's objects cost ~50 us a message."""
    parts = [authserv_id]
    if spf.get("result"):
        client = "".join(c for c in spf.get("client_ip", "") if c.isalnum() or c in ".:")
        comment = f" (client {client})" if client else ""
        if spf.get("identity") == "helo":
            prop = f"smtp.helo={_quoted(_value(spf.get('helo', '')))}"
        else:
            prop = f"smtp.mailfrom={_quoted(_value(spf.get('sender', '')))}"
        parts.append(f"spf={spf['result'].lower()}{comment} {prop}")
    for r in dkim_results:
        clause = f"dkim={r.result.lower()}{_reason(r.reason)}"
        for name, text in (("d", r.domain), ("i", r.identity), ("a", r.algorithm),
                           ("s", r.selector)):
            if text:
                clause += f" header.{name}={_quoted(_value(text))}"
        parts.append(clause)
    if not dkim_results:
        parts.append("dkim=none")
    if dmarc is not None:
        clause = f"dmarc={dmarc.result.lower()}{_reason(dmarc.reason)}"
        if dmarc.domain:
            clause += f" header.from={_quoted(_value(dmarc.domain))}"
        if dmarc.result == "fail" and dmarc.applied:
            clause += f" policy.dmarc={_quoted(dmarc.applied)}"
            if dmarc.record is not None:
                clause += (f" (p={dmarc.record.policy} sp={dmarc.record.subdomain_policy} "
                           f"pct={dmarc.record.pct})")
        parts.append(clause)
    return "; ".join(parts)


def authentication_results_authres(authserv_id: str, dkim_results: Sequence[dkim_.DkimResult],
                                   dmarc: Optional[dmarc_.DmarcResult],
                                   spf: dict[str, str]) -> str:
    """``authentication_results`` by the authres library (the reference)."""
    results: list[Any] = []
    if spf.get("result"):
        client = "".join(c for c in spf.get("client_ip", "") if c.isalnum() or c in ".:")
        if spf.get("identity") == "helo":
            results.append(authres.SPFAuthenticationResult(
                result=spf["result"], smtp_helo=_value(spf.get("helo", "")),
                result_comment=f"client {client}" if client else None))
        else:
            results.append(authres.SPFAuthenticationResult(
                result=spf["result"], smtp_mailfrom=_value(spf.get("sender", "")),
                result_comment=f"client {client}" if client else None))
    for r in dkim_results:
        results.append(authres.DKIMAuthenticationResult(
            result=r.result, reason=r.reason or None,
            header_d=_value(r.domain) if r.domain else None,
            header_i=_value(r.identity) if r.identity else None,
            header_a=_value(r.algorithm) if r.algorithm else None,
            header_s=_value(r.selector) if r.selector else None))
    if not dkim_results:
        results.append(authres.DKIMAuthenticationResult(result="none"))
    if dmarc is not None:
        comment = None
        if dmarc.record is not None:
            comment = (f"p={dmarc.record.policy} sp={dmarc.record.subdomain_policy} "
                       f"pct={dmarc.record.pct}")
        results.append(authres.dmarc.DMARCAuthenticationResult(
            result=dmarc.result, reason=dmarc.reason or None,
            header_from=_value(dmarc.domain) if dmarc.domain else None,
            policy=dmarc.applied if dmarc.result == "fail" else None,
            policy_comment=comment if dmarc.result == "fail" else None))
    field = str(authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=results))
    return field.partition(": ")[2]
