"""The edge's traffic counts and health reports for the dashboard: which
state database they go to, under which node name, and what this process
knows of its engines and DNS lists.

Composition (docs/design.md, "Floors"): the recorder (``db/traffic.py``)
and the reports (``db/nodehealth.py``) are leaves that know no stage; the
scan stage's health monitor (``scan/health.py``) and the policy engine's
DNS-list health (``policy/dnshealth.py``) are stages.  This module reads
the stages and hands plain reports to the leaf.  The counts go through the
policy runtime's state database (the one ``[database]`` names, which the
edge opens with the policy engine); while there is none (``policy.enabled
= false``) nothing is written.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from mppproxy.archive.copies import node_name
from mppproxy.config.schema import ProxyConfig
from mppproxy.db.base import Database
from mppproxy.db.nodehealth import ENGINE, HealthReport
from mppproxy.db.traffic import TrafficRecorder
from mppproxy.edge.context import resolve_hostname
from mppproxy.policy.runtime import PolicyRuntime
from mppproxy.scan.runtime import ScanStage


def health_reports(scan: Optional[ScanStage],
                   policy: Optional[PolicyRuntime]) -> list[HealthReport]:
    """What this process knows now: each engine's last health check (none
    before the first has answered), then each DNS list asked so far."""
    reports = []
    monitor = scan.health if scan is not None else None
    if monitor is not None:
        for name in sorted(monitor.status):
            h = monitor.status[name]
            reports.append(HealthReport(ENGINE, name, h.up, h.version, h.signatures_time,
                                        h.detail))
    if policy is not None:
        reports.extend(policy.services.dns_health.reports())
    return reports


def traffic_node(config: ProxyConfig) -> str:
    """The node name of the counts: archive.node_name, or the host name."""
    return node_name(config.archive, resolve_hostname(config))


def make_recorder(config: ProxyConfig, reactor: Any,
                  policy: Callable[[], Optional[PolicyRuntime]],
                  scan: Callable[[], Optional[ScanStage]]) -> Optional[TrafficRecorder]:
    """The process's recorder, or None with ``database.traffic_flush = 0``.
    ``policy`` and ``scan`` give the service's current runtime and stage
    (a reload replaces them).  No I/O."""
    if config.database.traffic_flush <= 0:
        return None

    def database() -> Optional[Database]:
        runtime = policy()
        db: Optional[Database] = runtime.database if runtime is not None else None
        return db

    return TrafficRecorder(reactor, traffic_node(config), config.database.traffic_flush,
                           database, lambda: health_reports(scan(), policy()))
