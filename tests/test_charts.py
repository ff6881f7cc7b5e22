"""The dashboard's SVG charts (``mppproxy.charts``): valid and
deterministic SVG, escaped text, accessible titles, round y ticks,
sensible hour and day labels, and a chart that says so when there is no
mail."""
from __future__ import annotations

import xml.etree.ElementTree as ET

from mppproxy.charts import (EMPTY_TEXT, OKABE_ITO, Bar, Series, escape, horizontal_bars,
                             mail_per_hour, nice_ticks, stacked_bars)

NS = "{http://www.w3.org/2000/svg}"
# Tue 14 Nov 2023 22:00 UTC.
H0 = 1_700_000_000 // 3600 * 3600
SERIES = [Series("relayed", "relayed", OKABE_ITO["green"]),
          Series("tagged", "tagged", OKABE_ITO["orange"]),
          Series("refused", "refused", OKABE_ITO["vermillion"])]


def _texts(svg: str) -> list[str]:
    root = ET.fromstring(svg)
    return [t.text or "" for t in root.iter(f"{NS}text")]


def _bars(svg: str) -> list[ET.Element]:
    root = ET.fromstring(svg)
    return [r for r in root.iter(f"{NS}rect") if r.get("fill") not in ("#ffffff", "none")
            and r.get("width") != "10"]


def test_nice_ticks_are_round() -> None:
    """Ticks step by 1, 2 or 5 times a power of ten and reach the maximum."""
    assert nice_ticks(0) == [0, 1]
    assert nice_ticks(3) == [0, 1, 2, 3]
    assert nice_ticks(7) == [0, 2, 4, 6, 8]
    assert nice_ticks(1234) == [0, 500, 1000, 1500]
    assert nice_ticks(100) == [0, 20, 40, 60, 80, 100]


def test_day_chart_is_valid_accessible_and_deterministic() -> None:
    """24 hourly bars: parsed by xml.etree, role img with title and desc
    named by aria-labelledby, labels every three hours with the date under
    midnight, a tooltip per bar, and the same bytes twice."""
    counts = {H0 + i * 3600: {"relayed": i * 10, "refused": i} for i in range(24)}
    svg = mail_per_hour(counts, H0 + 1800, 24, SERIES, title="Mail, last 24 hours", ident="day")
    assert svg == mail_per_hour(counts, H0 + 1800, 24, SERIES, title="Mail, last 24 hours",
                                ident="day")
    root = ET.fromstring(svg)
    assert root.tag == f"{NS}svg" and root.get("role") == "img"
    assert root.get("aria-labelledby") == "day-title day-desc"
    assert root.find(f"{NS}title").text == "Mail, last 24 hours"  # type: ignore[union-attr]
    desc = root.find(f"{NS}desc").text or ""  # type: ignore[union-attr]
    assert desc.startswith("3,036 in all over 24 bars: relayed 2,760, refused 276")
    texts = _texts(svg)
    assert [t for t in texts if t.endswith(":00")] == [
        "00:00", "03:00", "06:00", "09:00", "12:00", "15:00", "18:00", "21:00"]
    assert "Wed 15 Nov" in texts
    assert "hour (UTC), Tue 14 Nov 22:00 to Wed 15 Nov 21:59 UTC" in texts
    tips = [t.text for t in root.iter(f"{NS}title")][1:]
    assert tips[0] == "2023-11-14 23:00 UTC: relayed 10, refused 1"
    assert len(tips) == 23  # the first hour had no mail: no bar
    # The y axis ends on a round value above the tallest bar (253).
    assert [t for t in texts if t.isdigit()][:4] == ["0", "100", "200", "300"]


def test_week_chart_labels_each_midnight() -> None:
    """168 bars labelled at each UTC midnight with weekday, day and month."""
    counts = {H0 + i * 3600: {"tagged": 1} for i in range(168)}
    svg = mail_per_hour(counts, H0, 168, SERIES, title="Mail, last 7 days", ident="week")
    labels = [t for t in _texts(svg) if t[:3] in ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat",
                                                  "Sun")]
    assert labels == ["Wed 15 Nov", "Thu 16 Nov", "Fri 17 Nov", "Sat 18 Nov", "Sun 19 Nov",
                      "Mon 20 Nov", "Tue 21 Nov"]
    assert len(_bars(svg)) == 168


def test_empty_period_says_no_mail() -> None:
    """No counts at all (or only zeros) draws the frame and the words, not an error."""
    for counts in ({}, {H0: {"relayed": 0}}):
        svg = mail_per_hour(counts, H0, 24, SERIES, title="Mail")
        assert EMPTY_TEXT in _texts(svg)
        assert _bars(svg) == []
    svg = horizontal_bars([], SERIES, title="Top reasons")
    assert EMPTY_TEXT in _texts(svg)
    assert EMPTY_TEXT in (ET.fromstring(svg).find(f"{NS}desc").text or "")  # type: ignore[union-attr]
    assert EMPTY_TEXT in _texts(stacked_bars([], SERIES, title="none"))


def test_every_text_is_escaped() -> None:
    """Markup, quotes and characters XML cannot carry in labels, titles and
    reasons come out as text, and the document still parses."""
    nasty = 'a<b>&"c"\x00\x1b</svg><script>x</script>'
    series = [Series("relayed", nasty, '"><script>')]
    svg = mail_per_hour({H0: {"relayed": 3}}, H0, 2, series, title=nasty, ident='x" onload="y')
    root = ET.fromstring(svg)
    assert "<script>" not in svg and "\x00" not in svg and "\x1b" not in svg
    assert root.get("aria-labelledby") == "x__onload__y-title x__onload__y-desc"
    assert root.find(f"{NS}title").text == 'a<b>&"c"</svg><script>x</script>'  # type: ignore[union-attr]
    svg = horizontal_bars([(nasty, "relayed", 5)], series, title="Top")
    assert "<script>" not in svg
    ET.fromstring(svg)
    assert escape('<&>"') == "&lt;&amp;&gt;&quot;"


def test_top_reasons_bars_in_order_with_counts() -> None:
    """One bar per reason in the given order, widths in proportion, the
    count at each end, long names cut, the legend naming the dispositions used."""
    rows = [("greylisting", "refused", 120), ("spamd", "tagged", 30),
            ("a-very-long-reason-name-that-goes-on-and-on", "refused", 12)]
    svg = horizontal_bars(rows, SERIES, title="Top reasons", ident="top")
    bars = _bars(svg)
    widths = [float(b.get("width", "0")) for b in bars]
    assert widths[0] > widths[1] > widths[2] and abs(widths[0] / widths[1] - 4) < 0.05
    texts = _texts(svg)
    assert ["120", "30", "12"] == [t for t in texts if t.isdigit()]
    assert "a-very-long-reason-name-that-go\u2026" in texts
    assert "relayed" not in texts and "tagged" in texts and "refused" in texts
    assert svg == horizontal_bars(rows, SERIES, title="Top reasons", ident="top")


def test_stacked_bars_stack_in_series_order() -> None:
    """Segments of a bar stack bottom-up in the series' order, heights in
    proportion to the values."""
    svg = stacked_bars([Bar({"relayed": 30, "refused": 10}, "one", "x")], SERIES, title="t")
    relayed, refused = _bars(svg)
    assert relayed.get("fill") == OKABE_ITO["green"] and refused.get("fill") == OKABE_ITO["vermillion"]
    assert float(relayed.get("y", "0")) > float(refused.get("y", "0"))
    assert abs(float(relayed.get("height", "0")) / float(refused.get("height", "0")) - 3) < 0.05


def test_fluid_charts_leave_the_size_to_the_page() -> None:
    """fluid=True keeps the viewBox and leaves out width and height."""
    root = ET.fromstring(mail_per_hour({H0: {"relayed": 1}}, H0, 24, SERIES, title="t",
                                       width=1000, fluid=True))
    assert root.get("viewBox") == "0 0 1000 300"
    assert root.get("width") is None and root.get("height") is None
    root = ET.fromstring(horizontal_bars([("a", "relayed", 1)], SERIES, title="t", fluid=True))
    assert root.get("width") is None and root.get("viewBox", "").startswith("0 0 720 ")
