"""Settings of scanning after DATA (docs/design.md, "Configuration"):
``policies.NAME.scan`` (``ScanConfig``: the engines a policy asks, the
virus action, what is skipped) and the message checks it holds -- MIME
structure, header rules, attachment rules.

A leaf of ``config/``: frozen dataclasses, defaults with their reason, a
``check`` for every value; the scanners in ``scan/scanners/`` read them.
The keys are documented in docs/configuration.md ("Message checks": the
prefixes ``scan.mime.``, ``scan.headers.`` and ``scan.attachments.``).

An *action* is one string: ``"reject"`` (5xx), ``"tempfail"`` (4xx),
``"score:N"`` (add N, a finite number, to the message's score) or
``"ignore"`` (record nothing).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Optional

from mppproxy.config.authentication import DkimConfig, DmarcConfig
from mppproxy.config.fields import (at_least as _at_least, finite as _finite, opt as _opt,
                                    regex as _regex, tempfail_or_skip as _on_failure)
from mppproxy.match import check_address_patterns, check_cidrs
from mppproxy.results import HardAction


def parse_action(value: str) -> tuple[Optional[HardAction], float]:
    """``"reject"`` -> (REJECT, 0), ``"score:2.5"`` -> (None, 2.5),
    ``"ignore"`` -> (None, 0).  Raises ValueError for anything else."""
    if value == "reject":
        return HardAction.REJECT, 0.0
    if value == "tempfail":
        return HardAction.TEMPFAIL, 0.0
    if value == "ignore":
        return None, 0.0
    if value.startswith("score:"):
        score = float(value[6:])
        if not math.isfinite(score):
            raise ValueError("not finite")
        return None, score
    raise ValueError(value)


def check_action(value: str) -> Optional[str]:
    try:
        parse_action(value)
    except ValueError:
        return f"must be 'reject', 'tempfail', 'ignore' or 'score:N', not {value!r}"
    return None


_ACTION = _opt(check_action, "reject, tempfail, ignore or score:N")


@dataclass(frozen=True)
class MimeDefectActions:
    """What each kind of defect costs (``scan.mime.actions.<kind>``).

    "Dangerous" defects are those where two parsers can honestly disagree
    about what the message *is*: which headers it has, where a part ends,
    which part is an attachment.  The proxy's scanners see Python's reading;
    the recipient's client may see another one, so whatever the scanners
    did not see could be smuggled past them.  Those are refused by default.
    Defects that only make a message ugly get a small score or nothing.
    """

    # Two boundaries where one is a prefix of the other, or a line that
    # starts with a boundary delimiter but has more after it: RFC 2046
    # 5.1.1 tells parsers to match the boundary at the start of a line, and
    # Python matches the whole line, so the parts differ between readers.
    boundary_ambiguous: str = field(default="reject", metadata=_ACTION)
    # multipart/* without a boundary parameter: Python keeps the body as one
    # opaque text; lenient clients guess a boundary from the first "--" line
    # and show parts no scanner looked at.
    boundary_missing: str = field(default="reject", metadata=_ACTION)
    # The declared boundary never appears: same risk (the boundary a client
    # derives from an oddly quoted or RFC 2231-split parameter may differ).
    boundary_start_missing: str = field(default="reject", metadata=_ACTION)
    # Content-Type says multipart but no parts came out: always follows one
    # of the two above; refused for the same reason.
    multipart_invariant: str = field(default="reject", metadata=_ACTION)
    # No closing delimiter: the last part runs to the end for every reader,
    # truncated but legitimate mail has it.  A small score.
    boundary_close_missing: str = field(default="score:1", metadata=_ACTION)
    # A multipart or message/* part with base64 or quoted-printable
    # encoding (RFC 2045 6.4 forbids it): a reader that decodes first finds
    # other parts than one that does not (Python does not); a known
    # scanner-evasion trick.
    composite_cte: str = field(default="reject", metadata=_ACTION)
    # message/partial (RFC 2046 5.2.2): the client reassembles fragments
    # that no scanner saw whole; hardly used by legitimate mail today.
    message_partial: str = field(default="reject", metadata=_ACTION)
    # A line in a header section that is neither a field, a continuation,
    # nor the empty line: Python ends the header there, other readers skip
    # the line and take the fields below it as headers (hidden headers).
    header_without_colon: str = field(default="reject", metadata=_ACTION)
    # 8-bit octets in the message's header without SMTPUTF8 (RFC 6532, RFC
    # 6531 3.2), or not UTF-8 with it: each reader guesses a charset, so the
    # From the user sees is not the one any check saw.
    header_8bit: str = field(default="reject", metadata=_ACTION)
    # The same in a MIME part's header (raw UTF-8 file names are common
    # from broken clients); the attachment rules read the name both ways.
    part_header_8bit: str = field(default="score:1", metadata=_ACTION)
    # From, Sender, Content-Type, Content-Transfer-Encoding or
    # Content-Disposition twice in one header: readers pick different ones
    # (RFC 7489 6.6.1 for From; MIME evasion for the rest).
    header_duplicate: str = field(default="reject", metadata=_ACTION)
    # The first header line is a continuation: Python drops it, a relay
    # glues it to the field above (our Received:).  Odd, low risk.
    header_continuation_first: str = field(default="score:1", metadata=_ACTION)
    # A "From " line among the header fields (mbox damage); Python skips it.
    header_misplaced_from: str = field(default="score:1", metadata=_ACTION)
    # A field the strict header parser finds invalid (bad address list,
    # missing value, empty field name): common in legitimate mail too.
    header_invalid: str = field(default="score:0.5", metadata=_ACTION)
    # Obsolete syntax (RFC 5322 section 4) must be accepted.
    header_obsolete: str = field(default="ignore", metadata=_ACTION)
    # Bad base64 or an unknown charset in an encoded word.
    encoding_invalid: str = field(default="score:1", metadata=_ACTION)
    # The bounds below: the parse stopped there, so the rest of the message
    # was never checked, and such messages are attacks on parsers anyway.
    nesting_too_deep: str = field(default="reject", metadata=_ACTION)
    too_many_parts: str = field(default="reject", metadata=_ACTION)
    too_many_headers: str = field(default="reject", metadata=_ACTION)
    header_block_too_big: str = field(default="reject", metadata=_ACTION)
    line_too_long: str = field(default="reject", metadata=_ACTION)
    too_large: str = field(default="reject", metadata=_ACTION)
    # The parser itself failed (a bug, ours or the email package's): the
    # message could not be checked.  docs/design.md promise 4: tempfail, loudly.
    parse_error: str = field(default="tempfail", metadata=_ACTION)
    # Any defect the email package reports that has no kind above.
    other: str = field(default="score:1", metadata=_ACTION)

    def get(self, kind: str) -> str:
        return getattr(self, kind, self.other)


DEFECT_KINDS: tuple[str, ...] = tuple(f.name for f in fields(MimeDefectActions))


@dataclass(frozen=True)
class MimeCheckConfig:
    """MIME structure checks (scanner ``mime``): every message is parsed once,
    within these bounds, before any other scanner sees it."""

    enabled: bool = True
    # Levels of nesting below the message (a multipart or message/rfc822
    # is one level).  Forwarded-as-attachment chains rarely pass 5; ClamAV
    # stops at 17 (MaxRecursion).
    max_depth: int = field(default=20, metadata=_opt(_at_least(1)))
    # Parts in the whole message, containers included.
    max_parts: int = field(default=1000, metadata=_opt(_at_least(1)))
    # Lines in one header section (the message's or one part's).  A long
    # Received: chain has ~50; 1000 is an attack.
    max_header_lines: int = field(default=1000, metadata=_opt(_at_least(10)))
    # Octets in one header section; Exim's header_maxsize is 1 MiB, Postfix
    # keeps 100 KiB per field (header_size_limit).
    max_header_bytes: int = field(default=262144, metadata=_opt(_at_least(1024)))
    # Octets of the message (header sections and content) the parsed
    # message keeps in memory for the later scanners.  Past it, body lines
    # are checked for structure but left out of the parsed parts (which are
    # marked truncated), so memory stays bounded whatever the message size
    # (docs/design.md promise 6).  Header sections past it stop the parse
    # (``header_block_too_big``): they cannot be left out.
    memory_bytes: int = field(default=10 * 1024 * 1024, metadata=_opt(_at_least(65536)))
    # A message longer than this is not read further and gets the
    # ``too_large`` action.  0: no bound of its own (limits.max_message_size
    # already refused anything larger before the scanners).
    max_size: int = field(default=0, metadata=_opt(_at_least(0)))
    actions: MimeDefectActions = MimeDefectActions()


def _rule_kind(value: str) -> Optional[str]:
    if value not in ("header", "charset", "country"):
        return f"must be 'header', 'charset' or 'country', not {value!r}"
    return None


def _header_name(value: str) -> Optional[str]:
    # RFC 5322 2.2: printable ASCII except ":".
    if value and not re.fullmatch(r"[!-9;-~]+", value):
        return f"{value!r} is not a header field name"
    return None


@dataclass(frozen=True)
class HeaderRule:
    """One header content rule (``[[scan.headers.rules]]``).

    ``kind`` "header": ``pattern`` is searched (case-insensitively) in each
    occurrence of the field ``header`` of the message's header, after RFC
    2047 encoded words are decoded.  "charset": in the charset of every
    text/* part (and of the message).  "country": in the ISO 3166 code of
    the client address's country, from ``scan.headers.geoip_database``.
    """

    pattern: str = field(metadata=_opt(_regex, "regular expression"))
    kind: str = field(default="header", metadata=_opt(_rule_kind))
    header: str = field(default="", metadata=_opt(_header_name))
    action: str = field(default="score:1", metadata=_ACTION)
    # Label in reasons and logs; empty: kind and header.
    name: str = ""


def _check_header_rules(rules: tuple[HeaderRule, ...]) -> Optional[str]:
    for i, rule in enumerate(rules):
        if rule.kind == "header" and not rule.header:
            return f"rule {i} ({rule.pattern!r}): kind 'header' needs header = NAME"
        if rule.kind != "header" and rule.header:
            return f"rule {i} ({rule.pattern!r}): header is only for kind 'header'"
    return None


@dataclass(frozen=True)
class HeaderFilterConfig:
    """Header content rules (scanner ``headers``)."""

    enabled: bool = True
    rules: tuple[HeaderRule, ...] = field(default=(), metadata=_opt(_check_header_rules))
    # A MaxMind DB format file (GeoLite2-Country, GeoIP2-Country, DB-IP's
    # country lite) for the "country" rules; empty: they never match.
    geoip_database: str = ""


# Executable types by their content (see scan/scanners/attachments.py).
EXECUTABLE_TYPES = ("exe", "elf", "macho", "lnk")

# The types a rule may name (``AttachmentRule.types``): type name -> what it
# is; "executable" names EXECUTABLE_TYPES.  scan/scanners/attachments.py
# detects each from the content.
TYPE_NAMES = {
    "exe": "DOS/Windows program (MZ)", "elf": "ELF program", "macho": "Mach-O program",
    "java": "Java class", "script": "script with #!", "lnk": "Windows shortcut",
    "zip": "zip archive (also docx, jar, apk)", "rar": "RAR archive", "7z": "7-Zip archive",
    "gzip": "gzip", "bzip2": "bzip2", "xz": "xz", "cab": "Windows cabinet",
    "ole": "OLE2 compound file (doc, xls, msi)", "pdf": "PDF", "iso": "ISO 9660 image",
    "executable": "any of " + ", ".join(EXECUTABLE_TYPES),
}

# Gmail's list of blocked file types (Google Workspace help "File types
# blocked in Gmail"), less the archive and disk-image formats that
# legitimate mail carries; matched as the last extension.
DANGEROUS_EXTENSIONS = (
    "ade", "adp", "apk", "appx", "bat", "chm", "cmd", "com", "cpl", "dll", "exe",
    "hta", "ins", "isp", "jar", "jnlp", "js", "jse", "lib", "lnk", "mde", "msc", "msi",
    "msix", "msp", "mst", "nsh", "pif", "ps1", "scr", "sct", "shb", "sys", "vb", "vbe",
    "vbs", "vxd", "wsc", "wsf", "wsh", "xll",
)


def _types(values: tuple[str, ...]) -> Optional[str]:
    for v in values:
        if v not in TYPE_NAMES:
            return f"unknown type {v!r} (known: {', '.join(sorted(TYPE_NAMES))})"
    return None


def _extensions(values: tuple[str, ...]) -> Optional[str]:
    for v in values:
        if not v or v.startswith(".") or v != v.lower():
            return f"{v!r}: extensions are lower case, without the dot"
    return None


@dataclass(frozen=True)
class AttachmentRule:
    """One attachment rule (``[[scan.attachments.rules]]``).  Every criterion
    that is set must match (so ``extensions = ["pdf"]`` with ``types =
    ["exe"]`` is "a .pdf that is really a program"); at least one is set.

    ``filename``: a regular expression searched (case-insensitively) in the
    file name, after RFC 2231/2047 decoding, with bidirectional and
    zero-width characters and trailing dots and spaces removed.
    ``extensions``: the last extension of that name.  ``types``: the type
    detected from the content (``executable`` stands for exe, elf, macho and
    lnk).  ``in_archives``: the rule also looks at the members of zip
    archives, nested ones too.
    """

    name: str
    filename: str = field(default="", metadata=_opt(_regex))
    extensions: tuple[str, ...] = field(default=(), metadata=_opt(_extensions))
    types: tuple[str, ...] = field(default=(), metadata=_opt(_types))
    in_archives: bool = True
    action: str = field(default="reject", metadata=_ACTION)


def _check_attachment_rules(rules: tuple[AttachmentRule, ...]) -> Optional[str]:
    for rule in rules:
        if not (rule.filename or rule.extensions or rule.types):
            return f"rule {rule.name!r}: set at least one of filename, extensions, types"
    return None


DEFAULT_ATTACHMENT_RULES = (
    # Programs by content, whatever the name says, also inside archives:
    # the classic malware delivery (and what Gmail refuses outright).
    AttachmentRule(name="executable", types=("executable",)),
    # Names Windows would run when clicked, also inside archives.
    AttachmentRule(name="dangerous-extension", extensions=DANGEROUS_EXTENSIONS),
    # "#!" scripts: legitimate between administrators, suspicious otherwise.
    AttachmentRule(name="script", types=("script",), action="score:2"),
)


@dataclass(frozen=True)
class AttachmentConfig:
    """Attachment rules (scanner ``attachments``)."""

    enabled: bool = True
    rules: tuple[AttachmentRule, ...] = field(default=DEFAULT_ATTACHMENT_RULES,
                                              metadata=_opt(_check_attachment_rules))
    # Archives inside archives are opened this deep (the attachment is 0).
    max_archive_depth: int = field(default=3, metadata=_opt(_at_least(0)))
    # Members looked at in all archives of one message together; an
    # archive declaring more than remain is not opened (its central
    # directory is never loaded).
    max_archive_entries: int = field(default=1000, metadata=_opt(_at_least(1)))
    # Octets decompressed in all for one message (nested archives are read
    # whole; other members only their first 4 KiB): a zip bomb costs this.
    max_archive_bytes: int = field(default=16 * 1024 * 1024, metadata=_opt(_at_least(65536)))
    # A password-protected member: its content cannot be checked, which is
    # why malware is sent that way (the password in the text).
    encrypted_archive: str = field(default="score:3", metadata=_ACTION)
    # An archive not opened or not fully read (corrupt, over the bounds
    # above, cut short by scan.mime.memory_bytes): what it holds is unknown.
    archive_limits: str = field(default="score:2", metadata=_ACTION)
    # A file name with bidirectional-override or zero-width characters
    # ("invoice<RLO>fdp.exe" shows as "invoiceexe.pdf").
    deceptive_name: str = field(default="score:5", metadata=_ACTION)


_CLIENTS = _opt(check_cidrs, "client IP addresses and CIDR ranges (IPv4 and IPv6)")
_SENDERS = _opt(check_address_patterns, "addresses, domains, .subdomains")


@dataclass(frozen=True)
class EngineSlotConfig:
    """How one policy uses one engine of ``[scanners]``."""

    enabled: bool = True
    # The engine's score (already times its score_factor) times this.
    weight: float = field(default=1.0, metadata=_opt(_finite))
    on_failure: str = field(default="tempfail", metadata=_opt(_on_failure))
    # Messages larger than this skip the engine in this policy; 0: only the
    # engine's own max_size.
    max_size: int = field(default=0, metadata=_opt(_at_least(0)))


# What a per-engine rule (``EngineActionRule``) may do with the message.
# No "relay": a rule never lets through what another engine or the score
# would stop; it chooses among the ways of stopping (or tagging) it.
RULE_ACTIONS = ("reject", "tempfail", "quarantine", "tag", "discard", "delete")
# The verdicts a rule may match: an engine's own word (config/scanners.py
# ENGINE_VERDICTS) or "any" (whatever it said, a score range then decides).
RULE_VERDICTS = ("any", "clean", "spam", "virus")
# Actions that drop the message: never for what an engine called clean
# (docs/design.md promise 1 -- a clean message is never lost).
DROPPING = ("discard", "delete")


@dataclass(frozen=True)
class EngineActionRule:
    """One ``[[policies.NAME.scan.engine_actions]]``: when ``engine`` (an
    engine of ``[scanners]`` this policy asks) says ``verdict`` with its
    own score (before the policy's weight) in [``min_score``,
    ``max_score``), the message gets ``action``; the first matching rule in
    the order configured wins (verdict.py has the precedence)."""

    engine: str = field(metadata=_opt(lambda v: None if v else "must name an engine"))
    action: str = field(metadata=_opt(lambda v: None if v in RULE_ACTIONS else
                                      f"must be one of {', '.join(RULE_ACTIONS)}, not {v!r}"))
    verdict: str = field(default="any", metadata=_opt(
        lambda v: None if v in RULE_VERDICTS else
        f"must be one of {', '.join(RULE_VERDICTS)}, not {v!r}"))
    # Unset (None): no bound.  Inclusive below, exclusive above, so ranges
    # [0, 5) and [5, 10) meet without overlap.
    min_score: Optional[float] = field(default=None, metadata=_opt(
        lambda v: None if v is None else _finite(v)))
    max_score: Optional[float] = field(default=None, metadata=_opt(
        lambda v: None if v is None else _finite(v)))

    def matches(self, engine: str, verdict: str, score: float) -> bool:
        if engine != self.engine or (self.verdict != "any" and verdict != self.verdict):
            return False
        if self.min_score is not None and score < self.min_score:
            return False
        return self.max_score is None or score < self.max_score


def _address_or_empty(value: str) -> Optional[str]:
    if value and (value.count("@") != 1 or any(c.isspace() or c in "<>" for c in value)):
        return f"{value!r} is not a mail address (user@domain, no angle brackets)"
    return None


def _addresses(values: tuple[str, ...]) -> Optional[str]:
    return next((problem for problem in map(_address_or_empty, values) if problem), None)


@dataclass(frozen=True)
class DeleteNoticeConfig:
    """``policies.NAME.scan.delete_notice``: who hears of a deleted message
    (``virus_action = "delete"``, or a rule's "delete"), from a Jinja2
    template, sent through the backend (actions/notice.py)."""

    # Tell each recipient of the deleted message.
    recipients: bool = False
    # And/or these administrators.
    admins: tuple[str, ...] = field(default=(), metadata=_opt(_addresses))
    # The notice's From: (its envelope sender is <>, RFC 5321 4.5.5, so it
    # can never bounce back and forth); empty: postmaster@<our host name>.
    sender: str = field(default="", metadata=_opt(_address_or_empty))
    # templates/notices/<template>.txt: a "Subject:" line, an empty line,
    # the text.  A site's own in policy.templates_dir/notices/ wins.
    template: str = field(default="virus_deleted", metadata=_opt(
        lambda v: None if re.fullmatch(r"[A-Za-z0-9_-]+", v) else
        f"{v!r} is not a template name (letters, digits, '-' and '_')"))
    # Seconds to hand one notice to the backend; the client's 250 waits
    # for it (bounded), the message stays deleted whatever happens.
    timeout: float = field(default=30.0, metadata=_opt(
        lambda v: None if 0.1 <= v <= 600 else f"must be from 0.1 to 600, not {v!r}"))


def engine_action_problems(where: str, scan: "ScanConfig", engines: list[str]) -> list[str]:
    """The rules of ``scan`` (policy key prefix ``where``) against the
    engines of [scanners] and the engines the policy asks."""
    problems = []
    asked = [n for n, use in scan.engines.items() if use.enabled]
    for i, rule in enumerate(scan.engine_actions):
        key = f"{where}.scan.engine_actions[{i}]"
        if rule.engine not in engines:
            problems.append(f"{key}.engine: no such scanner in [scanners] ({rule.engine!r}; "
                            f"configured: {', '.join(engines) or 'none'})")
        elif rule.engine not in asked:
            problems.append(f"{key}.engine: {rule.engine!r} is not asked by this policy "
                            f"(add [{where}.scan.engines.{rule.engine}]), so the rule could "
                            "never match")
        if rule.action in DROPPING and rule.verdict == "clean":
            problems.append(f"{key}.action: {rule.action!r} for verdict 'clean' would drop "
                            "clean mail")
        if (rule.action in DROPPING and rule.verdict == "any" and rule.min_score is None):
            problems.append(f"{key}.action: {rule.action!r} with verdict 'any' needs a "
                            "min_score (or verdict 'spam' or 'virus'): it would drop clean mail")
        if rule.action == "tag" and rule.verdict == "virus":
            problems.append(f"{key}.action: 'tag' would relay a virus; use reject, "
                            "quarantine or delete")
        if (rule.min_score is not None and rule.max_score is not None
                and rule.min_score >= rule.max_score):
            problems.append(f"{key}.max_score: must be above min_score "
                            f"({rule.max_score:g} <= {rule.min_score:g})")
    uses_delete = scan.virus_action == "delete" or any(
        r.action == "delete" for r in scan.engine_actions)
    notice = scan.delete_notice
    if (notice.recipients or notice.admins) and not uses_delete:
        problems.append(f"{where}.scan.delete_notice: set, but nothing in this policy deletes "
                        "(virus_action or an engine_actions rule 'delete')")
    return problems


@dataclass(frozen=True)
class ScanConfig:
    """Post-DATA scanning of the policy (``policies.NAME.scan``): the MIME
    checks first (every message is parsed once, within bounds), then the
    attachment rules and header rules on the parsed message.  Their scores
    add to the pre-DATA score; the verdict compares the sum with
    ``scoring``.  The engines of ``[scanners]`` (clamd, spamd, rspamd,
    command) run after the message checks, per ``engines``.  Off by
    default: the MIME checks refuse malformed mail, which a site should
    see in its logs before it turns them on."""

    enabled: bool = False
    mime: MimeCheckConfig = MimeCheckConfig()
    attachments: AttachmentConfig = AttachmentConfig()
    headers: HeaderFilterConfig = HeaderFilterConfig()
    # Message authentication (config/authentication.py): DKIM signatures
    # and the DMARC policy of the From: domain, one Authentication-Results.
    dkim: DkimConfig = DkimConfig()
    dmarc: DmarcConfig = DmarcConfig()
    # A scanner that cannot answer (a GeoIP file that cannot be read, a
    # parse failure): "tempfail" (451 4.3.0, docs/design.md promise 4) or "skip".
    on_failure: str = field(default="tempfail", metadata=_opt(_on_failure))
    # Spam verdicts (score at or above scoring.tag) count for the
    # thresholds' max_spam.
    count_spam: bool = True
    # The engines of [scanners] this policy asks, by name, run at once
    # after the message checks.
    engines: dict[str, EngineSlotConfig] = field(default_factory=dict)
    # What a virus (or a command scanner's find) does: "reject" (554 5.7.1
    # naming the signature), "quarantine" (accepted and held) or "delete"
    # (accepted with 250, dropped, logged; ``delete_notice`` tells whom).
    virus_action: str = field(default="reject", metadata=_opt(
        lambda v: None if v in ("reject", "quarantine", "delete") else
        f"must be 'reject', 'quarantine' or 'delete', not {v!r}"))
    # Per-engine actions, first match wins (verdict.py: before the score
    # ladder; see EngineActionRule).
    engine_actions: tuple[EngineActionRule, ...] = ()
    # Who hears of a deleted message.
    delete_notice: DeleteNoticeConfig = DeleteNoticeConfig()
    # At or above this score (0: never) the message is accepted and dropped,
    # logged (the "discard" action).  Above scoring.reject it drops the worst
    # silently; below, a reached reject wins.  Combinations in which a
    # threshold could never act are refused (config/ladder.py).
    discard_score: float = field(default=0.0, metadata=_opt(_finite))
    # Add X-MPP-Scan (score, action) and X-MPP-Scan-Rules (each engine's
    # rule names) to every accepted message, not only tagged ones.
    result_headers: bool = False
    # Transactions from these senders, to any of these recipients or from
    # these clients are not scanned (logged as skipped).
    skip_senders: tuple[str, ...] = field(default=(), metadata=_SENDERS)
    skip_recipients: tuple[str, ...] = field(default=(), metadata=_SENDERS)
    skip_clients: tuple[str, ...] = field(default=(), metadata=_CLIENTS)
