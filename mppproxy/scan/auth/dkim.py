"""DKIM verification (RFC 6376, Ed25519 by RFC 8463, the crypto updates of
RFC 8301) with dkimpy, its DNS answered by our asynchronous resolver.

Stage: scanning, a building block of the authentication scanner
(``scan/scanners/authentication.py``).  Three steps, so no DNS query ever
blocks a thread and the CPU work can go where it is cheapest:

1. ``signatures(header)``: the DKIM-Signature fields of the header section,
   their tags parsed (d=, s=, a=...); a field that cannot be parsed is a
   permerror here, before any DNS (at most ``max_signatures`` are looked at:
   RFC 6376 6.1 lets a verifier limit the work a message may cause).
2. ``fetch_keys(resolver, sigs)``: the TXT record at ``s._domainkey.d`` of
   each signature, all at once, through ``Resolver.query`` (its timeout, its
   cache).  No record is RFC 6376 6.1.2's "no key for signature"
   (permerror); a DNS failure is a temperror.
3. ``verify(message, sigs, keys, settings)``: dkimpy checks each signature
   against the prefetched key record; plain CPU work, no I/O (the scanner
   runs it on the reactor for small messages, in the thread pool for big
   ones).

Every signature gets one ``DkimResult`` (RFC 8601 2.7.1's results, with
why), and nothing raises: a malformed signature, key or message is a
permerror or a fail with its reason, never a traceback.
"""
from __future__ import annotations

import binascii
import functools
import logging
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import dkim
import dkim.crypto
import dkim.util
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from twisted.internet import defer

from mppproxy._async import as_deferred
from mppproxy.dns.resolver import DnsError

# RFC 8301 3.2: "Verifiers MUST NOT consider signatures using RSA keys of
# less than 1024 bits as valid signatures."
MIN_RSA_BITS = 1024
# RFC 6376 3.5 allows any number of signatures; a message with dozens is an
# attack on the verifier, and RFC 6376 6.1 lets us stop early.
MAX_SIGNATURES = 5
# A key record is one TXT record; anything longer is not a key anyone uses
# (an RSA 4096 key is ~740 characters).
MAX_KEY_RECORD = 4096

RESULTS = ("pass", "fail", "neutral", "policy", "temperror", "permerror")

# dkimpy logs every verification problem at error level; its reasons come
# back to us as exceptions, so its own logger stays silent.
_QUIET = logging.getLogger("mppproxy.dkimpy")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


# -- RSA by OpenSSL ------------------------------------------------------------
#
# dkimpy verifies RSA signatures in pure Python (its own modular
# exponentiation and integer-to-octets conversion): ~300 us of the ~450 us a
# 1 KB message with one RSA 2048 signature cost (measured, benchmarks/
# auth_bench.py).  The same RFC 8017 RSASSA-PKCS1-v1_5 check by OpenSSL
# through cryptography (a dependency already) takes ~30 us.  dkimpy looks the
# function up in its module at each call, so it is swapped there once; the
# answer is the same (tests/test_authentication.py checks both agree on
# good and bad signatures), and anything OpenSSL will not take (an odd
# hash) goes to dkimpy's own.
_PURE_RSA_VERIFY = dkim.crypto.RSASSA_PKCS1_v1_5_verify
_HASHES: dict[str, Any] = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}


@functools.lru_cache(maxsize=256)
def _rsa_key(modulus: int, exponent: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def openssl_rsa_verify(hash_: Any, signature: bytes, public_key: dict[str, int]) -> bool:
    """dkimpy's ``RSASSA_PKCS1_v1_5_verify(hash, signature, public_key)``
    (``hash_`` a hashlib-like object with ``name`` and ``digest()``), by OpenSSL."""
    algorithm = _HASHES.get(getattr(hash_, "name", ""))
    if algorithm is None:
        result: bool = _PURE_RSA_VERIFY(hash_, signature, public_key)
        return result
    try:
        key = _rsa_key(public_key["modulus"], public_key["publicExponent"])
        key.verify(bytes(signature), hash_.digest(), padding.PKCS1v15(),
                   utils.Prehashed(algorithm()))
    except InvalidSignature:
        return False
    except (ValueError, TypeError):
        # A key OpenSSL refuses (an even modulus, a tiny exponent): dkimpy decides.
        result = _PURE_RSA_VERIFY(hash_, signature, public_key)
        return result
    return True


dkim.RSASSA_PKCS1_v1_5_verify = openssl_rsa_verify


@functools.lru_cache(maxsize=256)
def _evaluate_key(name: str, record: str) -> Any:
    """dkimpy's key record parse, remembered per record text (the same keys
    sign most mail; a parse costs ~35 us).  Raises as dkimpy does."""
    return dkim.evaluate_pk(name.encode(), record)


@dataclass(frozen=True)
class DkimSignature:
    """One DKIM-Signature field as found in the header section.

    ``index`` counts DKIM-Signature fields from the top (dkimpy's ``idx``).
    ``problem``: why the field is a permerror before any DNS (empty if it
    looks well formed).  ``domain``/``selector`` are lower case, as written
    otherwise (empty when missing)."""

    index: int
    domain: str
    selector: str
    algorithm: str = ""
    identity: str = ""
    length: Optional[int] = None
    problem: str = ""

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


@dataclass(frozen=True)
class KeyLookup:
    """What DNS said about one key name: the TXT record (``record``), or
    ``missing`` (NXDOMAIN, no TXT), or ``error`` (a DNS failure: timeout,
    SERVFAIL...)."""

    record: str = ""
    missing: bool = False
    error: str = ""


@dataclass(frozen=True)
class DkimResult:
    """One signature's outcome (RFC 8601 2.7.1) with why."""

    result: str
    domain: str
    selector: str
    algorithm: str = ""
    identity: str = ""
    reason: str = ""
    key_bits: int = 0


def _text(value: Union[bytes, str]) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def header_fields(header: bytes) -> list[tuple[bytes, bytes]]:
    """(name, value) of each field of a raw header section (CRLF or LF
    lines; continuation lines kept in the value, as dkimpy keeps them)."""
    fields: list[tuple[bytes, bytes]] = []
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + line)
            continue
        name, colon, value = line.partition(b":")
        if colon:
            fields.append((name.strip(), value))
    return fields


def signatures(fields: Sequence[tuple[bytes, bytes]],
               max_signatures: int = MAX_SIGNATURES) -> list[DkimSignature]:
    """The first ``max_signatures`` DKIM-Signature fields, parsed."""
    found: list[DkimSignature] = []
    index = 0
    for name, value in fields:
        if name.lower() != b"dkim-signature":
            continue
        if index >= max_signatures:
            break
        found.append(_parse_signature(index, value))
        index += 1
    return found


def _parse_signature(index: int, value: bytes) -> DkimSignature:
    try:
        tags = dkim.util.parse_tag_value(value)
    except dkim.util.InvalidTagValueList as e:
        return DkimSignature(index, "", "", problem=f"bad tag list: {_text(str(e))}")
    domain = _text(tags.get(b"d", b"")).strip().lower()
    selector = _text(tags.get(b"s", b"")).strip().lower()
    algorithm = _text(tags.get(b"a", b"")).strip().lower()
    identity = _text(tags.get(b"i", b"")).strip()
    length: Optional[int] = None
    problem = ""
    try:
        dkim.validate_signature_fields(tags)
    except dkim.DKIMException as e:
        problem = _text(str(e))
    if not problem and not _DNS_NAME.fullmatch(f"{selector}._domainkey.{domain}"):
        problem = "d= or s= is not a domain name"
    if not problem and b"from" not in [h.strip().lower() for h in tags.get(b"h", b"").split(b":")]:
        # RFC 6376 5.4 / 6.1.1: a signature that does not cover From is ignored, PERMFAIL.
        problem = "From: not signed (RFC 6376 6.1.1)"
    if not problem and b"l" in tags:
        length = int(tags[b"l"])
    return DkimSignature(index, domain, selector, algorithm, identity, length,
                         _short(problem))


# Labels of letters, digits, "-" and "_" (selectors may carry "_"), 253 at most.
_DNS_NAME = re.compile(r"(?=.{1,253}\Z)(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)+"
                       r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def _short(text: str, limit: int = 120) -> str:
    """A reason for a header comment and a log line: printable, no
    quotes, bounded (dkimpy puts whole tag values in its messages)."""
    clean = "".join(c if c.isprintable() and c not in "\"\\" else " " for c in text)
    clean = " ".join(clean.split())
    return clean if len(clean) <= limit else clean[:limit - 3] + "..."


async def fetch_keys(resolver: Any, sigs: Sequence[DkimSignature]) -> dict[str, KeyLookup]:
    """The key record of every signature worth a query, by key name, asked
    at once; never raises (a failure is in the ``KeyLookup``)."""
    names = sorted({s.key_name for s in sigs if not s.problem})
    if not names:
        return {}
    answers = await defer.gatherResults([as_deferred(_fetch_one(resolver, n)) for n in names])
    return dict(zip(names, answers))


async def _fetch_one(resolver: Any, name: str) -> KeyLookup:
    try:
        answer = await resolver.query(name, "TXT")
    except DnsError as e:
        return KeyLookup(error=e.kind)
    except ValueError as e:
        return KeyLookup(error=f"bad name: {e}")
    if not answer.texts:
        return KeyLookup(missing=True)
    # RFC 6376 3.6.2.2: several records at one name give undefined results;
    # the first that looks like a key is used, as OpenDKIM does.
    texts = [t for t in answer.texts if "p=" in t] or list(answer.texts)
    return KeyLookup(record=texts[0][:MAX_KEY_RECORD])


def verify(message: bytes, sigs: Sequence[DkimSignature], keys: dict[str, KeyLookup],
           min_rsa_bits: int = MIN_RSA_BITS, partial_body: str = "policy",
           allow_sha1: bool = False) -> list[DkimResult]:
    """The result of each of ``sigs`` on ``message`` (CRLF lines), keys
    from ``keys`` (``fetch_keys``).  CPU only; never raises.

    ``partial_body``: what a valid signature whose l= leaves part of the
    body unsigned gets: "policy" (RFC 8601 2.7.1: signed, but not acceptable
    here; such a body can carry anything after the signed part) or "pass"
    (reported with the unsigned length)."""
    if not sigs:
        return []
    try:
        verifier = dkim.DKIM(message, logger=_QUIET, minkey=min_rsa_bits)
    except Exception as e:  # dkimpy's parser on a broken message
        return [DkimResult("permerror", s.domain, s.selector, s.algorithm, s.identity,
                           _short(f"message cannot be parsed: {e}")) for s in sigs]
    return [_verify_one(verifier, s, keys, min_rsa_bits, partial_body, allow_sha1)
            for s in sigs]


def _verify_one(verifier: Any, sig: DkimSignature, keys: dict[str, KeyLookup],
                min_rsa_bits: int, partial_body: str, allow_sha1: bool) -> DkimResult:
    def result(outcome: str, reason: str = "", bits: int = 0) -> DkimResult:
        return DkimResult(outcome, sig.domain, sig.selector, sig.algorithm, sig.identity,
                          _short(reason), bits)

    if sig.problem:
        return result("permerror", sig.problem)
    if sig.algorithm == "rsa-sha1" and not allow_sha1:
        return result("permerror", "rsa-sha1 is not acceptable (RFC 8301 3.1)")
    lookup = keys.get(sig.key_name)
    if lookup is None or lookup.error:
        why = lookup.error if lookup is not None else "not asked"
        return result("temperror", f"key {sig.key_name}: DNS {why}")
    if lookup.missing:
        return result("permerror", f"no key for signature at {sig.key_name} (RFC 6376 6.1.2)")
    try:
        key_tags = dkim.util.parse_tag_value(lookup.record.encode("utf-8", "replace"))
    except dkim.util.InvalidTagValueList as e:
        return result("permerror", f"key record: bad tag list: {e}")
    if not key_tags.get(b"p", b"").strip():
        # RFC 6376 3.6.1: an empty p= means the key was revoked.
        return result("permerror", "key revoked (empty p=)")
    try:
        pk, bits, ktag, seqtlsrpt = _evaluate_key(sig.key_name, lookup.record)
    except (dkim.DKIMException, binascii.Error, ValueError, TypeError) as e:
        return result("permerror", f"key record: {e}")
    if pk is None:
        return result("permerror", "key record is not for email (s=)")
    key_type = _text(ktag or b"")
    if sig.algorithm.split("-", 1)[0] != key_type:
        # RFC 6376 6.1.2 step 6: the key's k= must suit the signature's a=.
        return result("permerror", f"{key_type} key for an {sig.algorithm} signature")
    if key_type == "rsa" and bits < min_rsa_bits:
        return result("permerror", f"RSA key of {bits} bits, under {min_rsa_bits} "
                                   f"(RFC 8301 3.2)", bits)
    try:
        prep = verifier.verify_headerprep(sig.index)
        if not prep:
            return result("permerror", "signature field not found")
        tags, include_headers, sig_fields = prep
        verifier.pk, verifier.keysize, verifier.ktag, verifier.seqtlsrpt = pk, bits, ktag, seqtlsrpt
        ok = verifier.verify_sig_process(tags, include_headers, sig_fields[sig.index], None)
    except dkim.ValidationError as e:
        # The body hash does not match: the body was changed.
        return result("fail", str(e).split(" (got", 1)[0], bits)
    except dkim.DKIMException as e:
        return result("permerror", str(e), bits)
    except Exception as e:  # nacl/cryptography on a malformed signature value
        return result("fail", f"signature cannot be checked: {type(e).__name__}", bits)
    if not ok:
        return result("fail", "signature did not verify", bits)
    if sig.length is not None:
        unsigned = _unsigned_octets(verifier, tags, sig.length)
        if unsigned > 0:
            why = f"body beyond l=: {unsigned} octets not signed"
            if partial_body != "pass":
                return result("policy", why, bits)
            return result("pass", why, bits)
    return result("pass", "", bits)


def _unsigned_octets(verifier: Any, tags: dict[bytes, bytes], length: int) -> int:
    """Octets of the canonical body past the signature's l=."""
    try:
        policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError:
        return 0
    return max(0, len(policy.canonicalize_body(verifier.body)) - length)

