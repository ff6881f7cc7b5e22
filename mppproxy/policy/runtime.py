"""The policy engine with what it needs, for one process.

``PolicyRuntime`` owns what outlives a reload (the DNS resolver and its
cache, the state database and its stores, the rate counters) and rebuilds
only the engine when the configuration changes.  The SMTP edge and the
Postfix policy server (``policyd``) both use it.  It knows nothing of
post-DATA scanning: that stage is built beside it (``scan/runtime.py``;
docs/design.md, "The stages of one session").  Construction does no I/O;
``stop`` closes sockets and database connections.
"""
from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer

from mppproxy.config.schema import ProxyConfig
from mppproxy.db import StateDatabase
from mppproxy.dns.nameservers import nameservers
from mppproxy.dns.resolver import Resolver
from mppproxy.logsetup import Logger
from mppproxy.policy.counters import RateCounters
from mppproxy.policy.sharedcounters import SharedRateCounters
from mppproxy.policy.dnsguard import DnsListGuard
from mppproxy.policy.engine import PolicyEngine
from mppproxy.policy.services import PolicyServices
from mppproxy.policy.spf import DEFAULT_TIMEOUT, SpfEvaluator
from mppproxy.templates import make_renderer

log = Logger()


class PolicyRuntime:
    def __init__(self, config: ProxyConfig, reactor: Any, hostname: str,
                 database: Any = None):
        self.reactor = reactor
        self.config = config
        self._dns_key = (nameservers(config.dns), config.dns.timeout)
        self.database = database
        self.services = PolicyServices(
            reactor, hostname=hostname,
            resolver=Resolver(reactor, self._dns_key[0], timeout=config.dns.timeout),
            # The state database's processes and nodes sum the counts of
            # the policies whose thresholds say shared (sharedcounters.py).
            counters=(SharedRateCounters(reactor, lambda: self.database)
                      if database is not None else RateCounters(reactor)))
        if database is not None:
            self.services.blacklist = database.blacklist
            self.services.greylist = database.greylist
            # Test doubles of the database may have no allow list.
            self.services.allowlist = getattr(database, "allowlist", None)
        self.services.dns_guard = DnsListGuard(reactor, lambda: self.services.resolver,
                                               config.dns.list_check_interval)
        self._attach_spf(config)
        self.engine = self._make_engine(config)

    def _attach_spf(self, config: ProxyConfig) -> None:
        """A fresh SPF evaluator on the current resolver.  Its time bound
        stays under the engine's per-check timeout, so a slow SPF domain
        ends in "temperror" (scored or tempfailed as the policy says)
        rather than in an engine timeout that scores nothing."""
        timeout = min(DEFAULT_TIMEOUT, max(0.1, config.policy.check_timeout * 0.9))
        self.services.spf = SpfEvaluator(self.services.resolver, timeout=timeout,
                                         hostname=self.services.hostname)

    def _make_engine(self, config: ProxyConfig) -> PolicyEngine:
        return PolicyEngine(config.policy, config.policies, self.services, make_renderer(config),
                            self.reactor)

    def reconfigure(self, config: ProxyConfig) -> None:
        """A reload: the engine is rebuilt; the resolver only when the DNS
        settings changed (its cache survives otherwise)."""
        key = (nameservers(config.dns), config.dns.timeout)
        if key != self._dns_key:
            old = self.services.resolver
            self.services.resolver = Resolver(self.reactor, key[0], timeout=config.dns.timeout)
            self._dns_key = key
            if old is not None:
                old.close()
        self._attach_spf(config)
        self.services.dns_guard.interval = config.dns.list_check_interval
        self.config = config
        self.engine = self._make_engine(config)

    def stop(self) -> defer.Deferred[list[None]]:
        self.engine.deadlines.stop()
        self.services.dns_guard.stop()
        waits: list[defer.Deferred[None]] = []
        if isinstance(self.services.counters, SharedRateCounters):
            # The last counts, before the database stops below.
            waits.append(self.services.counters.stop())
        if self.services.resolver is not None:
            waits.append(self.services.resolver.close())
        if self.database is not None:
            waits.append(defer.maybeDeferred(self.database.stop))
        return defer.gatherResults(waits, consumeErrors=True)


def policy_active(config: ProxyConfig) -> bool:
    return config.policy.enabled


def make_database(config: ProxyConfig, reactor: Any) -> Any:
    """The shared state (greylist, auto-blacklist) of ``config``: a
    ``mppproxy.db.StateDatabase`` on ``database.url`` (empty: SQLite at
    ``data_dir/state.sqlite``).  Not started; no I/O yet."""
    return StateDatabase(config.database, config.data_dir, reactor)


def runtime_for(config: ProxyConfig, reactor: Any, hostname: str,
                database: Optional[Any] = None) -> Optional[PolicyRuntime]:
    """The policy runtime when the engine is on, else None.

    Without a ``database`` one is made from ``config`` and started here:
    its thread pool and purge run from now on, its tables are created in
    the background (a database that cannot be reached is logged and tried
    again on each use, where the checks fail per ``policy.on_error``).
    ``PolicyRuntime.stop()`` stops it; so does the reactor's shutdown.
    The database settings are read once: a reload keeps the database.
    """
    if not policy_active(config):
        return None
    if database is None:
        database = make_database(config, reactor)
        # Fires True/False; never fails (a failure is logged).
        database.start()
    return PolicyRuntime(config, reactor, hostname, database)
