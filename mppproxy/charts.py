"""Charts drawn on the server as SVG, for the web console's dashboard
(issue 13): mail per hour stacked by disposition, and the top reasons.

Ground floor (docs/design.md, "Floors"): pure functions from numbers and
words to an SVG document, importing nothing of the product, so the console
(or a test) hands them plain data.  No JavaScript, no external fonts or
stylesheets: the page shows the ``<svg>`` inline or as an ``<img>``.

What every chart promises:

* valid, self-contained SVG 1.1 (``xml.etree`` parses it), the same bytes
  for the same input (no random ids, fixed number formatting);
* every text from the caller XML-escaped, and characters XML 1.0 cannot
  carry dropped;
* for screen readers: ``role="img"``, a ``<title>`` and a ``<desc>`` that
  says the totals in words, named by ``aria-labelledby``; each bar segment
  carries its own ``<title>`` (a tooltip for the mouse);
* colours of the Okabe-Ito palette, chosen to stay apart for the common
  colour-vision deficiencies, and never alone: a legend names each series,
  and segments are parted by a thin white line;
* an empty period draws the frame and says so ("no mail in this period"),
  never an error;
* ``fluid=True`` leaves out width and height, for an inline ``<svg>`` that
  follows its container's width.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

# Okabe & Ito, "Color Universal Design" (2008): distinguishable with
# protanopia, deuteranopia and tritanopia.
OKABE_ITO = {
    "green": "#009E73", "orange": "#E69F00", "blue": "#0072B2", "vermillion": "#D55E00",
    "purple": "#CC79A7", "sky": "#56B4E9", "yellow": "#F0E442", "grey": "#666666",
}
FONT = "font-family=\"sans-serif\""
TEXT_COLOUR = "#222222"
GRID_COLOUR = "#dddddd"
EMPTY_TEXT = "no mail in this period"
HOUR = 3600
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# XML 1.0 section 2.2: what a document may not contain at all.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


@dataclass(frozen=True)
class Series:
    """One stacked series (a disposition): its key in the data, the word
    the legend shows, and its fill colour."""

    key: str
    label: str
    colour: str


def escape(text: str) -> str:
    """``text`` safe in XML content and in a double-quoted attribute."""
    text = _NOT_XML.sub("", text)
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def _num(value: float) -> str:
    """A coordinate: at most one decimal, no "-0", no trailing ".0"."""
    text = f"{value:.1f}"
    if text.endswith(".0"):
        text = text[:-2]
    return "0" if text == "-0" else text


def _count(n: int) -> str:
    return f"{n:,}"


def nice_ticks(maximum: int, ticks: int = 5) -> list[int]:
    """Round tick values from 0 to at least ``maximum``: steps of 1, 2 or
    5 times a power of ten, about ``ticks`` of them (integers: counts)."""
    if maximum <= 0:
        return [0, 1]
    raw = maximum / ticks
    power = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    step = next((m * power for m in (1, 2, 5, 10) if m * power >= raw), 10 * power)
    step = max(1, int(step))
    top = -(-maximum // step) * step
    return list(range(0, top + 1, step))


def _svg_open(width: int, height: int, ident: str, title: str, desc: str,
              fluid: bool = False) -> list[str]:
    # fluid: no width and height, so an inline <svg> takes its container's
    # width and the viewBox's proportions (the console's page).
    size = "" if fluid else f'width="{width}" height="{height}" '
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" version="1.1" {size}'
        f'viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="{ident}-title {ident}-desc">',
        f'<title id="{ident}-title">{escape(title)}</title>',
        f'<desc id="{ident}-desc">{escape(desc)}</desc>',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="8" y="20" {FONT} font-size="14" font-weight="bold" '
        f'fill="{TEXT_COLOUR}">{escape(title)}</text>',
    ]


def _legend(series: Sequence[Series], x: float, y: float, width: float) -> list[str]:
    """Swatch and word per series, left to right, wrapping at ``width``."""
    out = ['<g aria-hidden="true">']
    cx, cy = x, y
    for s in series:
        item = 18 + 7 * len(s.label) + 14
        if cx + item > x + width and cx > x:
            cx, cy = x, cy + 16
        out.append(f'<rect x="{_num(cx)}" y="{_num(cy - 9)}" width="10" height="10" '
                   f'fill="{escape(s.colour)}"/>')
        out.append(f'<text x="{_num(cx + 14)}" y="{_num(cy)}" {FONT} font-size="11" '
                   f'fill="{TEXT_COLOUR}">{escape(s.label)}</text>')
        cx += item
    out.append("</g>")
    return out


def _empty(out: list[str], x0: float, y0: float, x1: float, y1: float, text: str) -> None:
    out.append(f'<rect x="{_num(x0)}" y="{_num(y0)}" width="{_num(x1 - x0)}" '
               f'height="{_num(y1 - y0)}" fill="none" stroke="{GRID_COLOUR}"/>')
    out.append(f'<text x="{_num((x0 + x1) / 2)}" y="{_num((y0 + y1) / 2)}" {FONT} '
               f'font-size="13" text-anchor="middle" fill="{TEXT_COLOUR}">{escape(text)}</text>')


@dataclass(frozen=True)
class Bar:
    """One bar of a stacked chart: its values by series key, the text of
    its tooltip, and an x-axis label to draw at its left edge ("" none;
    ``sublabel`` a second line)."""

    values: Mapping[str, int]
    tooltip: str
    label: str = ""
    sublabel: str = ""


def stacked_bars(bars: Sequence[Bar], series: Sequence[Series], *, title: str,
                 ident: str = "chart", width: int = 720, height: int = 300,
                 y_title: str = "transactions per hour", x_title: str = "",
                 empty: str = EMPTY_TEXT, fluid: bool = False) -> str:
    """A vertical stacked bar chart: one bar per entry of ``bars``, its
    segments in the order of ``series`` from the bottom.  ``ident`` makes
    the element ids (unique within the page)."""
    ident = re.sub(r"[^A-Za-z0-9_-]", "_", ident) or "chart"
    totals = {s.key: sum(b.values.get(s.key, 0) for b in bars) for s in series}
    grand = sum(totals.values())
    if grand:
        parts = ", ".join(f"{s.label} {_count(totals[s.key])}" for s in series if totals[s.key])
        desc = f"{_count(grand)} in all over {len(bars)} bars: {parts}."
    else:
        desc = f"{empty}."
    out = _svg_open(width, height, ident, title, desc, fluid)
    left, right, top, bottom = 64.0, 12.0, 34.0, 78.0
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    if not grand or not bars:
        _empty(out, x0, y0, x1, y1, empty)
        out += _legend(series, x0, height - 14, x1 - x0)
        out.append("</svg>")
        return "\n".join(out) + "\n"
    highest = max(sum(b.values.get(s.key, 0) for s in series) for b in bars)
    ticks = nice_ticks(highest)
    scale = (y1 - y0) / ticks[-1]
    # The y axis: grid lines at round values.
    out.append('<g aria-hidden="true">')
    for t in ticks:
        y = y1 - t * scale
        out.append(f'<line x1="{_num(x0)}" y1="{_num(y)}" x2="{_num(x1)}" y2="{_num(y)}" '
                   f'stroke="{GRID_COLOUR}" stroke-width="1"/>')
        out.append(f'<text x="{_num(x0 - 6)}" y="{_num(y + 4)}" {FONT} font-size="11" '
                   f'text-anchor="end" fill="{TEXT_COLOUR}">{_count(t)}</text>')
    if y_title:
        cy = (y0 + y1) / 2
        out.append(f'<text x="14" y="{_num(cy)}" {FONT} font-size="11" text-anchor="middle" '
                   f'transform="rotate(-90 14 {_num(cy)})" fill="{TEXT_COLOUR}">'
                   f'{escape(y_title)}</text>')
    out.append("</g>")
    step = (x1 - x0) / len(bars)
    gap = step * 0.15 if step >= 4 else 0.0
    # The bars, each a group with its tooltip.
    for i, bar in enumerate(bars):
        bx = x0 + i * step
        base = y1
        total = sum(bar.values.get(s.key, 0) for s in series)
        if total:
            out.append(f'<g><title>{escape(bar.tooltip)}</title>')
            for s in series:
                n = bar.values.get(s.key, 0)
                if n <= 0:
                    continue
                h = n * scale
                out.append(f'<rect x="{_num(bx + gap / 2)}" y="{_num(base - h)}" '
                           f'width="{_num(step - gap)}" height="{_num(h)}" '
                           f'fill="{escape(s.colour)}" stroke="#ffffff" stroke-width="0.5"/>')
                base -= h
            out.append("</g>")
    # The x axis: labels at the bars' left edges.
    out.append('<g aria-hidden="true">')
    out.append(f'<line x1="{_num(x0)}" y1="{_num(y1)}" x2="{_num(x1)}" y2="{_num(y1)}" '
               f'stroke="{TEXT_COLOUR}" stroke-width="1"/>')
    for i, bar in enumerate(bars):
        if not bar.label:
            continue
        bx = x0 + i * step
        out.append(f'<line x1="{_num(bx)}" y1="{_num(y1)}" x2="{_num(bx)}" '
                   f'y2="{_num(y1 + 4)}" stroke="{TEXT_COLOUR}" stroke-width="1"/>')
        out.append(f'<text x="{_num(bx)}" y="{_num(y1 + 16)}" {FONT} font-size="11" '
                   f'text-anchor="middle" fill="{TEXT_COLOUR}">{escape(bar.label)}</text>')
        if bar.sublabel:
            out.append(f'<text x="{_num(bx)}" y="{_num(y1 + 29)}" {FONT} font-size="10" '
                       f'text-anchor="middle" fill="{TEXT_COLOUR}">{escape(bar.sublabel)}</text>')
    if x_title:
        out.append(f'<text x="{_num(x1)}" y="{_num(y1 + 44)}" {FONT} font-size="11" '
                   f'text-anchor="end" fill="{TEXT_COLOUR}">{escape(x_title)}</text>')
    out.append("</g>")
    out += _legend(series, x0, height - 14, x1 - x0)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _utc(hour: int) -> time.struct_time:
    return time.gmtime(hour)


def _date(t: time.struct_time) -> str:
    # Our own names: strftime's %a and %b follow the process's locale.
    return f"{_DAYS[t.tm_wday]} {t.tm_mday} {_MONTHS[t.tm_mon - 1]}"


def mail_per_hour(counts: Mapping[int, Mapping[str, int]], start_hour: int, hours: int,
                  series: Sequence[Series], *, title: str, ident: str = "hours",
                  width: int = 720, height: int = 300, empty: str = EMPTY_TEXT,
                  fluid: bool = False) -> str:
    """Transactions per UTC hour from ``start_hour`` (Unix seconds, rounded
    down to the hour) for ``hours`` bars, stacked by ``series``.
    ``counts``: {hour: {series key: count}} (``db/traffic.per_hour``).
    Up to two days are labelled every three hours ("15:00", the date under
    midnight); longer periods at each midnight ("Mon 6 May")."""
    start = int(start_hour) // HOUR * HOUR
    labels = _hour_labels if hours <= 48 else _day_labels
    bars = []
    for i in range(max(0, hours)):
        hour = start + i * HOUR
        values = counts.get(hour, {})
        label, sublabel = labels(_utc(hour))
        t = _utc(hour)
        when = f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d} {t.tm_hour:02d}:00 UTC"
        parts = ", ".join(f"{s.label} {_count(values.get(s.key, 0))}" for s in series
                          if values.get(s.key, 0))
        bars.append(Bar(values, f"{when}: {parts or 'none'}", label, sublabel))
    if hours > 0:
        first, last = _utc(start), _utc(start + (hours - 1) * HOUR)
        span = (f"{_date(first)} {first.tm_hour:02d}:00 to {_date(last)} "
                f"{last.tm_hour:02d}:59 UTC")
    else:
        span = ""
    return stacked_bars(bars, series, title=title, ident=ident, width=width, height=height,
                        x_title=f"hour (UTC), {span}" if span else "hour (UTC)", empty=empty,
                        fluid=fluid)


def _hour_labels(t: time.struct_time) -> tuple[str, str]:
    if t.tm_hour % 3:
        return "", ""
    return f"{t.tm_hour:02d}:00", (_date(t) if t.tm_hour == 0 else "")


def _day_labels(t: time.struct_time) -> tuple[str, str]:
    if t.tm_hour:
        return "", ""
    return _date(t), ""


def horizontal_bars(rows: Sequence[tuple[str, str, int]], series: Sequence[Series], *,
                    title: str, ident: str = "reasons", width: int = 720,
                    empty: str = EMPTY_TEXT, label_chars: int = 32, fluid: bool = False) -> str:
    """One horizontal bar per ``(label, series key, count)`` row, in the
    order given (most first), coloured by its series; the count at its
    end.  The legend shows the series that occur."""
    ident = re.sub(r"[^A-Za-z0-9_-]", "_", ident) or "chart"
    colours = {s.key: s for s in series}
    used = [s for s in series if any(key == s.key for _, key, _ in rows)]
    row_h, top, bottom = 22.0, 34.0, 34.0
    height = int(top + max(len(rows), 3) * row_h + bottom)
    total = sum(n for _, _, n in rows)
    if rows and total:
        desc = "; ".join(f"{label} ({colours[key].label if key in colours else key}): "
                         f"{_count(n)}" for label, key, n in rows) + "."
    else:
        desc = f"{empty}."
    out = _svg_open(width, height, ident, title, desc, fluid)
    x0, x1 = 8.0 + 7 * label_chars * 0.9, width - 64.0
    y0, y1 = top, height - bottom
    if not rows or not total:
        _empty(out, 8.0, y0, width - 12.0, y1, empty)
        out.append("</svg>")
        return "\n".join(out) + "\n"
    highest = max(n for _, _, n in rows)
    scale = (x1 - x0) / highest
    for i, (label, key, n) in enumerate(rows):
        s = colours.get(key, Series(key, key, OKABE_ITO["grey"]))
        y = y0 + i * row_h
        shown = label if len(label) <= label_chars else label[:label_chars - 1] + "\u2026"
        w = max(1.0, n * scale) if n > 0 else 0.0
        out.append(f'<g><title>{escape(label)} ({escape(s.label)}): {_count(n)}</title>')
        out.append(f'<text x="{_num(x0 - 6)}" y="{_num(y + 15)}" {FONT} font-size="11" '
                   f'text-anchor="end" fill="{TEXT_COLOUR}">{escape(shown)}</text>')
        out.append(f'<rect x="{_num(x0)}" y="{_num(y + 4)}" width="{_num(w)}" '
                   f'height="{_num(row_h - 8)}" fill="{escape(s.colour)}"/>')
        out.append(f'<text x="{_num(x0 + w + 4)}" y="{_num(y + 15)}" {FONT} font-size="11" '
                   f'fill="{TEXT_COLOUR}">{_count(n)}</text>')
        out.append("</g>")
    out += _legend(used, x0, height - 12, x1 - x0)
    out.append("</svg>")
    return "\n".join(out) + "\n"

