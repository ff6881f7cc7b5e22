"""The console's dashboard page (mppproxy/web/dashboard.py) served for
real: the ``WebConsole`` on loopback (``ConsoleCase`` of
test_web_console.py), the traffic counts and health rows in the state
database of the test's data directory (SQLite), written with the same
functions the edges use."""
from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from typing import Any

from sqlalchemy.engine import Engine

from test_web_console import ANNA, ROOT_NAME, ConsoleCase
from mppproxy.config.load import from_mapping
from mppproxy.db.engine import database_url, make_engine
from mppproxy.db.models import StateTables, create_missing
from mppproxy.db.nodehealth import DNS_LIST, ENGINE, HealthReport, write_health
from mppproxy.db.traffic import HOUR, upsert_counts
from mppproxy.web.dashboard import age_text, configured_names, load

NS = "{http://www.w3.org/2000/svg}"


def _svgs(text: str) -> list[ET.Element]:
    """Every inline <svg> of a page, parsed on its own."""
    out = []
    start = text.find("<svg")
    while start != -1:
        end = text.index("</svg>", start) + len("</svg>")
        out.append(ET.fromstring(text[start:end]))
        start = text.find("<svg", end)
    return out


class DashboardTests(ConsoleCase):

    def state_engine(self) -> Engine:
        engine = make_engine(database_url(self.config.database, str(self.data)),
                             self.config.database)
        self.addCleanup(engine.dispose)
        create_missing(engine, StateTables().metadata.sorted_tables)
        return engine

    def fill(self) -> int:
        engine = self.state_engine()
        hour = int(time.time()) // HOUR * HOUR
        tables = StateTables()
        upsert_counts(engine, tables, "edge1", {
            (hour, "relayed", ""): 40, (hour, "refused", "greylisting"): 7,
            (hour - 5 * HOUR, "tagged", "scan:spamd"): 3,
            (hour - 3 * 24 * HOUR, "quarantined", "scan:clamd"): 2})
        upsert_counts(engine, tables, "edge<2>", {(hour, "relayed", ""): 10})
        write_health(engine, tables, "edge1", [
            HealthReport(ENGINE, "clamd", True, "ClamAV 1.4.6", time.time() - 7200),
            HealthReport(DNS_LIST, "zen", False, detail="last 3 lookups failed (timeout)")],
            time.time())
        return hour

    async def test_superadmin_sees_charts_totals_and_health(self) -> None:
        """A superadmin's dashboard shows the two charts as valid inline SVG,
        the totals of the last 24 hours, the top reasons and the health rows;
        the week adds the older hours; one node's view counts only its own."""
        self.fill()
        await self.start()
        browser = await self.logged_in(ROOT_NAME)
        page = await browser.get("/dashboard")
        self.assertEqual(page.code, 200, page.text[:500])
        hourly_svg, top_svg = _svgs(page.text)
        self.assertEqual(hourly_svg.get("role"), "img")
        desc = hourly_svg.find(f"{NS}desc").text or ""  # type: ignore[union-attr]
        self.assertTrue(desc.startswith("60 in all over 24 bars: relayed 50, tagged 3, "
                                        "refused 7"), desc)
        labels = [t.text for t in top_svg.iter(f"{NS}text")]
        self.assertIn("greylisting", labels)
        self.assertIn("scan:spamd", labels)
        self.assertNotIn("scan:clamd", labels)  # three days ago: not in the last 24 hours
        self.assertIn("<td>50</td>", page.text)
        self.assertIn("ClamAV 1.4.6", page.text)
        self.assertIn("2 h", page.text)  # the signatures' age
        self.assertIn('<strong class="error">down</strong>', page.text)
        self.assertIn("edge&lt;2&gt;", page.text)  # node names escaped, offered as a choice
        week = await browser.get("/dashboard?period=week")
        self.assertIn("scan:clamd", [t.text for t in _svgs(week.text)[1].iter(f"{NS}text")])
        one = await browser.get("/dashboard?period=day&node=edge%3C2%3E")
        desc = _svgs(one.text)[0].find(f"{NS}desc").text or ""  # type: ignore[union-attr]
        self.assertTrue(desc.startswith("10 in all"), desc)
        odd = await browser.get("/dashboard?period=<x>&node=nobody")
        self.assertEqual(odd.code, 200)
        self.assertIn("last 24 hours", odd.text)

    async def test_empty_database_and_who_may_see_it(self) -> None:
        """With nothing counted yet the page says so instead of failing; a
        domain admin gets "no such page" and a visitor the login page."""
        await self.start()
        root = await self.logged_in(ROOT_NAME)
        page = await root.get("/dashboard")
        self.assertEqual(page.code, 200)
        self.assertIn("no mail in this period", page.text)
        self.assertIn("no refused, held or tagged mail in this period", page.text)
        anna = await self.logged_in(ANNA)
        self.assertEqual((await anna.get("/dashboard")).code, 404)
        visitor = self.browser()
        page = await visitor.get("/dashboard")
        self.assertEqual((page.code, page.header("location")), (303, "/login"))
        self.assertEqual((await root.post("/dashboard", {})).code, 405)


def test_load_reports_an_unreadable_database() -> None:
    """A state database that cannot be reached gives the page's data with
    the reason (URL without its password), not an exception."""
    config = from_mapping({"database": {"url": "mysql+pymysql://u:secret@127.0.0.1:1/x"}})
    data = load(config.database, ".", time.time(), "day", None, [], [])
    assert "cannot be read" in data.error and "secret" not in data.error
    assert data.counts == {} and data.totals[0] == ("relayed", 0)


def test_configured_names_and_ages() -> None:
    """The engines of [scanners] and every policy's DNS lists are named;
    ages read as minutes, hours or days."""
    config: Any = from_mapping({
        "scanners": {"clamd": {"address": "unix:/run/clamd.sock"}},
        "policies": {"default": {"dnsbl": {"lists": [{"zone": "zen.example.org"}]}},
                     "other": {"domains": ["b.test"],
                               "dnsbl": {"lists": [{"zone": "dbl.example.org", "name": "dbl"}]}}}})
    assert configured_names(config) == (["clamd"], ["dbl", "zen.example.org"])
    assert (age_text(None), age_text(120), age_text(7200), age_text(3 * 86400 + 3600)) == (
        "", "2 min", "2 h", "3 d 1 h")
