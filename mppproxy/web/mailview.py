"""A safe text rendering of a stored message for the console's message
view (issue 13: "no remote content, no script, HTML shown as text").

Floor 3 (``mppproxy/web/``).  Nothing of the message is ever rendered by
the browser: this module turns it into plain strings (header fields, the
text of one body part, a list of the parts), and the template escapes
them (Jinja2 autoescape).  HTML is never sanitised into HTML: its text is
extracted (script and style contents dropped, tags removed) or its source
shown, both as text.  Control and bidirectional-override characters
become "?" so a hostile subject cannot disguise itself; every string is
bounded.
"""
from __future__ import annotations

import email.policy
import unicodedata
from dataclasses import dataclass
from email.message import EmailMessage, Message
from email.parser import BytesParser
from html.parser import HTMLParser
from typing import Optional

# Characters of body text shown (the raw download has the rest).
MAX_TEXT = 200_000
# Header fields shown, and characters of each.
MAX_FIELDS = 200
MAX_FIELD = 4000
MAX_PARTS = 100


def clean(text: str, keep_newlines: bool = False) -> str:
    """Controls, format characters (bidi overrides, zero-width joiners) and
    surrogates as "?"; tabs and, with ``keep_newlines``, line ends kept."""
    out = []
    for c in text:
        if c == "\t" or (keep_newlines and c == "\n"):
            out.append(c)
        elif c == "\r":
            continue
        elif unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
            out.append("?")
        else:
            out.append(c)
    return "".join(out)


class _TextOfHtml(HTMLParser):
    """The text of an HTML document: what a reader would see, as text;
    script, style and other non-text elements dropped."""

    SKIP = {"script", "style", "head", "title", "template", "noscript", "svg", "math",
            "iframe", "object"}
    BREAK = {"br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table",
             "blockquote", "pre", "hr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.size = 0
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        if tag in self.SKIP:
            self._skipping += 1
        elif tag in self.BREAK:
            self._add("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self.BREAK:
            self._add("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self._add(data)

    def _add(self, text: str) -> None:
        if self.size < MAX_TEXT:
            self.parts.append(text)
            self.size += len(text)


def html_to_text(html: str) -> str:
    parser = _TextOfHtml()
    parser.feed(html[:MAX_TEXT * 4])
    parser.close()
    lines = [" ".join(line.split()) for line in "".join(parser.parts).splitlines()]
    text, blank = [], False
    for line in lines:
        if line or not blank:
            text.append(line)
        blank = not line
    return "\n".join(text).strip()


@dataclass(frozen=True)
class Part:
    content_type: str
    filename: str
    size: int


@dataclass(frozen=True)
class MessageView:
    headers: tuple[tuple[str, str], ...]
    text: str
    # Where the text came from: "text/plain", "text/html, as text",
    # "text/html, source" or "" (no text part).
    text_source: str
    parts: tuple[Part, ...]
    truncated: bool


def _part_text(part: Message) -> str:
    try:
        content = part.get_content()  # type: ignore[attr-defined]  # EmailMessage under policy.default
        if isinstance(content, str):
            return content
    except (LookupError, ValueError, AssertionError, UnicodeError):
        pass  # an unknown charset, a broken transfer encoding: the bytes as they are
    payload = part.get_payload(decode=True)
    return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""


def view_message(raw: bytes, html_source: bool = False) -> MessageView:
    """The parts of ``raw`` a person may safely read (module docstring).
    ``html_source``: for an HTML-only message, its source instead of its
    text."""
    message: EmailMessage = BytesParser(policy=email.policy.default).parsebytes(raw)
    headers: list[tuple[str, str]] = []
    for name, value in message.raw_items():
        if len(headers) >= MAX_FIELDS:
            break
        try:
            shown = str(message.policy.header_fetch_parse(name, value))
        except Exception:  # any defect of a hostile header: show it as it came
            shown = str(value)
        headers.append((clean(str(name))[:200], clean(" ".join(shown.split()))[:MAX_FIELD]))
    plain: Optional[Message] = None
    html: Optional[Message] = None
    parts: list[Part] = []
    for part in message.walk():
        if part.is_multipart():
            continue
        kind = part.get_content_type()
        filename = part.get_filename() or ""
        payload = part.get_payload(decode=True)
        if len(parts) < MAX_PARTS:
            parts.append(Part(clean(kind)[:100], clean(str(filename))[:200],
                              len(payload) if isinstance(payload, bytes) else 0))
        attachment = part.get_content_disposition() == "attachment"
        if kind == "text/plain" and plain is None and not attachment:
            plain = part
        elif kind == "text/html" and html is None and not attachment:
            html = part
    if plain is not None:
        text, source = _part_text(plain), "text/plain"
    elif html is not None:
        source_text = _part_text(html)
        if html_source:
            text, source = source_text, "text/html, source"
        else:
            text, source = html_to_text(source_text), "text/html, as text"
    else:
        text, source = "", ""
    truncated = len(text) > MAX_TEXT
    return MessageView(tuple(headers), clean(text[:MAX_TEXT], keep_newlines=True), source,
                       tuple(parts), truncated)
