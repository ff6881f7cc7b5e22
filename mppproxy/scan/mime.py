"""The bounded MIME parser: every message is parsed once, here, before any
scanner sees it (issue #5).

Stage: first step of the scan engine.  Takes the raw message as chunks
(``ScanInput.chunks()``), hands on a ``ParsedMessage``: the
``email.message.EmailMessage`` the later scanners read, the defects found,
and counts.  ``parse_message`` never raises, whatever the input (a parser
failure is itself a defect, ``parse_error``).

How the bounds hold (docs/design.md promise 6).  The message is fed to the
standard library's ``BytesFeedParser`` in slices of at most 64 KiB.  That
parser reads lines through a ``BufferedSubFile``; ours (``_BoundedInput``)
sees each line just before the parser takes it, knows which part is being
parsed and whether it is in its header or its body, and so:

- counts header lines and octets per header section and stops the parse
  (``too_many_headers``, ``header_block_too_big``) before more are kept;
- stops at a part too many or a level too deep as the part is created,
  before the parser nests another generator (``too_many_parts``,
  ``nesting_too_deep``);
- past ``memory_bytes`` of kept content, leaves body lines of leaf parts
  (and preambles and epilogues) out of the parsed message while the
  structure is still followed to the end: the boundary lines, the headers
  of later parts, the defects.  A line that starts with "--" is never left
  out, so the parts come out exactly as the unbounded parser would find
  them; only their content is cut (``BoundedPart.elided_bytes``);
- checks what the parser cannot: 8-bit octets in header lines without
  SMTPUTF8, and boundary lines that RFC 2046's prefix match would take but
  Python's whole-line match does not.

Policy: ``email.policy.default``, not ``compat32``, read the cheap way
where that gives the same answer (``fields.py``).  The structure decisions
(header/body split, content type, boundary) are made by the same
feedparser and ``Message`` code under both; ``default`` adds the strict
header parser, which finds header defects (InvalidHeaderDefect & co.) and
decodes RFC 2047 words and RFC 2231 parameters for the header and
attachment rules.  That parser costs 10-70 us a field, so:

- each part reads each field through the policy once (``BoundedPart.get``;
  the feedparser alone asks for Content-Type several times per part);
- a Content-Type, Content-Disposition, Content-Transfer-Encoding,
  address list or unstructured field of the plain forms of ``fields.py``
  comes back as a ``PlainField``: the strict header's exact text, the strict header itself
  made only if asked for;
- the defects of a field are the strict parser's, for every field of every
  part; only a field of a plain form, for which the strict parser is known
  to find nothing, does not run it (tests/test_fields.py checks both ways
  give the same defects and the same structure).

The strict parser is the less robust one (it has had crashes on odd
input), so every header access here is guarded and turns an exception into
a defect, and the whole parse is fuzzed (tests/test_mime.py).

The feedparser's internals used (``_input``, ``_cur``, ``_msgstack``,
``_new_message``, ``_parse_headers``) are the same from Python 3.8 to
3.13, and so are ``BufferedSubFile``'s ``_lines``, ``_eofstack`` and
``_closed``, which ``_BoundedInput.__next__`` reads in place of
``BufferedSubFile.readline`` (the whole class is unchanged from 3.11 to
3.13); the bound tests fail loudly if that changes.  ``_parsegen`` runs
the feedparser's own code with one global read differently
(``_LineEndAtEnd``).  We keep the standard library's parser rather than
vendor a copy: its fixes (several were for crashes on hostile input) reach
us with each Python release, and CI runs the unit suite on every Python
we support (3.11, 3.12, 3.13: ``.ci/run``), so a change in these
internals fails CI, not production.
"""
from __future__ import annotations

import email.errors
import email.feedparser
import re
import types
from dataclasses import dataclass
from email.feedparser import BytesFeedParser
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

from mppproxy.config.scan import MimeCheckConfig
from mppproxy.scan.fields import SCAN_POLICY, STRICT, is_clean

if TYPE_CHECKING:
    import collections
    from email.policy import Policy

__all__ = ["BoundedPart", "Defect", "ParsedMessage", "parse_message", "parse_scan_input",
           "walk_parts", "header_values", "decode_text"]

# Policy[Any]: typeshed's EmailPolicy is a policy of plain Messages; the
# parser's factory makes BoundedParts.
POLICY: Policy[Any] = SCAN_POLICY
# Slices fed to the parser: the parser's pending lines never hold more.
FEED_SLICE = 65536
# A line longer than this cannot be SMTP (RFC 5321 4.5.3.1.6: 1000 octets;
# limits.max_line_length may raise it a little): the parse stops.
MAX_LINE = 1024 * 1024
# Defects kept per message; past it only the count grows.
MAX_DEFECTS = 200

# Same pattern as the feedparser's, after the boundary.
_BOUNDARY_END = re.compile(r"(?P<end>--)?(?P<ws>[ \t]*)(?P<linesep>\r\n|\r|\n)?$")
# Fields whose repetition lets readers disagree (RFC 5322 3.6 allows each
# once; RFC 2045/2183 once per part).
_SINGLE = frozenset(["from", "sender", "content-type", "content-transfer-encoding",
                     "content-disposition"])

# email.errors class name -> our kind
_EMAIL_DEFECTS = {
    "StartBoundaryNotFoundDefect": "boundary_start_missing",
    "CloseBoundaryNotFoundDefect": "boundary_close_missing",
    "NoBoundaryInMultipartDefect": "boundary_missing",
    "MultipartInvariantViolationDefect": "multipart_invariant",
    "InvalidMultipartContentTransferEncodingDefect": "composite_cte",
    "MissingHeaderBodySeparatorDefect": "header_without_colon",
    "FirstHeaderLineIsContinuationDefect": "header_continuation_first",
    "MisplacedEnvelopeHeaderDefect": "header_misplaced_from",
    "InvalidHeaderDefect": "header_invalid",
    "HeaderMissingRequiredValue": "header_invalid",
    "InvalidDateDefect": "header_invalid",
    "ObsoleteHeaderDefect": "header_obsolete",
    "CharsetError": "encoding_invalid",
    "InvalidBase64PaddingDefect": "encoding_invalid",
    "InvalidBase64CharactersDefect": "encoding_invalid",
    "InvalidBase64LengthDefect": "encoding_invalid",
    # 8-bit: our own raw check decides (it knows about SMTPUTF8); these
    # are the header parser's view of the same octets.
    "NonASCIILocalPartDefect": "",
    "UndecodableBytesDefect": "",
}

# What the client may be told about each kind (template variable
# ``problem``): fixed texts, nothing from the message, no internals.
PROBLEMS = {
    "boundary_ambiguous": "ambiguous MIME boundary",
    "boundary_missing": "multipart without boundary",
    "boundary_start_missing": "MIME boundary not found",
    "multipart_invariant": "broken multipart structure",
    "boundary_close_missing": "MIME closing boundary missing",
    "composite_cte": "encoded multipart or message part",
    "message_partial": "message/partial is not accepted",
    "header_without_colon": "header line without colon",
    "header_8bit": "8-bit characters in header without SMTPUTF8",
    "part_header_8bit": "8-bit characters in MIME part header",
    "header_duplicate": "duplicate header field",
    "header_continuation_first": "header starts with a continuation line",
    "header_misplaced_from": "misplaced From line in header",
    "header_invalid": "invalid header field",
    "header_obsolete": "obsolete header syntax",
    "encoding_invalid": "invalid encoding",
    "nesting_too_deep": "MIME nesting too deep",
    "too_many_parts": "too many MIME parts",
    "too_many_headers": "too many header lines",
    "header_block_too_big": "header too large",
    "line_too_long": "line too long",
    "too_large": "message too large to check",
    "parse_error": "message could not be parsed",
    "other": "malformed message",
}


@dataclass(frozen=True)
class Defect:
    """One thing wrong with the message.  ``part`` numbers the parts in the
    order they start (0 is the message itself); ``detail`` is for the log."""

    kind: str
    detail: str = ""
    part: int = 0


class BoundedPart(EmailMessage):
    """The message and its parts as parsed here: an ``EmailMessage`` that
    also knows its number and how much of its content was left out."""

    # Message's own list of (name, raw value), which typeshed leaves out.
    _headers: list[tuple[str, Any]]

    def __init__(self, policy: Any = None):
        super().__init__(policy)
        # Order in which the part started; 0 is the message.
        self.part_number = 0
        # Octets of this part's body left out (``memory_bytes``).
        self.elided_bytes = 0
        self._mpp_in_body = False
        self._mpp_kind = ""  # "multipart", "message" or "leaf", from the header
        self._mpp_boundary: Optional[str] = None
        # multipart: 0 preamble, 1 between parts, 2 epilogue
        self._mpp_phase = 0
        self._mpp_header_lines = 0
        self._mpp_header_bytes = 0
        # (name, raw value) -> what the policy made of it
        self._mpp_fields: dict[tuple[str, str], Any] = {}

    @property
    def truncated(self) -> bool:
        return self.elided_bytes > 0

    def get(self, name: str, failobj: Any = None) -> Any:
        """``Message.get``, each field read once: the feedparser alone asks
        for Content-Type several times per part."""
        lower = name.lower()
        for key in self._headers:
            if key[0].lower() == lower:
                return self.field(*key)
        return failobj

    def field(self, name: str, value: str, keep: bool = True) -> Any:
        """The policy's header object for the raw field, made once.  Kept
        only for fields asked for by name (``get``: a few per part, so the
        strict parser's objects, many times their text, stay few); a read
        of every field (defects, all Received:) passes ``keep=False``."""
        found = self._mpp_fields.get((name, value))
        if found is None:
            found = self.policy.header_fetch_parse(name, value)
            if keep:
                self._mpp_fields[(name, value)] = found
        return found


if TYPE_CHECKING:
    # The feedparser's internals used here (the module docstring lists
    # them), which typeshed leaves out; at run time these names are the
    # email package's own.

    class BufferedSubFile:
        _lines: collections.deque[str]
        # Matchers of the enclosing boundaries, innermost last.
        _eofstack: list[Callable[[str], object]]
        _closed: bool

        def __next__(self) -> Any: ...

        def readline(self) -> Any: ...

    NeedMoreData: object

    class _FeedParser(BytesFeedParser[BoundedPart]):
        _input: BufferedSubFile
        # The part being parsed.  None before the first part and after
        # the parse: the hooks always have one, and the line readers, which
        # look before they touch it, read it as Optional.
        _cur: BoundedPart
        _msgstack: list[BoundedPart]

        def _parsegen(self) -> Iterator[object]: ...

        def _new_message(self) -> None: ...

        def _parse_headers(self, lines: list[str]) -> None: ...
else:
    from email.feedparser import BufferedSubFile, NeedMoreData

    _FeedParser = BytesFeedParser


@dataclass(frozen=True)
class ParsedMessage:
    """What the MIME checks hand on.

    ``message`` is None only when not even the message's header was parsed
    (a bound hit inside it).  ``complete`` is False when a bound or an error
    stopped the parse: the parts after that point were never seen.
    ``truncated``: some body content was left out to keep within
    ``memory_bytes`` (the structure was still followed to the end).
    """

    message: Optional[BoundedPart]
    defects: tuple[Defect, ...] = ()
    defect_count: int = 0
    size: int = 0
    parts: int = 0
    depth: int = 0
    header_lines: int = 0
    complete: bool = True
    truncated: bool = False

    @property
    def kinds(self) -> tuple[str, ...]:
        """Each defect kind once, in order of first appearance."""
        return tuple(dict.fromkeys(d.kind for d in self.defects))


class _Stop(Exception):
    """A bound was hit: the parse ends here."""

    def __init__(self, kind: str, detail: str):
        super().__init__(kind)
        self.kind = kind
        self.detail = detail


class _BoundedInput(BufferedSubFile):
    """The feedparser's line source, with our look at every line it takes.

    ``__next__`` does ``BufferedSubFile.readline``'s work and
    ``_BoundedParser.keep``'s in one frame: it runs for nearly every line of
    every message (``for line in self._input``), and most lines are body
    lines of a leaf part within the memory bound, which need only their
    cost counted; those go to the feedparser in runs (``_content_run``).
    ``readline`` is the same, with "" for the false EOF."""

    def __init__(self, parser: "_BoundedParser"):
        super().__init__()
        self._parser = parser

    def readline(self) -> Any:
        try:
            return self.__next__()
        except StopIteration:
            return ""

    def __next__(self) -> Any:
        lines = self._lines
        parser = self._parser
        while True:
            if not lines:
                if self._closed:
                    raise StopIteration
                return NeedMoreData
            line = lines.popleft()
            # As BufferedSubFile.readline: a boundary of any enclosing
            # multipart (RFC 2046 5.1.2) is a false EOF, innermost first.
            for ateof in reversed(self._eofstack):
                if ateof(line):
                    lines.appendleft(line)
                    raise StopIteration
            cur: Optional[BoundedPart] = parser._cur
            # The common case of keep(), inline: a leaf's content line that
            # fits.  "--" lines may be boundaries of any level: keep() looks.
            if cur is not None and cur._mpp_kind == "leaf" and not line.startswith("--"):
                # UTF-8 and other 8-bit octets come in as surrogates: 4 octets each.
                cost = len(line) if line.isascii() else 4 * len(line)
                if cost <= parser.room:
                    parser.room -= cost
                    return self._content_run(line)
            if parser.keep(line):
                return line

    def _content_run(self, first: str) -> str:
        """``first`` and the content lines after it that need no look
        either, as one string.  The feedparser only appends a leaf's content
        lines to its payload (``_parsegen``: "the entire rest of the file
        contents becomes the payload"), so a run of them is the same to it
        as the lines one by one, at one pass through its loop instead of
        one per line.  A run ends before a line that is a false EOF, may be
        a boundary ("--") or does not fit: that one comes on its own."""
        lines = self._lines
        parser = self._parser
        matchers = _unlike_boundaries(self._eofstack)
        room = parser.room
        run = [first]
        take = lines.popleft
        keep = run.append
        while lines:
            line = lines[0]
            if line.startswith("--") or (matchers and any(m(line) for m in matchers)):
                break
            cost = len(line) if line.isascii() else 4 * len(line)
            if cost > room:
                break
            room -= cost
            keep(take())
        parser.room = room
        return "".join(run)


# What every boundary matcher of the feedparser's starts with: up to
# Python 3.12 it builds them as
# re.compile('(?P<sep>' + re.escape('--' + boundary) + ...).match.
_BOUNDARY_MATCHER = "(?P<sep>" + re.escape("--")


def _unlike_boundaries(eofstack: list[Any]) -> list[Any]:
    """The false-EOF matchers that might match a line not starting with
    "--": all but the boundary matchers (which need "--" first).  Any
    other matcher is kept and asked (3.13's boundary matcher is a plain
    function: correct, only slower)."""
    return [m for m in eofstack
            if not (isinstance(getattr(m, "__self__", None), re.Pattern)
                    and m.__self__.pattern.startswith(_BOUNDARY_MATCHER))]


class _LineEndAtEnd:
    """``email.feedparser.NLCRE_eol`` -- ``(\\r\\n|\\r|\\n)\\Z`` -- searched
    from two characters before the end, the only places it can match: the
    same match, without the regex engine trying every position of a
    payload of megabytes (the feedparser searches each part's whole
    payload after the part ends; ~90 us for 30 KiB)."""

    def __init__(self, pattern: re.Pattern[str]):
        self._pattern = pattern

    def search(self, text: str) -> Optional[re.Match[str]]:
        return self._pattern.search(text, max(0, len(text) - 2))


def _with_fast_line_end(function: Any) -> Any:
    """The feedparser's own ``function`` (its code, unchanged) reading
    ``NLCRE_eol`` as ``_LineEndAtEnd``: in a copy of its module's globals,
    so the email package itself is left as it is."""
    module: Any = email.feedparser  # NLCRE_eol is not in typeshed's module
    namespace = dict(vars(module), NLCRE_eol=_LineEndAtEnd(module.NLCRE_eol))
    return types.FunctionType(function.__code__, namespace, function.__name__,
                              function.__defaults__, function.__closure__)


class _BoundedParser(_FeedParser):
    _parsegen = _with_fast_line_end(_FeedParser._parsegen)

    def __init__(self, limits: MimeCheckConfig, smtputf8: bool):
        super().__init__(_factory=BoundedPart, policy=POLICY)
        self._input = _BoundedInput(self)
        self.limits = limits
        self.smtputf8 = smtputf8
        self.parts = 0
        self.depth = 0
        self.header_total = 0
        # Octets of memory_bytes not yet taken by header sections or kept content.
        self.room = limits.memory_bytes
        self.truncated = False
        self.defects: list[Defect] = []
        self.defect_count = 0

    def add_defect(self, kind: str, detail: str, part: int) -> None:
        self.defect_count += 1
        if len(self.defects) < MAX_DEFECTS:
            self.defects.append(Defect(kind, detail, part))

    # -- hooks into FeedParser ------------------------------------------

    def _new_message(self) -> None:
        depth = len(self._msgstack)
        if self.parts >= self.limits.max_parts:
            raise _Stop("too_many_parts", f"more than {self.limits.max_parts} parts")
        if depth > self.limits.max_depth:
            raise _Stop("nesting_too_deep", f"more than {self.limits.max_depth} levels")
        super()._new_message()
        self._cur.part_number = self.parts
        self.parts += 1
        self.depth = max(self.depth, depth)

    def _parse_headers(self, lines: list[str]) -> None:
        super()._parse_headers(lines)
        cur = self._cur
        cur._mpp_in_body = True
        maintype = cur.get_content_maintype()
        if maintype == "multipart":
            cur._mpp_kind = "multipart"
            boundary = cur.get_boundary()
            cur._mpp_boundary = boundary
            if boundary is not None:
                self._check_nested_boundary(cur, boundary)
        elif maintype == "message":
            cur._mpp_kind = "message"
            cte = str(cur.get("content-transfer-encoding", "7bit")).strip().lower()
            if cte not in ("7bit", "8bit", "binary"):
                # The feedparser checks this for multipart only.
                self.add_defect("composite_cte", f"{cur.get_content_type()} with {cte[:40]!r}",
                                cur.part_number)
            if cur.get_content_subtype() == "partial":
                self.add_defect("message_partial", "message/partial", cur.part_number)
        else:
            cur._mpp_kind = "leaf"

    # -- our look at each line -----------------------------------------

    def keep(self, line: str) -> bool:
        """Whether the parser may have ``line`` (False: left out); raises
        ``_Stop`` at a bound."""
        cur: Optional[BoundedPart] = self._cur
        if cur is None:
            return True
        if not cur._mpp_in_body:
            self._header_line(cur, line)
            return True
        if line.startswith("--"):
            # Never left out: it may be a boundary of any level.
            self._boundary_line(cur, line)
            return True
        kind = cur._mpp_kind
        # message/*: its own lines are the nested message's separators
        # (delivery-status blocks); multipart between parts: the line after
        # a boundary is the next part's first.
        if kind == "message" or (kind == "multipart" and cur._mpp_phase == 1
                                 and cur._mpp_boundary is not None):
            return True
        # UTF-8 and other 8-bit octets come in as surrogates: 4 octets each.
        cost = len(line) if line.isascii() else 4 * len(line)
        if cost <= self.room:
            self.room -= cost
            return True
        cur.elided_bytes += len(line)
        self.truncated = True
        return False

    def _header_line(self, cur: BoundedPart, line: str) -> None:
        cur._mpp_header_lines += 1
        cur._mpp_header_bytes += len(line)
        self.header_total += len(line)
        self.room -= len(line)
        if cur._mpp_header_lines > self.limits.max_header_lines:
            raise _Stop("too_many_headers", f"more than {self.limits.max_header_lines} header lines"
                        f" in part {cur.part_number}")
        if cur._mpp_header_bytes > self.limits.max_header_bytes:
            raise _Stop("header_block_too_big", f"header of part {cur.part_number} over"
                        f" {self.limits.max_header_bytes} octets")
        if self.header_total > self.limits.memory_bytes:
            raise _Stop("header_block_too_big", "headers of all parts together over"
                        f" {self.limits.memory_bytes} octets")
        if not line.isascii():
            raw = line.encode("ascii", "surrogateescape")
            if self.smtputf8:
                try:
                    raw.decode("utf-8")
                    return
                except UnicodeDecodeError:
                    detail = "header line is not UTF-8"
            else:
                detail = "8-bit header line without SMTPUTF8"
            kind = "header_8bit" if cur.part_number == 0 else "part_header_8bit"
            self.add_defect(kind, detail, cur.part_number)

    def _boundary_line(self, cur: BoundedPart, line: str) -> None:
        for part in self._msgstack:
            boundary = part._mpp_boundary
            if boundary is None or not line.startswith("--" + boundary):
                continue
            mo = _BOUNDARY_END.match(line, 2 + len(boundary))
            if mo is None:
                # RFC 2046 5.1.1: "it is sufficient that the boundary appear
                # in its entirety following the CRLF" -- a boundary to some
                # readers, content to Python.
                self.add_defect("boundary_ambiguous", "a line starts with the boundary of part"
                                f" {part.part_number} but is not one", cur.part_number)
            elif part is cur:
                cur._mpp_phase = 2 if mo.group("end") else 1

    def _check_nested_boundary(self, cur: BoundedPart, boundary: str) -> None:
        for outer in self._msgstack[:-1]:
            other = outer._mpp_boundary
            if other is not None and (boundary.startswith(other) or other.startswith(boundary)):
                self.add_defect("boundary_ambiguous", f"boundary of part {cur.part_number} and of"
                                f" part {outer.part_number}: one is a prefix of the other",
                                cur.part_number)


def _slices(chunks: Iterable[bytes]) -> Iterator[bytes]:
    for chunk in chunks:
        if len(chunk) <= FEED_SLICE:
            yield chunk
        else:
            view = memoryview(chunk)
            for i in range(0, len(chunk), FEED_SLICE):
                yield bytes(view[i:i + FEED_SLICE])


def parse_message(chunks: Iterable[bytes], limits: Optional[MimeCheckConfig] = None,
                  smtputf8: bool = False) -> ParsedMessage:
    """Parse the raw message ``chunks`` within ``limits``.  Never raises:
    what goes wrong is a defect of the result."""
    limits = limits or MimeCheckConfig()
    parser = _BoundedParser(limits, smtputf8)
    size = 0
    partial = 0  # octets since the last line end
    complete = True
    root: Optional[BoundedPart] = None
    try:
        for piece in _slices(chunks):
            size += len(piece)
            if limits.max_size and size > limits.max_size:
                raise _Stop("too_large", f"more than {limits.max_size} octets")
            end = max(piece.rfind(b"\n"), piece.rfind(b"\r"))
            partial = partial + len(piece) if end < 0 else len(piece) - end - 1
            if partial > MAX_LINE:
                raise _Stop("line_too_long", f"a line of more than {MAX_LINE} octets")
            parser.feed(piece)
        root = parser.close()
    except _Stop as stop:
        parser.add_defect(stop.kind, stop.detail, parser.parts - 1 if parser.parts else 0)
        complete = False
    except Exception as e:  # the email package failed; that is a finding, not a crash
        parser.add_defect("parse_error", f"{type(e).__name__}: {e}"[:200],
                          parser.parts - 1 if parser.parts else 0)
        complete = False
    if root is None:
        # The parse stopped: whatever was built so far.  The message's own
        # header exists once its first body line was asked for.
        stack = parser._msgstack
        root = stack[0] if stack and stack[0]._mpp_in_body else None
    if root is not None:
        _collect_defects(parser, root)
    return ParsedMessage(
        message=root, defects=tuple(parser.defects), defect_count=parser.defect_count,
        size=size, parts=parser.parts, depth=parser.depth,
        header_lines=root._mpp_header_lines if root is not None else 0,
        complete=complete, truncated=parser.truncated)


def walk_parts(root: EmailMessage) -> Iterator[EmailMessage]:
    """Every part, depth first, without recursion (``Message.walk`` recurses,
    and a partial tree after a stopped parse is still a tree)."""
    stack = [root]
    while stack:
        part = stack.pop()
        yield part
        payload = (part._payload  # type: ignore[attr-defined]  # Message's own, not in typeshed
                   if isinstance(part, EmailMessage) else None)
        if isinstance(payload, list):
            stack.extend(reversed([p for p in payload if isinstance(p, EmailMessage)]))


def _collect_defects(parser: _BoundedParser, root: BoundedPart) -> None:
    for part in walk_parts(root):
        number = getattr(part, "part_number", 0)
        for defect in part.defects:
            _email_defect(parser, defect, number)
        names: dict[str, int] = {}
        for name, value in part.raw_items():
            lower = name.lower()
            names[lower] = names.get(lower, 0) + 1
            if isinstance(value, str) and is_clean(name, value):
                # fields.py: the strict parser would find nothing here
                continue
            try:
                header = _strict_field(part, name, value)
                defects = getattr(header, "defects", ())
            except Exception as e:  # the strict header parser's bug, recorded
                parser.add_defect("parse_error", f"header {name[:40]!r}: {type(e).__name__}",
                                  number)
                continue
            for defect in defects:
                _email_defect(parser, defect, number, f"header {name[:40]!r}: ")
        for lower in sorted(_SINGLE):
            if names.get(lower, 0) > 1:
                parser.add_defect("header_duplicate", f"{lower} {names[lower]} times", number)


def _strict_field(part: Any, name: str, value: Any) -> Any:
    """The strict header object of a raw field (the one the part already
    made when it has one)."""
    if isinstance(part, BoundedPart):
        return part.field(name, value, keep=False)
    return STRICT.header_fetch_parse(name, value)


def _email_defect(parser: _BoundedParser, defect: Any, part: int, prefix: str = "") -> None:
    name = type(defect).__name__
    kind = _EMAIL_DEFECTS.get(name, "other")
    if kind:
        parser.add_defect(kind, f"{prefix}{name}: {defect}"[:200], part)


def parse_scan_input(message: Any, limits: Optional[MimeCheckConfig] = None) -> ParsedMessage:
    """The ``ParsedMessage`` of a ``ScanInput``: the one the MIME check left
    in ``parsed``, or a new parse."""
    if isinstance(message.parsed, ParsedMessage):
        return message.parsed
    return parse_message(message.chunks(), limits, getattr(message, "smtputf8", False))


# -- reading headers safely, for the header and attachment rules ----------

def decode_text(value: str) -> str:
    """A header value as text: RFC 2047 encoded words decoded, raw 8-bit
    octets (surrogates from the parser) read as UTF-8, else Latin-1."""
    if not value.isascii():
        raw = value.encode("utf-8", "surrogateescape")
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            value = raw.decode("latin-1")
    if "=?" not in value:
        return value
    try:
        from email.header import decode_header, make_header

        return str(make_header(decode_header(value)))
    except (LookupError, UnicodeError, ValueError, email.errors.HeaderParseError):
        return value


def header_values(part: EmailMessage, name: str) -> list[str]:
    """Every value of the field ``name`` as decoded text.  The strict header
    parser's reading when it works, else our own decoding of the raw value."""
    out = []
    lower = name.lower()
    for raw_name, raw_value in part.raw_items():
        if raw_name.lower() != lower:
            continue
        try:
            if isinstance(part, BoundedPart):
                text = str(part.field(raw_name, raw_value, keep=False))
            else:
                text = str(part.policy.header_fetch_parse(raw_name, raw_value))
        except Exception:  # the strict parser failed: fall back to ours below
            text = ""
        if not text or "\ufffd" in text or not text.isprintable():
            text = decode_text(" ".join(str(raw_value).split()))
        out.append(text)
    return out
