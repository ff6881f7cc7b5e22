"""Scanner ``headers``: header content rules (issue #5).

Stage: post-DATA, after the MIME checks, whose parsed message it reads
(``ScanInput.parsed``; it parses within the default bounds itself when run
alone).  Each rule of ``HeaderFilterConfig.rules`` searches its regular
expression, case-insensitively, in:

- ``header``: every occurrence of one field of the message's header, as
  text: RFC 2047 encoded words decoded, raw UTF-8 read as such;
- ``charset``: the charset of every text/* part (and the message's own
  Content-Type), and the charsets named by encoded words in the header;
- ``country``: the ISO 3166 code of the client address's country, looked up
  in a MaxMind DB file (``geoip_database``) with ``maxminddb``.

Each rule that matches adds its score or asks for its hard action; the
strongest action wins (reject over tempfail).  A configured database that
cannot be opened makes the scanner unavailable (docs/design.md promise 4: the
engine's failure action, tempfail by default), it never silently stops the
country rules.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Optional

from mppproxy.results import CheckResult, HardAction
from mppproxy.scan.base import Scanner, ScanInput, ScannerUnavailable
from mppproxy.config.scan import HeaderFilterConfig, HeaderRule, MimeCheckConfig, parse_action
from mppproxy.scan.hits import combine
from mppproxy.scan.mime import header_values, parse_scan_input, walk_parts

_ENCODED_WORD_CHARSET = re.compile(r"=\?([^?*\s]+)(?:\*[^?]*)?\?[bBqQ]\?")


@dataclass(frozen=True)
class _Rule:
    rule: HeaderRule
    regex: re.Pattern[str]
    action: Optional[HardAction]
    score: float
    label: str


def charsets(root: Any) -> list[str]:
    """Charsets of the text parts, the message's Content-Type and the
    encoded words of the message's header, lower case, each once."""
    found: dict[str, None] = {}
    for part in walk_parts(root):
        if part is root or part.get_content_maintype() == "text":
            for value in header_values(part, "content-type"):
                match = re.search(r"charset\s*=\s*\"?([^\";\s]+)", value, re.I)
                if match:
                    found[match.group(1).lower()] = None
    for _, value in root.raw_items():
        for match in _ENCODED_WORD_CHARSET.finditer(str(value)):
            found[match.group(1).lower()] = None
    return list(found)


def country_code(record: Any) -> str:
    """The ISO code from a GeoIP2/GeoLite2 or DB-IP country record."""
    if not isinstance(record, dict):
        return ""
    for key in ("country", "registered_country"):
        entry = record.get(key)
        if isinstance(entry, dict):
            iso_code = entry.get("iso_code")
            if isinstance(iso_code, str):
                return iso_code
    code = record.get("country_code")
    return code if isinstance(code, str) else ""


class HeaderFilterScanner(Scanner):
    """Header, charset and country rules with scores or hard actions."""

    name = "headers"
    settings: HeaderFilterConfig

    def __init__(self, settings: Optional[HeaderFilterConfig] = None, reactor: Any = None,
                 mime_limits: Optional[MimeCheckConfig] = None):
        super().__init__(settings or HeaderFilterConfig(), reactor)
        self._mime_limits = mime_limits
        self._rules = []
        for rule in self.settings.rules:
            action, score = parse_action(rule.action)
            label = rule.name or (f"header:{rule.header.lower()}" if rule.kind == "header" else rule.kind)
            self._rules.append(_Rule(rule, re.compile(rule.pattern, re.I), action, score, label))
        self._reader: Any = None

    def _database(self) -> Any:
        # Opened on first use, not in the constructor (no I/O there).
        if self._reader is None:
            import maxminddb

            try:
                self._reader = maxminddb.open_database(self.settings.geoip_database)
            except (OSError, ValueError, maxminddb.InvalidDatabaseError) as e:
                raise ScannerUnavailable(self.name, f"geoip database {self.settings.geoip_database}:"
                                         f" {e}") from e
        return self._reader

    def country(self, client_ip: str) -> str:
        """The client's country code, "" when unknown or not configured."""
        if not self.settings.geoip_database or not client_ip:
            return ""
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            return ""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        reader = self._database()
        try:
            return country_code(reader.get(address))
        except ValueError:
            # an IPv6 address in an IPv4-only database
            return ""

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    async def scan(self, message: ScanInput) -> CheckResult:
        if not self.settings.enabled or not self._rules:
            return CheckResult()
        root = parse_scan_input(message, self._mime_limits).message
        cache: dict[str, list[str]] = {}
        hits = []
        for r in self._rules:
            kind = r.rule.kind
            if kind == "header":
                key = "h:" + r.rule.header.lower()
                if key not in cache:
                    cache[key] = header_values(root, r.rule.header) if root is not None else []
            elif kind == "charset":
                key = "charset"
                if key not in cache:
                    cache[key] = charsets(root) if root is not None else []
            else:
                key = "country"
                if key not in cache:
                    code = self.country(message.client_ip)
                    cache[key] = [code] if code else []
            if any(r.regex.search(value) for value in cache[key]):
                hits.append((r.label, r.action, r.score))
        return combine(hits, "content")
