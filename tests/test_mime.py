"""The bounded MIME parser and the ``mime`` scanner (issue #5): every defect
kind, the CPython email test corpus, hostile messages with bounded memory
and time, and fuzzing."""
from __future__ import annotations

import dataclasses
import email.feedparser
import email.parser
import email.policy
import re
import time
import tracemalloc
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mppproxy.results import HardAction
from mppproxy.scan.base import ScanInput
from mppproxy.config.scan import DEFECT_KINDS, MimeCheckConfig, MimeDefectActions
from mppproxy.scan.mime import (PROBLEMS, ParsedMessage, _BoundedParser, _LineEndAtEnd, _unlike_boundaries,
                                header_values, parse_message, walk_parts)
from mppproxy.scan.scanners.mime_check import MimeCheckScanner, evaluate
from mppproxy.templates import REFUSALS, ReplyRenderer

CORPUS = Path(__file__).parent / "data" / "email_corpus"


def crlf(text: bytes) -> bytes:
    return text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def msg(*lines: str | bytes) -> bytes:
    return b"".join((line.encode() if isinstance(line, str) else line) + b"\r\n" for line in lines)


def kinds(data: bytes, **kw) -> tuple[str, ...]:
    smtputf8 = kw.pop("smtputf8", False)
    return parse_message([data], MimeCheckConfig(**kw), smtputf8).kinds


def run(coro):
    d = Deferred.fromCoroutine(coro)
    out = []
    d.addBoth(out.append)
    assert out, "coroutine did not finish"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


HEAD = ("From: a@example.com", "To: b@example.com", "Subject: test")
MIXED = (*HEAD, "MIME-Version: 1.0", "Content-Type: multipart/mixed; boundary=XYZ", "")

# kind -> a message with that defect (and the keyword arguments to parse it)
DEFECT_CASES: dict[str, tuple[bytes, dict]] = {
    "boundary_ambiguous": (msg(*MIXED, "--XYZ", "Content-Type: text/plain", "", "a",
                               "--XYZextra", "hidden?", "--XYZ--"), {}),
    "boundary_missing": (msg(*HEAD, "Content-Type: multipart/mixed", "", "--x", "", "a", "--x--"), {}),
    "boundary_start_missing": (msg(*MIXED, "no boundary here", "--XYZ--"), {}),
    "multipart_invariant": (msg(*MIXED, "no boundary at all"), {}),
    "boundary_close_missing": (msg(*MIXED, "--XYZ", "", "a"), {}),
    "composite_cte": (msg(*HEAD, "Content-Type: multipart/mixed; boundary=XYZ",
                          "Content-Transfer-Encoding: base64", "", "LS1YWVoNCg0KYQ0KLS1YWVotLQ0K"), {}),
    "message_partial": (msg(*HEAD, "Content-Type: message/partial; id=\"x@y\"; number=1; total=2", "",
                            "Subject: part", "", "half"), {}),
    "header_without_colon": (msg(*HEAD, "this is no header", "Bcc: hidden@example.com", "", "body"), {}),
    "header_8bit": (msg(*HEAD[:2], b"Subject: caf\xc3\xa9", "", "body"), {}),
    "part_header_8bit": (msg(*MIXED, "--XYZ", b"Content-Disposition: attachment; filename=\"caf\xc3\xa9.pdf\"",
                             "", "a", "--XYZ--"), {}),
    "header_duplicate": (msg(*HEAD, "From: c@example.com", "", "body"), {}),
    "header_continuation_first": (msg(" folded first", *HEAD, "", "body"), {}),
    "header_misplaced_from": (msg(*HEAD, "From nobody Mon Jan  1 00:00:00 2024", "X-A: b", "", "body"), {}),
    "header_invalid": (msg(*HEAD, "Message-ID: <no-at-sign>", "", "body"), {}),
    "header_obsolete": (msg("From: a@example.com", "To: <@route.example:b@example.com>", "", "body"), {}),
    "encoding_invalid": (msg("From: =?utf-8?b?!!!?= <a@example.com>", "", "body"), {}),
    "nesting_too_deep": (msg(*HEAD, "Content-Type: message/rfc822", "",
                             "Content-Type: message/rfc822", "", "Subject: deep", "", "x"), {"max_depth": 1}),
    "too_many_parts": (msg(*MIXED, *["--XYZ", "", "a"] * 5, "--XYZ--"), {"max_parts": 4}),
    "too_many_headers": (msg(*HEAD, *[f"X-N{i}: v" for i in range(20)], "", "body"),
                         {"max_header_lines": 20}),
    "header_block_too_big": (msg(*HEAD, "X-Big: " + "v" * 2000, "", "body"), {"max_header_bytes": 1024}),
    "line_too_long": (msg(*HEAD, "", "x" * (2 * 1024 * 1024)), {}),
    "too_large": (msg(*HEAD, "", *["body line"] * 10000), {"max_size": 65536}),
}


@pytest.mark.parametrize("kind", sorted(DEFECT_CASES))
def test_each_defect_kind_is_found(kind):
    """Each defect kind is found in a message made to have it, and nothing
    the scanner refuses by default is found in a clean version of it."""
    data, kw = DEFECT_CASES[kind]
    assert kind in kinds(data, **kw)


def test_every_kind_has_a_case_a_default_and_a_client_text():
    """Every configurable defect kind is tested, has a default action and a
    fixed text the client may see."""
    untested = set(DEFECT_KINDS) - set(DEFECT_CASES) - {"parse_error", "other"}
    assert untested == set()
    assert set(DEFECT_KINDS) <= set(PROBLEMS)


def test_clean_message_has_no_defects():
    """A plain, well-formed multipart message parses without a defect."""
    data = msg(*MIXED, "preamble", "--XYZ", "Content-Type: text/plain; charset=utf-8", "", "hello",
               "--XYZ", "Content-Type: application/pdf", "Content-Transfer-Encoding: base64",
               "Content-Disposition: attachment; filename=\"a.pdf\"", "", "JVBERi0xLjQK", "--XYZ--", "")
    parsed = parse_message([data])
    assert parsed.defects == ()
    assert parsed.complete and not parsed.truncated
    assert [p.get_content_type() for p in walk_parts(parsed.message)] == [
        "multipart/mixed", "text/plain", "application/pdf"]
    assert (parsed.parts, parsed.depth, parsed.header_lines) == (3, 1, 6)


def test_utf8_headers_with_smtputf8_are_legal():
    """UTF-8 in header fields is legal when the transaction used SMTPUTF8
    (RFC 6532); octets that are not UTF-8 are still a defect."""
    data, _ = DEFECT_CASES["header_8bit"]
    assert "header_8bit" not in kinds(data, smtputf8=True)
    latin1 = msg(*HEAD[:2], b"Subject: caf\xe9", "", "body")
    assert "header_8bit" in kinds(latin1, smtputf8=True)


def test_nested_boundary_that_is_a_prefix_is_ambiguous():
    """An inner boundary that starts with the outer one (or the same one) is
    ambiguous: RFC 2046's prefix match ends the outer part there."""
    data = msg(*MIXED, "--XYZ", "Content-Type: multipart/alternative; boundary=XYZ--1", "",
               "--XYZ--1", "", "a", "--XYZ--1--", "--XYZ--")
    assert "boundary_ambiguous" in kinds(data)


def test_boundary_inside_content_is_seen_as_a_boundary():
    """A boundary line inside a part's text ends the part for Python as for
    every RFC 2046 reader: what follows is a part the scanners do see."""
    data = msg(*MIXED, "--XYZ", "Content-Type: text/plain", "", "innocent text", "--XYZ",
               "Content-Type: application/x-msdownload; name=\"evil.exe\"", "", "MZ", "--XYZ--")
    parsed = parse_message([data])
    assert parsed.defects == ()
    assert [p.get_filename() for p in walk_parts(parsed.message)] == [None, None, "evil.exe"]


def test_header_values_decode_encoded_words():
    """Header values come decoded: RFC 2047 words, and raw UTF-8."""
    data = msg("From: a@example.com", "Subject: =?utf-8?q?caf=C3=A9?= =?iso-8859-1?b?6Q==?=",
               b"X-Raw: na\xc3\xafve", "", "body")
    root = parse_message([data], smtputf8=True).message
    assert header_values(root, "subject") == ["caf\xe9\xe9"]
    assert header_values(root, "x-raw") == ["na\xefve"]


def test_chunking_does_not_change_the_result():
    """The result is the same whether the message comes whole, in odd
    chunks, or one byte at a time."""
    data, _ = DEFECT_CASES["boundary_ambiguous"]
    data += DEFECT_CASES["header_8bit"][0]
    whole = parse_message([data])
    for size in (1, 7, 64):
        parts = [data[i:i + size] for i in range(0, len(data), size)]
        again = parse_message(parts)
        assert again.defects == whole.defects
        assert again.message.as_bytes() == whole.message.as_bytes()


@pytest.mark.parametrize("name", ["msg_05.txt", "msg_43.txt", "msg_02.txt", "msg_10.txt"])
@pytest.mark.parametrize("size", [1, 13, 65536])
def test_content_comes_out_as_the_plain_parser_has_it(name, size):
    """Leaf content handed to the feedparser in runs of lines (delivery-status
    blocks, "--" lines that are no boundary, blank lines, chunks that end
    mid-line) comes out exactly as the plain parser has it."""
    data = crlf((CORPUS / name).read_bytes())
    data += msg("", "--not-a-boundary", "", "last line")
    parsed = parse_message([data[i:i + size] for i in range(0, len(data), size)])
    plain = email.parser.BytesParser(policy=email.policy.default).parsebytes(data)
    ours = list(walk_parts(parsed.message))
    theirs = list(plain.walk())
    assert [p.get_payload() if not p.is_multipart() else p.preamble for p in ours] == [
        p.get_payload() if not p.is_multipart() else p.preamble for p in theirs]
    assert parsed.message.as_bytes() == plain.as_bytes()


@given(st.text("\r\nx", max_size=12))
def test_line_end_search_is_the_feedparsers(text):
    """The feedparser's end-of-payload line-end search, from two characters
    before the end, finds what the whole-string search finds."""
    ours = _LineEndAtEnd(email.feedparser.NLCRE_eol).search(text)
    theirs = email.feedparser.NLCRE_eol.search(text)
    assert (ours and (ours.span(), ours.group(0))) == (theirs and (theirs.span(), theirs.group(0)))
    assert _BoundedParser._parsegen.__code__ is email.feedparser.FeedParser._parsegen.__code__


def test_only_boundary_matchers_are_skipped_in_content_runs():
    """A content run skips the feedparser's boundary matchers (a line not
    starting with "--" cannot match them) and asks every other one."""
    import re

    from mppproxy.scan.mime import _unlike_boundaries

    # as FeedParser._parsegen builds it
    separator = "--" + "=_b.ö(x)"
    boundary = re.compile("(?P<sep>" + re.escape(separator)
                          + r")(?P<end>--)?(?P<ws>[ \t]*)(?P<linesep>\r\n|\r|\n)?$").match
    other = re.compile("-?x").match
    assert _unlike_boundaries([boundary, email.feedparser.NLCRE.match, other, len]) == [
        email.feedparser.NLCRE.match, other, len]


# -- the scanner -------------------------------------------------------------

def test_default_actions_reject_dangerous_and_score_benign():
    """By default a dangerous defect is refused with the "malformed"
    template (550 5.6.0), naming the problem in fixed words; benign ones
    only score, each kind once."""
    settings_ = MimeCheckConfig()
    result = evaluate(parse_message([DEFECT_CASES["header_without_colon"][0]]), settings_)
    assert result.action is HardAction.REJECT
    assert result.template == "malformed"
    assert dict(result.template_vars) == {"problem": "header line without colon"}
    assert REFUSALS["malformed"] == (550, "5.6.0")
    reply = ReplyRenderer().reply(result.template, dict(result.template_vars))
    assert reply.code == 550 and "header line without colon" in reply.text

    data = msg(*HEAD, "Message-ID: <x>", "In-Reply-To: <y>", "X-Odd: <@a:b@c>", "", "body")
    result = evaluate(parse_message([data]), settings_)
    assert result.action is None
    assert result.reasons == ("mime:header_invalid",)
    assert result.score == 0.5


def test_configured_actions_apply():
    """Each kind's action comes from the configuration: score:N, ignore,
    tempfail."""
    parsed = parse_message([DEFECT_CASES["header_without_colon"][0]])
    scored = MimeCheckConfig(actions=MimeDefectActions(header_without_colon="score:4.5"))
    assert evaluate(parsed, scored) == evaluate(parsed, scored).__class__(4.5, ("mime:header_without_colon",))
    ignored = MimeCheckConfig(actions=MimeDefectActions(header_without_colon="ignore"))
    assert not evaluate(parsed, ignored).hit
    tempfail = MimeCheckConfig(actions=MimeDefectActions(header_without_colon="tempfail"))
    result = evaluate(parsed, tempfail)
    assert (result.action, result.template) == (HardAction.TEMPFAIL, "tempfail")


def test_parser_failure_is_a_tempfail(monkeypatch):
    """An exception inside the email package is a ``parse_error`` defect,
    tempfailed by default (docs/design.md promise 4), never a crash."""
    from email.message import Message

    def boom(self):
        raise IndexError("parser bug")

    monkeypatch.setattr(Message, "get_content_maintype", boom)
    parsed = parse_message([msg(*HEAD, "", "body")])
    assert parsed.kinds == ("parse_error",)
    assert not parsed.complete
    result = evaluate(parsed, MimeCheckConfig())
    assert result.action is HardAction.TEMPFAIL


def test_unknown_email_defect_is_other(monkeypatch):
    """A defect class the email package may add later counts as "other"."""
    import email.errors

    class NewDefect(email.errors.MessageDefect):
        pass

    from mppproxy.scan import mime

    real = mime._collect_defects

    def collect(parser, root):
        root.defects.append(NewDefect())
        real(parser, root)

    monkeypatch.setattr(mime, "_collect_defects", collect)
    parsed = parse_message([msg(*HEAD, "", "body")])
    assert parsed.kinds == ("other",)
    assert evaluate(parsed, MimeCheckConfig()).score == 1.0


def test_scanner_parses_once_and_hands_the_result_on():
    """``parse`` gives the ParsedMessage the engine puts in ScanInput.parsed;
    ``scan`` then uses it instead of parsing again."""
    data = DEFECT_CASES["header_duplicate"][0]
    scanner = MimeCheckScanner(MimeCheckConfig(), Clock())
    inp = ScanInput(chunks=lambda: iter([data]), size=len(data))
    parsed = run(scanner.parse(inp))
    assert isinstance(parsed, ParsedMessage)
    inp2 = dataclasses.replace(inp, chunks=lambda: iter([b"never read"]), parsed=parsed)
    result = run(scanner.scan(inp2))
    assert result.action is HardAction.REJECT and result.reasons == ("mime:header_duplicate",)


def test_disabled_scanner_finds_nothing():
    """With ``enabled = false`` the scanner scores nothing."""
    data = DEFECT_CASES["header_without_colon"][0]
    scanner = MimeCheckScanner(MimeCheckConfig(enabled=False), Clock())
    assert not run(scanner.scan(ScanInput(chunks=lambda: iter([data]), size=len(data)))).hit


# -- the CPython email test corpus --------------------------------------------

# Files of Lib/test/test_email/data that CPython's own tests use as broken
# messages, and the first defect the scanner refuses them for.
CORPUS_REJECTED = {
    "msg_15.txt": "boundary_ambiguous",       # test_same_boundary_inner_outer
    "msg_17.txt": "boundary_start_missing",   # multipart whose boundary never comes
    "msg_19.txt": "header_without_colon",     # a digest body without any header
    "msg_25.txt": "boundary_missing",         # test_multipart_no_boundary
    "msg_31.txt": "boundary_start_missing",   # test_no_start_boundary
    "msg_35.txt": "header_without_colon",     # test_no_separating_blank_line
    "msg_38.txt": "header_without_colon",     # test_nested_inner_contains_outer_boundary
    "msg_39.txt": "boundary_ambiguous",       # test_nested_with_same_boundary
    "msg_41.txt": "boundary_missing",         # test_lying_multipart
    "msg_42.txt": "boundary_start_missing",   # test_missing_start_boundary
    "msg_47.txt": "header_without_colon",     # parts without a blank line after the header
}


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("msg_*.txt"))


def test_corpus_is_there():
    """The corpus of tests/data/email_corpus is complete (48 files)."""
    assert len(corpus_files()) == 48


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_corpus_message(path):
    """Every message of CPython's email test data parses without a crash;
    the legal ones are not refused, the deliberately broken ones are, for
    the reason listed."""
    data = crlf(path.read_bytes())
    parsed = parse_message([data])
    assert parsed.complete
    result = evaluate(parsed, MimeCheckConfig())
    expected = CORPUS_REJECTED.get(path.name)
    if expected is None:
        assert result.action is None, parsed.defects
    else:
        assert result.action is HardAction.REJECT
        assert dict(result.template_vars)["problem"] == PROBLEMS[expected]
    # the structure is exactly the unbounded parser's
    plain = email.parser.BytesParser(policy=email.policy.default).parsebytes(data)
    assert [p.get_content_type() for p in walk_parts(parsed.message)] == [
        p.get_content_type() for p in plain.walk()]


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_corpus_structure_survives_a_tiny_memory_bound(path):
    """With almost no memory for content, the parts and defects are those of
    the full parse: only content is left out, never a boundary."""
    data = crlf(path.read_bytes())
    full = parse_message([data])
    # room for the header sections (they are never left out) and 64 octets
    headers = sum(p._mpp_header_bytes for p in walk_parts(full.message))
    tiny = parse_message([data], dataclasses.replace(MimeCheckConfig(), memory_bytes=headers + 64))
    assert tiny.truncated or len(data) < headers + 200
    assert [p.get_content_type() for p in walk_parts(tiny.message)] == [
        p.get_content_type() for p in walk_parts(full.message)]
    assert tiny.kinds == full.kinds


# -- hostile messages -----------------------------------------------------------

def measure(make_chunks, limits: MimeCheckConfig) -> tuple[ParsedMessage, float, int]:
    """Parse under tracemalloc: (result, seconds, peak octets)."""
    tracemalloc.start()
    try:
        start = time.perf_counter()
        parsed = parse_message(make_chunks(), limits)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return parsed, elapsed, peak


def big_message(total: int, chunk: int = 65536) -> Iterator[bytes]:
    yield msg(*MIXED, "--XYZ", "Content-Type: text/plain", "", "see attachment", "--XYZ",
              "Content-Type: application/octet-stream", "Content-Transfer-Encoding: base64", "")
    line = b"QUFB" * 19 + b"\r\n"
    block = line * (chunk // len(line))
    sent = 0
    while sent < total:
        yield block
        sent += len(block)
    yield msg("--XYZ", "Content-Type: application/x-msdownload; name=\"late.exe\"", "", "MZ", "--XYZ--")


MB = 1024 * 1024


def test_50mb_body_memory_stays_bounded():
    """A 50 MB attachment fed in 64 KiB chunks costs memory_bytes plus a few
    MB, not 50 MB, and the part after it is still found."""
    parsed, elapsed, peak = measure(lambda: big_message(50 * MB),
                                    dataclasses.replace(MimeCheckConfig(), memory_bytes=MB))
    assert parsed.complete and parsed.truncated
    assert parsed.kinds == ()
    names = [p.get_filename() for p in walk_parts(parsed.message)]
    assert names == [None, None, None, "late.exe"]
    assert peak < 5 * MB, peak
    assert elapsed < 30


def test_50mb_body_with_default_bounds_is_quick():
    """With the default bounds the same message takes well under seconds."""
    start = time.perf_counter()
    parsed = parse_message(big_message(50 * MB))
    assert parsed.complete and parsed.truncated
    assert time.perf_counter() - start < 10


def test_50mb_over_the_size_bound_stops_reading():
    """Past ``max_size`` the parse stops: ``too_large``, the rest unread."""
    parsed, elapsed, peak = measure(lambda: big_message(50 * MB),
                                    MimeCheckConfig(max_size=4 * MB, memory_bytes=MB))
    assert parsed.kinds == ("too_large",)
    assert not parsed.complete
    assert parsed.size <= 4 * MB + 65536
    assert peak < 5 * MB, peak
    assert evaluate(parsed, MimeCheckConfig()).action is HardAction.REJECT


def test_10000_headers():
    """10,000 header lines: the parse stops at max_header_lines, memory and
    time stay small."""
    data = msg(*HEAD, *[f"X-Header-{i}: value {i}" for i in range(10000)], "", "body")
    parsed, elapsed, peak = measure(lambda: [data[i:i + 65536] for i in range(0, len(data), 65536)],
                                    MimeCheckConfig())
    assert parsed.kinds == ("too_many_headers",)
    assert parsed.message is None
    assert peak < 2 * MB + len(data), peak
    assert elapsed < 5


def test_huge_header_block():
    """A 10 MB header section stops at max_header_bytes."""
    line = b"X-Filler: " + b"a" * 900 + b"\r\n"

    def chunks():
        yield msg(*HEAD)
        for _ in range(10000):
            yield line * 70

    parsed, elapsed, peak = measure(chunks, MimeCheckConfig(max_header_lines=100000))
    assert parsed.kinds == ("header_block_too_big",)
    assert peak < 4 * MB
    assert elapsed < 5


def nested(depth: int) -> bytes:
    lines = [*HEAD]
    for i in range(depth):
        lines += [f"Content-Type: multipart/mixed; boundary=\"=_{i}_=\"", "", f"--=_{i}_="]
    lines += ["Content-Type: text/plain", "", "deep"]
    lines += [f"--=_{i}_=--" for i in reversed(range(depth))]
    return msg(*lines)


def test_100_deep_nesting():
    """100 nested multiparts stop at max_depth (20) before the parser nests
    deeper; with a higher bound they parse without a recursion error."""
    parsed, elapsed, peak = measure(lambda: [nested(100)], MimeCheckConfig())
    assert parsed.kinds == ("nesting_too_deep",)
    assert parsed.depth == 20
    assert peak < 2 * MB and elapsed < 5
    deep = parse_message([nested(100)], MimeCheckConfig(max_depth=200))
    assert deep.complete and deep.kinds == () and deep.depth == 100


def test_mime_bomb_of_many_parts():
    """100,000 tiny parts stop at max_parts (1000)."""
    data = msg(*MIXED, *["--XYZ", "", "x"] * 100000, "--XYZ--")
    parsed, elapsed, peak = measure(lambda: [data[i:i + 65536] for i in range(0, len(data), 65536)],
                                    MimeCheckConfig())
    assert parsed.kinds == ("too_many_parts",)
    assert parsed.parts == 1000
    assert peak < 8 * MB, peak
    assert elapsed < 5


def test_nested_message_bomb():
    """message/rfc822 inside message/rfc822 ... counts as nesting."""
    data = msg(*HEAD, *["Content-Type: message/rfc822", ""] * 500, "Subject: bottom", "", "x")
    parsed = parse_message([data])
    assert parsed.kinds == ("nesting_too_deep",)


def test_base64_bomb():
    """A 30 MB base64 part in one message: the parsed part keeps at most
    memory_bytes of it and decoding that stays bounded too."""
    limits = dataclasses.replace(MimeCheckConfig(), memory_bytes=2 * MB)
    parsed, elapsed, peak = measure(lambda: big_message(30 * MB), limits)
    part = list(walk_parts(parsed.message))[2]
    assert part.truncated and part.elided_bytes > 25 * MB
    tracemalloc.start()
    decoded = part.get_payload(decode=True)
    peak_decode = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(decoded) < 2 * MB
    # get_payload splits and joins the lines: a small multiple of the bound
    assert peak_decode < 6 * limits.memory_bytes


def test_one_endless_line():
    """A 5 MB line without a line end stops at MAX_LINE."""
    def chunks():
        yield msg(*HEAD, "")
        for _ in range(80):
            yield b"A" * 65536

    parsed, elapsed, peak = measure(chunks, MimeCheckConfig())
    assert parsed.kinds == ("line_too_long",)
    assert peak < 8 * MB, peak


def test_scanner_parses_large_messages_in_the_thread_pool():
    """A message above INLINE_BYTES is parsed off the reactor thread."""
    calls = []

    class Pool:
        def callInThreadWithCallback(self, onResult, f, *a, **kw):
            calls.append(f)
            onResult(True, f(*a, **kw))

    class FakeReactor:
        def getThreadPool(self):
            return Pool()

        def callFromThread(self, f, *a, **kw):
            f(*a, **kw)

    data = b"".join(big_message(MB))
    scanner = MimeCheckScanner(MimeCheckConfig(), FakeReactor())
    parsed = run(scanner.parse(ScanInput(chunks=lambda: iter([data]), size=len(data))))
    assert calls and parsed.complete


# -- fuzzing ----------------------------------------------------------------------

TOKENS = [b"\r\n", b"--XYZ", b"--XYZ--", b"Content-Type: multipart/mixed; boundary=XYZ\r\n",
          b"Content-Type: message/rfc822\r\n", b"Content-Type: multipart/digest; boundary=\"Q\"\r\n",
          b"--Q\r\n", b"Content-Transfer-Encoding: base64\r\n", b"From: a@b\r\n", b" folded\r\n",
          b"Content-Disposition: attachment; filename*=utf-8''%E2%80%AE.exe\r\n", b"=?utf-8?b?\xff?=",
          b"\xc3\xa9", b"\xff", b":", b"From x\r\n", b"Content-Type: message/delivery-status\r\n",
          b"Subject: =?x?q?a?=\r\n", b"\t", b"\r", b"\n", b"To: <@a:b@c>,,\r\n", b"(", b"\"", b"<", b";"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS) | st.binary(max_size=20), max_size=80),
       st.integers(min_value=1, max_value=50), st.booleans())
def test_fuzz_never_raises(pieces, chunk, smtputf8):
    """Any input, in any chunking, gives a ParsedMessage and never raises;
    the defects can always be evaluated and the header values read."""
    data = b"".join(pieces)
    parsed = parse_message([data[i:i + chunk] for i in range(0, len(data), chunk)],
                           MimeCheckConfig(max_depth=5, max_parts=50), smtputf8)
    assert isinstance(parsed, ParsedMessage)
    evaluate(parsed, MimeCheckConfig())
    if parsed.message is not None:
        for part in walk_parts(parsed.message):
            for name in ("subject", "from", "content-type"):
                header_values(part, name)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(p.name for p in CORPUS.glob("msg_*.txt"))),
       st.lists(st.tuples(st.integers(min_value=0), st.binary(min_size=1, max_size=8)), max_size=6))
def test_fuzz_mutated_corpus(name, edits):
    """Corpus messages with bytes overwritten at random never crash it."""
    data = bytearray(crlf((CORPUS / name).read_bytes()))
    for pos, junk in edits:
        at = pos % len(data)
        data[at:at + len(junk)] = junk
    parsed = parse_message([bytes(data)])
    evaluate(parsed, MimeCheckConfig())
