"""Which policy judges a transaction: the one copy of policy-by-recipient
and policy-by-domain routing (docs/design.md, "Policy per transaction" in
architecture.md).

A named policy's ``recipients`` (addresses, ``user@`` in any domain,
``@domain``, as the access lists write them) pick it for those recipients
before any policy's ``domains`` are looked at, as the original product let
a user have a policy of their own (issue 14); the first policy, in the
order of the configuration, whose recipients match wins.

The pre-DATA engine asks it for every recipient, the proxy for a
transaction the engine did not see, and scan mode for a request that names
no policy, so one recipient domain picks the same policy everywhere.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Protocol

from mppproxy.match import AddressSet, DomainSet


class _Routed(Protocol):
    """What routing reads of a policy: its ``recipients`` and ``domains``."""

    @property
    def domains(self) -> tuple[str, ...]: ...

    @property
    def recipients(self) -> tuple[str, ...]: ...


class PolicyRouter:
    """The named policy listing a domain (or a parent as ``.parent``), else
    "default".  Built once per configuration; no I/O."""

    def __init__(self, policies: Mapping[str, _Routed]):
        self._domains: list[tuple[DomainSet, str]] = []
        self._recipients: list[tuple[AddressSet, str]] = []
        for name, policy in policies.items():
            if name != "default":
                domains = DomainSet()
                for d in policy.domains:
                    domains.add(d)
                self._domains.append((domains, name))
                if policy.recipients:
                    self._recipients.append((AddressSet(policy.recipients), name))

    def policy_for(self, domain: str) -> str:
        """The policy of a recipient domain (lower-cased, no trailing dot)."""
        if domain:
            for domains, name in self._domains:
                if domain in domains:
                    return name
        return "default"

    def policy_for_recipient(self, address: str, domain: str) -> str:
        """The policy of one recipient: a policy listing the address in its
        ``recipients``, else its domain's (``domain``: lower-cased, no
        trailing dot, as ``Facts.recipient_domain``)."""
        for recipients, name in self._recipients:
            if address in recipients:
                return name
        return self.policy_for(domain)

    def policy_for_recipients(self, recipients: Iterable[str]) -> str:
        """The policy of the first recipient, as a transaction gets it (a
        recipient of another policy is answered 452 4.5.3)."""
        first = next(iter(recipients), "")
        return self.policy_for_recipient(
            first, first.rpartition("@")[2].rstrip(".").lower() if "@" in first else "")
