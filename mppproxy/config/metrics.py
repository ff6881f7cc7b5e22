"""``[metrics]``: the Prometheus exposition of a node (issue 16,
``mppproxy/metrics/``).

A leaf of ``config/`` (docs/design.md floor 1); ``schema.py`` puts
``MetricsConfig`` into ``ProxyConfig``.

Off by default.  A node that serves mail should not open a port nobody
asked for, and a fixed default port would make a second instance on one
host (a test run, the edge and the policy server side by side) fail to
listen.  Turned on, it listens on loopback only: the counts name checks,
engines and certificate files, which is for the operator's Prometheus,
not for the internet.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mppproxy.config.fields import at_least as _at_least, endpoints as _endpoints, opt as _opt


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: where the exposition is served and how fresh it is."""

    enabled: bool = False
    # Twisted endpoint descriptions; GET /metrics on each.  Loopback: put a
    # reverse proxy or an SSH tunnel in front before opening it further.
    listen: tuple[str, ...] = field(default=("tcp:9125:interface=127.0.0.1",),
                                    metadata=_opt(_endpoints))
    # Seconds between the moments each process writes what it knows now
    # (open sessions, backend connections, engine and DNS-list health) into
    # the shared metric files: the staleness of those gauges in a scrape.
    # Counters and histograms are written as they happen.
    refresh: float = field(default=5.0, metadata=_opt(_at_least(0.1)))
    # Seconds a scrape reuses the costly figures (queue depths and oldest
    # ages, which list directories; greylist and blacklist sizes, a COUNT
    # in the state database): a scrape every 15 s costs a listing a minute.
    state_cache: float = field(default=60.0, metadata=_opt(_at_least(0)))
