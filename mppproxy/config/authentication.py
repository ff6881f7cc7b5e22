"""``policies.NAME.scan.dkim`` and ``policies.NAME.scan.dmarc``: message
authentication after DATA (DKIM, RFC 6376 / RFC 8463; DMARC, RFC 7489).

A leaf of ``config/``: frozen dataclasses, defaults with their reason, a
``check`` for every value; ``scan/scanners/authentication.py`` reads them.
Both are off by default; either one turned on adds the authentication
scanner to the policy's scanning (``scan.enabled`` must be true) and one
Authentication-Results field (RFC 8601) with SPF (the pre-DATA check's
result, when it ran), each DKIM signature and DMARC.  The keys are
documented in docs/configuration.md ("Message authentication").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mppproxy.config.fields import (at_least as _at_least, choice as _one_of, finite as _finite,
                                    opt as _opt)


def _score(default: float) -> Any:
    return field(default=default, metadata=_opt(_finite))


@dataclass(frozen=True)
class DkimConfig:
    """DKIM verification: every signature is checked and reported; the
    message's DKIM outcome (the most favourable of its signatures: pass,
    temperror, fail, policy, neutral, permerror; "none" when unsigned) adds
    its score.  DMARC verifies the signatures too (alignment needs them),
    but only ``enabled`` here adds these scores."""

    enabled: bool = False
    # A valid signature does not make mail good (spammers sign too), so a
    # pass scores nothing by default; a broken one is often a forwarder's
    # doing, hence small scores.
    score_pass: float = _score(0.0)
    score_fail: float = _score(1.0)
    score_none: float = _score(0.0)
    score_policy: float = _score(0.5)
    score_permerror: float = _score(0.5)
    score_temperror: float = _score(0.0)
    # RFC 8301 3.2: RSA keys under 1024 bits are never valid (permerror);
    # a site may ask for more (2048), never for less.
    min_rsa_bits: int = field(default=1024, metadata=_opt(_at_least(1024)))
    # Signatures looked at per message (RFC 6376 6.1 allows a limit); the
    # rest are ignored, so a message with hundreds costs no more than this.
    max_signatures: int = field(default=5, metadata=_opt(_at_least(1)))
    # A valid signature whose l= leaves part of the body unsigned:
    # "policy" (RFC 8601 2.7.1: not acceptable here, since anything can be
    # appended after the signed part) or "pass" (reported with the number
    # of unsigned octets in the header comment).
    partial_body: str = field(default="policy", metadata=_opt(_one_of("policy", "pass")))
    # rsa-sha1 signatures (RFC 8301 3.1: must not be considered valid).
    allow_sha1: bool = False
    # Messages larger than this (octets) are verified in the thread pool
    # instead of on the reactor thread.  Measured (RSA 2048, one signature,
    # the lean check of scan/auth/dkim.py): 0.05-0.1 ms for a 2 KB message;
    # at 64 KB 0.2 ms with simple body canonicalisation, 1.7 ms relaxed with
    # white space to squeeze on every line; per MiB 2 ms simple, ~29 ms
    # relaxed: past 64 KiB a verification may stall every other session
    # longer than the hop to a thread costs.
    thread_above: int = field(default=65536, metadata=_opt(_at_least(0)))


# What a DMARC fail does beside its score, by the policy the domain
# published (and pct= chose): "score" only, "quarantine" (accepted and
# held) or "reject" (550 5.7.1, RFC 7489 10.3).
_FAIL_ACTIONS = ("score", "quarantine", "reject")


@dataclass(frozen=True)
class DmarcConfig:
    """DMARC evaluation of the From: domain: the result's score, and for a
    fail the action the domain's policy asks for, as far as the site lets
    it (score only by default)."""

    enabled: bool = False
    score_pass: float = _score(0.0)
    score_none: float = _score(0.0)
    # A fail, by the policy applied (p=/sp= after pct=).
    score_fail_none: float = _score(1.0)
    score_fail_quarantine: float = _score(3.0)
    score_fail_reject: float = _score(5.0)
    # No usable From: (none, two fields, several domains: RFC 7489 6.6.1).
    score_permerror: float = _score(2.0)
    score_temperror: float = _score(0.0)
    # What a fail under p=quarantine does: "score" or "quarantine".
    quarantine_action: str = field(default="score",
                                   metadata=_opt(_one_of("score", "quarantine")))
    # What a fail under p=reject does: "score", "quarantine" or "reject".
    reject_action: str = field(default="score", metadata=_opt(_one_of(*_FAIL_ACTIONS)))
    # Apply pct= (RFC 7489 6.6.4); false applies p= to every failing message.
    honour_pct: bool = True
