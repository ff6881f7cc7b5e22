"""Disclaimers: a text appended to outgoing mail, MIME-correctly.

Stage: the action, after the verdict, before relaying (``actions/rewrite.py``).
``apply`` takes the message's own header section and body (raw octets, CRLF
lines) and returns the rewritten pair, or None with the reason it left the
message alone:

* a single-part text/plain or text/html message whose charset has a text:
  the body is decoded (7bit, 8bit, binary, quoted-printable, base64),
  the text appended (in HTML before ``</body>`` when there is one), and
  encoded again the same way; a 7bit body that is no longer ASCII becomes
  quoted-printable (RFC 2045 6.7);
* multipart/alternative: the same for each text/plain and text/html
  alternative (so every reader sees it);
* multipart/mixed (and other multipart/* that are neither signed nor
  encrypted): a new text/plain part before the closing boundary, in the
  charset of the first text part (us-ascii when there is none);
* signed or encrypted messages (multipart/signed, multipart/encrypted,
  application/pkcs7-mime): left alone, as any change breaks them;
* anything else, or a charset without a text: left alone.

Only the parts touched are re-encoded; every other octet stays as it came,
so other parts, attachments and header fields keep their bytes.
"""
from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import html
import quopri
import re
from email.message import Message
from typing import Optional, Sequence

from mppproxy.config.policy import DisclaimerText, charset_key

_SIGNED = {"multipart/signed", "multipart/encrypted", "application/pkcs7-mime",
           "application/x-pkcs7-mime", "application/pkcs7-signature"}
_REENCODABLE = {"7bit", "8bit", "binary", "quoted-printable", "base64"}
_BODY_END = re.compile(r"</body\s*>", re.I)


class Skipped(Exception):
    """The message is left alone; the text says why (for the log)."""


def _text_for(texts: Sequence[DisclaimerText], charset: str) -> DisclaimerText:
    key = charset_key(charset)
    for t in texts:
        if charset_key(t.charset) == key:
            return t
    raise Skipped(f"no disclaimer text for charset {charset}")


def _parse_header(header: bytes) -> Message:
    # compat32: the parser only reads fields here, never rewrites them.
    return email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
        header + b"\r\n")


def _cte(msg: Message) -> str:
    return str(msg.get("Content-Transfer-Encoding", "7bit")).strip().lower()


def _decode(body: bytes, cte: str) -> bytes:
    if cte == "base64":
        try:
            return base64.b64decode(re.sub(rb"\s+", b"", body), validate=True)
        except binascii.Error:
            raise Skipped("bad base64 body") from None
    if cte == "quoted-printable":
        return quopri.decodestring(body)
    return body


def _encode(text: str, charset: str, cte: str) -> bytes:
    """``text`` (LF line ends) in ``charset`` and ``cte``, with CRLF line
    ends: canonical form for base64 (RFC 2045 6.8), soft and hard breaks
    for quoted-printable (6.7)."""
    if cte == "quoted-printable":
        out = quopri.encodestring(text.encode(charset)).replace(b"\n", b"\r\n")
        return out if out.endswith(b"\r\n") else out + b"\r\n"
    raw = text.replace("\n", "\r\n").encode(charset)
    if cte == "base64":
        return base64.encodebytes(raw).replace(b"\n", b"\r\n")
    return raw


def _set_field(header: bytes, name: str, value: str) -> bytes:
    """``header`` with the field ``name`` (and its continuation lines)
    replaced by ``name: value``, or the field added."""
    lines = header.splitlines(keepends=True)
    out: list[bytes] = []
    key = name.lower().encode("ascii") + b":"
    replaced = skipping = False
    for line in lines:
        if skipping and line[:1] in (b" ", b"\t"):
            continue
        skipping = line.lower().startswith(key)
        if skipping:
            if not replaced:
                out.append(f"{name}: {value}\r\n".encode("ascii"))
                replaced = True
            continue
        out.append(line)
    if not replaced:
        out.append(f"{name}: {value}\r\n".encode("ascii"))
    return b"".join(out)


def _append_text(header: bytes, body: bytes, texts: Sequence[DisclaimerText]
                 ) -> tuple[bytes, bytes]:
    """One text/plain or text/html entity (header fields, then the body
    after the empty line) with the disclaimer appended."""
    msg = _parse_header(header)
    ctype = msg.get_content_type()
    charset = msg.get_content_charset() or "us-ascii"
    text = _text_for(texts, charset)
    cte = _cte(msg)
    if cte not in _REENCODABLE:
        raise Skipped(f"content-transfer-encoding {cte} cannot be re-encoded")
    try:
        decoded = _decode(body, cte).decode(charset)
    except (UnicodeError, LookupError):
        raise Skipped(f"body is not {charset}") from None
    decoded = decoded.replace("\r\n", "\n")
    if ctype == "text/html":
        addition = text.html or f"<pre>{html.escape(text.plain)}</pre>"
        ends = list(_BODY_END.finditer(decoded))
        if ends:
            cut = ends[-1].start()
            new = decoded[:cut] + addition + "\n" + decoded[cut:]
        else:
            new = decoded + ("" if decoded.endswith("\n") else "\n") + addition + "\n"
    else:
        new = decoded + ("" if decoded.endswith("\n") else "\n") + text.plain
        if not new.endswith("\n"):
            new += "\n"
    if cte in ("7bit", "8bit") and (
            cte == "7bit" and not new.encode(charset).isascii()
            or any(len(line.encode(charset)) > 998 for line in new.split("\n"))):
        # RFC 2045 6.7: 8-bit text in a 7bit body, or a line past SMTP's
        # 998 octets (RFC 5321 4.5.3.1.6), goes out quoted-printable.
        cte = "quoted-printable"
        header = _set_field(header, "Content-Transfer-Encoding", cte)
    return header, _encode(new, charset, cte)


def _split_entity(data: bytes) -> tuple[bytes, bytes]:
    """(header fields, body) of one MIME part: the body after the empty line."""
    if data.startswith(b"\r\n"):
        return b"", data[2:]
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, b""
    return data[:end + 2], data[end + 4:]


def _part_spans(body: bytes, boundary: str) -> tuple[list[tuple[int, int]], int]:
    """(start, end) of each part of a multipart body, and the offset of the
    closing delimiter.  RFC 2046 5.1.1: the CRLF before a delimiter belongs
    to the delimiter, so a part ends there."""
    delim = re.compile(rb"(?:^|\r\n)--" + re.escape(boundary.encode("ascii", "replace"))
                       + rb"(--)?[ \t]*(?=\r\n|$)")
    spans: list[tuple[int, int]] = []
    start: Optional[int] = None
    for m in delim.finditer(body):
        if start is not None:
            spans.append((start, max(start, m.start())))
        if m.group(1):
            return spans, m.start()
        line_end = body.find(b"\r\n", m.end())
        start = len(body) if line_end < 0 else line_end + 2
    raise Skipped("multipart without a closing boundary")


def _new_part(texts: Sequence[DisclaimerText], charset: str) -> bytes:
    text = _text_for(texts, charset)
    plain = text.plain.replace("\r\n", "\n")
    if not plain.endswith("\n"):
        plain += "\n"
    cte = "7bit" if plain.isascii() else "quoted-printable"
    return (f"Content-Type: text/plain; charset=\"{text.charset}\"\r\n"
            f"Content-Transfer-Encoding: {cte}\r\n"
            "Content-Disposition: inline\r\n\r\n").encode("ascii") + _encode(plain, charset, cte)


def _first_text_charset(body: bytes, boundary: str) -> Optional[str]:
    spans, _ = _part_spans(body, boundary)
    for start, end in spans:
        header, _ = _split_entity(body[start:end])
        msg = _parse_header(header)
        if msg.get_content_maintype() == "text":
            return msg.get_content_charset() or "us-ascii"
    return None


def _rewrite(header: bytes, body: bytes, texts: Sequence[DisclaimerText], depth: int
             ) -> tuple[bytes, bytes]:
    msg = _parse_header(header)
    ctype = msg.get_content_type()
    if ctype in _SIGNED:
        raise Skipped(f"{ctype} is signed or encrypted")
    if ctype in ("text/plain", "text/html"):
        if str(msg.get("Content-Disposition", "")).strip().lower().startswith("attachment"):
            raise Skipped("the text is an attachment")
        return _append_text(header, body, texts)
    if msg.get_content_maintype() != "multipart":
        raise Skipped(f"{ctype} has no text to append to")
    boundary = msg.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise Skipped("multipart without a boundary")
    if _cte(msg) not in ("7bit", "8bit", "binary"):
        raise Skipped("multipart with a content-transfer-encoding")
    spans, close = _part_spans(body, boundary)
    if ctype == "multipart/alternative":
        out = bytearray()
        pos = 0
        changed = 0
        for start, end in spans:
            part_header, part_body = _split_entity(body[start:end])
            sub = _parse_header(part_header)
            if sub.get_content_type() in ("text/plain", "text/html"):
                # Each alternative in its own charset; all or nothing.
                new_header, new_body = _append_text(part_header, part_body, texts)
            elif sub.get_content_maintype() == "multipart" and depth < 5:
                # multipart/related holding the HTML, typically.
                new_header, new_body = _rewrite(part_header, part_body, texts, depth + 1)
            else:
                continue
            out += body[pos:start] + new_header + b"\r\n" + new_body.removesuffix(b"\r\n")
            pos = end
            changed += 1
        if not changed:
            raise Skipped("multipart/alternative without a text alternative")
        out += body[pos:]
        return header, bytes(out)
    if ctype == "multipart/related" and spans:
        # The first part is the root (RFC 2387 3.2): append to it.
        start, end = spans[0]
        part_header, part_body = _split_entity(body[start:end])
        new_header, new_body = _rewrite(part_header, part_body, texts, depth + 1)
        return header, (body[:start] + new_header + b"\r\n" + new_body.removesuffix(b"\r\n")
                        + body[end:])
    charset = _first_text_charset(body, boundary) or "us-ascii"
    part = _new_part(texts, charset)
    return header, (body[:close] + b"\r\n--" + boundary.encode("ascii", "replace") + b"\r\n"
                    + part.removesuffix(b"\r\n") + body[close:])


def apply(header: bytes, body: bytes, texts: Sequence[DisclaimerText]
          ) -> tuple[Optional[tuple[bytes, bytes]], str]:
    """((new header, new body), "") or (None, why it was left alone).
    ``header`` is the message's fields (CRLF lines, without the empty line);
    ``body`` what follows, starting with that empty line."""
    if body.startswith(b"\r\n"):
        body = body[2:]
    try:
        new_header, new_body = _rewrite(header, body, texts, 0)
    except Skipped as e:
        return None, str(e)
    return (new_header, b"\r\n" + new_body), ""
