"""The policy engine with what it needs, for one process.

``PolicyRuntime`` owns what outlives a reload (the DNS resolver and its
cache, the state database and its stores, the rate counters) and rebuilds
only the engine when the configuration changes.  The SMTP gateway and the
Postfix policy server (``policyd``) both use it.  Construction does no I/O;
``stop`` closes sockets and database connections.
"""
from __future__ import annotations

from typing import Any, Optional

import dns.resolver
from twisted.internet import defer

from mppproxy.config.schema import ProxyConfig, parse_nameserver
from mppproxy.logsetup import Logger
from mppproxy.policy.counters import RateCounters
from mppproxy.policy.dnsbl import DnsblResolver
from mppproxy.policy.engine import PolicyEngine
from mppproxy.policy.services import PolicyServices
from mppproxy.templates import ReplyRenderer

log = Logger()


def system_nameservers() -> tuple[tuple[str, int], ...]:
    """The resolvers in /etc/resolv.conf (dnspython reads it; no I/O on
    the network), else 127.0.0.1."""
    try:
        found = dns.resolver.Resolver(configure=True).nameservers
    except (dns.resolver.NoResolverConfiguration, OSError):
        found = []
    servers = []
    for ns in found[:4]:
        parsed = parse_nameserver(str(ns))
        if parsed is not None:
            servers.append(parsed)
    return tuple(servers) or (("127.0.0.1", 53),)


def nameservers(config: ProxyConfig) -> tuple[tuple[str, int], ...]:
    if config.dns.nameservers:
        return tuple(p for p in (parse_nameserver(n) for n in config.dns.nameservers) if p)
    return system_nameservers()


def make_renderer(config: ProxyConfig) -> ReplyRenderer:
    import os

    def resolve(path: str) -> str:
        return os.path.join(config.data_dir, path) if path else ""

    return ReplyRenderer(resolve(config.policy.templates_dir),
                         {name: resolve(p.templates_dir) for name, p in config.policies.items()
                          if p.templates_dir})


class PolicyRuntime:
    def __init__(self, config: ProxyConfig, reactor: Any, hostname: str,
                 database: Any = None):
        self.reactor = reactor
        self.config = config
        self._dns_key = (nameservers(config), config.dns.timeout)
        self.database = database
        self.services = PolicyServices(
            reactor, hostname=hostname,
            resolver=DnsblResolver(reactor, self._dns_key[0], timeout=config.dns.timeout),
            counters=RateCounters(reactor))
        if database is not None:
            self.services.blacklist = database.blacklist
            self.services.greylist = database.greylist
        self._attach_spf(config)
        self.engine = self._make_engine(config)

    def _attach_spf(self, config: ProxyConfig) -> None:
        """A fresh SPF evaluator on the current resolver.  Its time bound
        stays under the engine's per-check timeout, so a slow SPF domain
        ends in "temperror" (scored or tempfailed as the policy says)
        rather than in an engine timeout that scores nothing."""
        from mppproxy.policy.spf import DEFAULT_TIMEOUT, SpfEvaluator

        timeout = min(DEFAULT_TIMEOUT, max(0.1, config.policy.check_timeout * 0.9))
        self.services.spf = SpfEvaluator(self.services.resolver, timeout=timeout,
                                         hostname=self.services.hostname)

    def _make_engine(self, config: ProxyConfig) -> PolicyEngine:
        from mppproxy.scan import factory

        # Post-DATA scanning per policy (None where it is off), over the
        # engines of [scanners], whose health is watched while they are used.
        engines = factory.build_engines(config, self.reactor)
        self.scanning = {name: factory.build(p.scan, self.reactor, engines)
                         for name, p in config.policies.items()}
        self._watch_engines(config, engines)
        return PolicyEngine(config.policy, config.policies, self.services, make_renderer(config),
                            self.reactor)

    def _watch_engines(self, config: ProxyConfig, engines: dict) -> None:
        from mppproxy.scan.health import HealthMonitor

        old = getattr(self, "health", None)
        if old is not None:
            old.stop()
        self.health = None
        if engines:
            self.health = HealthMonitor(list(engines.values()), self.reactor,
                                        config.scanners.health)
            # Started on the next reactor turn: building the runtime does no I/O.
            self.reactor.callLater(0, self.health.start)

    def reconfigure(self, config: ProxyConfig) -> None:
        """A reload: the engine is rebuilt; the resolver only when the DNS
        settings changed (its cache survives otherwise)."""
        key = (nameservers(config), config.dns.timeout)
        if key != self._dns_key:
            old = self.services.resolver
            self.services.resolver = DnsblResolver(self.reactor, key[0], timeout=config.dns.timeout)
            self._dns_key = key
            old.close()
        self._attach_spf(config)
        self.config = config
        self.engine = self._make_engine(config)

    def stop(self) -> defer.Deferred:
        if getattr(self, "health", None) is not None:
            self.health.stop()
        self.engine.deadlines.stop()
        waits = [self.services.resolver.close()]
        if self.database is not None:
            waits.append(defer.maybeDeferred(self.database.stop))
        return defer.gatherResults(waits, consumeErrors=True)


def policy_active(config: ProxyConfig) -> bool:
    return config.policy.enabled


def make_database(config: ProxyConfig, reactor: Any) -> Any:
    """The shared state (greylist, auto-blacklist) of ``config``: a
    ``mppproxy.db.StateDatabase`` on ``database.url`` (empty: SQLite at
    ``data_dir/state.sqlite``).  Not started; no I/O yet."""
    from mppproxy.db import StateDatabase

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
