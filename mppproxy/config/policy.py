"""``[policies.NAME]`` and ``[policy]``: the policies, one per recipient
domain group, and how the engine runs (docs/design.md, "Configuration").

A leaf of ``config/``: frozen dataclasses, defaults with their reason, a
``check`` for every value; the policy stage (``policy/``) reads them.

``[policies.default]`` applies to every recipient domain that no other
policy names; ``[policies.NAME]`` with ``domains = [...]`` to those domains
(``example.com`` exactly, ``.example.com`` its subdomains).  A named policy
starts from the default policy: each section it does not set is the
default's, each key it does not set in a section it does set is too.

Every feature section has ``enabled`` and the three per-feature whitelists
(``whitelist_clients``, ``whitelist_senders``, ``whitelist_recipients``)
that exempt a client, sender or recipient from that feature only.
"""
from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from mppproxy.config.dnsbl import DnsblList, validate_dnsbl_lists
from mppproxy.config.fields import (at_least as _at_least, choice as _choice, finite as _finite,
                                    opt as _opt, regexes as _regexes,
                                    tempfail_or_skip as _on_failure)
from mppproxy.config.scan import ScanConfig
from mppproxy.match import check_address_patterns, check_cidrs, check_helo_patterns

# What a check that waits does when it has not answered within
# policy.check_timeout (policies.NAME.<check>.on_timeout): "pass" goes on
# as if it found nothing, "tempfail" refuses the recipient for now with
# 451 4.3.0 (RFC 5321 4.2.2 451 "local error in processing"; RFC 3463
# 4.3.0 "other or undefined mail system status").
ON_TIMEOUT = ("pass", "tempfail")


def _on_timeout(default: str) -> Any:
    """The ``on_timeout`` field of a check's section, with its default."""
    return field(default=default, metadata=_opt(_choice(*ON_TIMEOUT)))


def _prefix(maximum: int) -> Callable[[int], Optional[str]]:
    def check(value: int) -> Optional[str]:
        if not 0 <= value <= maximum:
            return f"must be a prefix length from 0 to {maximum}, not {value}"
        return None

    return check


def _template_name(value: str) -> Optional[str]:
    if value and not re.fullmatch(r"[A-Za-z0-9_-]+", value):
        return f"{value!r} is not a template name (letters, digits, '-' and '_')"
    return None


_CLIENTS = _opt(check_cidrs, "client IP addresses and CIDR ranges (IPv4 and IPv6)")
_SENDERS = _opt(check_address_patterns, "addresses, domains, .subdomains")
_HELOS = _opt(check_helo_patterns, "HELO names, .subdomains")


@dataclass(frozen=True)
class AccessConfig:
    """Whitelists and blacklists (check ``access``).  A whitelisted client,
    HELO, sender or recipient skips every later check; a blacklisted one is
    refused with 554 5.7.1."""

    enabled: bool = True
    whitelist_clients: tuple[str, ...] = field(default=(), metadata=_CLIENTS)
    blacklist_clients: tuple[str, ...] = field(default=(), metadata=_CLIENTS)
    whitelist_helos: tuple[str, ...] = field(default=(), metadata=_HELOS)
    blacklist_helos: tuple[str, ...] = field(default=(), metadata=_HELOS)
    whitelist_senders: tuple[str, ...] = field(default=(), metadata=_SENDERS)
    blacklist_senders: tuple[str, ...] = field(default=(), metadata=_SENDERS)
    whitelist_recipients: tuple[str, ...] = field(default=(), metadata=_SENDERS)
    blacklist_recipients: tuple[str, ...] = field(default=(), metadata=_SENDERS)


@dataclass(frozen=True)
class BlacklistConfig:
    """Auto-blacklist enforcement (check ``blacklist``): clients that a spam
    trap or a threshold put on the shared blacklist are refused with 554
    5.7.1 until their entry expires."""

    enabled: bool = True
    # The store (SQL) did not answer in policy.check_timeout: passing would
    # let a listed client through while the database hangs (promise 4).
    on_timeout: str = _on_timeout("tempfail")
    whitelist_clients: tuple[str, ...] = field(default=(), metadata=_CLIENTS)
    whitelist_senders: tuple[str, ...] = field(default=(), metadata=_SENDERS)
    whitelist_recipients: tuple[str, ...] = field(default=(), metadata=_SENDERS)


@dataclass(frozen=True)
class SpamtrapConfig:
    """Spam traps (check ``spamtrap``): a recipient matching one of the
    regular expressions (searched case-insensitively in the whole address)
    is refused and the client is auto-blacklisted."""

    enabled: bool = False
    patterns: tuple[str, ...] = field(default=(), metadata=_opt(_regexes))
    blacklist_seconds: float = field(default=3600.0, metadata=_opt(_at_least(1)))
    # Listing the client (SQL) did not finish in policy.check_timeout:
    # passing would accept mail to the trap itself.
    on_timeout: str = _on_timeout("tempfail")
    whitelist_clients: tuple[str, ...] = field(default=(), metadata=_CLIENTS)
    whitelist_senders: tuple[str, ...] = field(default=(), metadata=_SENDERS)
    whitelist_recipients: tuple[str, ...] = field(default=(), metadata=_SENDERS)


@dataclass(frozen=True)
class ThresholdsConfig:
    """Rate thresholds with auto-blacklisting (check ``thresholds``)."""

    enabled: bool = False
    # Sample period in seconds over which messages and spam verdicts count.
    period: float = field(default=120.0, metadata=_opt(_at_least(1)))
    # More than this many messages (or spam verdicts) in the period puts the
    # client on the blacklist; 0 switches that limit off.
    max_messages: int = field(default=0, metadata=_opt(_at_least(0)))
    max_spam: int = field(default=0, metadata=_opt(_at_least(0)))
    blacklist_seconds: float = field(default=3600.0, metadata=_opt(_at_least(1)))
    # Count per address (32 / 128) or per network (24 / 64, say).
    ipv4_prefix: int = field(default=32, metadata=_opt(_prefix(32)))
    ipv6_prefix: int = field(default=128, metadata=_opt(_prefix(128)))
    # Sum the counts of every process and node on the state database
    # (policy/sharedcounters.py; synced every 2 s) instead of this
    # process's alone.
    shared: bool = False
    # Listing a client over a limit (SQL) did not finish in
    # policy.check_timeout: passing would accept the flood it stops.
    on_timeout: str = _on_timeout("tempfail")
    whitelist_clients: tuple[str, ...] = field(default=(), metadata=_CLIENTS)
    whitelist_senders: tuple[str, ...] = field(default=(), metadata=_SENDERS)
    whitelist_recipients: tuple[str, ...] = field(default=(), metadata=_SENDERS)


@dataclass(frozen=True)
class GreylistConfig:
    """Greylisting (check ``greylist``) of the triplet (client network,
    sender, recipient)."""

    enabled: bool = False
    # A triplet seen for the first time is deferred for this long.
    delay: float = field(default=300.0, metadata=_opt(_at_least(0)))
    # The retry must come within this long of the first attempt.
    retry_window: float = field(default=2 * 86400.0, metadata=_opt(_at_least(60)))
    # A passed triplet is remembered this long after its last use.
    lifetime: float = field(default=36 * 86400.0, metadata=_opt(_at_least(60)))
    # A client network that passed this many triplets skips greylisting
    # (0: never).
    auto_whitelist_after: int = field(default=5, metadata=_opt(_at_least(0)))
    ipv4_prefix: int = field(default=24, metadata=_opt(_prefix(32)))
    ipv6_prefix: int = field(default=64, metadata=_opt(_prefix(128)))
    # The triplet store (SQL) did not answer in policy.check_timeout:
    # passing would skip greylisting whenever the database hangs.
    on_timeout: str = _on_timeout("tempfail")
    whitelist_clients: tuple[str, ...] = field(default=(), metadata=_CLIENTS)
    whitelist_senders: tuple[str, ...] = field(default=(), metadata=_SENDERS)
    whitelist_recipients: tuple[str, ...] = field(default=(), metadata=_SENDERS)


@dataclass(frozen=True)
class DnsblConfig:
    """DNS block lists (check ``dnsbl``): each listing adds its score."""

    enabled: bool = False
    lists: tuple[DnsblList, ...] = field(default=(), metadata=_opt(validate_dnsbl_lists))
    # Ask the "domain" lists (RHSBL) about the sender domain and the HELO.
    check_sender_domain: bool = True
    check_helo: bool = False
    # The lists did not answer in policy.check_timeout: a DNS list never
    # blocks mail by itself, so the check scores nothing.
    on_timeout: str = _on_timeout("pass")
    whitelist_clients: tuple[str, ...] = field(default=(), metadata=_CLIENTS)
    whitelist_senders: tuple[str, ...] = field(default=(), metadata=_SENDERS)
    whitelist_recipients: tuple[str, ...] = field(default=(), metadata=_SENDERS)


@dataclass(frozen=True)
class SpfConfig:
    """SPF, RFC 7208 (check ``spf``): a score per result, and an
    Authentication-Results header (RFC 8601) on relayed mail."""

    enabled: bool = False
    score_fail: float = field(default=5.0, metadata=_opt(_finite))
    score_softfail: float = field(default=2.0, metadata=_opt(_finite))
    score_neutral: float = field(default=0.0, metadata=_opt(_finite))
    score_none: float = field(default=0.5, metadata=_opt(_finite))
    score_pass: float = field(default=0.0, metadata=_opt(_finite))
    score_permerror: float = field(default=1.0, metadata=_opt(_finite))
    score_temperror: float = field(default=0.0, metadata=_opt(_finite))
    # Refuse "fail" outright (550 5.7.23, RFC 7372) instead of scoring it.
    reject_fail: bool = False
    # A DNS failure (temperror) is a 451 4.4.3 instead of a score.
    tempfail_on_temperror: bool = False
    add_header: bool = True
    # No result in policy.check_timeout (SPF's own bound is shorter, so
    # this is rare): scored nothing, as a DNS failure is by default.
    on_timeout: str = _on_timeout("pass")
    whitelist_clients: tuple[str, ...] = field(default=(), metadata=_CLIENTS)
    whitelist_senders: tuple[str, ...] = field(default=(), metadata=_SENDERS)
    whitelist_recipients: tuple[str, ...] = field(default=(), metadata=_SENDERS)


def _one_line(value: str) -> Optional[str]:
    if any(not c.isprintable() for c in value):
        return "must be one line of printable text"
    return None


@dataclass(frozen=True)
class ScoringConfig:
    """The sum of all scores against thresholds; 0 switches one off."""

    # At or above: X-Spam-Flag/X-Spam-Score headers are added when relayed.
    tag: float = field(default=5.0, metadata=_opt(_finite))
    # At or above: accepted and held in the quarantine instead of relayed.
    quarantine: float = field(default=0.0, metadata=_opt(_finite))
    # At or above before DATA: the recipient is refused (550 5.7.1).
    reject: float = field(default=15.0, metadata=_opt(_finite))
    # Put before the Subject of a tagged message ("[SPAM] "); empty: none.
    subject_prefix: str = field(default="", metadata=_opt(_one_line))


def charset_key(charset: str) -> str:
    """One name per charset ("UTF8", "utf-8" -> "utf-8"); unknown names as
    written, lower case.  The disclaimer (``disclaimer.py``) picks its text
    by it; ``_texts`` refuses two texts under one name."""
    try:
        return codecs.lookup(charset).name
    except LookupError:
        return charset.strip().lower()


def _charset(value: str) -> Optional[str]:
    try:
        codecs.lookup(value)
    except LookupError:
        return f"{value!r} is not a charset Python knows"
    return None


@dataclass(frozen=True)
class DisclaimerText:
    """The disclaimer in one charset (``[[policies.NAME.disclaimers.texts]]``)."""

    charset: str = field(default="utf-8", metadata=_opt(_charset))
    # Appended to text/plain bodies and added as a new text/plain part.
    plain: str = ""
    # Appended to text/html bodies (before </body> when there is one);
    # empty: the plain text, escaped, in a <pre>.
    html: str = ""


def _texts(values: tuple[DisclaimerText, ...]) -> Optional[str]:
    seen = set()
    for i, t in enumerate(values):
        key = charset_key(t.charset)
        if key in seen:
            return f"[{i}] charset: {t.charset!r} has two texts"
        seen.add(key)
        try:
            t.plain.encode(t.charset)
            t.html.encode(t.charset)
        except (UnicodeError, LookupError):
            return f"[{i}]: the text cannot be written in {t.charset!r}"
    return None


@dataclass(frozen=True)
class DisclaimerConfig:
    """A text appended to outgoing mail of some senders
    (``[[policies.NAME.disclaimers]]``), MIME-correctly; see
    ``mppproxy/disclaimer.py``."""

    senders: tuple[str, ...] = field(default=(), metadata=_SENDERS)
    texts: tuple[DisclaimerText, ...] = field(default=(), metadata=_opt(_texts))
    # Messages larger than this (octets) are left alone: the rewrite holds
    # the message in memory.
    max_size: int = field(default=10 * 1024 * 1024, metadata=_opt(_at_least(0)))


@dataclass(frozen=True)
class PolicyConfig:
    """One named policy."""

    # Recipient domains this policy is for (not in [policies.default]).
    domains: tuple[str, ...] = ()
    # Recipients this policy is for, before any policy's domains (issue 14:
    # a policy per user): "user@example.com", "user@" (that local part in
    # any domain), "@example.com"; not in [policies.default].
    recipients: tuple[str, ...] = field(default=(), metadata=_SENDERS)
    # Directory of reply templates that override the built-in ones for this
    # policy (templates/replies/<name>.txt); relative to data_dir.
    templates_dir: str = ""
    access: AccessConfig = AccessConfig()
    blacklist: BlacklistConfig = BlacklistConfig()
    spamtrap: SpamtrapConfig = SpamtrapConfig()
    thresholds: ThresholdsConfig = ThresholdsConfig()
    dnsbl: DnsblConfig = DnsblConfig()
    spf: SpfConfig = SpfConfig()
    greylisting: GreylistConfig = GreylistConfig()
    scoring: ScoringConfig = ScoringConfig()
    scan: ScanConfig = ScanConfig()
    # The first table whose senders match the envelope sender applies.
    disclaimers: tuple[DisclaimerConfig, ...] = ()


@dataclass(frozen=True)
class PolicyEngineConfig:
    """``[policy]``: how the engine runs."""

    enabled: bool = True
    # Clients in trusted_networks (they relay outbound mail) skip the
    # pre-DATA checks, like Postfix's permit_mynetworks first.
    skip_trusted: bool = True
    # Seconds one check may take; past it the check's own on_timeout
    # decides (pass for DNS lists and SPF, tempfail for the checks of the
    # state database) and it is logged.
    check_timeout: float = field(default=10.0, metadata=_opt(_at_least(0.1)))
    # A check that fails (database down, say): "tempfail" answers 451 4.3.0
    # (docs/design.md promise 4) or "skip" logs it and goes on.
    on_error: str = field(default="tempfail", metadata=_opt(_on_failure))
    # Site-wide reply templates overriding the built-in ones; relative to data_dir.
    templates_dir: str = ""
