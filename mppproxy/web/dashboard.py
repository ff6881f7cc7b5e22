"""The console's dashboard (issue 13): mail per hour by disposition, the top
reasons, and the health of the scan engines and DNS lists, for
superadmins.

Floor 3 (``mppproxy/web/``), a thin page over three lower pieces: the
counts and health rows the edges write into the state database
(``db/traffic.py``, ``db/nodehealth.py``; every ``database.traffic_flush``
seconds), read here in the reactor's thread pool with an engine opened
for the request; the SVG charts (``charts.py``), inline in the page so
their titles reach screen readers and their tooltips the mouse; and the
console's page frame (``templates/web/dashboard.html`` extends
``base.html``).

The counts are of every domain together, so only superadmins see them; a
domain admin gets the console's "no such page".  ``app.py`` hands this
module its ``Route`` and ``Response`` types (``routes``): this module does
not import ``app.py``, which imports it.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from markupsafe import Markup
from sqlalchemy.exc import SQLAlchemyError

from mppproxy.charts import OKABE_ITO, Series, horizontal_bars, mail_per_hour
from mppproxy.config.database import DatabaseConfig
from mppproxy.config.schema import ProxyConfig
from mppproxy.db.engine import database_url, is_memory_sqlite, make_engine
from mppproxy.db.models import NODE_LENGTH, StateTables, create_missing
from mppproxy.db.nodehealth import HealthStatus, health_summary, read_health
from mppproxy.db.traffic import COUNTED, HOUR, Counted, hourly, nodes, per_hour, top_reasons

# ?period=: the bars and the words.
PERIODS = {"day": (24, "last 24 hours"), "week": (7 * 24, "last 7 days")}
TOP_REASONS = 10
# The charts' drawing width: they scale to the page's width (``fluid``),
# and at this size their text stays near the page's own on a wide screen.
CHART_WIDTH = 1000
# The stack's colours (Okabe-Ito: apart for colour-blind readers too).
SERIES = (
    Series(Counted.RELAYED, "relayed", OKABE_ITO["green"]),
    Series(Counted.TAGGED, "tagged", OKABE_ITO["orange"]),
    Series(Counted.QUARANTINED, "quarantined", OKABE_ITO["blue"]),
    Series(Counted.REFUSED, "refused", OKABE_ITO["vermillion"]),
    Series(Counted.TEMPFAILED, "tempfailed", OKABE_ITO["purple"]),
    Series(Counted.DISCARDED, "discarded", OKABE_ITO["grey"]),
)
assert tuple(s.key for s in SERIES) == COUNTED


@dataclass
class DashboardData:
    """What the page shows, read in one go (``load``)."""

    period: str
    hours: int
    start_hour: int
    node: Optional[str]
    nodes: list[str] = field(default_factory=list)
    counts: dict[int, dict[str, int]] = field(default_factory=dict)
    reasons: list[tuple[str, str, int]] = field(default_factory=list)
    health: list[HealthStatus] = field(default_factory=list)
    # Why the state database could not be read ("" when it could).
    error: str = ""

    @property
    def totals(self) -> list[tuple[str, int]]:
        """(label, count) per disposition over the period, in the stack's order."""
        return [(s.label, sum(h.get(s.key, 0) for h in self.counts.values())) for s in SERIES]


def configured_names(config: ProxyConfig) -> tuple[list[str], list[str]]:
    """The scan engines of ``[scanners]`` and the DNS lists of every
    policy, by name: each gets a health line even before a node reports it."""
    lists = sorted({dnsbl.name for policy in config.policies.values()
                    for dnsbl in policy.dnsbl.lists})
    return config.scanners.names(), lists


def load(db_config: DatabaseConfig, data_dir: str, now: float, period: str,
         node: Optional[str], engines: list[str], dns_lists: list[str]) -> DashboardData:
    """Read the period's counts, top reasons and health (blocking: run it
    in a thread).  An engine of its own for the request, closed after it
    (the page is asked for rarely; nothing stays open between requests).
    A database that cannot be read gives the data with ``error`` set."""
    hours = PERIODS[period][0]
    this_hour = int(now) // HOUR * HOUR
    start = this_hour - (hours - 1) * HOUR
    data = DashboardData(period, hours, start, node)
    url = database_url(db_config, data_dir)
    if url.get_backend_name() == "sqlite" and not is_memory_sqlite(url):
        os.makedirs(os.path.dirname(str(url.database)), exist_ok=True)
    engine = make_engine(url, dataclasses.replace(db_config, pool_max=1,
                                                  sqlite_in_reactor=False))
    tables = StateTables()
    try:
        # An archive node whose edges have not written yet: empty tables.
        create_missing(engine, [tables.traffic, tables.node_health])
        data.nodes = nodes(engine, start, tables)
        if node is not None and node not in data.nodes:
            data.node = node = None
        until = this_hour + HOUR
        data.counts = per_hour(hourly(engine, start, until, node, tables))
        data.reasons = top_reasons(engine, start, until, TOP_REASONS, node, tables)
        data.health = health_summary(read_health(engine, tables), now, engines, dns_lists)
    except (SQLAlchemyError, OSError) as e:
        reason = getattr(e, "orig", None) or e
        data.error = (f"the state database {url.render_as_string(hide_password=True)} "
                      f"cannot be read: {' '.join(str(reason).split())[:300]}")
    finally:
        engine.dispose()
    return data


def age_text(seconds: Optional[float]) -> str:
    """"3 h", "2 d 4 h", "" when unknown."""
    if seconds is None:
        return ""
    hours = int(seconds // 3600)
    if hours < 1:
        return f"{int(seconds // 60)} min"
    if hours < 48:
        return f"{hours} h"
    return f"{hours // 24} d {hours % 24} h"


def charts(data: DashboardData) -> tuple[Markup, Markup]:
    """The two SVG charts of ``data``.  Markup: ``charts.py`` escapes every
    text it draws, and the SVG is our own document, not message data."""
    words = PERIODS[data.period][1]
    where = f" on {data.node}" if data.node else ""
    hourly_svg = mail_per_hour(data.counts, data.start_hour, data.hours, SERIES,
                               title=f"Mail per hour, {words}{where}", ident="mail-per-hour",
                               width=CHART_WIDTH, height=320, fluid=True)
    top_svg = horizontal_bars(data.reasons, SERIES, title=f"Top reasons, {words}{where}",
                              ident="top-reasons",
                              empty="no refused, held or tagged mail in this period",
                              width=CHART_WIDTH, fluid=True)
    return Markup(hourly_svg), Markup(top_svg)


def _query(call: Any, name: str, limit: int) -> str:
    values = call.query.get(name) or [""]
    return str(values[0])[:limit]


def routes(route: Callable[..., Any], response: Callable[..., Any]) -> list[Any]:
    """The dashboard's route, made with the console's ``Route`` and
    ``Response`` (see the module docstring)."""

    async def page(console: Any, call: Any) -> Any:
        if not call.admin.superadmin:
            return console._page(404, "Not found", "There is no such page.", call)
        period = _query(call, "period", 8)
        if period not in PERIODS:
            period = "day"
        node = _query(call, "node", NODE_LENGTH) or None
        config: ProxyConfig = console.ctx.config
        engines, dns_lists = configured_names(config)
        now = console.ctx.now()
        data: DashboardData = await console.ctx.in_thread(
            load, config.database, config.data_dir, now, period, node, engines, dns_lists)
        hourly_svg, top_svg = charts(data)
        body = console._render(
            "dashboard.html", call, title="Dashboard", data=data, periods=PERIODS,
            hourly_svg=hourly_svg, top_svg=top_svg, age=age_text,
            flush=config.database.traffic_flush)
        return response(200, body)

    return [route(b"GET", re.compile(r"/dashboard"), page)]
