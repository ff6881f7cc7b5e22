"""DMARC (RFC 7489): the author domain, policy discovery over our
asynchronous resolver, identifier alignment and the result.

Stage: scanning, a building block of the authentication scanner
(``scan/scanners/authentication.py``), which hands over the header
section's fields, the DKIM results and the SPF result and turns the
``DmarcResult`` into a score, an action and its part of the
Authentication-Results field.

- The author domain (6.6.1): exactly one From: field with addresses of one
  domain; none, two fields, or addresses of several domains are a
  permerror (the message "is typically rejected", 6.6.1; what it costs is
  the policy's ``score_permerror``).
- Policy discovery (6.6.3): the TXT records at ``_dmarc.<author domain>``
  starting with ``v=DMARC1``; with none there, the same at the
  organisational domain (3.2, Public Suffix List: ``scan/auth/psl.py``).
  Two records at one name: no policy ("none").  A DNS failure: "temperror".
- Alignment (3.1): a passing DKIM signature whose d= (adkim) or a passing
  SPF whose checked domain (aspf) is the author domain (s) or shares its
  organisational domain (r, the default).
- The policy applied: p=, or sp= for a subdomain whose record came from its
  organisational domain; pct= below 100 applies it to that share of
  failing messages and the next-lower policy to the rest (6.6.4).
"""
from __future__ import annotations

import email.utils
import functools
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from mppproxy.dns.resolver import DnsError
from mppproxy.scan.auth.dkim import DkimResult, cached_txt
from mppproxy.scan.auth.psl import PublicSuffixList, organisational_domain

POLICIES = ("none", "quarantine", "reject")
RESULTS = ("pass", "fail", "none", "temperror", "permerror")
# Section 6.6.4: the next-lower policy for messages pct= does not select.
_LOWER = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_DOMAIN = re.compile(r"(?=.{1,253}\Z)(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)+"
                     r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class DmarcRecord:
    """The tags of a policy record that evaluation reads (6.3)."""

    policy: str
    subdomain_policy: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


@dataclass(frozen=True)
class DmarcResult:
    """``result`` one of RESULTS; ``domain`` the author (From:) domain;
    ``policy`` the record's p= (sp= where it applies), ``applied`` what the
    receiver should do after pct= ("none", "quarantine", "reject"; "none"
    unless the result is "fail"); ``reason`` why, for the header comment
    and the log; ``aligned`` which identifiers passed aligned ("dkim",
    "spf")."""

    result: str
    domain: str = ""
    policy: str = ""
    applied: str = "none"
    reason: str = ""
    aligned: tuple[str, ...] = ()
    record: Optional[DmarcRecord] = None


@functools.lru_cache(maxsize=1024)
def parse_record(text: str) -> Optional[DmarcRecord]:
    """A ``v=DMARC1`` record (6.3, 6.4) as DmarcRecord; None when it is
    not one DMARC can use: no valid p= (and no rua= that would make it
    p=none, 6.6.3 step 6).  Remembered per text (the record comes from the
    resolver's cache for every message of a domain)."""
    parts = [p.strip() for p in text.split(";")]
    if not parts or parts[0].replace(" ", "") != "v=DMARC1":
        return None
    tags: dict[str, str] = {}
    for part in parts[1:]:
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), value.strip())
    p = tags.get("p", "").lower()
    if p not in POLICIES:
        # 6.6.3 step 6: a record with a valid rua= but no valid p= acts as p=none.
        if "mailto:" in tags.get("rua", "").lower():
            p = "none"
        else:
            return None
    sp = tags.get("sp", "").lower()
    if sp not in POLICIES:
        sp = p
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    pct_text = tags.get("pct", "100")
    pct = int(pct_text) if pct_text.isdigit() else 100
    return DmarcRecord(p, sp, adkim if adkim in ("r", "s") else "r",
                       aspf if aspf in ("r", "s") else "r", min(100, pct))


def author_domain(fields: Sequence[tuple[bytes, bytes]]) -> tuple[Optional[str], str]:
    """The RFC5322.From domain (lower case) and "", or None and why it
    cannot be had (6.6.1)."""
    froms = [value for name, value in fields if name.lower() == b"from"]
    if not froms:
        return None, "no From: field"
    if len(froms) > 1:
        return None, f"{len(froms)} From: fields (RFC 7489 6.6.1)"
    return _from_domain(froms[0])


@functools.lru_cache(maxsize=4096)
def _from_domain(value: bytes) -> tuple[Optional[str], str]:
    """The domain of one From: field's value, or None and why; remembered
    per value (a sender writes the same From: on all its mail, and the
    address parser costs ~60 us)."""
    text = value.decode("utf-8", "replace").replace("\r", "").replace("\n", "")
    addresses = [a for _, a in email.utils.getaddresses([text]) if a]
    domains = {a.rpartition("@")[2].strip().lower().rstrip(".") for a in addresses if "@" in a}
    if not domains:
        return None, "no domain in From:"
    if len(domains) > 1:
        return None, "From: has addresses of several domains (RFC 7489 6.6.1)"
    domain = domains.pop()
    try:
        domain = domain.encode("idna").decode("ascii").lower() if not domain.isascii() else domain
    except UnicodeError:
        return None, "From: domain is not a domain name"
    if not _DOMAIN.fullmatch(domain):
        return None, "From: domain is not a domain name"
    return domain, ""


async def discover(resolver: Any, domain: str,
                   psl: Optional[PublicSuffixList] = None) -> tuple[Optional[DmarcRecord], bool, str]:
    """Policy discovery (6.6.3): (record, found at the organisational
    domain rather than ``domain`` itself, problem).  Raises DnsError when a
    query failed (temperror)."""
    record, problem = await _record_at(resolver, domain)
    if record is not None or problem:
        return record, False, problem
    org = organisational_domain(domain, psl)
    if org == domain:
        return None, False, ""
    record, problem = await _record_at(resolver, org)
    return record, record is not None, problem


async def _record_at(resolver: Any, domain: str) -> tuple[Optional[DmarcRecord], str]:
    texts = await cached_txt(resolver, f"_dmarc.{domain}")
    found = [t for t in texts if t.replace(" ", "")[:8] == "v=DMARC1"]
    if len(found) > 1:
        # 6.6.3 step 5: several records, no DMARC for this message.
        return None, f"{len(found)} DMARC records at _dmarc.{domain}"
    if not found:
        return None, ""
    record = parse_record(found[0])
    return record, "" if record is not None else f"unusable DMARC record at _dmarc.{domain}"


def aligned(domain: str, author: str, mode: str, psl: Optional[PublicSuffixList] = None) -> bool:
    """Identifier alignment (3.1.1, 3.1.2): strict is equality, relaxed
    equal organisational domains."""
    domain = domain.lower().rstrip(".")
    if domain == author:
        return True
    if mode == "s" or not domain:
        return False
    return organisational_domain(domain, psl) == organisational_domain(author, psl)


@dataclass(frozen=True)
class Discovery:
    """What policy discovery found before the DKIM results are in: the
    author domain and its record, or the result already decided
    (``early``: permerror, temperror, none)."""

    author: str = ""
    record: Optional[DmarcRecord] = None
    at_org: bool = False
    early: Optional[DmarcResult] = None


async def discover_policy(resolver: Any, fields: Sequence[tuple[bytes, bytes]],
                          psl: Optional[PublicSuffixList] = None) -> Discovery:
    """The author domain of ``fields`` and its policy; never raises (the
    DNS queries may run while the DKIM keys are fetched)."""
    author, why = author_domain(fields)
    if author is None:
        return Discovery(early=DmarcResult("permerror", reason=why))
    try:
        record, at_org, problem = await discover(resolver, author, psl)
    except DnsError as e:
        return Discovery(author, early=DmarcResult("temperror", author,
                                                   reason=f"DNS {e.kind} for the policy"))
    except ValueError as e:
        return Discovery(author, early=DmarcResult("permerror", author,
                                                   reason=f"cannot ask for the policy: {e}"))
    if record is None:
        return Discovery(author, early=DmarcResult("none", author,
                                                   reason=problem or "no DMARC record"))
    return Discovery(author, record, at_org)


def judge(found: Discovery, dkim_results: Sequence[DkimResult], spf_result: str,
          spf_domain: str, psl: Optional[PublicSuffixList] = None,
          sample: Optional[Callable[[], float]] = random.random) -> DmarcResult:
    """The DMARC result once the DKIM results are in.  ``spf_result`` is
    the SPF result of ``spf_domain`` (the MAIL FROM domain, or the HELO
    name for the null sender); "" when SPF was not checked.  ``sample``
    gives a number in [0, 1) for pct= (tests pass their own); None
    ignores pct= (the policy applies to every failing message)."""
    if found.early is not None or found.record is None:
        return found.early or DmarcResult("none", found.author, reason="no DMARC record")
    record, author = found.record, found.author
    passed = []
    if any(r.result == "pass" and aligned(r.domain, author, record.adkim, psl)
           for r in dkim_results):
        passed.append("dkim")
    if spf_result == "pass" and aligned(spf_domain, author, record.aspf, psl):
        passed.append("spf")
    policy = record.subdomain_policy if found.at_org else record.policy
    if passed:
        return DmarcResult("pass", author, policy, "none", "", tuple(passed), record)
    applied = policy
    reason = "no aligned DKIM or SPF pass"
    if sample is not None and record.pct < 100 and sample() * 100 >= record.pct:
        applied = _LOWER[policy]
        reason += f", not sampled by pct={record.pct}"
    return DmarcResult("fail", author, policy, applied, reason, (), record)


async def evaluate(resolver: Any, fields: Sequence[tuple[bytes, bytes]],
                   dkim_results: Sequence[DkimResult], spf_result: str, spf_domain: str,
                   psl: Optional[PublicSuffixList] = None,
                   sample: Optional[Callable[[], float]] = random.random) -> DmarcResult:
    """``discover_policy`` then ``judge``: the DMARC result of a message.
    Never raises."""
    found = await discover_policy(resolver, fields, psl)
    return judge(found, dkim_results, spf_result, spf_domain, psl, sample)
