"""The cheap reading of header fields (mppproxy/scan/fields.py): a plain
field is one the strict header parser finds nothing wrong with and reads
as the same text; the parse with the cheap way finds exactly the defects
and the structure of the strict way, on every field."""
from __future__ import annotations

import email.parser
import email.policy
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mppproxy.scan import fields, mime
from mppproxy.config.scan import AttachmentConfig, AttachmentRule, MimeCheckConfig
from mppproxy.scan.fields import SCAN_POLICY, STRICT, PlainField, field_kind, is_clean
from mppproxy.scan.mime import header_values, parse_message, walk_parts
from mppproxy.scan.scanners.attachments import AttachmentScanner
from mppproxy.scan.base import ScanInput

from test_mime import CORPUS, DEFECT_CASES, crlf, msg, run

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

# Strategies that build values of the plain grammar (fields.py), piece by
# piece: hypothesis' from_regex is slow on grammars this size.
ATEXT = st.text("abcXYZ019!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=5)
DOT_ATOM = st.lists(ATEXT, min_size=1, max_size=3).map(".".join)
ADDR_SPEC = st.builds("{}@{}".format, DOT_ATOM, DOT_ATOM)
QUOTED = st.text(" !#$%&'()*+,-./09:;<=>?@AZ[]^_`az{|}~", min_size=1, max_size=8).map('"{}"'.format)
PHRASE = st.one_of(st.lists(ATEXT, min_size=1, max_size=3).map(" ".join), QUOTED)
MAILBOX = st.one_of(ADDR_SPEC, ADDR_SPEC.map("<{}>".format),
                    st.builds("{}{}<{}>".format, PHRASE, st.sampled_from(["", " "]), ADDR_SPEC))
ADDRESS_LIST = st.builds(lambda boxes, sep: sep.join(boxes), st.lists(MAILBOX, min_size=1, max_size=3),
                         st.sampled_from([",", ", "]))
TOKEN = st.text("abcXYZ019!#$&+-.^_`{|}~", min_size=1, max_size=6)
PARAM = st.builds("{}{}={}".format, st.sampled_from([";", "; ", ";\t", ";  "]), TOKEN,
                  st.one_of(TOKEN, QUOTED))
PARAMS = st.lists(PARAM, max_size=3).map("".join)
GRAMMARS = {
    "Content-Type": st.builds("{}/{}{}".format, TOKEN, TOKEN, PARAMS),
    "Content-Disposition": st.builds("{}{}".format, TOKEN, PARAMS),
    "Content-Transfer-Encoding": st.from_regex(fields._CTE, fullmatch=True),
    "From": ADDRESS_LIST,
    "Sender": ADDRESS_LIST,
    "Message-ID": st.builds("<{}@{}>".format, DOT_ATOM, DOT_ATOM),
    "MIME-Version": st.just("1.0"),
    "Subject": st.text("".join(map(chr, range(0x20, 0x7f))) + "\t", max_size=40),
    "X-Mailer": st.text("".join(map(chr, range(0x20, 0x7f))) + "\t", max_size=40),
}


@pytest.mark.parametrize("name", sorted(GRAMMARS))
def test_plain_values_are_what_the_strict_parser_says(name):
    """Any value of the plain grammar that is_clean() accepts has no defect
    under the strict parser, and the policy gives the strict header's text."""

    tried, clean = [], []

    @SETTINGS
    @given(GRAMMARS[name])
    def check(value):
        tried.append(value)
        if not is_clean(name, value):
            return
        clean.append(value)
        strict = STRICT.header_fetch_parse(name, value)
        assert strict.defects == ()
        assert str(SCAN_POLICY.header_fetch_parse(name, value)) == str(strict)

    check()
    assert 2 * len(clean) >= len(tried), "the strategy must mostly build plain values"


@pytest.mark.parametrize("name, value, clean", [
    ("Content-Type", "text/plain; charset=us-ascii", True),
    ("Content-Type", "multipart/mixed;\tboundary=\"=_a b\"", True),
    ("Content-Type", "text/plain; charset=\"=?utf-8?q?x?=\"", False),   # encoded word
    ("Content-Type", "text/plain; charset=a; charset=b", False),        # repeated
    ("Content-Type", "text/plain (comment)", False),
    ("Content-Disposition", "attachment; filename*=utf-8''a%2Eexe", False),  # RFC 2231
    ("From", "Sender 0 <sender0@example.com>", True),
    ("From", "\"Doe, John\" <j@example.com>, k@example.com", True),
    ("From", "John Q. Public <j@example.com>", False),                 # obs-phrase
    ("From", "a@b@c", False),
    ("From", "<a@example.com", False),
    ("To", "undisclosed-recipients:;", False),
    ("Date", "Mon, 06 May 2024 08:00:00 +0000", True),
    ("Date", "Fri, 30 Feb 2024 08:00:00 +0000", False),                 # no such day
    ("Date", "", False),
    ("Message-ID", "<bench.0000.ham@example.com>", True),
    ("Message-ID", "<no-at-sign>", False),
    ("MIME-Version", "1.0", True),
    ("MIME-Version", "1.0 (produced by x)", False),
    ("Subject", "hello\tworld", True),
    ("Subject", "=?utf-8?q?caf=C3=A9?=", False),
    ("Subject", "caf\udcc3\udca9", False),                                # raw 8-bit
    ("X-Anything", "a \x01 control", False),
])
def test_clean_table(name, value, clean):
    """Real-world values: the plain ones are spared, anything odd goes to
    the strict parser."""
    assert is_clean(name, value) is clean
    if clean:
        assert STRICT.header_fetch_parse(name, value).defects == ()


@pytest.mark.parametrize("value, text", [
    ("Sender 0 <s@example.com>", "Sender 0 <s@example.com>"),
    ("\"Sender\" <s@example.com>", "Sender <s@example.com>"),
    ("\"Doe, J.\"<j@example.com>,<k@example.com>", "\"Doe, J.\" <j@example.com>, k@example.com"),
    ("a@example.com,b@example.com", "a@example.com, b@example.com"),
])
def test_plain_address_text_is_the_strict_rendering(value, text):
    """A plain address list reads as the strict header renders it, and
    its addresses are the strict header's."""
    field = SCAN_POLICY.header_fetch_parse("To", value)
    assert isinstance(field, PlainField)
    assert str(field) == str(STRICT.header_fetch_parse("To", value)) == text
    assert field.addresses == STRICT.header_fetch_parse("To", value).addresses


def test_kinds_follow_the_strict_registry():
    """Each field is checked by the grammar of the class the strict
    registry reads it with; unknown fields are unstructured."""
    assert field_kind("FROM") == "address" and field_kind("resent-bcc") == "address"
    assert field_kind("Date") == field_kind("Resent-Date") == "date"
    assert field_kind("X-Mailer") == field_kind("Received") == "unstructured"


def test_header_factory_composes_each_class_once():
    """The scan policy's registry gives the stock registry's classes, made
    once per class however many field names come."""
    factory = SCAN_POLICY.header_factory
    for name in ("From", "Subject", "X-A", "X-B", "Content-Type"):
        assert factory[name].__bases__ == STRICT.header_factory[name].__bases__
    assert factory["X-A"] is factory["X-B"] is factory["Received"]
    assert len(factory._composed) <= len(set(factory.registry.values())) + 1


def test_plain_field_is_the_strict_header_on_demand():
    """A PlainField reads like the strict header: text, params, type,
    name, defects; the message API that uses them works."""
    data = msg("From: a@example.com", "MIME-Version: 1.0",
               "Content-Type: multipart/mixed; boundary=XYZ", "", "--XYZ",
               "Content-Type: application/pdf; name=a.pdf", "Content-Disposition: attachment",
               "Content-Transfer-Encoding: base64", "", "JVBERi0xLjQK", "--XYZ--")
    root = parse_message([data]).message
    part = list(walk_parts(root))[1]
    ctype = part["content-type"]
    assert isinstance(ctype, PlainField)
    assert str(ctype) == 'application/pdf; name="a.pdf"'
    assert ctype.content_type == "application/pdf" and dict(ctype.params) == {"name": "a.pdf"}
    assert ctype.name == "Content-Type" and ctype.defects == ()
    assert part.is_attachment() and part.get_filename() == "a.pdf"
    assert [p.get_content_type() for p in root.iter_attachments()] == ["application/pdf"]
    assert part.get_content() == b"%PDF-1.4\n"
    assert part["content-type"] is ctype  # read once per part


def test_fields_read_in_bulk_are_not_kept():
    """The defect check and the header rules read every field without
    keeping the strict parser's objects: a part keeps only the fields asked
    for by name (memory stays a small multiple of the header text)."""
    data = msg("From: a@example.com", *[f"X-Enc: =?utf-8?q?value_{i}?=" for i in range(500)],
               "Content-Type: text/plain; charset=\"=?x?q?y?=\"", "", "body")
    root = parse_message([data]).message
    assert len(header_values(root, "x-enc")) == 500
    assert len(root._mpp_fields) <= 3


def _defects_both_ways(data: bytes, monkeypatch, **kw):
    fast = parse_message([data], MimeCheckConfig(**kw))
    with monkeypatch.context() as m:
        m.setattr(mime, "is_clean", lambda name, value: False)
        strict = parse_message([data], MimeCheckConfig(**kw))
    return fast, strict


def _structure(root):
    return [(p.get_content_type(), p.get_boundary(), p.get_filename(), p.get_param("charset"),
             p.get_payload(decode=True) if not p.is_multipart() else None)
            for p in walk_parts(root)]


@pytest.mark.parametrize("path", sorted(CORPUS.glob("msg_*.txt")), ids=lambda p: p.name)
def test_corpus_defects_and_structure_as_the_strict_way(path: Path, monkeypatch):
    """Each corpus message: the same defects as with the strict parser on
    every field, and the structure of the plain email.policy.default parse."""
    data = crlf(path.read_bytes())
    fast, strict = _defects_both_ways(data, monkeypatch)
    assert fast.defects == strict.defects
    plain = email.parser.BytesParser(policy=email.policy.default).parsebytes(data)
    assert _structure(fast.message) == _structure(plain)


@pytest.mark.parametrize("kind", sorted(DEFECT_CASES))
def test_defect_cases_as_the_strict_way(kind, monkeypatch):
    """Every defect case: the same defects both ways."""
    data, kw = DEFECT_CASES[kind]
    fast, strict = _defects_both_ways(data, monkeypatch, **kw)
    assert fast.defects == strict.defects


def test_invalid_from_is_still_found():
    """An invalid From (and a bad Message-ID, Date, Content-Type) is found
    although well-formed fields skip the strict parser."""
    data = msg("From: a@b@c", "To: Sender 0 <s@example.com>", "Date: 31 Feb 2024 00:00 +0000",
               "Message-ID: <x>", "Content-Type: text/plain; charset=\"a", "", "body")
    details = [d.detail for d in parse_message([data]).defects if d.kind == "header_invalid"]
    for name in ("'From'", "'Date'", "'Message-ID'", "'Content-Type'"):
        assert any(name in detail for detail in details), (name, details)
    assert not any("'To'" in detail for detail in details)


# Pieces of header values that sit on the edges of the plain grammar.
VALUE_PIECES = st.sampled_from([
    "a", "Z9", " ", "\t", "<", ">", "@", ",", ";", ":", "\"", "\\", "(", ")", ".", "=", "?",
    "=?utf-8?q?x?=", "/", "*", "'", "%", "[", "]", "\udcc3\udca9", "\x01", "example.com",
    "text/plain", "charset=", "boundary=", "filename*0=", "\r\n ", "Mon, 06 May 2024 08:00:00 +0000",
])
FIELDS = ["From", "To", "Sender", "Date", "Message-ID", "MIME-Version", "Content-Type",
          "Content-Disposition", "Content-Transfer-Encoding", "Subject", "X-Other"]


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(FIELDS), st.lists(VALUE_PIECES, max_size=8).map("".join)),
                min_size=1, max_size=6), st.booleans())
def test_fuzzed_fields_as_the_strict_way(monkeypatch, headers, in_part):
    """Fields made of the grammar's edge cases: the same defects both ways,
    and the structure of the plain email.policy.default parse."""
    lines = [f"{name}: {value}".encode("utf-8", "surrogateescape") for name, value in headers]
    if in_part:
        data = msg("From: a@example.com", "Content-Type: multipart/mixed; boundary=XYZ", "", "--XYZ",
                   *lines, "", "content", "--XYZ--")
    else:
        data = msg(*lines, "", "body")
    fast, strict = _defects_both_ways(data, monkeypatch)
    assert fast.defects == strict.defects
    if fast.message is not None and fast.complete:
        plain = email.parser.BytesParser(policy=email.policy.default).parsebytes(data)
        assert [p.get_content_type() for p in walk_parts(fast.message)] == [
            p.get_content_type() for p in plain.walk()]


def test_rfc2231_file_name_still_matches_the_attachment_rules():
    """A file name in RFC 2231 form (split, percent-encoded) goes the strict
    way and still hits the dangerous-extension rule."""
    data = msg("From: a@example.com", "MIME-Version: 1.0", "Content-Type: multipart/mixed; boundary=XYZ",
               "", "--XYZ", "Content-Type: application/octet-stream",
               "Content-Disposition: attachment; filename*0*=utf-8''invoice%2E; filename*1=exe",
               "", "payload", "--XYZ--")
    rules = (AttachmentRule(name="dangerous-extension", extensions=("exe",), action="reject"),)
    scanner = AttachmentScanner(AttachmentConfig(rules=rules), None)
    result = run(scanner.scan(ScanInput(chunks=lambda: [data], size=len(data))))
    assert result.reasons == ("attachment:dangerous-extension:invoice.exe",)
