"""Which policy judges a transaction: the one copy of policy-by-domain
routing (docs/design.md, "Policy per transaction" in architecture.md).

The pre-DATA engine asks it for every recipient, the proxy for a
transaction the engine did not see, and scan mode for a request that names
no policy, so one recipient domain picks the same policy everywhere.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Protocol

from mppproxy.match import DomainSet


class _Routed(Protocol):
    """What routing reads of a policy: its ``domains`` list."""

    @property
    def domains(self) -> tuple[str, ...]: ...


class PolicyRouter:
    """The named policy listing a domain (or a parent as ``.parent``), else
    "default".  Built once per configuration; no I/O."""

    def __init__(self, policies: Mapping[str, _Routed]):
        self._domains: list[tuple[DomainSet, str]] = []
        for name, policy in policies.items():
            if name != "default":
                domains = DomainSet()
                for d in policy.domains:
                    domains.add(d)
                self._domains.append((domains, name))

    def policy_for(self, domain: str) -> str:
        """The policy of a recipient domain (lower-cased, no trailing dot)."""
        if domain:
            for domains, name in self._domains:
                if domain in domains:
                    return name
        return "default"

    def policy_for_recipients(self, recipients: Iterable[str]) -> str:
        """The policy of the first recipient's domain, as a transaction gets
        it (a recipient of another policy is answered 452 4.5.3)."""
        first = next(iter(recipients), "")
        return self.policy_for(first.rpartition("@")[2].rstrip(".").lower() if "@" in first
                               else "")
