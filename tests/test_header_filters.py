"""The ``headers`` scanner (issue #5): header, charset and country rules."""
from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mppproxy.results import HardAction
from mppproxy.scan.base import ScanInput, ScannerUnavailable
from mppproxy.config.scan import HeaderFilterConfig, HeaderRule
from mppproxy.scan.mime import parse_message
from mppproxy.scan.scanners.headers import HeaderFilterScanner
from mppproxy.templates import REFUSALS

from mmdb import write_mmdb


def run(coro):
    d = Deferred.fromCoroutine(coro)
    out = []
    d.addBoth(out.append)
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def msg(*lines: str | bytes) -> bytes:
    return b"".join((line.encode() if isinstance(line, str) else line) + b"\r\n" for line in lines)


def scan(rules, data: bytes, client_ip: str = "192.0.2.1", parsed: bool = True, **kw):
    scanner = HeaderFilterScanner(HeaderFilterConfig(rules=tuple(rules), **kw), Clock())
    inp = ScanInput(chunks=lambda: iter([data]), size=len(data), client_ip=client_ip,
                    parsed=parse_message([data], smtputf8=True) if parsed else None)
    return run(scanner.scan(inp))


SPAM = msg("From: =?utf-8?b?VmlhZ3JhIFNob3A=?= <shop@example.com>", "To: you@example.net",
           "Subject: =?koi8-r?b?8NLPxM/M1sXOycU=?=", "X-Mailer: The Bat! (v3.0)",
           "Message-ID: <1234@localhost>", "MIME-Version: 1.0",
           "Content-Type: multipart/alternative; boundary=B", "", "--B",
           "Content-Type: text/plain; charset=\"GB2312\"", "", "hi", "--B",
           "Content-Type: text/html; charset=utf-8", "", "<p>hi</p>", "--B--")


@pytest.mark.parametrize("rule, hit", [
    (HeaderRule(header="Subject", pattern="продолжение"), True),    # koi8-r encoded word, decoded
    (HeaderRule(header="From", pattern=r"viagra"), True),           # base64 word, any case
    (HeaderRule(header="from", pattern=r"^viagra shop <"), True),   # field name in any case
    (HeaderRule(header="X-Mailer", pattern=r"^The Bat!"), True),
    (HeaderRule(header="User-Agent", pattern=r"."), False),         # absent field
    (HeaderRule(header="Message-ID", pattern=r"@localhost>$"), True),
    (HeaderRule(header="Content-Type", pattern=r"multipart/alternative"), True),
    (HeaderRule(kind="charset", pattern=r"^gb2312$"), True),        # a text part's charset
    (HeaderRule(kind="charset", pattern=r"^koi8-r$"), True),        # an encoded word's charset
    (HeaderRule(kind="charset", pattern=r"^big5$"), False),
])
def test_rule_matches(rule, hit):
    """Each kind of rule matches what it names, decoded, case-insensitively."""
    result = scan([rule], SPAM)
    assert result.hit is hit
    if hit:
        assert result.score == 1.0 and result.action is None


def test_scores_add_and_reject_wins():
    """Scores of matching rules add up; a rule with "reject" refuses with the
    "content" template (550 5.7.1), and beats "tempfail"."""
    rules = [HeaderRule(header="Subject", pattern="продолжение", action="score:2.5", name="ru-subject"),
             HeaderRule(kind="charset", pattern="gb2312", action="score:1.5"),
             HeaderRule(header="X-Mailer", pattern="Bat", action="tempfail")]
    result = scan(rules, SPAM)
    assert (result.score, result.reasons) == (4.0, ("ru-subject", "charset", "header:x-mailer"))
    assert (result.action, result.template) == (HardAction.TEMPFAIL, "tempfail")
    result = scan(rules + [HeaderRule(header="Message-ID", pattern="localhost", action="reject")], SPAM)
    assert (result.action, result.template) == (HardAction.REJECT, "content")
    assert REFUSALS["content"] == (550, "5.7.1")


def test_raw_utf8_header_is_matched_as_text():
    """A raw UTF-8 Subject (SMTPUTF8) is matched as the text it spells."""
    data = msg("From: a@example.com", "Subject: Gr\u00fc\u00dfe".encode(), "", "x")
    assert scan([HeaderRule(header="Subject", pattern="grüße")], data).hit


def test_runs_without_a_parsed_message():
    """Run alone (no MIME scanner before it) it parses the message itself."""
    assert scan([HeaderRule(header="X-Mailer", pattern="Bat")], SPAM, parsed=False).hit


def test_no_rules_no_work():
    """Without rules (or disabled) it scores nothing."""
    assert not scan([], SPAM).hit
    assert not scan([HeaderRule(header="Subject", pattern=".")], SPAM, enabled=False).hit


@pytest.fixture
def geoip(tmp_path):
    path = tmp_path / "country.mmdb"
    write_mmdb(str(path), {"192.0.2.0/24": {"country": {"iso_code": "CN"}},
                           "198.51.100.0/24": {"registered_country": {"iso_code": "RU"}},
                           "203.0.113.0/24": {"country": {"iso_code": "DE"}}})
    return str(path)


@pytest.mark.parametrize("client_ip, hit", [
    ("192.0.2.9", True),          # country
    ("198.51.100.200", True),     # only the registered country is known
    ("::ffff:192.0.2.9", True),   # IPv4-mapped IPv6
    ("203.0.113.5", False),       # another country
    ("233.252.0.1", False),       # not in the database
    ("2001:db8::1", False),       # IPv6 in an IPv4-only database
    ("", False),
    ("not-an-ip", False),
])
def test_country_rules(geoip, client_ip, hit):
    """A country rule matches the client address's ISO country code from
    the MaxMind DB file."""
    rule = HeaderRule(kind="country", pattern="^(CN|RU)$", action="score:3")
    result = scan([rule], SPAM, client_ip=client_ip, geoip_database=geoip)
    assert result.hit is hit
    if hit:
        assert result.score == 3 and result.reasons == ("country",)


def test_country_rules_without_database_never_match():
    """Without a database the country rules do not match (and open nothing)."""
    assert not scan([HeaderRule(kind="country", pattern=".")], SPAM).hit


def test_unreadable_database_makes_the_scanner_unavailable(tmp_path):
    """A configured database that cannot be opened is a scanner failure,
    loud (docs/design.md promise 4), not a silent miss."""
    bad = tmp_path / "bad.mmdb"
    bad.write_bytes(b"not a database")
    for path in (str(bad), str(tmp_path / "missing.mmdb")):
        with pytest.raises(ScannerUnavailable):
            scan([HeaderRule(kind="country", pattern=".")], SPAM, geoip_database=path)


def test_odd_headers_do_not_crash_the_rules():
    """Broken encoded words, undecodable bytes and unparseable addresses are
    matched as best they can be, never raise."""
    data = msg(b"From: =?utf-8?b?!!!?= <a@@b> \xff\xfe", b"Subject: =?x-unknown?q?caf=E9?= \xe9t\xe9",
               "Content-Type: text/plain; charset=\"", "", "x")
    rules = [HeaderRule(header="From", pattern="a@@b"), HeaderRule(header="Subject", pattern="caf"),
             HeaderRule(kind="charset", pattern=".")]
    result = scan(rules, data)
    assert "header:from" in result.reasons and "header:subject" in result.reasons
