"""The lean DKIM path (``scan/auth/tags.py``, ``scan/auth/canon.py``, the
``_lean`` check of ``scan/auth/dkim.py``) against dkimpy, the reference.

Differential: a few hundred messages generated from a seed (folding, white
space, empty and blank-line bodies, c= in every combination, l=, one to
three signatures RSA and Ed25519, then tampered: body, headers, a second
From:, b=/bh= changed or made bad base64, tags broken) are signed by dkimpy
and verified both ways; every signature must get the same result, reason
and key size.  The pieces are compared too: the tag-list parser and the
signature checks with dkimpy's, the b= pattern with dkimpy's, the
Authentication-Results text with authres's.
"""
from __future__ import annotations

import base64
import random
import re
import time
from typing import Any, Optional

import dkim
import dkim.util
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mppproxy.scan.auth import canon, dkim as dkim_
from mppproxy.scan.auth import tags as tags_
from mppproxy.scan.auth.dmarc import DmarcRecord, DmarcResult
from mppproxy.scan.scanners.authentication import (authentication_results,
                                                   authentication_results_authres)

SEED = 6376
MESSAGES = 400


def _rsa(bits: int) -> tuple[bytes, str]:
    key = rsa.generate_private_key(65537, bits)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    pub = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    return pem, pub


RSA2048_PEM, RSA2048_PUB = _rsa(2048)
RSA1024_PEM, RSA1024_PUB = _rsa(1024)
_ED = nacl.signing.SigningKey.generate()
ED_PRIVATE = base64.b64encode(bytes(_ED))
ED_PUB = base64.b64encode(bytes(_ED.verify_key)).decode()

# selector -> (signing key, algorithm) and the key records by name.
SIGNERS = {
    b"big": (RSA2048_PEM, b"rsa-sha256"),
    b"small": (RSA1024_PEM, b"rsa-sha256"),
    b"ed": (ED_PRIVATE, b"ed25519-sha256"),
}
KEYS = {
    "big._domainkey.lean.test": dkim_.KeyLookup(record=f"v=DKIM1; k=rsa; p={RSA2048_PUB}"),
    "small._domainkey.lean.test": dkim_.KeyLookup(record=f"v=DKIM1; p={RSA1024_PUB}"),
    "ed._domainkey.lean.test": dkim_.KeyLookup(record=f"v=DKIM1; k=ed25519; p={ED_PUB}"),
    "revoked._domainkey.lean.test": dkim_.KeyLookup(record="v=DKIM1; k=rsa; p="),
    "gone._domainkey.lean.test": dkim_.KeyLookup(missing=True),
    "slow._domainkey.lean.test": dkim_.KeyLookup(error="timeout"),
    "wrong._domainkey.lean.test": dkim_.KeyLookup(record=f"v=DKIM1; k=ed25519; p={ED_PUB}"),
    "tls._domainkey.lean.test": dkim_.KeyLookup(record=f"v=DKIM1; s=tlsrpt; p={RSA2048_PUB}"),
}

WORDS = [b"alpha", b"beta", b"gamma", b"delta", b"x", b"", b"\xc3\xa9t\xc3\xa9", b"a=b;c"]


def _space(r: random.Random) -> bytes:
    return r.choice([b" ", b" ", b"  ", b"\t", b" \t ", b""])


def _value(r: random.Random) -> bytes:
    words = [r.choice(WORDS) for _ in range(r.randint(0, 4))]
    out = _space(r) + _space(r).join(words) if words else _space(r)
    if r.random() < 0.3:
        # Folded (RFC 5322 2.2.3): CRLF then WSP.
        out += b"\r\n" + r.choice([b" ", b"\t", b"   "]) + r.choice(WORDS)
    if r.random() < 0.2:
        out += _space(r)  # trailing white space
    return out


def _message(r: random.Random) -> bytes:
    fields = [b"From:" + _space(r) + r.choice([b"Alice <alice@lean.test>", b"bob@lean.test",
                                               b"\"Q, R\" <q@lean.test>"])]
    fields.append(b"To: someone@example.net")
    for _ in range(r.randint(1, 5)):
        name = r.choice([b"Subject", b"subject", b"X-Thing", b"Date", b"Message-ID", b"Reply-To"])
        fields.append(name + b":" + _value(r))
    r.shuffle(fields)
    body_lines = []
    for _ in range(r.choice([0, 0, 1, 3, 10])):
        body_lines.append(_space(r).join(r.choice(WORDS) for _ in range(r.randint(0, 6)))
                          + r.choice([b"", b"", b" ", b"\t", b"  "]))
    body = b"".join(line + b"\r\n" for line in body_lines)
    body += r.choice([b"", b"", b"\r\n", b"\r\n\r\n", b"last line without CRLF"])
    return b"\r\n".join(fields) + b"\r\n\r\n" + body


def _sign(r: random.Random, msg: bytes, selector: bytes) -> bytes:
    key, algorithm = SIGNERS[selector]
    canonicalize = (r.choice([b"simple", b"relaxed"]), r.choice([b"simple", b"relaxed"]))
    names = [b"from", b"to", b"subject", b"date", b"x-thing", b"message-id", b"reply-to"]
    include = [b"from"] + r.sample(names[1:], r.randint(0, 4))
    if r.random() < 0.2:
        include.append(b"subject")  # signed more often than present (5.4.2)
    sig = dkim.sign(msg, selector, b"lean.test", key, canonicalize=canonicalize,
                    signature_algorithm=algorithm, include_headers=include,
                    length=r.random() < 0.2, identity=r.choice([None, b"@lean.test"]))
    return sig + msg


def _tamper_signature(r: random.Random, msg: bytes) -> bytes:
    """Change something inside the top DKIM-Signature field."""
    end = msg.find(b"\r\n", msg.find(b" b="))
    choice = r.randrange(10)
    if choice == 0:
        return msg.replace(b"a=rsa-sha256", b"a=rsa-sha512", 1).replace(
            b"a=ed25519-sha256", b"a=ed25519-sha512", 1)
    if choice == 1:
        return re.sub(rb"c=[a-z/]+", b"c=relaxed/fancy", msg, count=1)
    if choice == 2:
        return re.sub(rb"bh=[A-Za-z0-9+/=]", b"bh=!", msg, count=1)
    if choice == 3:
        # A character of b= changed: the signature no longer verifies.
        at = msg.find(b" b=") + 6
        return msg[:at] + (b"A" if msg[at:at + 1] != b"A" else b"B") + msg[at + 1:]
    if choice == 4:
        # b= one character short: not base64 (length).
        at = msg.find(b" b=") + 6
        return msg[:at] + msg[at + 1:]
    if choice == 5:
        return re.sub(rb"s=[a-z]+", r.choice([b"s=revoked", b"s=gone", b"s=slow", b"s=wrong",
                                              b"s=tls"]), msg, count=1)
    if choice == 6:
        return msg.replace(b"v=1;", b"v=1; v=1;", 1)
    if choice == 7:
        return msg.replace(b"v=1;", b"v=1; l=99999;", 1) if b"l=" not in msg[:end] else msg
    if choice == 8:
        return re.sub(rb"h=from", b"h=to", msg, count=1)
    return msg.replace(b"d=lean.test", b"d=lean.test; x=1", 1)


def _tamper(r: random.Random, msg: bytes) -> bytes:
    choice = r.randrange(16)
    header_end = msg.find(b"\r\n\r\n")
    if choice == 0:
        return msg + b"appended\r\n"
    if choice == 1:
        return msg[:header_end + 4] + b" " + msg[header_end + 4:]
    if choice == 2:
        return msg.replace(b"Subject:", b"Subject: changed", 1)
    if choice == 3:
        return b"From: evil@other.test\r\n" + msg
    if choice == 4:
        return msg[:header_end] + b"\r\nX-Added: after signing" + msg[header_end:]
    if choice == 5:
        return msg + b"\r\n\r\n"  # blank lines only: simple and relaxed ignore them
    if choice == 6:
        return msg[:header_end + 4] + msg[header_end + 4:].replace(b" ", b"  ")
    if choice == 7:
        return msg.replace(b"\r\n\r\n", b"\r\n\r\nbare\nLF\r\n", 1)
    return _tamper_signature(r, msg)


def _corpus() -> list[bytes]:
    r = random.Random(SEED)
    out = []
    for _ in range(MESSAGES):
        msg = _message(r)
        for selector in r.sample(list(SIGNERS), r.choice([1, 1, 2, 3])):
            msg = _sign(r, msg, selector)
        for _ in range(r.choice([0, 1, 1, 2])):
            msg = _tamper(r, msg)
        out.append(msg)
    return out


def _fields(msg: bytes) -> list[tuple[bytes, bytes]]:
    split = canon.split(msg)
    if split is not None:
        return split.fields
    end = msg.find(b"\r\n\r\n")
    return dkim_.header_fields(msg[:end + 2] if end >= 0 else msg)


def test_lean_and_dkimpy_agree_on_generated_messages() -> None:
    """Every signature of the generated corpus gets the same result,
    reason and key size from the lean path as from dkimpy, and the tag
    parse agrees too; the corpus covers every outcome and both paths."""
    outcomes: dict[str, int] = {}
    plain = 0
    for n, msg in enumerate(_corpus()):
        fields = _fields(msg)
        sigs = dkim_.signatures(fields, 5)
        reference_sigs = dkim_.signatures(fields, 5, reference=True)
        assert sigs == reference_sigs, (n, msg)
        for policy in ("pass", "policy"):
            lean = dkim_.verify(msg, sigs, KEYS, partial_body=policy)
            reference = dkim_.verify(msg, reference_sigs, KEYS, partial_body=policy, lean=False)
            assert lean == reference, (n, msg, lean, reference)
        plain += canon.split(msg) is not None
        for result in lean:
            outcomes[result.result] = outcomes.get(result.result, 0) + 1
    assert {"pass", "fail", "permerror", "temperror", "policy"} <= set(outcomes), outcomes
    assert outcomes["pass"] >= 100 and outcomes["fail"] >= 50, outcomes
    # Both ways are exercised: plain messages and ones dkimpy must read.
    assert MESSAGES // 2 < plain < MESSAGES, plain


def test_rfc6376_vector_style_edge_cases_agree() -> None:
    """Hand-made edge cases: empty body, body of blank lines only, no
    body at all, a header-only message, l=0, a field with only white
    space, a signature whose b= comes first in the field."""
    r = random.Random(1)
    bodies = [b"", b"\r\n", b"\r\n\r\n\r\n", b" \r\n\t\r\n", b"x", b"x\r\n\r\n"]
    for body in bodies:
        for c in ((b"simple", b"simple"), (b"relaxed", b"relaxed"), (b"simple", b"relaxed")):
            base = b"From: a@lean.test\r\nSubject:  \t \r\n\r\n" + body
            for length in (False, True):
                msg = dkim.sign(base, b"big", b"lean.test", RSA2048_PEM, canonicalize=c,
                                include_headers=[b"from", b"subject"], length=length) + base
                _agree(msg)
                _agree(_tamper(r, msg))
    header_only = dkim.sign(b"From: a@lean.test\r\n", b"big", b"lean.test", RSA2048_PEM,
                            include_headers=[b"from"]) + b"From: a@lean.test\r\n"
    _agree(header_only)
    first_b = re.sub(rb"^DKIM-Signature: (.*?)(b=[^;]+)$", rb"DKIM-Signature: \2; \1",
                     header_only, flags=re.S | re.M)
    _agree(first_b)


def _agree(msg: bytes) -> None:
    fields = _fields(msg)
    sigs = dkim_.signatures(fields)
    assert sigs == dkim_.signatures(fields, reference=True)
    assert dkim_.verify(msg, sigs, KEYS) == dkim_.verify(msg, sigs, KEYS, lean=False), msg


def test_tag_list_parser_agrees_with_dkimpy() -> None:
    """Random tag lists: the same tags, or the same exception with the
    same text."""
    r = random.Random(2)
    alphabet = [b"a", b"b", b"v", b"=", b";", b" ", b"\r\n ", b"1", b"_", b"-", b"\t", b"%"]
    for _ in range(3000):
        text = b"".join(r.choice(alphabet) for _ in range(r.randint(0, 16)))
        assert _outcome(tags_.parse_tag_list, text) == _outcome(dkim.util.parse_tag_value, text), text


def test_signature_checks_agree_with_dkimpy() -> None:
    """Mutations of a good signature's tags: the same ValidationError
    text, or none, from both (where dkimpy itself answers rather than
    crashing)."""
    r = random.Random(3)
    now = int(time.time())
    good = {b"v": b"1", b"a": b"rsa-sha256", b"b": b"AAAA", b"bh": b"BBBB", b"d": b"lean.test",
            b"h": b"from:to", b"s": b"big", b"i": b"@lean.test", b"t": str(now).encode()}
    variants: dict[bytes, list[Optional[bytes]]] = {
        b"v": [None, b"2", b""], b"a": [None, b"rsa-sha1", b"ed25519-sha256", b"RSA-SHA256"],
        b"b": [None, b"AAA", b"AA AA", b"!!!!", b"AA=="], b"bh": [None, b"BBB", b"B B B B"],
        b"d": [None, b"lean.test;", b"l(e)an.test", "l\u00e9an.test".encode()],
        b"i": [None, b"x@lean.test", b"x@sub.lean.test", b"x@other.test", b"xlean.test",
               b"lean.test", b"@LEAN.TEST"],
        b"l": [None, b"12", b"", b"x1", b"1" * 80], b"q": [None, b"dns/txt", b"dns"],
        b"t": [None, b"abc", str(now + 86400).encode()],
        b"x": [None, b"1", str(now + 86400).encode(), str(now - 1).encode(), b"y"],
    }
    for _ in range(3000):
        sig = dict(good)
        for name in r.sample(list(variants), r.randint(1, 3)):
            value = r.choice(variants[name])
            if value is None:
                sig.pop(name, None)
            else:
                sig[name] = value
        theirs = _outcome(dkim.validate_signature_fields, dict(sig))
        if theirs[0] == "IndexError" or sig.get(b"l") == b"":
            # dkimpy crashes on an i= no longer than d=, and passes an empty
            # l= that int() then fails on: ours answers both.
            assert _outcome(tags_.check_signature_tags, sig)[0] == "ValidationError", sig
            continue
        assert _outcome(tags_.check_signature_tags, sig) == theirs, sig


def _outcome(fn: Any, arg: Any) -> tuple[str, str]:
    try:
        value = fn(arg)
    except Exception as e:
        return type(e).__name__, str(e)
    return "ok", repr(value)


def test_b_tag_pattern_matches_dkimpys() -> None:
    """The faster b= pattern empties exactly what dkimpy's does, on random
    signature-like fields (folding, white space, tags named b*)."""
    r = random.Random(4)
    pieces = [b"b=", b"bh=", b" b =", b";b=", b"\r\n ", b" ", b"\t", b"AB", b"c+/=", b"!", b";",
              b"x", b"\r\n", b"\n"]
    for _ in range(5000):
        text = b"".join(r.choice(pieces) for _ in range(r.randint(0, 12)))
        assert canon.B_TAG.sub(b"\\1", text) == canon.DKIMPY_B_TAG.sub(b"\\1", text), text


def test_authentication_results_text_matches_authres() -> None:
    """The hand-written Authentication-Results value is authres's, for
    results with and without reasons (quotes, backslashes, control
    characters), SPF by MAIL FROM and by HELO, and each DMARC outcome."""
    r = random.Random(5)
    reasons = ["", "body hash mismatch", 'say "hi"', "back\\slash", "ctl\x01char", "a@b c",
               "token-ok", "semi; colon"]
    for _ in range(500):
        results = [dkim_.DkimResult(r.choice(["pass", "fail", "permerror", "policy"]),
                                    r.choice(["", "lean.test", "bad domain"]),
                                    r.choice(["", "sel"]), r.choice(["", "rsa-sha256"]),
                                    r.choice(["", "@lean.test", "x y"]),
                                    r.choice([x for x in reasons if "@" not in x]))
                   for _ in range(r.randint(0, 3))]
        dmarc = r.choice([None, DmarcResult("pass", "lean.test", "reject", aligned=("dkim",)),
                          DmarcResult("fail", "lean.test", "reject", r.choice(
                              ["reject", "quarantine", "none"]), "no aligned DKIM or SPF pass",
                                      record=DmarcRecord("reject", "none", pct=r.choice([50, 100]))),
                          DmarcResult("permerror", reason="2 From: fields (RFC 7489 6.6.1)"),
                          DmarcResult("none", "lean.test", reason="no DMARC record")])
        spf = r.choice([{}, {"result": "pass", "identity": "mailfrom", "sender": "a@lean.test",
                             "client_ip": "192.0.2.1"},
                        {"result": "softfail", "identity": "helo", "helo": "mx.lean.test"}])
        assert (authentication_results("mx.test", results, dmarc, spf)
                == authentication_results_authres("mx.test", results, dmarc, spf))
