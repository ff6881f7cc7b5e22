"""Scanner ``attachments``: rules on attachment names and content types
(issue #5).

Stage: post-DATA, after the MIME checks, whose parsed message it reads.
Every attachment (a part with a file name, or whose type is not text,
multipart or message) becomes an *item*: its file name, normalised the way
the recipient's system will read it, and its type detected from the first
octets of its decoded content.  Zip archives are opened and each member is
an item too, nested archives to ``max_archive_depth``.  Each rule of
``AttachmentConfig.rules`` is checked against every item.

Bounds (docs/design.md promise 6): the parsed parts hold at most
``scan.mime.memory_bytes``; an archive's central directory is sized from
its end record before ``zipfile`` reads it, so a directory of a million
entries is never loaded; at most ``max_archive_entries`` members are looked
at per message, only their first octets are decompressed (a nested archive
is read whole), and all decompression together stops at
``max_archive_bytes`` -- a zip bomb costs that much, not its expansion.
What could not be looked at is itself a finding (``archive_limits``).
"""
from __future__ import annotations

import io
import lzma
import re
import struct
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from mppproxy.results import CheckResult, HardAction
from mppproxy.scan.base import Scanner, ScanInput
from mppproxy.config.scan import (EXECUTABLE_TYPES, AttachmentConfig, AttachmentRule, MimeCheckConfig,
                                  parse_action)
from mppproxy.scan.hits import combine
from mppproxy.scan.mime import decode_text, parse_scan_input, walk_parts

# Octets of each member read for its type; 0x8806 reaches the ISO 9660
# volume descriptor at 0x8001.
HEAD = 0x8806

_MAGIC = (
    (b"MZ", "exe"), (b"\x7fELF", "elf"),
    (b"\xfe\xed\xfa\xce", "macho"), (b"\xfe\xed\xfa\xcf", "macho"),
    (b"\xce\xfa\xed\xfe", "macho"), (b"\xcf\xfa\xed\xfe", "macho"), (b"\xca\xfe\xba\xbf", "macho"),
    (b"#!", "script"),
    (b"L\x00\x00\x00\x01\x14\x02\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00F", "lnk"),
    (b"PK\x03\x04", "zip"), (b"PK\x05\x06", "zip"), (b"PK\x07\x08", "zip"),
    (b"Rar!\x1a\x07", "rar"), (b"7z\xbc\xaf\x27\x1c", "7z"), (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"MSCF", "cab"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "ole"), (b"%PDF-", "pdf"),
)

# Invisible or reordering characters in a name: bidirectional controls
# (U+202E RIGHT-TO-LEFT OVERRIDE shows "fdp.exe" as "exe.pdf"), zero-width
# characters, soft hyphen, and C0 controls such as NUL.
_DECEPTIVE = re.compile("[\u0000-\u001f\u007f\u00ad\u061c\u200b-\u200f\u202a-\u202e"
                        "\u2060-\u2064\u2066-\u2069\ufeff]")


def detect_type(head: bytes) -> str:
    """The type name of content starting with ``head``, "" if none."""
    if head[:4] == b"\xca\xfe\xba\xbe":
        # Fat Mach-O and Java class files share this magic; a fat binary
        # counts its architectures (a few), a class file has its version (>= 45).
        return "macho" if len(head) >= 8 and struct.unpack(">I", head[4:8])[0] < 45 else "java"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[0x8001:0x8006] == b"CD001":
        return "iso"
    return ""


def normalise_name(name: str) -> tuple[str, bool]:
    """The file name as the recipient's system will take it, lower case,
    and whether it held deceptive characters.  Encoded words and raw 8-bit
    are decoded, compatibility forms folded (NFKC: a full-width "ｅｘｅ" is
    "exe"), directories dropped, and trailing dots and spaces removed (Windows
    drops them: "a.exe. " opens as "a.exe")."""
    name = decode_text(name)
    deceptive = bool(_DECEPTIVE.search(name))
    name = _DECEPTIVE.sub("", name)
    name = unicodedata.normalize("NFKC", name)
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = name.rstrip(" .")
    return name.casefold(), deceptive


def extension(name: str) -> str:
    return name.rsplit(".", 1)[1] if "." in name else ""


@dataclass(frozen=True)
class Item:
    """One attachment or archive member."""

    name: str          # normalised
    type: str          # detected, "" unknown
    depth: int = 0     # 0: the attachment; 1: a member of it; ...
    path: str = ""     # for reasons: "outer.zip/inner.zip/x.exe"


class _Scan:
    """Collects the items and findings of one message."""

    def __init__(self, settings: AttachmentConfig):
        self.settings = settings
        self.items: list[Item] = []
        self.flags: dict[str, str] = {}  # flag -> where
        self.budget = settings.max_archive_bytes
        self.entries = settings.max_archive_entries

    def flag(self, name: str, where: str) -> None:
        self.flags.setdefault(name, where)

    def add(self, name: str, content: bytes, depth: int, path: str, complete: bool) -> None:
        norm, deceptive = normalise_name(name) if name else ("", False)
        if deceptive:
            self.flag("deceptive_name", path)
        kind = detect_type(content[:HEAD])
        self.items.append(Item(norm, kind, depth, path))
        if kind == "zip":
            if not complete:
                self.flag("archive_limits", path)
            elif depth >= self.settings.max_archive_depth:
                self.flag("archive_limits", path)
            else:
                self.open_zip(content, depth + 1, path)

    def open_zip(self, data: bytes, depth: int, path: str) -> None:
        directory = _zip_directory(data)
        if directory is None:
            self.flag("archive_limits", path)
            return
        count, size = directory
        # an entry needs 46 octets plus its name; 1 KiB is generous
        if count > self.entries or size > self.entries * 1024:
            self.flag("archive_limits", path)
            return
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError, struct.error,
                UnicodeDecodeError, NotImplementedError, KeyError, IndexError) as e:
            self.flag("archive_limits", f"{path}: {type(e).__name__}")
            return
        with archive:
            for info in archive.infolist():
                if self.entries <= 0:
                    self.flag("archive_limits", path)
                    return
                self.entries -= 1
                if info.is_dir():
                    continue
                member = f"{path}/{info.filename}"
                if info.flag_bits & 0x1:
                    self.flag("encrypted_archive", member)
                    self.add(info.filename, b"", depth, member, True)
                    continue
                content, complete = self.read_member(archive, info, member)
                self.add(info.filename, content, depth, member, complete)

    def read_member(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> tuple[bytes, bool]:
        """The member's first HEAD octets, or all of it when it is an
        archive we may open; (content, whether it is whole)."""
        if self.budget <= 0:
            self.flag("archive_limits", where)
            return b"", False
        try:
            with archive.open(info) as f:
                head = f.read(min(HEAD, self.budget))
                self.budget -= len(head)
                if detect_type(head) != "zip":
                    # only an archive needs all of it
                    return head, True
                rest = f.read(self.budget + 1)
                if len(rest) > self.budget:
                    self.budget = 0
                    self.flag("archive_limits", where)
                    return head, False
                self.budget -= len(rest)
                return head + rest, True
        except (zipfile.BadZipFile, ValueError, EOFError, OSError, RuntimeError, NotImplementedError,
                struct.error, zlib.error, lzma.LZMAError, LookupError) as e:
            # corrupt data, unsupported compression, a CRC error, a name in
            # the directory that differs from the local header's
            self.flag("archive_limits", f"{where}: {type(e).__name__}")
            return b"", False


def _zip_directory(data: bytes) -> Optional[tuple[int, int]]:
    """(entries, central directory octets) from the end record (zip64 too),
    or None when there is none (APPNOTE.TXT 4.3.16, 4.3.14)."""
    pos = data.rfind(b"PK\x05\x06", max(0, len(data) - 65557))
    if pos < 0 or pos + 22 > len(data):
        return None
    count, size = struct.unpack_from("<HI", data, pos + 10)
    if count == 0xFFFF or size == 0xFFFFFFFF:
        locator = pos - 20
        if locator >= 0 and data[locator:locator + 4] == b"PK\x06\x07":
            (offset,) = struct.unpack_from("<Q", data, locator + 8)
            if offset + 56 <= len(data) and data[offset:offset + 4] == b"PK\x06\x06":
                count, size = struct.unpack_from("<QQ", data, offset + 32)
    return count, size


_NAME_PARAM = re.compile(r"name\*?(?:\*\d+\*?)?\s*=\s*\"?([^\";]+)", re.I)


def _filename(part: Any) -> str:
    """The part's file name (RFC 2231 and RFC 2047 decoded)."""
    try:
        name = part.get_filename()
    except Exception:  # the strict parameter parser failed: read the raw header instead
        name = None
        for header in ("content-disposition", "content-type"):
            raw = " ".join(str(v) for k, v in part.raw_items() if k.lower() == header)
            match = _NAME_PARAM.search(raw)
            if match:
                name = match.group(1)
                break
    return str(name) if name else ""


def _payload(part: Any) -> bytes:
    """The decoded content (base64, quoted-printable, uuencode); content
    that does not decode is taken as it stands."""
    try:
        data = part.get_payload(decode=True)
    except Exception:  # a decoder failed on hostile input: the raw content below
        data = None
    if isinstance(data, bytes):
        return data
    raw = part.get_payload()
    return raw.encode("ascii", "surrogateescape") if isinstance(raw, str) else b""


def attachments(root: Any) -> Iterator[tuple[Any, str, bool]]:
    """(part, file name, is an attachment) for every leaf part."""
    for part in walk_parts(root):
        if part.is_multipart() or part.get_content_maintype() in ("multipart", "message"):
            continue
        name = _filename(part)
        disposition = str(part.get("content-disposition", "")).split(";")[0].strip().lower()
        attached = bool(name) or disposition == "attachment" or part.get_content_maintype() != "text"
        yield part, name, attached


class AttachmentScanner(Scanner):
    """Attachment rules by name, extension and detected type."""

    name = "attachments"
    settings: AttachmentConfig

    def __init__(self, settings: Optional[AttachmentConfig] = None, reactor: Any = None,
                 mime_limits: Optional[MimeCheckConfig] = None):
        super().__init__(settings or AttachmentConfig(), reactor)
        self._mime_limits = mime_limits
        self._rules = [(rule, re.compile(rule.filename, re.I) if rule.filename else None,
                        set(rule.extensions), _expand(rule.types), *parse_action(rule.action))
                       for rule in self.settings.rules]

    def items(self, message: ScanInput) -> _Scan:
        """Every attachment and archive member of the message, and the flags."""
        scan = _Scan(self.settings)
        root = parse_scan_input(message, self._mime_limits).message
        if root is None:
            return scan
        for index, (part, name, attached) in enumerate(attachments(root)):
            content = _payload(part)
            if not attached and detect_type(content[:8]) not in ("exe", "elf", "macho"):
                # a text body; only a program disguised as one counts
                continue
            path = _printable(name) or f"part{getattr(part, 'part_number', index)}"
            scan.add(name, content, 0, path, not getattr(part, "truncated", False))
        return scan

    async def scan(self, message: ScanInput) -> CheckResult:
        if not self.settings.enabled:
            return CheckResult()
        found = self.items(message)
        hits: list[tuple[str, Optional[HardAction], float]] = []
        for rule, regex, exts, types, action, score in self._rules:
            for item in found.items:
                if _matches(rule, regex, exts, types, item):
                    if action is not None or score:
                        hits.append((f"attachment:{rule.name}:{_printable(item.path)[:80]}", action, score))
                    break
        for flag, where in found.flags.items():
            action, score = parse_action(getattr(self.settings, flag))
            if action is not None or score:
                hits.append((f"attachment:{flag}:{_printable(where)[:80]}", action, score))
        return combine(hits, "attachment")


def _expand(types: tuple[str, ...]) -> set[str]:
    out = set(types)
    if "executable" in out:
        out.discard("executable")
        out.update(EXECUTABLE_TYPES)
    return out


def _matches(rule: AttachmentRule, regex: Optional[re.Pattern[str]], exts: set[str], types: set[str],
             item: Item) -> bool:
    if item.depth and not rule.in_archives:
        return False
    if regex is not None and not regex.search(item.name):
        return False
    if exts and extension(item.name) not in exts:
        return False
    if types and item.type not in types:
        return False
    return True


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)
