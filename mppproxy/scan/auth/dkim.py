"""DKIM verification (RFC 6376, Ed25519 by RFC 8463, the crypto updates of
RFC 8301): a lean check of our own for plain messages, dkimpy for the rest
and as the reference; DNS answered by our asynchronous resolver.

Stage: scanning, a building block of the authentication scanner
(``scan/scanners/authentication.py``).  Three steps, so no DNS query ever
blocks a thread and the CPU work can go where it is cheapest:

1. ``signatures(fields)``: the DKIM-Signature fields of the header section,
   their tags parsed once (d=, s=, a=...; ``scan/auth/tags.py``, dkimpy's
   answers); a field that cannot be parsed is a permerror here, before any
   DNS (at most ``max_signatures`` are looked at: RFC 6376 6.1 lets a
   verifier limit the work a message may cause).
2. ``fetch_keys(resolver, sigs)``: the TXT record at ``s._domainkey.d`` of
   each signature, all at once, through the resolver (its timeout, its
   cache).  No record is RFC 6376 6.1.2's "no key for signature"
   (permerror); a DNS failure is a temperror.
3. ``verify(message, sigs, keys, settings)``: each signature checked
   against the prefetched key record; plain CPU work, no I/O (the scanner
   runs it on the reactor for small messages, in the thread pool for big
   ones).  A plain message (``scan/auth/canon.py``: CRLF lines, ordinary
   field names, no bare LF) gets ``_lean``: RFC 6376 3.4 canonicalisation
   and the 3.7 hashes on the octets we hold, RSA by OpenSSL, Ed25519 by
   libsodium, keys parsed once per record text.  Anything else goes to
   dkimpy, whose reading of an unusual message is the reference: a message
   that is not plain, a key with s=tlsrpt, a key OpenSSL refuses.  Both
   give the same result and reason for every signature
   (tests/test_dkim_lean.py, a few hundred generated messages).

Where the time went (benchmarks/README.md, "auth.sh"): dkimpy cost ~340 us
for a 1 KiB message with one RSA 2048 signature, in Python regular
expressions for canonicalisation and in parsing the message and the
signature a second time; the lean check costs ~50 us, 40 of them OpenSSL's
RSA.

Every signature gets one ``DkimResult`` (RFC 8601 2.7.1's results, with
why), and nothing raises: a malformed signature, key or message is a
permerror or a fail with its reason, never a traceback.
"""
from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import dkim
import dkim.crypto
import dkim.util
import dns.rdatatype
import nacl.exceptions
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from twisted.internet import defer

from mppproxy._async import as_deferred
from mppproxy.dns.names import to_query_name
from mppproxy.dns.resolver import DnsError
from mppproxy.scan.auth import canon
from mppproxy.scan.auth import tags as tags_

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
_TXT = dns.rdatatype.TXT

# dkimpy logs every verification problem at error level; its reasons come
# back to us as exceptions, so its own logger stays silent.
_QUIET = logging.getLogger("mppproxy.dkimpy")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


# -- RSA by OpenSSL (for dkimpy) ---------------------------------------------------
#
# The lean check calls OpenSSL itself; for the messages dkimpy still checks:
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


@dataclass(frozen=True)
class DkimSignature:
    """One DKIM-Signature field as found in the header section.

    ``index`` counts DKIM-Signature fields from the top (dkimpy's ``idx``).
    ``problem``: why the field is a permerror before any DNS (empty if it
    looks well formed).  ``domain``/``selector`` are lower case, as written
    otherwise (empty when missing).  ``tags``: the parsed tag list (empty
    when it could not be parsed), so verification does not parse it again."""

    index: int
    domain: str
    selector: str
    algorithm: str = ""
    identity: str = ""
    length: Optional[int] = None
    problem: str = ""
    tags: dict[bytes, bytes] = field(default_factory=dict, compare=False, repr=False)

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
    lines; continuation lines kept in the value, as dkimpy keeps them).
    For a plain section ``canon.split`` gives the same fields, cheaper."""
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
               max_signatures: int = MAX_SIGNATURES,
               reference: bool = False) -> list[DkimSignature]:
    """The first ``max_signatures`` DKIM-Signature fields, parsed
    (``reference``: by dkimpy's own functions, for the tests)."""
    found: list[DkimSignature] = []
    index = 0
    for name, value in fields:
        if name.lower() != b"dkim-signature":
            continue
        if index >= max_signatures:
            break
        found.append(_parse_signature(index, value, reference))
        index += 1
    return found


def _parse_signature(index: int, value: bytes, reference: bool = False) -> DkimSignature:
    try:
        if reference:
            tags = dkim.util.parse_tag_value(value)
        else:
            tags = tags_.parse_tag_list(value)
    except dkim.util.InvalidTagValueList as e:
        return DkimSignature(index, "", "", problem=f"bad tag list: {_text(str(e))}")
    domain = _text(tags.get(b"d", b"")).strip().lower()
    selector = _text(tags.get(b"s", b"")).strip().lower()
    algorithm = _text(tags.get(b"a", b"")).strip().lower()
    identity = _text(tags.get(b"i", b"")).strip()
    length: Optional[int] = None
    problem = ""
    try:
        if reference:
            dkim.validate_signature_fields(tags)
        else:
            tags_.check_signature_tags(tags)
    except dkim.DKIMException as e:
        problem = _text(str(e))
    except (IndexError, ValueError) as e:
        # dkimpy's checks on an i= no longer than d=: an answer, not a crash.
        problem = f"bad signature tags: {type(e).__name__}"
    if not problem and not _DNS_NAME.fullmatch(f"{selector}._domainkey.{domain}"):
        problem = "d= or s= is not a domain name"
    if not problem and b"from" not in [h.strip().lower() for h in tags.get(b"h", b"").split(b":")]:
        # RFC 6376 5.4 / 6.1.1: a signature that does not cover From is ignored, PERMFAIL.
        problem = "From: not signed (RFC 6376 6.1.1)"
    if not problem and b"l" in tags:
        if not tags[b"l"].isdigit():
            problem = "l= value is not a decimal integer"
        else:
            length = int(tags[b"l"])
    return DkimSignature(index, domain, selector, algorithm, identity, length,
                         _short(problem), tags)


# Labels of letters, digits, "-" and "_" (selectors may carry "_"), 253 at most.
_DNS_NAME = re.compile(r"(?=.{1,253}\Z)(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)+"
                       r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def _short(text: str, limit: int = 120) -> str:
    """A reason for a header comment and a log line: printable, no
    quotes, bounded (dkimpy puts whole tag values in its messages)."""
    if not text:
        return text
    clean = "".join(c if c.isprintable() and c not in "\"\\" else " " for c in text)
    clean = " ".join(clean.split())
    return clean if len(clean) <= limit else clean[:limit - 3] + "..."


# -- keys ----------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)
def _query_name(name: str) -> Any:
    """The DNS name object for a key or policy name, made once per text:
    the resolver's cache is keyed by it, and parsing the text again for
    every message cost more than the cache lookup itself."""
    return to_query_name(name)


async def cached_txt(resolver: Any, name: str) -> tuple[str, ...]:
    """The TXT records at ``name`` (empty for NXDOMAIN/NODATA) through
    ``resolver``: by ``lookup`` with a remembered name when it is our
    ``Resolver`` (an answer from its cache then costs a dict probe), by
    ``query`` otherwise.  Raises DnsError, or ValueError for a bad name."""
    lookup = getattr(resolver, "lookup", None)
    if lookup is not None:
        answer = await lookup(_query_name(name), _TXT)
        texts: tuple[str, ...] = answer.rdatas
        return texts
    reply = await resolver.query(name, "TXT")
    texts = reply.texts
    return texts


async def fetch_keys(resolver: Any, sigs: Sequence[DkimSignature]) -> dict[str, KeyLookup]:
    """The key record of every signature worth a query, by key name, asked
    at once; never raises (a failure is in the ``KeyLookup``)."""
    names = sorted({s.key_name for s in sigs if not s.problem})
    if not names:
        return {}
    if len(names) == 1:
        # The usual case: no Deferreds to gather.
        return {names[0]: await _fetch_one(resolver, names[0])}
    answers = await defer.gatherResults([as_deferred(_fetch_one(resolver, n)) for n in names])
    return dict(zip(names, answers))


async def _fetch_one(resolver: Any, name: str) -> KeyLookup:
    try:
        texts = await cached_txt(resolver, name)
    except DnsError as e:
        return KeyLookup(error=e.kind)
    except ValueError as e:
        return KeyLookup(error=f"bad name: {e}")
    if not texts:
        return KeyLookup(missing=True)
    # RFC 6376 3.6.2.2: several records at one name give undefined results;
    # the first that looks like a key is used, as OpenDKIM does.
    keyish = [t for t in texts if "p=" in t] or list(texts)
    return KeyLookup(record=keyish[0][:MAX_KEY_RECORD])


@dataclass(frozen=True)
class KeyInfo:
    """A key record as verification needs it, made once per record text:
    ``problem`` (a permerror reason) or dkimpy's parse (``pk``, ``bits``,
    ``kind`` "rsa"/"ed25519", ``tlsrpt``: s=tlsrpt) and, for RSA, the
    OpenSSL key (None when OpenSSL refuses it: dkimpy checks then)."""

    problem: str = ""
    pk: Any = None
    bits: int = 0
    kind: str = ""
    tlsrpt: bool = False
    rsa: Optional[rsa.RSAPublicKey] = None


@functools.lru_cache(maxsize=256)
def key_info(name: str, record: str) -> KeyInfo:
    """The key record at ``name`` parsed (dkimpy's ``evaluate_pk``, ~35 us,
    remembered per record text: the same keys sign most mail).  Never raises."""
    try:
        key_tags = tags_.parse_tag_list(record.encode("utf-8", "replace"))
    except dkim.util.InvalidTagValueList as e:
        return KeyInfo(f"key record: bad tag list: {e}")
    if not key_tags.get(b"p", b"").strip():
        # RFC 6376 3.6.1: an empty p= means the key was revoked.
        return KeyInfo("key revoked (empty p=)")
    try:
        pk, bits, ktag, seqtlsrpt = dkim.evaluate_pk(name.encode(), record)
    except (dkim.DKIMException, binascii.Error, ValueError, TypeError) as e:
        return KeyInfo(f"key record: {e}")
    if pk is None:
        return KeyInfo("key record is not for email (s=)")
    kind = _text(ktag or b"")
    openssl_key: Optional[rsa.RSAPublicKey] = None
    if kind == "rsa":
        try:
            openssl_key = _rsa_key(pk["modulus"], pk["publicExponent"])
        except (ValueError, TypeError, KeyError):
            openssl_key = None
    return KeyInfo("", pk, int(bits or 0), kind, bool(seqtlsrpt), openssl_key)


# -- verification ----------------------------------------------------------------

def verify(message: bytes, sigs: Sequence[DkimSignature], keys: dict[str, KeyLookup],
           min_rsa_bits: int = MIN_RSA_BITS, partial_body: str = "policy",
           allow_sha1: bool = False, split: Optional[canon.Message] = None,
           lean: bool = True) -> list[DkimResult]:
    """The result of each of ``sigs`` on ``message`` (CRLF lines), keys
    from ``keys`` (``fetch_keys``).  CPU only; never raises.

    ``partial_body``: what a valid signature whose l= leaves part of the
    body unsigned gets: "policy" (RFC 8601 2.7.1: signed, but not acceptable
    here; such a body can carry anything after the signed part) or "pass"
    (reported with the unsigned length).

    A plain message (``canon.split``; ``split`` when the caller has it
    already) is checked by ``_lean``: our canonicalisation and hashes,
    OpenSSL's RSA, libsodium's Ed25519 (through PyNaCl, as dkimpy).  dkimpy
    checks the rest: a message that is not plain, a key with s=tlsrpt, a
    key OpenSSL refuses.  ``lean=False`` gives dkimpy every signature (the
    reference the tests compare with)."""
    if not sigs:
        return []
    msg = split
    if msg is None and lean:
        msg = canon.split(message)
    checker = _Dkimpy(message)
    if msg is None:
        # dkimpy reads the message now, as it always did: one that it
        # cannot parse is a permerror for every signature.
        failed = checker.load()
        if failed:
            return [DkimResult("permerror", s.domain, s.selector, s.algorithm, s.identity,
                               _short(f"message cannot be parsed: {failed}")) for s in sigs]
    bodies: dict[tuple[bool, str], tuple[bytes, bytes]] = {}
    out = []
    for sig in sigs:
        key = _precheck(sig, keys, min_rsa_bits, allow_sha1)
        if isinstance(key, DkimResult):
            out.append(key)
            continue
        outcome = _lean(msg, sig, key, bodies) if msg is not None else None
        if outcome is None:
            outcome = checker.check(sig, key)
        result, reason, unsigned = outcome
        if result == "pass" and sig.length is not None and unsigned > 0:
            reason = f"body beyond l=: {unsigned} octets not signed"
            if partial_body != "pass":
                result = "policy"
        out.append(DkimResult(result, sig.domain, sig.selector, sig.algorithm, sig.identity,
                              _short(reason), key.bits))
    return out


def _precheck(sig: DkimSignature, keys: dict[str, KeyLookup], min_rsa_bits: int,
              allow_sha1: bool) -> Union[DkimResult, KeyInfo]:
    """What decides a signature before any hashing, or its key."""
    def result(outcome: str, reason: str, bits: int = 0) -> DkimResult:
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
    key = key_info(sig.key_name, lookup.record)
    if key.problem:
        return result("permerror", key.problem)
    if sig.algorithm.split("-", 1)[0] != key.kind:
        # RFC 6376 6.1.2 step 6: the key's k= must suit the signature's a=.
        return result("permerror", f"{key.kind} key for an {sig.algorithm} signature")
    if key.kind == "rsa" and key.bits < min_rsa_bits:
        return result("permerror", f"RSA key of {key.bits} bits, under {min_rsa_bits} "
                                   f"(RFC 8301 3.2)", key.bits)
    return key


# (result, reason, octets of the canonical body past l=)
_Outcome = tuple[str, str, int]
_DIGESTS: dict[str, Any] = {"sha256": hashlib.sha256, "sha1": hashlib.sha1}
_PADDING = padding.PKCS1v15()
_PREHASHED = {"sha256": utils.Prehashed(hashes.SHA256()), "sha1": utils.Prehashed(hashes.SHA1())}


def _lean(msg: canon.Message, sig: DkimSignature, key: KeyInfo,
          bodies: dict[tuple[bool, str], tuple[bytes, bytes]]) -> Optional[_Outcome]:
    """RFC 6376 6.1.3 on a plain message, in dkimpy's order (c=, body
    hash, header hash, b=), with dkimpy's answers; None hands the
    signature to dkimpy (s=tlsrpt, a key OpenSSL refuses)."""
    if key.tlsrpt or (key.kind == "rsa" and key.rsa is None):
        return None
    tags = sig.tags
    c = tags.get(b"c", b"simple/simple")
    modes = c.split(b"/")
    if len(modes) not in (1, 2):
        return "permerror", "invalid c= value: %r" % c, 0
    if len(modes) == 1:
        modes.append(b"simple")
    for mode in modes:
        if mode not in (b"simple", b"relaxed"):
            return "permerror", "invalid c= value: %r" % mode, 0
    relaxed_header, relaxed_body = modes[0] == b"relaxed", modes[1] == b"relaxed"
    digest_name = sig.algorithm.rsplit("-", 1)[-1]
    hasher = _DIGESTS[digest_name]
    try:
        expected = base64.b64decode(b"".join(tags[b"bh"].split()))
    except binascii.Error as e:
        return "fail", f"signature cannot be checked: {type(e).__name__}", 0
    # The canonical body and its hash, once per (mode, hash) per message:
    # two signatures (RSA and Ed25519 by one signer) share them.
    cached = bodies.get((relaxed_body, digest_name))
    if cached is None or sig.length is not None:
        body = canon.canonical_body(msg.body, relaxed_body) if cached is None else cached[0]
        computed = hasher(body if sig.length is None else body[:sig.length]).digest()
        if cached is None and sig.length is None:
            bodies[(relaxed_body, digest_name)] = (body, computed)
    else:
        body, computed = cached
    if computed != expected:
        return "fail", "body hash mismatch", 0
    positions = [i for i, n in enumerate(msg.names) if n == b"dkim-signature"]
    if sig.index >= len(positions):
        return None
    data = canon.header_data(msg, tags_.signed_names(tags[b"h"]), positions[sig.index],
                             relaxed_header)
    digest = hasher(data).digest()
    try:
        signature = base64.b64decode(b"".join(tags[b"b"].split()))
    except binascii.Error as e:
        return "fail", f"signature cannot be checked: {type(e).__name__}", 0
    unsigned = 0 if sig.length is None else max(0, len(body) - sig.length)
    if key.rsa is not None:
        try:
            key.rsa.verify(signature, digest, _PADDING, _PREHASHED[digest_name])
        except InvalidSignature:
            return "fail", "signature did not verify", 0
        except (ValueError, TypeError):
            return None
        return "pass", "", unsigned
    try:
        key.pk.verify(digest, signature)
    except nacl.exceptions.BadSignatureError:
        return "fail", "signature did not verify", 0
    except Exception as e:  # nacl on a signature of the wrong length
        return "fail", f"signature cannot be checked: {type(e).__name__}", 0
    return "pass", "", unsigned


class _Dkimpy:
    """dkimpy's verification of single signatures of one message, its
    parse made on first use."""

    def __init__(self, message: bytes):
        self.message = message
        self.verifier: Any = None

    def load(self) -> str:
        """Parse the message; why it cannot be parsed, or ""."""
        if self.verifier is None:
            try:
                self.verifier = dkim.DKIM(self.message, logger=_QUIET, minkey=MIN_RSA_BITS)
            except Exception as e:  # dkimpy's parser on a broken message
                return str(e) or type(e).__name__
        return ""

    def check(self, sig: DkimSignature, key: KeyInfo) -> _Outcome:
        failed = self.load()
        if failed:
            return "permerror", f"message cannot be parsed: {failed}", 0
        verifier = self.verifier
        try:
            prep = verifier.verify_headerprep(sig.index)
            if not prep:
                return "permerror", "signature field not found", 0
            tags, include_headers, sig_fields = prep
            verifier.pk, verifier.keysize = key.pk, key.bits
            verifier.ktag, verifier.seqtlsrpt = key.kind.encode(), key.tlsrpt
            ok = verifier.verify_sig_process(tags, include_headers, sig_fields[sig.index], None)
        except dkim.ValidationError as e:
            # The body hash does not match: the body was changed.
            return "fail", str(e).split(" (got", 1)[0], 0
        except dkim.DKIMException as e:
            return "permerror", str(e), 0
        except Exception as e:  # nacl/cryptography on a malformed signature value
            return "fail", f"signature cannot be checked: {type(e).__name__}", 0
        if not ok:
            return "fail", "signature did not verify", 0
        unsigned = 0
        if sig.length is not None:
            unsigned = _unsigned_octets(verifier, tags, sig.length)
        return "pass", "", unsigned


def _unsigned_octets(verifier: Any, tags: dict[bytes, bytes], length: int) -> int:
    """Octets of the canonical body past the signature's l=."""
    try:
        policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError:
        return 0
    return max(0, len(policy.canonicalize_body(verifier.body)) - length)
