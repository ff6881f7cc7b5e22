"""The ``attachments`` scanner (issue #5): names, detected types, archives."""
from __future__ import annotations

import base64
import io
import struct
import time
import tracemalloc
import zipfile

import pytest
from hypothesis import given, settings, strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mppproxy.results import HardAction
from mppproxy.scan.base import ScanInput
from mppproxy.config.scan import AttachmentConfig, AttachmentRule, MimeCheckConfig, _check_attachment_rules, _types
from mppproxy.scan.mime import parse_message
from mppproxy.scan.scanners.attachments import AttachmentScanner, detect_type, normalise_name
from mppproxy.templates import REFUSALS

PE = b"MZ\x90\x00" + b"\x00" * 60 + b"PE\x00\x00" + b"\x00" * 200
ELF = b"\x7fELF\x02\x01\x01" + b"\x00" * 100
MACHO = b"\xcf\xfa\xed\xfe" + b"\x00" * 100
FAT_MACHO = b"\xca\xfe\xba\xbe\x00\x00\x00\x02" + b"\x00" * 100
JAVA = b"\xca\xfe\xba\xbe\x00\x00\x00\x34" + b"\x00" * 100
LNK = b"L\x00\x00\x00\x01\x14\x02\x00\x00\x00\x00\x00\xc0\x00\x00\x00\x00\x00\x00F" + b"\x00" * 60
PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + b"0" * 100
SCRIPT = b"#!/bin/sh\nrm -rf ~\n"


def run(coro):
    d = Deferred.fromCoroutine(coro)
    out = []
    d.addBoth(out.append)
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def part(content: bytes, filename: str | None = None, ctype: str = "application/octet-stream",
         disposition: str | None = None) -> str:
    lines = [f"Content-Type: {ctype}"]
    if disposition is not None:
        lines.append(f"Content-Disposition: {disposition}")
    elif filename is not None:
        lines.append(f"Content-Disposition: attachment; filename=\"{filename}\"")
    lines += ["Content-Transfer-Encoding: base64", ""]
    encoded = base64.b64encode(content).decode()
    lines += [encoded[i:i + 76] for i in range(0, len(encoded), 76)]
    return "\r\n".join(lines)


def mail(*parts: str) -> bytes:
    out = ["From: a@example.com", "To: b@example.com", "Subject: files", "MIME-Version: 1.0",
           "Content-Type: multipart/mixed; boundary=\"=_b_=\"", "", "--=_b_=",
           "Content-Type: text/plain", "", "see attached"]
    for p in parts:
        out += ["--=_b_=", p]
    out += ["--=_b_=--", ""]
    return "\r\n".join(out).encode("utf-8")


def scan(data: bytes, settings_: AttachmentConfig | None = None, mime: MimeCheckConfig | None = None):
    scanner = AttachmentScanner(settings_ or AttachmentConfig(), Clock())
    inp = ScanInput(chunks=lambda: iter([data]), size=len(data), parsed=parse_message([data], mime))
    return run(scanner.scan(inp))


def zipped(*members: tuple[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, content in members:
            z.writestr(name, content)
    return buf.getvalue()


def kinds(result) -> list[str]:
    return [r.split(":")[1] for r in result.reasons]


@pytest.mark.parametrize("head, kind", [
    (PE, "exe"), (ELF, "elf"), (MACHO, "macho"), (FAT_MACHO, "macho"), (JAVA, "java"),
    (LNK, "lnk"), (PDF, "pdf"), (SCRIPT, "script"), (zipped(("a", b"x")), "zip"),
    (b"Rar!\x1a\x07\x01\x00", "rar"), (b"7z\xbc\xaf\x27\x1c\x00\x04", "7z"),
    (b"\x1f\x8b\x08\x00", "gzip"), (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "ole"),
    (b"\x00" * 0x8001 + b"CD001", "iso"), (b"hello", ""), (b"", ""),
])
def test_detect_type(head, kind):
    """Types come from the content's first octets, not from the name."""
    assert detect_type(head) == kind


@pytest.mark.parametrize("raw, name, deceptive", [
    ("Invoice.PDF.EXE", "invoice.pdf.exe", False),
    ("a.exe. . ", "a.exe", False),                      # Windows drops trailing dots and spaces
    ("C:\\Users\\x\\a.exe", "a.exe", False),
    ("\uff41.\uff45\uff58\uff45", "a.exe", False),      # full-width letters (NFKC)
    ("invoice\u202efdp.exe", "invoicefdp.exe", True),   # shows as "invoiceexe.pdf"
    ("a\u200b.exe", "a.exe", True),
    ("=?utf-8?b?cmVwb3J0LmV4ZQ==?=", "report.exe", False),
])
def test_normalise_name(raw, name, deceptive):
    """Names are read as the recipient's system will read them."""
    assert normalise_name(raw) == (name, deceptive)


@pytest.mark.parametrize("disposition", [
    "attachment; filename=\"invoice.pdf.exe\"",                        # double extension
    "attachment; filename=\"INVOICE.EXE\"",                             # case
    "attachment; filename=\"invoice.exe . .\"",                        # trailing dots/spaces
    "attachment; filename*=utf-8''invoice%2Eexe",                       # RFC 2231
    "attachment; filename*0=\"inv\"; filename*1=\"oice.e\"; filename*2=\"xe\"",  # RFC 2231 continuations
    "attachment; filename=\"=?utf-8?q?invoice=2Eexe?=\"",              # RFC 2047 in a parameter
    "attachment; filename=\"a.js\"",
    "attachment; filename=\"a.pdf.scr\"",
])
def test_dangerous_names_are_refused(disposition):
    """A name Windows would run is refused by default, however it is spelt;
    the reply uses the "attachment" template, 550 5.7.1."""
    result = scan(mail(part(b"harmless text", disposition=disposition)))
    assert result.action is HardAction.REJECT and result.template == "attachment"
    assert "dangerous-extension" in kinds(result)
    assert REFUSALS["attachment"] == (550, "5.7.1")


def test_name_from_content_type_when_no_disposition():
    """The Content-Type name parameter counts when there is no filename."""
    data = mail(part(b"x", ctype="application/octet-stream; name=\"setup.exe\"", disposition=""))
    assert "dangerous-extension" in kinds(scan(data))


def test_rlo_name_is_deceptive():
    """A right-to-left override in a name is flagged, and the extension is
    the real one: "report<RLO>fdp.exe" is an .exe."""
    result = scan(mail(part(b"x", filename="report\u202eexe.pdf")))
    assert kinds(result) == ["deceptive_name"]
    assert result.score == 5 and result.action is None
    result = scan(mail(part(b"x", filename="report\u202efdp.exe")))
    assert set(kinds(result)) == {"deceptive_name", "dangerous-extension"}


@pytest.mark.parametrize("content", [PE, ELF, MACHO, LNK])
def test_programs_are_refused_whatever_their_name(content):
    """A program is refused by its content even when named like a PDF."""
    result = scan(mail(part(content, filename="invoice.pdf")))
    assert result.action is HardAction.REJECT
    assert kinds(result) == ["executable"]
    assert result.reasons[0] == "attachment:executable:invoice.pdf"


def test_scripts_score():
    """A #! script attached scores 2; an inline text body starting with #!
    is not an attachment."""
    assert (scan(mail(part(SCRIPT, filename="fix.sh"))).score, kinds(scan(mail(part(SCRIPT, filename="fix.sh"))))) \
        == (2.0, ["script"])
    inline = mail("Content-Type: text/plain\r\n\r\n#!/bin/sh\r\necho hi")
    assert not scan(inline).hit


def test_program_disguised_as_text_body():
    """A text/plain body that decodes to a program counts as one."""
    data = mail(part(PE, ctype="text/plain"))
    assert kinds(scan(data)) == ["executable"]


def test_clean_attachments_pass():
    """A PDF and a zip of documents pass."""
    data = mail(part(PDF, filename="report.pdf"), part(zipped(("a.txt", b"hello"), ("b.pdf", PDF)),
                                                       filename="docs.zip"))
    result = scan(data)
    assert not result.hit, result


def test_program_inside_zip():
    """A program inside a zip is found, and the reason names its path."""
    data = mail(part(zipped(("readme.txt", b"hi"), ("dir/tool.dat", PE)), filename="files.zip"))
    result = scan(data)
    assert result.action is HardAction.REJECT
    assert result.reasons == ("attachment:executable:files.zip/dir/tool.dat",)


def test_dangerous_name_inside_zip():
    """A dangerous name inside a zip counts too; ``in_archives = false``
    rules do not look inside."""
    data = mail(part(zipped(("invoice.pdf.js", b"WScript.Echo(1)")), filename="files.zip"))
    assert kinds(scan(data)) == ["dangerous-extension"]
    only_top = AttachmentConfig(rules=(AttachmentRule(name="js", extensions=("js",), in_archives=False),))
    assert not scan(data, only_top).hit


def test_nested_archives_to_a_bounded_depth():
    """Archives in archives are opened to max_archive_depth; deeper ones are
    an ``archive_limits`` finding."""
    inner = zipped(("x.exe.txt", PE))
    for _ in range(3):
        inner = zipped(("nested.zip", inner))
    data = mail(part(inner, filename="outer.zip"))   # the program is 4 archives deep
    result = scan(data)
    assert kinds(result) == ["archive_limits"] and result.score == 2.0
    result = scan(data, AttachmentConfig(max_archive_depth=4))
    assert kinds(result) == ["executable"]


def set_encrypted(data: bytes) -> bytes:
    out = bytearray(data)
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = out.find(sig)
        flags = struct.unpack_from("<H", out, pos + offset)[0]
        struct.pack_into("<H", out, pos + offset, flags | 1)
    return bytes(out)


def test_encrypted_archive_is_flagged():
    """A password-protected member is flagged (score 3 by default); its name
    is still checked."""
    data = mail(part(set_encrypted(zipped(("doc.txt", b"secret"), compression=zipfile.ZIP_STORED)),
                     filename="locked.zip"))
    result = scan(data)
    assert kinds(result) == ["encrypted_archive"] and result.score == 3.0
    data = mail(part(set_encrypted(zipped(("run.exe", b"x"), compression=zipfile.ZIP_STORED)),
                     filename="locked.zip"))
    assert set(kinds(scan(data))) == {"encrypted_archive", "dangerous-extension"}


def test_corrupt_and_lying_archives():
    """A zip without an end record, or whose local header names another file
    than its directory (extractors disagree which is real), is an
    ``archive_limits`` finding, not a crash."""
    good = zipped(("a.txt", b"hello"), compression=zipfile.ZIP_STORED)
    truncated = good[:len(good) // 2]
    lying = good.replace(b"a.txt", b"a.exe", 1)    # the local header only
    for data in (truncated, lying, b"PK\x03\x04" + b"\xff" * 100):
        result = scan(mail(part(data, filename="x.zip")))
        assert kinds(result) == ["archive_limits"], result


def test_too_many_entries_are_not_loaded():
    """An archive declaring more members than max_archive_entries is not
    opened (its directory is never loaded)."""
    data = zipped(*[(f"f{i}.txt", b"") for i in range(1500)], compression=zipfile.ZIP_STORED)
    result = scan(mail(part(data, filename="many.zip")))
    assert kinds(result) == ["archive_limits"]
    assert not scan(mail(part(data, filename="many.zip")), AttachmentConfig(max_archive_entries=2000)).hit


def test_zip_bomb_is_cheap():
    """A member that expands to 200 MB costs its first 34 KiB; a nest of
    such archives stops at max_archive_bytes; memory and time stay bounded."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("zeros.bin", "w", force_zip64=True) as f:
            block = b"\0" * (1 << 20)
            for _ in range(200):
                f.write(block)
    bomb = buf.getvalue()
    layer = zipped(*[(f"b{i}.zip", bomb) for i in range(10)], compression=zipfile.ZIP_STORED)
    nest = zipped(*[(f"l{i}.zip", layer) for i in range(5)], compression=zipfile.ZIP_STORED)
    data = mail(part(nest, filename="42.zip"))
    budget = 4 * 1024 * 1024
    scanner = AttachmentScanner(AttachmentConfig(max_archive_bytes=budget), Clock())
    inp = ScanInput(chunks=lambda: iter([data]), size=len(data), parsed=parse_message([data]))
    tracemalloc.start()
    start = time.perf_counter()
    result = run(scanner.scan(inp))
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert kinds(result) == ["archive_limits"]   # the budget ran out
    assert elapsed < 10
    # decoding the attachment, plus the archive budget
    assert peak < 4 * len(nest) + 2 * budget, (peak, len(nest))


def test_archive_cut_short_by_the_memory_bound():
    """A zip attachment larger than scan.mime.memory_bytes cannot be opened
    (its directory is at the end): an ``archive_limits`` finding."""
    data = mail(part(zipped(*[(f"f{i}.bin", bytes(range(256)) * 1024) for i in range(4)],
                            compression=zipfile.ZIP_STORED), filename="big.zip"))
    result = scan(data, mime=MimeCheckConfig(memory_bytes=256 * 1024))
    assert kinds(result) == ["archive_limits"]


def test_rules_combine_criteria():
    """A rule's criteria must all match: a ".pdf" that is a program."""
    rule = AttachmentRule(name="fake-pdf", extensions=("pdf",), types=("executable",), action="score:7")
    settings_ = AttachmentConfig(rules=(rule,))
    assert scan(mail(part(PE, filename="a.pdf")), settings_).score == 7.0
    assert not scan(mail(part(PDF, filename="a.pdf")), settings_).hit
    assert not scan(mail(part(PE, filename="a.bin")), settings_).hit
    regex = AttachmentRule(name="invoice", filename=r"^invoice[-_ ]?\d+", action="tempfail")
    result = scan(mail(part(PDF, filename="Invoice_2024.pdf")), AttachmentConfig(rules=(regex,)))
    assert (result.action, result.template) == (HardAction.TEMPFAIL, "tempfail")


def test_rule_validation():
    """A rule without any criterion, or with an unknown type, is refused."""
    assert _check_attachment_rules((AttachmentRule(name="empty"),))
    assert _types(("exe", "nonsense"))
    assert _types(("executable", "zip")) is None


def test_disabled():
    """With ``enabled = false`` nothing is looked at."""
    assert not scan(mail(part(PE, filename="a.exe")), AttachmentConfig(enabled=False)).hit


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.sampled_from(["a.zip", "b.exe", "c", "d.pdf"]))
def test_fuzz_attachments_never_raise(content, name):
    """Any content under any name, raw or inside a zip, never raises."""
    scan(mail(part(content, filename=name)))
    scan(mail(part(zipped((name, content)), filename="f.zip")))
    if len(content) > 30:
        # a real zip with bytes overwritten
        z = bytearray(zipped((name, content), ("x.zip", zipped(("y", content)))))
        z[len(z) // 2:len(z) // 2 + 8] = content[:8]
        scan(mail(part(bytes(z), filename="g.zip")))
