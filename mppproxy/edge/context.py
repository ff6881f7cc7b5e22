"""What all edge sessions of one configuration share, and how it is built.

Composition (docs/design.md, "Floors"): ``make_context`` only builds objects
-- the backend pool, relay control, the trusted networks, the reply
renderer, the actions' helpers -- and takes the policy runtime, the scan
stage and the archive queue the service built beside it, so neither stage
builds the other.  A reload builds a new context; sessions keep the one
they began with (the archive queue is the process's one, shared by all).
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Optional

from twisted.python.threadpool import ThreadPool

from mppproxy.actions.deliver import LocalDelivery
from mppproxy.actions.rewrite import Rewriter
from mppproxy.archive.copies import ArchiveCopies, node_name, open_queue
from mppproxy.spool.committer import PoolCommitter
from mppproxy.config.schema import ProxyConfig
from mppproxy.match import SetCache, TrustedNetworks
from mppproxy.policy.runtime import PolicyRuntime
from mppproxy.relay.pool import BackendPool
from mppproxy.scan.runtime import ScanStage
from mppproxy.smtp.address import RelayDomains
from mppproxy.templates import ReplyRenderer, make_renderer


def resolve_hostname(config: ProxyConfig) -> str:
    return config.smtp.hostname or socket.getfqdn()


@dataclass
class EdgeContext:
    """What all sessions of one configuration share."""

    config: ProxyConfig
    reactor: Any
    threadpool: ThreadPool
    hostname: str
    relay_domains: RelayDomains
    trusted: TrustedNetworks
    pool: Optional[BackendPool]
    # The pre-DATA policy engine and its services; None when policy.enabled
    # is false.
    policy: Optional[PolicyRuntime]
    # Post-DATA scanning, per policy; there whatever policy.enabled says.
    scan: ScanStage
    # Refusals after DATA (the policy engine's renderer when it runs).
    renderer: ReplyRenderer
    # The do-not-scan and disclaimer lists' sets, built on first use.
    sets: SetCache
    delivery: LocalDelivery
    rewriter: Rewriter
    # The archive queue: held messages and archive copies (issue 12).
    archive: ArchiveCopies


def make_context(config: ProxyConfig, reactor: Any, threadpool: ThreadPool,
                 backend_tls_context: Any = None,
                 policy: Optional[PolicyRuntime] = None,
                 scan: Optional[ScanStage] = None,
                 archive: Optional[ArchiveCopies] = None) -> EdgeContext:
    """The context of ``config``.  ``backend_tls_context`` is what
    ``tlsconfig.backend_context`` gives (options or a connection creator,
    None for no STARTTLS).  ``scan`` is the service's scan stage (it
    starts and stops its engine-health watch); without one a stage is built
    here, unwatched.  ``archive`` is the service's archive queue (opened
    at its start, shared by every context of the process); without one a
    queue for ``config`` is set up here, opened at its first use.  No I/O."""
    hostname = resolve_hostname(config)
    pool = None
    if config.backend is not None:
        pool = BackendPool(reactor, config.backend, config.backend.helo_name or hostname,
                           backend_tls_context)
    sets = SetCache()
    if archive is None:
        queue = open_queue(config.archive, config.data_dir)
        archive = ArchiveCopies(reactor, queue, config.archive, node_name(config.archive, hostname))
        # Without a service: the queue written in the given thread pool.
        archive.committer = PoolCommitter(reactor, threadpool, queue, prepare=archive.open)
    return EdgeContext(
        config, reactor, threadpool, hostname, RelayDomains(config.relay_domains),
        TrustedNetworks(config.trusted_networks), pool, policy,
        scan if scan is not None else ScanStage(config, reactor),
        policy.engine.renderer if policy is not None else make_renderer(config),
        sets, LocalDelivery(reactor, threadpool, config.data_dir, config.delivery.maildir),
        Rewriter(reactor, threadpool, sets), archive)
