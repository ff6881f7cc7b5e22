"""The transaction's state as it travels with an archive copy: ``X-MPP-*``
header fields, authenticated by an HMAC (issue 12, "Forwarder").

Stage: after the action at the edge (the forwarder signs what the edge knew
at the end of DATA) and at the end of DATA on the archive node (the receiver
verifies before it queues anything).  Hands on a ``CopyState`` -- the same
facts as the transaction's log line (``txlog.py``; docs/design.md promise
5) -- or a ``StateRefused`` carrying the reply for the forwarder.

The fields, in the order ``sign`` gives them:

=====================  ==========================================================
``X-MPP-Node``          the edge's node name                        (readable)
``X-MPP-Queue-Id``      the queue id: every refusal's and log line's reference
``X-MPP-Received``      end of DATA, RFC 5322 date in UTC (the state: epoch)
``X-MPP-Client``        client IP
``X-MPP-Helo``          HELO/EHLO argument, ``(none)`` without one
``X-MPP-TLS``           ``yes`` or ``no``
``X-MPP-Sender``        ``<envelope sender>``
``X-MPP-Recipients``    ``<rcpt>, <rcpt>, ...``: every recipient, one field
``X-MPP-Policy``        the policy that judged it, ``(none)`` without one
``X-MPP-Verdict``       the verdict's ``Disposition``
``X-MPP-Disposition``   what the edge did (the verdict's, or relay for copy-all)
``X-MPP-Score``         the summed score
``X-MPP-Key-Id``        the id of the key that signed (``keys.py``)  (signed)
``X-MPP-Body-Digest``   ``sha256=<hex>; octets=<n>`` of the body
``X-MPP-State``         the whole state: compact JSON, base64url, folded
``X-MPP-Signature``     ``v=1; b=<base64 HMAC-SHA256>``
=====================  ==========================================================

Why one ``X-MPP-State`` blob and readable fields beside it: the blob is the
authority.  Base64 cannot break a header line whatever the client sent
(CRLF in a HELO, quotes and controls in a reason, a UTF-8 sender), its only
canonical form is "all white space removed", so a field refolded in transit
still verifies, and a thousand recipients or per-check results need no
field order to be kept.  The readable fields are for people reading the copy
(printable ASCII: non-ASCII as ``\\uXXXX`` escapes, controls as spaces, words
past 200 characters cut); the verifier derives them again from the verified
blob and refuses a copy whose readable field says anything else (compared
with runs of white space as one space), so no field can be changed unseen.
One ``X-MPP-Recipients`` field rather than one per recipient: a field
per recipient would be a thousand fields for a thousand recipients, and
their order would matter.

The signed bytes (canonical form), ASCII, lines ending in LF::

    mppproxy-state/1
    key-id:<X-MPP-Key-Id, trimmed>
    state:<X-MPP-State, white space removed>
    body:sha256=<lower-case hex>;octets=<decimal>

The body digest covers the octets after the empty line that ends the header
section, as received (CRLF line ends, dot-unstuffed).  Header fields other
than these are not covered (the issue's design: state plus body); the hop
between edge and archive is meant to run over TLS.  A copy replayed as it
was stores nothing twice: the archive is idempotent on node + queue id.

Refusals (``StateRefused.reply``), at the end of DATA on the archive node
(RFC 5321 4.3.2 lists 554 and 451 among the replies to DATA; RFC 3463 for
the enhanced codes):

* no ``X-MPP-Signature``: ``554 5.7.1`` -- delivery not authorised; the
  archive takes signed copies only.
* an unknown key id: ``451 4.7.5`` -- RFC 3463 X.7.5 names "necessary
  information such as key was not available"; the only way a real edge
  sends one is a rotation that reached the edge before the archive, and
  the retry after the archive reloads succeeds.  A forger gains nothing
  from the deferral: nothing is stored, and a wrong key stays refused
  until the forwarder's maximum age sends the item to ``bad/``.
* an unknown signature version ``v=``: ``451 4.6.0`` for the same reason
  (an edge upgraded before the archive).
* a bad signature, or a readable field that differs from the signed state:
  ``554 5.7.7`` -- RFC 3463 X.7.7 "message integrity failure": "the
  message was corrupted or altered".  Neither improves on a retry.
* a body whose digest is not the signed one: ``554 5.7.7`` as well.
* a body shorter than the signed length (truncated), or a field that does
  not parse (signature, key id, digest, the state itself), or an X-MPP
  state field given twice: ``554 5.6.0`` -- RFC 3463 X.6.0, the content's
  form is wrong; the forwarder's queue item is complete on disk (fsync'ed,
  renamed), so a retry sends the same bytes.
"""
from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import hmac
import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence, Union

from mppproxy.archive.keys import KEY_ID, KeyRing
from mppproxy.message import format_header
from mppproxy.results import Disposition, HardAction, TransactionRecord
from mppproxy.smtp.replies import Reply

if TYPE_CHECKING:
    # Only the type: the archive node decodes states without loading the
    # scan stage that verdict.py stands on.
    from mppproxy.verdict import Verdict

VERSION = 1

# --- replies (see the module docstring for each choice) ----------------------
# RFC 5321 4.3.2 (554 after DATA) / RFC 3463 5.7.1: delivery not authorized.
UNSIGNED = Reply(554, "5.7.1", "Archive copy refused: no signed state")
# RFC 5321 4.3.2 (451) / RFC 3463 4.7.5: cryptographic failure, key not available.
UNKNOWN_KEY = Reply(451, "4.7.5", "Archive copy deferred: unknown key id, try again later")
# RFC 5321 4.3.2 (451) / RFC 3463 4.6.0: other media error, here a newer format.
UNKNOWN_VERSION = Reply(451, "4.6.0",
                        "Archive copy deferred: unknown state version, try again later")
# RFC 5321 4.3.2 (554) / RFC 3463 5.7.7: message integrity failure.
BAD_SIGNATURE = Reply(554, "5.7.7", "Archive copy refused: state signature does not verify")
# RFC 5321 4.3.2 (554) / RFC 3463 5.7.7: message integrity failure.
BODY_MISMATCH = Reply(554, "5.7.7", "Archive copy refused: body does not match the signed digest")
# RFC 5321 4.3.2 (554) / RFC 3463 5.6.0: other or undefined media error.
TRUNCATED = Reply(554, "5.6.0", "Archive copy refused: message truncated")
# RFC 5321 4.3.2 (554) / RFC 3463 5.6.0: other or undefined media error.
BAD_STATE = Reply(554, "5.6.0", "Archive copy refused: state header does not parse")

NODE, QUEUE_ID, RECEIVED = "X-MPP-Node", "X-MPP-Queue-Id", "X-MPP-Received"
CLIENT, HELO, TLS = "X-MPP-Client", "X-MPP-Helo", "X-MPP-TLS"
SENDER, RECIPIENTS, POLICY = "X-MPP-Sender", "X-MPP-Recipients", "X-MPP-Policy"
VERDICT, DISPOSITION, SCORE = "X-MPP-Verdict", "X-MPP-Disposition", "X-MPP-Score"
KEY_ID_FIELD, BODY_DIGEST, STATE, SIGNATURE = (
    "X-MPP-Key-Id", "X-MPP-Body-Digest", "X-MPP-State", "X-MPP-Signature")
READABLE = (NODE, QUEUE_ID, RECEIVED, CLIENT, HELO, TLS, SENDER, RECIPIENTS, POLICY, VERDICT,
            DISPOSITION, SCORE)
SIGNED = (KEY_ID_FIELD, BODY_DIGEST, STATE, SIGNATURE)
_OURS = frozenset(n.lower() for n in READABLE + SIGNED)

# A readable word longer than this is cut (RFC 5322 2.1.1: lines stay
# under 998 octets, and format_header folds only at spaces).
_MAX_WORD = 200
# The last second RFC 5322 dates can show (year 9999).
_MAX_TIME = 253402300800.0
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
_DIGEST = re.compile(r"sha256=([0-9a-fA-F]{64});octets=([0-9]{1,18})")


class StateRefused(Exception):
    """A copy whose state the archive cannot accept: ``reply`` for the
    forwarder, ``reason`` for the log line."""

    def __init__(self, reply: Reply, reason: str):
        super().__init__(reason)
        self.reply = reply
        self.reason = reason


@dataclass(frozen=True)
class CheckState:
    """One check's or engine's result as the log line has it (a hit, or a
    check that was skipped): ``results.Recorded`` in plain values."""

    name: str
    score: float = 0.0
    reasons: tuple[str, ...] = ()
    skipped: str = ""
    # The recipient a per-recipient check judged ("" for the transaction).
    recipient: str = ""
    action: Optional[HardAction] = None


@dataclass(frozen=True)
class CopyState:
    """What the edge knew about a transaction at the end of DATA: the facts
    of its log line (``txlog.py``), carried with the copy."""

    node: str
    queue_id: str
    # End of DATA, seconds since the epoch (UTC).
    received: float
    client: str
    helo: Optional[str]
    tls: bool
    sender: str
    recipients: tuple[str, ...]
    policy: Optional[str]
    verdict: Disposition
    disposition: Disposition
    score: float
    # The verdict's reasons.
    reasons: tuple[str, ...] = ()
    # Hits and skips in full, in the order recorded; the misses by name.
    checks: tuple[CheckState, ...] = ()
    checks_passed: tuple[str, ...] = ()
    smtputf8: bool = False


def state_from(*, node: str, queue_id: str, received: float, client: str, helo: Optional[str],
               tls: bool, sender: str, recipients: Sequence[str], record: Optional[TransactionRecord],
               verdict: "Verdict", disposition: Optional[Disposition] = None,
               smtputf8: bool = False) -> CopyState:
    """The state of a transaction from plain facts (the ``Session`` and
    ``Transaction`` fields of the same names), its ``TransactionRecord``
    and its ``Verdict``.  ``disposition``: what the edge did, the verdict's
    action unless said otherwise.  Hits and misses split as in
    ``results.checks_for_log``, so the copy and the log line agree."""
    recorded = record.recorded if record is not None else []
    checks = tuple(CheckState(r.check, r.result.score, tuple(r.result.reasons), r.skipped,
                              r.recipient, r.result.action)
                   for r in recorded if not r.is_miss)
    passed = tuple(sorted({r.check for r in recorded if r.is_miss}))
    return CopyState(node=node, queue_id=queue_id, received=received, client=client, helo=helo,
                     tls=tls, sender=sender, recipients=tuple(recipients),
                     policy=record.policy if record is not None else None,
                     verdict=verdict.action, disposition=disposition or verdict.action,
                     score=verdict.score, reasons=tuple(verdict.reasons), checks=checks,
                     checks_passed=passed, smtputf8=smtputf8)


@dataclass(frozen=True)
class BodyDigest:
    """SHA-256 and length of a message body (the octets after the empty
    line that ends the header section)."""

    sha256: bytes
    octets: int

    @classmethod
    def of(cls, chunks: Iterable[bytes]) -> "BodyDigest":
        h = hashlib.sha256()
        size = 0
        for chunk in chunks:
            h.update(chunk)
            size += len(chunk)
        return cls(h.digest(), size)

    def field_value(self) -> str:
        return f"sha256={self.sha256.hex()}; octets={self.octets}"


# --- signing -----------------------------------------------------------------

def sign(state: CopyState, body: BodyDigest, keys: KeyRing) -> tuple[tuple[str, str], ...]:
    """The ``X-MPP-*`` fields (name, unfolded value) for a copy of ``body``
    with ``state``, signed with the ring's signing key.  ``render`` turns
    them into header lines.  ValueError for a score or time that is not a
    finite number (no edge records one)."""
    blob = encode_state(state)
    key = keys.signing
    mac = _mac(key.secret, key.id, blob, body)
    signature = f"v={VERSION}; b={base64.b64encode(mac).decode('ascii')}"
    return readable_fields(state) + ((KEY_ID_FIELD, key.id), (BODY_DIGEST, body.field_value()),
                                     (STATE, blob), (SIGNATURE, signature))


def render(fields: Iterable[tuple[str, str]]) -> bytes:
    """Header lines for ``fields``, folded under 78 octets where a space
    allows it and the state blob in 76-character pieces (RFC 5322 2.1.1,
    2.2.3); nothing in a value can start a new field."""
    out = []
    for name, value in fields:
        out.append(_fold_token(name, value) if name == STATE else format_header(name, value))
    return b"".join(out)


def _fold_token(name: str, token: str) -> bytes:
    # Base64 has no spaces to fold at: each continuation line is a tab and
    # 76 characters; unfolding and removing white space gives it back.
    first = 78 - len(name) - 2
    pieces = [token[:first]] + [token[i:i + 76] for i in range(first, len(token), 76)]
    return (f"{name}: " + "\r\n\t".join(pieces) + "\r\n").encode("ascii")


def encode_state(state: CopyState) -> str:
    """The state as compact JSON (sorted keys, ASCII), base64url without padding."""
    obj: dict[str, Any] = {
        "v": VERSION, "node": state.node, "queue_id": state.queue_id,
        "received": state.received, "client": state.client, "helo": state.helo,
        "tls": state.tls, "sender": state.sender, "recipients": list(state.recipients),
        "policy": state.policy, "verdict": str(state.verdict),
        "disposition": str(state.disposition), "score": state.score,
        "reasons": list(state.reasons), "checks_passed": list(state.checks_passed),
        "smtputf8": state.smtputf8,
        "checks": [{"check": c.name, "score": c.score, "reasons": list(c.reasons),
                    "skipped": c.skipped, "recipient": c.recipient,
                    "action": c.action.value if c.action is not None else None}
                   for c in state.checks],
    }
    text = json.dumps(obj, ensure_ascii=True, allow_nan=False, sort_keys=True,
                      separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode("ascii")).decode("ascii").rstrip("=")


def readable_fields(state: CopyState) -> tuple[tuple[str, str], ...]:
    """The fields for people, all derived from ``state``."""
    return (
        (NODE, _readable(state.node)),
        (QUEUE_ID, _readable(state.queue_id)),
        (RECEIVED, email.utils.formatdate(state.received, usegmt=True)),
        (CLIENT, _readable(state.client)),
        (HELO, _readable(state.helo) if state.helo is not None else "(none)"),
        (TLS, "yes" if state.tls else "no"),
        (SENDER, _readable(f"<{state.sender}>")),
        (RECIPIENTS, _readable(", ".join(f"<{r}>" for r in state.recipients))),
        (POLICY, _readable(state.policy) if state.policy is not None else "(none)"),
        (VERDICT, str(state.verdict)),
        (DISPOSITION, str(state.disposition)),
        (SCORE, f"{state.score:g}"),
    )


def _readable(text: str) -> str:
    """Printable ASCII only: non-ASCII as backslash escapes, controls as
    spaces, long words cut; so client text can neither break the header
    line nor make it longer than a line may be."""
    escaped = text.encode("ascii", "backslashreplace").decode("ascii")
    clean = "".join(c if " " <= c <= "~" else " " for c in escaped)
    words = [w if len(w) <= _MAX_WORD else w[:_MAX_WORD] + "..." for w in clean.split(" ") if w]
    return " ".join(words)


def _mac(secret: bytes, key_id: str, blob: str, body: BodyDigest) -> bytes:
    return hmac.new(secret, _canonical(key_id, blob, body), hashlib.sha256).digest()


def _canonical(key_id: str, blob: str, body: BodyDigest) -> bytes:
    return (f"mppproxy-state/{VERSION}\nkey-id:{key_id}\nstate:{blob}\n"
            f"body:sha256={body.sha256.hex()};octets={body.octets}\n").encode("ascii")


# --- verifying ---------------------------------------------------------------

def parse_fields(section: bytes) -> list[tuple[str, str]]:
    """The fields of a header section (up to its empty line) as (name,
    value), continuation lines joined with their white space.  Octets that
    are not UTF-8 are kept as surrogates; only ours must be ASCII."""
    fields: list[tuple[str, str]] = []
    for line in section.splitlines():
        if not line:
            break
        text = line.decode("utf-8", "surrogateescape")
        if text[0] in " \t" and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + text)
        elif ":" in text:
            name, _, value = text.partition(":")
            fields.append((name.strip(), value))
    return fields


def verify(fields: Iterable[tuple[str, str]], body: Union[BodyDigest, Iterable[bytes]],
           keys: KeyRing) -> CopyState:
    """The verified state of a copy whose header fields (name, value, folded
    or not, any order) are ``fields`` and whose body is ``body`` (its digest,
    or its chunks), or ``StateRefused`` with the reply and the reason (see
    the module docstring).  The MAC is checked before anything signed is
    decoded, and compared in constant time."""
    ours = _collect(fields)
    if SIGNATURE.lower() not in ours:
        raise StateRefused(UNSIGNED, "unsigned: no X-MPP-Signature")
    for name in (KEY_ID_FIELD, BODY_DIGEST, STATE):
        if name.lower() not in ours:
            raise StateRefused(BAD_STATE, f"{name} missing")
    given = _parse_signature(ours[SIGNATURE.lower()])
    key_id = ours[KEY_ID_FIELD.lower()].strip()
    if not KEY_ID.fullmatch(key_id):
        raise StateRefused(BAD_STATE, f"{KEY_ID_FIELD} does not parse")
    key = keys.get(key_id)
    if key is None:
        raise StateRefused(UNKNOWN_KEY, f"unknown key id {key_id}")
    signed_body = _parse_digest(ours[BODY_DIGEST.lower()])
    blob = "".join(ours[STATE.lower()].split())
    if not _BASE64URL.fullmatch(blob):
        raise StateRefused(BAD_STATE, f"{STATE} is not base64url")
    if not hmac.compare_digest(_mac(key.secret, key_id, blob, signed_body), given):
        raise StateRefused(BAD_SIGNATURE, f"bad signature (key id {key_id})")
    actual = body if isinstance(body, BodyDigest) else BodyDigest.of(body)
    if actual.octets < signed_body.octets:
        raise StateRefused(TRUNCATED, f"truncated: body of {actual.octets} octets, "
                                      f"{signed_body.octets} signed")
    if not hmac.compare_digest(actual.sha256, signed_body.sha256) or actual.octets != signed_body.octets:
        raise StateRefused(BODY_MISMATCH, "body does not match the signed digest")
    state = decode_state(blob)
    for name, value in readable_fields(state):
        got = ours.get(name.lower())
        if got is None:
            raise StateRefused(BAD_SIGNATURE, f"{name} missing")
        if " ".join(got.split()) != " ".join(value.split()):
            raise StateRefused(BAD_SIGNATURE, f"{name} does not match the signed state")
    return state


def _collect(fields: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Our fields by lower-case name, unfolded; one of them twice refuses."""
    ours: dict[str, str] = {}
    for name, value in fields:
        key = name.strip().lower()
        if key not in _OURS:
            continue
        if key in ours:
            raise StateRefused(BAD_STATE, f"{name.strip()} given more than once")
        ours[key] = value.replace("\r", "").replace("\n", "")
    return ours


def _parse_signature(value: str) -> bytes:
    """The MAC of ``v=1; b=<base64>``; another version defers (4xx)."""
    tags: dict[str, str] = {}
    for part in value.split(";"):
        tag, equals, tag_value = part.partition("=")
        if equals:
            tags[tag.strip().lower()] = "".join(tag_value.split())
    if tags.get("v") != str(VERSION):
        if re.fullmatch(r"[0-9]{1,4}", tags.get("v", "")):
            raise StateRefused(UNKNOWN_VERSION, f"unknown state version v={tags['v']}")
        raise StateRefused(BAD_STATE, f"{SIGNATURE} has no version")
    try:
        mac = base64.b64decode(tags.get("b", ""), validate=True)
    except (binascii.Error, ValueError):
        raise StateRefused(BAD_STATE, f"{SIGNATURE} is not base64") from None
    if len(mac) != hashlib.sha256().digest_size:
        raise StateRefused(BAD_STATE, f"{SIGNATURE} is not an HMAC-SHA256")
    return mac


def _parse_digest(value: str) -> BodyDigest:
    match = _DIGEST.fullmatch("".join(value.split()))
    if match is None:
        raise StateRefused(BAD_STATE, f"{BODY_DIGEST} does not parse")
    return BodyDigest(bytes.fromhex(match.group(1)), int(match.group(2)))


class _Bad(ValueError):
    pass


def decode_state(blob: str) -> CopyState:
    """The state of a verified ``X-MPP-State`` value; ``StateRefused``
    (``BAD_STATE``) naming what does not parse."""
    return decode_state_text(blob)[0]


def decode_state_text(blob: str) -> tuple[CopyState, str]:
    """``decode_state``, and the JSON text the value carries (what the
    store keeps), decoded once."""
    try:
        text = base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4)).decode("ascii")
        obj = json.loads(text, parse_constant=_no_constant)
        return _state(obj), text
    except (binascii.Error, ValueError, RecursionError) as e:
        raise StateRefused(BAD_STATE, f"{STATE} does not parse: {e}") from None


def _no_constant(name: str) -> Any:
    raise _Bad(f"{name} is not a number")


_STATE_KEYS = frozenset({"v", "node", "queue_id", "received", "client", "helo", "tls", "sender",
                         "recipients", "policy", "verdict", "disposition", "score", "reasons",
                         "checks", "checks_passed", "smtputf8"})
_CHECK_KEYS = frozenset({"check", "score", "reasons", "skipped", "recipient", "action"})


def _state(obj: Any) -> CopyState:
    _keys(obj, _STATE_KEYS, "state")
    if obj["v"] != VERSION or isinstance(obj["v"], bool):
        raise _Bad(f"version {obj['v']!r} is not {VERSION}")
    received = _number(obj, "received")
    if not 0 <= received < _MAX_TIME:
        raise _Bad("received: out of range")
    checks = obj["checks"]
    if not isinstance(checks, list):
        raise _Bad("checks: not a list")
    return CopyState(
        node=_text(obj, "node"), queue_id=_text(obj, "queue_id"), received=received,
        client=_text(obj, "client"), helo=_optional_text(obj, "helo"), tls=_flag(obj, "tls"),
        sender=_text(obj, "sender"), recipients=_texts(obj, "recipients"),
        policy=_optional_text(obj, "policy"), verdict=_disposition(obj, "verdict"),
        disposition=_disposition(obj, "disposition"), score=_number(obj, "score"),
        reasons=_texts(obj, "reasons"), checks=tuple(_check(c) for c in checks),
        checks_passed=_texts(obj, "checks_passed"), smtputf8=_flag(obj, "smtputf8"))


def _check(obj: Any) -> CheckState:
    _keys(obj, _CHECK_KEYS, "checks[]")
    action = _optional_text(obj, "action")
    try:
        hard = HardAction(action) if action is not None else None
    except ValueError:
        raise _Bad(f"checks[].action: {action!r} is no action") from None
    return CheckState(_text(obj, "check"), _number(obj, "score"), _texts(obj, "reasons"),
                      _text(obj, "skipped"), _text(obj, "recipient"), hard)


def _keys(obj: Any, expected: frozenset[str], what: str) -> None:
    if not isinstance(obj, dict):
        raise _Bad(f"{what}: not an object")
    if set(obj) != expected:
        missing, unknown = sorted(expected - set(obj)), sorted(set(obj) - expected)
        raise _Bad(f"{what}: missing {missing}, unknown {unknown}")


def _text(obj: dict[str, Any], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise _Bad(f"{key}: not a string")
    return value


def _optional_text(obj: dict[str, Any], key: str) -> Optional[str]:
    return None if obj[key] is None else _text(obj, key)


def _texts(obj: dict[str, Any], key: str) -> tuple[str, ...]:
    value = obj[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Bad(f"{key}: not a list of strings")
    return tuple(value)


def _flag(obj: dict[str, Any], key: str) -> bool:
    value = obj[key]
    if not isinstance(value, bool):
        raise _Bad(f"{key}: not true or false")
    return value


def _number(obj: dict[str, Any], key: str) -> float:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Bad(f"{key}: not a finite number")
    return float(value)


def _disposition(obj: dict[str, Any], key: str) -> Disposition:
    value = _text(obj, key)
    try:
        return Disposition(value)
    except ValueError:
        raise _Bad(f"{key}: {value!r} is no disposition") from None
