"""DNSBL (RBL) and RHSBL lookups: the DNS part of the pre-DATA policy stage.

Stage: policy, as a building block.  The policy engine wraps this module in a
Check: it hands over the client IP and the domains worth asking about (HELO,
MAIL FROM) and gets back one ``DnsblResult`` per configured list, with its
score, the return codes, an optional TXT reason and an error name.

A list that times out, fails or answers nonsense scores nothing and is logged:
a broken list never blocks mail by itself, and the error travels in the result
so the engine records it (docs/design.md promises 4 and 5).

The questions go through the shared DNS client (``dns/resolver.py``); the
lists' settings are ``config/dnsbl.py``'s.  RFC 5782 describes the query
names and answers.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import dns.exception
import dns.name
import dns.rdatatype
from twisted.internet import defer
from twisted.internet.defer import Deferred

from mppproxy._async import as_deferred
from mppproxy.config.dnsbl import LISTING_NET, MAX_LISTS, DnsblList, parse_codes
from mppproxy.dns.names import IpLike, normalise_domain, reverse_ip
from mppproxy.dns.resolver import DnsError, Resolver
from mppproxy.logsetup import Logger

log = Logger()

# Domains one lookup may ask each RHSBL about (HELO, MAIL FROM, PTR ...).
MAX_DOMAINS = 8
# A TXT reason may end up in a reply line (RFC 5321 4.5.3.1.5: 512 octets).
MAX_REASON = 200

# Answers that report a problem with the query, not a listing: Spamhaus keeps
# 127.255.255.0/24 for errors (.252 typo in the zone name, .254 query through
# a public resolver, .255 excessive queries), and the DBL answers 127.0.1.255
# to an IP address asked as a domain.  They must never score.
_ERROR_NETS = (ipaddress.ip_network("127.255.255.0/24"), ipaddress.ip_network("127.0.1.255/32"))


# -- query names ----------------------------------------------------------------

def query_name(dnsbl: DnsblList, subject: str) -> dns.name.Name:
    """The absolute name to ask: ``subject`` (a ``reverse_ip`` or
    ``normalise_domain`` result) under the list's zone.  ValueError when
    the whole name is over 255 octets (RFC 1035 3.1)."""
    zone = normalise_domain(dnsbl.zone)
    labels = tuple(label.encode("ascii") for label in f"{subject}.{zone}".split("."))
    try:
        return dns.name.Name(labels + (b"",))
    except dns.exception.DNSException as e:  # NameTooLong, LabelTooLong, EmptyLabel
        raise ValueError(f"no query name for {subject!r} in {zone}: {e}") from None


# -- results -------------------------------------------------------------------

@dataclass(frozen=True)
class DnsblResult:
    """What one list said about one client.

    ``listed`` and ``score`` (0 when not listed); ``codes`` the return
    addresses that counted; ``hits`` the subjects (reversed IP or domain)
    that were listed; ``reason`` the TXT text when asked for and found;
    ``error`` None, or why the list could not tell ("timeout", "servfail",
    "refused", "network", "bad_reply", "list_error", "bogus_answer",
    "closed", or another rcode's name in lower case).  A listing in
    one subject wins over an error on another.
    """

    dnsbl: DnsblList
    listed: bool = False
    score: float = 0.0
    codes: tuple[str, ...] = ()
    hits: tuple[str, ...] = ()
    reason: Optional[str] = None
    error: Optional[str] = None

    @property
    def name(self) -> str:
        return self.dnsbl.name


def classify(dnsbl: DnsblList, addresses: Iterable[str]) -> tuple[tuple[str, ...], Optional[str]]:
    """The return codes that count for ``dnsbl`` among the A records of an
    answer, and an error: "list_error" if any is an error code (the answer
    means nothing then), "bogus_answer" if none is in 127.0.0.0/8.
    Addresses outside 127.0.0.0/8 are dropped and logged; codes outside
    ``dnsbl.codes`` are dropped quietly (a PBL code on an SBL-only list)."""
    ranges = parse_codes(tuple(dnsbl.codes))
    counted: list[str] = []
    in_net = 0
    for text in addresses:
        try:
            addr = ipaddress.IPv4Address(text)
        except ValueError:
            continue
        if addr not in LISTING_NET:
            log.warn("DNS list {dnsbl} answered {address}, outside 127.0.0.0/8; ignored "
                     "(a wildcard or broken list)", dnsbl=dnsbl.name, address=text)
            continue
        if any(addr in net for net in _ERROR_NETS):
            log.warn("DNS list {dnsbl} answered error code {address}; the list is not "
                     "usable as configured, nothing scored", dnsbl=dnsbl.name, address=text)
            return (), "list_error"
        in_net += 1
        if not ranges or any(lo <= int(addr) <= hi for lo, hi in ranges):
            counted.append(text)
    if not in_net:
        return (), "bogus_answer"
    return tuple(counted), None


def _reason_text(strings: Iterable[str]) -> Optional[str]:
    """TXT strings as one line fit for a log or a reply: control characters
    (a CR LF would end an SMTP reply early) become spaces, and it is bounded."""
    text = "; ".join(s for s in strings if s)
    text = "".join(c if c.isprintable() else " " for c in text)
    text = " ".join(text.split())
    return text[:MAX_REASON] or None


# -- lookups -------------------------------------------------------------------

async def lookup_all(resolver: Resolver, lists: Sequence[DnsblList], ip: Optional[IpLike] = None,
                     domains: Iterable[str] = ()) -> list[DnsblResult]:
    """One result per list, in order, for the client at ``ip`` (asked of
    the "ip" lists) and ``domains`` (asked of the "domain" lists).

    All queries run at once.  A domain that is not a domain name (an
    address literal in HELO, say) is skipped and logged; a list with
    nothing to ask is not listed.  Never raises for DNS trouble: that is
    each result's ``error``.  ValueError for a bad ``ip``, more than
    MAX_LISTS lists or more than MAX_DOMAINS distinct domains."""
    if len(lists) > MAX_LISTS:
        raise ValueError(f"at most {MAX_LISTS} lists per lookup, not {len(lists)}")
    ip_subject = reverse_ip(ip) if ip is not None else None
    domain_subjects: list[str] = []
    for domain in domains:
        try:
            d = normalise_domain(domain)
        except ValueError as e:
            log.debug("not asking domain lists about {domain}: {why}", domain=domain, why=str(e))
            continue
        if d not in domain_subjects:
            domain_subjects.append(d)
    if len(domain_subjects) > MAX_DOMAINS:
        raise ValueError(f"at most {MAX_DOMAINS} domains per lookup, not {len(domain_subjects)}")
    work = []
    for dnsbl in lists:
        if dnsbl.kind == "ip":
            subjects = [ip_subject] if ip_subject is not None else []
        else:
            subjects = domain_subjects
        work.append(as_deferred(_check_list(resolver, dnsbl, subjects)))
    results: list[DnsblResult] = await _gather(work)
    return results


async def _check_list(resolver: Resolver, dnsbl: DnsblList, subjects: list[str]) -> DnsblResult:
    outcomes = await _gather(
        [as_deferred(_check_subject(resolver, dnsbl, s)) for s in subjects])
    codes: list[str] = []
    hits: list[str] = []
    reasons: list[str] = []
    error = None
    for subject, (found, reason, problem) in zip(subjects, outcomes):
        if found:
            hits.append(subject)
            codes.extend(c for c in found if c not in codes)
            if reason:
                reasons.append(reason)
        elif problem and error is None:
            error = problem
    if hits:
        return DnsblResult(dnsbl, True, dnsbl.score, tuple(codes), tuple(hits),
                           _reason_text(reasons))
    return DnsblResult(dnsbl, error=error)


async def _check_subject(resolver: Resolver, dnsbl: DnsblList, subject: str
                         ) -> tuple[tuple[str, ...], Optional[str], Optional[str]]:
    """(counted codes, TXT reason, error) for one subject in one list."""
    try:
        qname = query_name(dnsbl, subject)
    except ValueError as e:  # the name would be too long
        log.debug("not asking {dnsbl} about {subject}: {why}",
                  dnsbl=dnsbl.name, subject=subject, why=str(e))
        return (), None, None
    try:
        answer = await resolver.lookup(qname, dns.rdatatype.A)
    except DnsError as e:
        log.warn("DNS list {dnsbl} gave no answer for {qname}: {error}; nothing scored",
                 dnsbl=dnsbl.name, qname=qname.to_text(), error=e.kind)
        return (), None, e.kind
    if not answer.rdatas:
        return (), None, None
    codes, problem = classify(dnsbl, answer.rdatas)
    if not codes or not dnsbl.fetch_txt:
        return codes, None, problem
    try:
        txt = await resolver.lookup(qname, dns.rdatatype.TXT)
    except DnsError as e:
        # The listing stands; only its explanation is missing.
        log.info("DNS list {dnsbl} gave no TXT for {qname}: {error}",
                 dnsbl=dnsbl.name, qname=qname.to_text(), error=e.kind)
        return codes, None, None
    return codes, _reason_text(txt.rdatas), None


async def check_subject_raw(resolver: Resolver, dnsbl: DnsblList, subject: str
                            ) -> tuple[tuple[str, ...], Optional[str]]:
    """(counted codes, error) for one subject in one list, without TXT and
    without a log line: the health guard's canaries (policy/dnsguard.py)."""
    try:
        answer = await resolver.lookup(query_name(dnsbl, subject), dns.rdatatype.A)
    except DnsError as e:
        return (), e.kind
    except ValueError as e:
        return (), f"bad query name: {e}"
    if not answer.rdatas:
        return (), None
    return classify(dnsbl, answer.rdatas)


async def _gather(work: list[Deferred[Any]]) -> list[Any]:
    """All results, or the first failure as itself (a CancelledError stays
    one) rather than wrapped in FirstError; cancelling cancels them all."""
    try:
        results: list[Any] = await defer.gatherResults(work, consumeErrors=True)
    except defer.FirstError as e:
        e.subFailure.raiseException()
    return results
