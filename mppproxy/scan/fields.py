"""Header fields of the parsed message, read the cheap way where that is
provably the strict way's answer (issue #5).

Stage: used by the bounded MIME parser (``mime.py``); hands on the email
policy the parsed message carries and the test that spares a field the
strict header parser.

Why.  ``email.policy.default`` builds a header object with the strict
parser (``email._header_value_parser``) for every field it hands out, and
the feedparser asks for Content-Type several times per part while it
decides the structure.  That parser costs 10-70 us a field: on the scan
benchmark corpus most of the parse.  Yet for the fields real mail is made
of -- ``text/plain; charset=us-ascii``, ``Name <a@example.com>``, a
well-formed date -- its answer is known in advance: no defect, and a text
that follows from the value.

So every field goes through one of two ways:

- *plain*: the unfolded value matches the small grammar below for its kind
  (a strict subset of what RFC 5322 / RFC 2045 / RFC 2183 allow, with no
  comments, quoting escapes, encoded words, 8-bit or control characters).
  For such a value the strict parser finds no defect and, for the kinds
  handed out as ``PlainField`` (below), its text is what ``_PLAIN_TEXT``
  renders; tests/test_fields.py checks both over values built from the
  grammar, on the running Python;
- *strict*: anything else goes to the strict parser exactly as
  ``email.policy.default`` would send it.

The defects found are therefore exactly those of running the strict parser
on every field, for every field (no field is left unchecked); only the
work is skipped where its result is known.

``ScanPolicy`` is ``email.policy.default`` except for
``header_fetch_parse``: a plain Content-Type, Content-Disposition,
Content-Transfer-Encoding, address list (From, To, Cc, Sender, Reply-To,
Bcc, Resent-*) or unstructured field (Subject, X-*, Received...) comes
back as a ``PlainField`` -- a ``str`` with the strict header's text (the
strict parser renders parameters as name="value" and addresses as
``headerregistry.Address`` does, so that is the text made here), whose
other attributes (``params``, ``content_type``, ``addresses``,
``defects``...) build the strict header on first use.  The structure
decisions read only the text (``Message.get_content_type``,
``get_param``, ``get_boundary`` work on ``str(header)``), so they are the
default policy's; so do the header rules.  Dates, message ids and
anything not plain come back as the strict header.
"""
from __future__ import annotations

import email.headerregistry as registry
import email.policy
import email.utils
import re
from typing import Any, Callable, Optional, cast

__all__ = ["STRICT", "SCAN_POLICY", "PlainField", "ScanPolicy", "field_kind", "is_clean", "unfold"]

STRICT = email.policy.default

# -- the plain grammar ----------------------------------------------------------

# RFC 5322 3.2.3 atext and dot-atom-text.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_ADDR_SPEC = rf"{_DOT_ATOM}@{_DOT_ATOM}"
# A display name of atoms (no "." -- an obs-phrase, RFC 5322 4.1) or one
# quoted string without escapes (RFC 5322 3.2.4 qtext and space).
_PHRASE = rf"(?:{_ATEXT}+(?: {_ATEXT}+)*|\"[ !#-\[\]-~]+\")"
_MAILBOX = rf"(?:{_PHRASE} ?<{_ADDR_SPEC}>|<{_ADDR_SPEC}>|{_ADDR_SPEC})"
# RFC 5322 3.4 address-list of mailboxes only: no groups, no empty members.
_ADDRESS_LIST = re.compile(rf"{_MAILBOX}(?:, ?{_MAILBOX})*")
# One mailbox of such a list: (atoms, quoted text, addr-spec) or (<addr-spec>) or (addr-spec).
_MAILBOX_PARTS = re.compile(rf"(?:, ?)?(?:(?:({_ATEXT}+(?: {_ATEXT}+)*)|\"([ !#-\[\]-~]+)\") ?"
                            rf"<({_ADDR_SPEC})>|<({_ADDR_SPEC})>|({_ADDR_SPEC}))")
# email._header_value_parser.SPECIALS: a display name holding one is quoted.
_SPECIALS = frozenset('()<>@,:;."[]\\')
# RFC 5322 3.6.4 msg-id with dot-atom-text on both sides.
_MESSAGE_ID = re.compile(rf"<{_DOT_ATOM}@{_DOT_ATOM}>")
# RFC 2045 4: "1.0" is the only version there is.
_MIME_VERSION = re.compile(r"1\.0")
# RFC 2045 6.1 mechanisms.
_CTE = re.compile(r"(?:7bit|8bit|binary|base64|quoted-printable)", re.I)
# RFC 2045 5.1 token, less "%", "*" and "'", which RFC 2231 gives a meaning
# in parameters.
_TOKEN = r"[!#$&+\-.^_`{|}~0-9A-Za-z]+"
# A parameter: attribute = token or a non-empty quoted string without
# escapes (RFC 2045 5.1).
_PARAM = rf"({_TOKEN})=(?:({_TOKEN})|\"([ !#-\[\]-~]+)\")"
_CONTENT_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}(?:;[ \t]*{_PARAM})*")
_CONTENT_DISPOSITION = re.compile(rf"{_TOKEN}(?:;[ \t]*{_PARAM})*")
_PARAM_ITEM = re.compile(rf";[ \t]*{_PARAM}")


def _printable_ascii(value: str) -> bool:
    """Printable ASCII, space and tab only, and no RFC 2047 encoded word
    (the strict parser decodes "=?" words even inside quoted strings)."""
    if not value.isascii() or "=?" in value:
        return False
    return value.isprintable() or value.replace("\t", " ").isprintable()


def _unstructured_text(value: str) -> Optional[str]:
    # get_unstructured keeps every character and space of such a value.
    return value if _printable_ascii(value) else None


def _address_list(value: str) -> bool:
    return _printable_ascii(value) and _ADDRESS_LIST.fullmatch(value) is not None


def _address_text(value: str) -> Optional[str]:
    """The strict AddressHeader's text of a plain address list, None when
    it is not plain: each mailbox as ``str(headerregistry.Address)`` renders
    it ("Name <a@b>", or "a@b" without a name; a name with a special
    quoted), joined by ", "."""
    if not _address_list(value):
        return None
    out = []
    for atoms, quoted, named, bracketed, bare in _MAILBOX_PARTS.findall(value):
        name = atoms or quoted
        if not name:
            out.append(bracketed or bare)
            continue
        if not _SPECIALS.isdisjoint(name):
            name = f'"{name}"'
        out.append(f"{name} <{named}>")
    return ", ".join(out)


def _date(value: str) -> bool:
    # The strict DateHeader's only check is this function; a value it
    # cannot read, or a datetime that cannot exist (30 February), goes to
    # the strict parser, which says what this Python says about it.
    if not value or not _printable_ascii(value):
        return False
    try:
        email.utils.parsedate_to_datetime(value)
    except Exception:  # whatever it is, not known clean: the strict way decides and records it
        return False
    return True


def _message_id(value: str) -> bool:
    return _printable_ascii(value) and _MESSAGE_ID.fullmatch(value) is not None


def _mime_version(value: str) -> bool:
    return _MIME_VERSION.fullmatch(value) is not None


def _parameterized_text(grammar: re.Pattern[str], value: str) -> Optional[str]:
    """The strict header's text of a plain Content-Type or -Disposition,
    None when the value is not plain.  The strict parser renders the
    parameters itself (``MimeParameters.__str__``): each as name="value",
    joined by "; " after one space -- so that is the text the structure
    decisions read, and ours must be the same."""
    if not _printable_ascii(value) or grammar.fullmatch(value) is None:
        return None
    head, sep, _ = value.partition(";")
    if not sep:
        return value
    params = _PARAM_ITEM.findall(value)
    # A repeated parameter is a defect of the strict parser's (readers pick
    # different ones): its own view of it decides.
    if len({name.lower() for name, _, _ in params}) != len(params):
        return None
    return head + "; " + "; ".join(f'{name}="{token or quoted}"' for name, token, quoted in params)


def _cte_text(value: str) -> Optional[str]:
    return value if _CTE.fullmatch(value) is not None else None


# kind -> the strict header's text of a plain value, or None: the kinds
# handed out as PlainField
_PLAIN_TEXT: dict[str, Callable[[str], Optional[str]]] = {
    "unstructured": _unstructured_text,
    "address": _address_text,
    "content-type": lambda value: _parameterized_text(_CONTENT_TYPE, value),
    "content-disposition": lambda value: _parameterized_text(_CONTENT_DISPOSITION, value),
    "content-transfer-encoding": _cte_text,
}

# other kinds -> whether a value is plain (their text is the strict
# parser's own rendering: they always come back as the strict header)
_PLAIN: dict[str, Callable[[str], bool]] = {
    "date": _date,
    "message-id": _message_id,
    "mime-version": _mime_version,
}


def _kind_of(cls: type) -> str:
    """Our kind for a class of the strict header registry; "" for a class
    we have no plain grammar for (always the strict way)."""
    for base, kind in ((registry.AddressHeader, "address"), (registry.DateHeader, "date"),
                       (registry.MessageIDHeader, "message-id"),
                       (registry.MIMEVersionHeader, "mime-version"),
                       (registry.ContentTypeHeader, "content-type"),
                       (registry.ContentDispositionHeader, "content-disposition"),
                       (registry.ContentTransferEncodingHeader, "content-transfer-encoding"),
                       (registry.UnstructuredHeader, "unstructured")):
        if issubclass(cls, base):
            return kind
    return ""


_REGISTRY = cast(registry.HeaderRegistry, STRICT.header_factory)
_KINDS = {name: _kind_of(cls) for name, cls in _REGISTRY.registry.items()}
_DEFAULT_KIND = _kind_of(_REGISTRY.default_class)


def field_kind(name: str) -> str:
    """The kind of the field ``name`` as the strict registry reads it."""
    return _KINDS.get(name.lower(), _DEFAULT_KIND)


def unfold(value: str) -> str:
    """The value as ``email.policy.default`` hands it to the header parser:
    every CR and LF removed (``policy.linesep_splitter``)."""
    if "\r" in value or "\n" in value:
        return value.replace("\r", "").replace("\n", "")
    return value


def is_clean(name: str, value: str) -> bool:
    """True when the strict parser is known to find no defect in the raw
    field ``name: value`` (and not to fail on it); False: ask it."""
    kind = field_kind(name)
    value = unfold(value)
    text = _PLAIN_TEXT.get(kind)
    if text is not None:
        return text(value) is not None
    check = _PLAIN.get(kind)
    return check is not None and check(value)


# -- the policy -----------------------------------------------------------------

class _Registry(registry.HeaderRegistry):
    """``HeaderRegistry`` that composes each header class once: the stock
    one builds a new class with ``type()`` on every header it parses.
    Keyed by the registry's class, so it holds at most one entry per class
    whatever field names a message brings."""

    def __init__(self) -> None:
        super().__init__()
        self._composed: dict[type, type] = {}

    def __getitem__(self, name: str) -> type:
        cls = self.registry.get(name.lower(), self.default_class)
        composed = self._composed.get(cls)
        if composed is None:
            composed = self._composed[cls] = super().__getitem__(name)
        return composed


class PlainField(str):
    """A plain MIME field: the strict header's text, and the strict header
    itself for anything else, made on first use."""

    _field_name: str
    _strict: Any

    def __new__(cls, name: str, value: str) -> "PlainField":
        self = super().__new__(cls, value)
        self._field_name = name
        self._strict = None
        return self

    def __getattr__(self, attr: str) -> Any:
        # Only called for what a str lacks: name, params, content_type,
        # defects, fold, ...
        if attr.startswith("__") or attr in ("_field_name", "_strict"):
            raise AttributeError(attr)
        if self._strict is None:
            self._strict = STRICT.header_factory(self._field_name, str(self))
        return getattr(self._strict, attr)

    def __reduce__(self) -> Any:
        return (PlainField, (self._field_name, str(self)))


class ScanPolicy(email.policy.EmailPolicy):
    """``email.policy.default`` whose ``header_fetch_parse`` returns a
    ``PlainField`` for a plain MIME or unstructured field (see the module
    docstring)."""

    def header_fetch_parse(self, name: str, value: Any) -> Any:
        if hasattr(value, "name"):
            return value
        value = unfold(value)
        text = _PLAIN_TEXT.get(field_kind(name))
        plain = text(value) if text is not None else None
        if plain is not None:
            return PlainField(name, plain)
        return self.header_factory(name, value)


SCAN_POLICY = ScanPolicy(header_factory=_Registry())
