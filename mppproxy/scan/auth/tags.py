"""DKIM tag lists (RFC 6376 3.2) and the checks of a DKIM-Signature's tags
(3.5) that need no key, in one pass with precompiled patterns.

Stage: scanning, a building block of DKIM (``scan/auth/dkim.py``).  dkimpy
(``dkim.util.parse_tag_value``, ``dkim.validate_signature_fields``) stays
the reference: these functions give the same answers and raise the same
exceptions with the same texts (tests/test_dkim_lean.py compares them on
generated fields), at a fifth of the cost: dkimpy looks each pattern up in
``re``'s cache at every call, ~40 us a signature, and the scanner parsed
every signature twice (once here, once inside dkimpy's verification).
"""
from __future__ import annotations

import re
import time

from dkim import ValidationError
from dkim.util import DuplicateTag, InvalidTagSpec

# dkimpy's tag-name test: a letter first (re.match, so only the start).
_TAG_NAME = re.compile(rb"[a-zA-Z]")
# RFC 6376 3.5: the tags a signature must have.
MANDATORY = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")
ALGORITHMS = (b"rsa-sha1", b"rsa-sha256", b"ed25519-sha256")
_BASE64ISH = re.compile(rb"[\s0-9A-Za-z+/]+[\s=]*$")
_WHITE = b" \t\n\r\x0b\x0c"  # what \s matches in a bytes pattern
_SPECIALS = re.compile(rb"[\(\)<>\[\]:;@\\,]")
_LENGTH = re.compile(rb"\d{,76}$")
_DIGITS = re.compile(rb"\d+$")
_H_SPLIT = re.compile(rb"\s*:\s*")
# dkimpy lets clocks be 10 hours wrong either way for t= and x=.
_SLOP = 36000


def parse_tag_list(value: bytes) -> dict[bytes, bytes]:
    """The tags of a tag list, whitespace around names and values removed
    (folding inside a value is kept, as dkimpy keeps it).  Raises
    InvalidTagSpec or DuplicateTag (RFC 6376 3.2: a tag twice is an
    error) as dkimpy does."""
    tags: dict[bytes, bytes] = {}
    specs = value.strip().split(b";")
    if not specs[-1]:
        # A trailing ";" is allowed.
        specs.pop()
    for spec in specs:
        key, eq, text = spec.partition(b"=")
        if not eq:
            raise InvalidTagSpec(spec)
        key = key.strip()
        if _TAG_NAME.match(key) is None:
            raise InvalidTagSpec(spec)
        if key in tags:
            raise DuplicateTag(key)
        tags[key] = text.strip()
    return tags


def check_signature_tags(sig: dict[bytes, bytes]) -> None:
    """dkimpy's ``validate_signature_fields`` for a DKIM-Signature: the
    mandatory tags, a known a=, base64-looking b=/bh=, d= without
    specials, i= within d=, l= decimal, q=dns/txt, t= not in the future,
    v=1, x= not past.  Raises dkim.ValidationError with dkimpy's text."""
    for name in MANDATORY:
        if name not in sig:
            raise ValidationError("missing %r=" % name)  # dkimpy's text (repr of bytes = their str)
    if sig[b"a"] not in ALGORITHMS:
        raise ValidationError("unknown signature algorithm: %r" % sig[b"a"])
    b = sig[b"b"]
    # (bytes.translate deletes the white space \s matches: dkimpy's
    # re.sub(\s+) in one C call.)
    b_looks_ok = _BASE64ISH.match(b) is not None
    if not b_looks_ok or len(b.translate(None, _WHITE)) % 4:
        raise ValidationError("b= value is not valid base64 (%r)" % b)
    # dkimpy tests bh= against b='s pattern (its slip): the same here, so
    # both give one answer.
    if not b_looks_ok or len(sig[b"bh"].translate(None, _WHITE)) % 4:
        raise ValidationError("bh= value is not valid base64 (%r)" % sig[b"bh"])
    d = sig[b"d"]
    if d.isascii() and _SPECIALS.search(d):
        raise ValidationError("d= value is not valid (%r)" % d)
    i = sig.get(b"i")
    # (dkimpy indexes before the domain unchecked: an i= no longer than d=
    # raised IndexError there, a crash rather than an answer.)
    if i is not None and (not i.lower().endswith(d.lower()) or len(i) <= len(d)
                          or i[-len(d) - 1] not in (64, 46)):
        raise ValidationError("i= domain is not a subdomain of d= (i=%r d=%r)" % (i, d))
    # dkimpy's pattern takes an empty l= (and int() then fails): refused here.
    if b"l" in sig and (_LENGTH.match(sig[b"l"]) is None or not sig[b"l"]):
        raise ValidationError("l= value is not a decimal integer (%r)" % sig[b"l"])
    if b"q" in sig and sig[b"q"] != b"dns/txt":
        raise ValidationError("q= value is not dns/txt (%r)" % sig[b"q"])
    t_sign = None
    now = int(time.time())
    if b"t" in sig:
        if _DIGITS.match(sig[b"t"]) is None:
            raise ValidationError("t= value is not a decimal integer (%r)" % sig[b"t"])
        t_sign = int(sig[b"t"])
        if t_sign > now + _SLOP:
            raise ValidationError("t= value is in the future (%r)" % sig[b"t"])
    if sig[b"v"] != b"1":
        raise ValidationError("v= value is not 1 (%r)" % sig[b"v"])
    if b"x" in sig:
        if _DIGITS.match(sig[b"x"]) is None:
            raise ValidationError("x= value is not a decimal integer (%r)" % sig[b"x"])
        x_sign = int(sig[b"x"])
        if x_sign < now - _SLOP:
            raise ValidationError("x= value is past (%r)" % sig[b"x"])
        if t_sign and x_sign < t_sign:
            raise ValidationError("x= value is less than t= value (x=%r t=%r)"
                                  % (sig[b"x"], sig[b"t"]))


def signed_names(h: bytes) -> list[bytes]:
    """h= as the lower-case field names it lists, in order (dkimpy's split)."""
    return [name.lower() for name in _H_SPLIT.split(h)]
