"""The pre-DATA checks, one module each, keyed by their policy section."""
from __future__ import annotations

from mppproxy.policy.base import Check
from mppproxy.policy.checks.access import AccessCheck
from mppproxy.policy.checks.blacklist import BlacklistCheck
from mppproxy.policy.checks.dnsbl import DnsblCheck
from mppproxy.policy.checks.greylisting import GreylistCheck
from mppproxy.policy.checks.spamtrap import SpamtrapCheck
from mppproxy.policy.checks.spf import SpfCheck
from mppproxy.policy.checks.thresholds import ThresholdsCheck

REGISTRY: dict[str, type[Check]] = {
    "access": AccessCheck,
    "blacklist": BlacklistCheck,
    "spamtrap": SpamtrapCheck,
    "thresholds": ThresholdsCheck,
    "dnsbl": DnsblCheck,
    "spf": SpfCheck,
    "greylisting": GreylistCheck,
}
