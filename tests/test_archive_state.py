"""The authenticated transaction state of archive copies (issue 12):
mppproxy/archive/state.py and mppproxy/archive/keys.py."""
from __future__ import annotations

import base64
import hmac
import os
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings, strategies as st

from mppproxy.archive import state as st_mod
from mppproxy.archive.keys import Key, KeyFileError, KeyRing, load_keys, parse_keys
from mppproxy.archive.state import (BAD_SIGNATURE, BAD_STATE, BODY_MISMATCH, TRUNCATED,
                                    UNKNOWN_KEY, UNKNOWN_VERSION, UNSIGNED, BodyDigest, CheckState,
                                    CopyState, StateRefused, parse_fields, render, sign, state_from,
                                    verify)
from mppproxy.results import CheckResult, Disposition, HardAction, Recorded, TransactionRecord
from mppproxy.verdict import Verdict

OLD = Key("2024-01", b"o" * 32)
NEW = Key("2024-07", b"n" * 40)
KEYS = KeyRing.of(NEW)
BODY = [b"Hello,\r\n", b"the body.\r\n"]


def _state(**changes: object) -> CopyState:
    base = CopyState(node="edge-1", queue_id="ABCDEFGH0000001", received=1700000000.25,
                     client="192.0.2.7", helo="mail.example.org", tls=True,
                     sender="alice@example.org", recipients=("bob@example.com",),
                     policy="default", verdict=Disposition.QUARANTINE,
                     disposition=Disposition.QUARANTINE, score=7.5,
                     reasons=("listed in zen",),
                     checks=(CheckState("dnsbl", 5.0, ("listed in zen",)),
                             CheckState("scan:clamd", 0.0, (), "timeout")),
                     checks_passed=("spf",))
    return replace(base, **changes)  # type: ignore[arg-type]


def _signed(state: CopyState, keys: KeyRing = KEYS, body: list[bytes] = BODY) -> list[tuple[str, str]]:
    """The fields as the archive would parse them off the wire."""
    return parse_fields(render(sign(state, BodyDigest.of(body), keys)))


def _refused(fields: list[tuple[str, str]], body: object = BODY, keys: KeyRing = KEYS) -> StateRefused:
    with pytest.raises(StateRefused) as info:
        verify(fields, body, keys)  # type: ignore[arg-type]
    return info.value


def _replace_field(fields: list[tuple[str, str]], name: str, value: str) -> list[tuple[str, str]]:
    return [(n, value if n.lower() == name.lower() else v) for n, v in fields]


# --- round trips ---------------------------------------------------------------

def test_state_from_carries_the_facts_of_the_log_line() -> None:
    """state_from takes the record's hits in full and its misses by name, the verdict's action,
    score and reasons, and the session facts, and that state survives signing and verifying."""
    record = TransactionRecord(policy="schools", score=6.0)
    record.recorded += [
        Recorded("dnsbl", CheckResult(5.0, ("listed in zen",))),
        Recorded("spf", CheckResult()),
        Recorded("greylist", CheckResult(action=HardAction.TEMPFAIL), recipient="b@example.com"),
        Recorded("scan:clamd", CheckResult(), skipped="timeout"),
        Recorded("scan:mime", CheckResult(1.0, ('file "a\x07.exe"',))),
    ]
    verdict = Verdict(Disposition.QUARANTINE, 6.0, ("listed in zen",))
    state = state_from(node="edge-1", queue_id="Q1", received=1700000000.0, client="192.0.2.7",
                       helo="mx.example.org", tls=False, sender="a@example.org",
                       recipients=["b@example.com"], record=record, verdict=verdict)
    assert state.policy == "schools" and state.verdict is Disposition.QUARANTINE
    assert state.disposition is Disposition.QUARANTINE and state.score == 6.0
    assert [c.name for c in state.checks] == ["dnsbl", "greylist", "scan:clamd", "scan:mime"]
    assert state.checks[1] == CheckState("greylist", 0.0, (), "", "b@example.com", HardAction.TEMPFAIL)
    assert state.checks_passed == ("spf",)
    assert verify(_signed(state), BODY, KEYS) == state


def test_ordinary_state_round_trips() -> None:
    """An ordinary state, signed and rendered, parses and verifies back to the same state."""
    state = _state()
    assert verify(_signed(state), BODY, KEYS) == state
    assert verify(_signed(state), BodyDigest.of(BODY), KEYS) == state


@pytest.mark.parametrize("changes", [
    {"helo": "evil\r\nX-MPP-Node: forged\r\n\r\nbody"},
    {"helo": None, "policy": None},
    {"sender": "jörg@bücher.example", "recipients": ("δοκιμή@παράδειγμα.δοκιμή",), "smtputf8": True},
    {"recipients": tuple(f"user{i}@example.com" for i in range(1000))},
    {"reasons": ('file "in\'voice\x00\x1b[31m.exe"', "x" * 5000),
     "checks": (CheckState("attachments", 9.0, ('name "a\r\nb.exe"', "\u202egnp.exe")),)},
    {"sender": "", "score": -2.5, "verdict": Disposition.TAG, "disposition": Disposition.RELAY},
], ids=["crlf-helo", "no-helo-no-policy", "smtputf8", "1000-recipients", "hostile-reasons",
        "null-sender"])
def test_hostile_values_round_trip_without_breaking_the_header(changes: dict[str, object]) -> None:
    """Hostile client text round-trips exactly, and the rendered header is printable ASCII with
    only our fields, no line over 998 octets and no line that starts a field it should not."""
    state = _state(**changes)
    raw = render(sign(state, BodyDigest.of(BODY), KEYS))
    assert raw.isascii()
    lines = raw.split(b"\r\n")
    assert lines[-1] == b"" and all(0 < len(line) <= 998 for line in lines[:-1])
    assert all(32 <= c < 127 or c == 9 for line in lines for c in line)
    names = [n for n, _ in parse_fields(raw)]
    assert names == [n for n, _ in sign(state, BodyDigest.of(BODY), KEYS)]
    assert verify(parse_fields(raw), BODY, KEYS) == state


# --- refusals ------------------------------------------------------------------

def _bad_blob_signed(blob: str) -> list[tuple[str, str]]:
    """Fields whose X-MPP-State is ``blob``, correctly signed (a signer bug)."""
    fields = _signed(_state())
    mac = st_mod._mac(NEW.secret, NEW.id, blob, BodyDigest.of(BODY))
    fields = _replace_field(fields, "X-MPP-State", blob)
    return _replace_field(fields, "X-MPP-Signature", f"v=1; b={base64.b64encode(mac).decode()}")


def _drop(name: str) -> list[tuple[str, str]]:
    return [(n, v) for n, v in _signed(_state()) if n != name]


@pytest.mark.parametrize("fields, body, reply, reason", [
    ([("Subject", "hi")], BODY, UNSIGNED, "unsigned"),
    (_drop("X-MPP-Signature"), BODY, UNSIGNED, "unsigned"),
    (_signed(_state(), KeyRing.of(OLD)), BODY, UNKNOWN_KEY, "unknown key id 2024-01"),
    (_replace_field(_signed(_state()), "X-MPP-Key-Id", "bad id!"), BODY, BAD_STATE,
     "X-MPP-Key-Id does not parse"),
    (_replace_field(_signed(_state()), "X-MPP-Signature", "v=2; b=AAAA"), BODY, UNKNOWN_VERSION,
     "unknown state version v=2"),
    (_replace_field(_signed(_state()), "X-MPP-Signature", "b=AAAA"), BODY, BAD_STATE,
     "X-MPP-Signature has no version"),
    (_replace_field(_signed(_state()), "X-MPP-Signature", "v=1; b=*not base64*"), BODY, BAD_STATE,
     "X-MPP-Signature is not base64"),
    (_replace_field(_signed(_state()), "X-MPP-Signature", "v=1; b=" + "A" * 43 + "="), BODY,
     BAD_SIGNATURE, "bad signature (key id 2024-07)"),
    (_replace_field(_signed(_state()), "X-MPP-State",
                    st_mod.encode_state(_state(score=0.0))), BODY, BAD_SIGNATURE, "bad signature"),
    (_replace_field(_signed(_state()), "X-MPP-State", "ab\u00e9"), BODY, BAD_STATE,
     "X-MPP-State is not base64url"),
    (_bad_blob_signed(base64.urlsafe_b64encode(b'{"v": 1}').decode().rstrip("=")), BODY,
     BAD_STATE, "X-MPP-State does not parse: state: missing"),
    (_bad_blob_signed(base64.urlsafe_b64encode(b"not json").decode().rstrip("=")), BODY,
     BAD_STATE, "X-MPP-State does not parse"),
    (_replace_field(_signed(_state()), "X-MPP-Body-Digest", "md5=abc"), BODY, BAD_STATE,
     "X-MPP-Body-Digest does not parse"),
    (_drop("X-MPP-State"), BODY, BAD_STATE, "X-MPP-State missing"),
    (_signed(_state()) + [("x-mpp-state", "AAAA")], BODY, BAD_STATE,
     "x-mpp-state given more than once"),
    (_signed(_state()), [b"Hello,\r\n", b"the b0dy.\r\n"], BODY_MISMATCH,
     "body does not match the signed digest"),
    (_signed(_state()), BODY + [b"appended\r\n"], BODY_MISMATCH,
     "body does not match the signed digest"),
    (_signed(_state()), [b"Hello,\r\n"], TRUNCATED, "truncated: body of 8 octets, 19 signed"),
    (_drop("X-MPP-Helo"), BODY, BAD_SIGNATURE, "X-MPP-Helo missing"),
], ids=["no-state-at-all", "no-signature", "unknown-key", "bad-key-id", "newer-version",
        "no-version", "signature-not-base64", "forged-signature", "state-swapped",
        "state-not-base64url", "signed-state-missing-keys", "signed-state-not-json",
        "digest-not-parsing", "state-missing", "state-twice", "body-changed", "body-longer",
        "body-truncated", "readable-field-removed"])
def test_every_refusal_has_its_reply_and_reason(fields: list[tuple[str, str]], body: object,
                                                reply: object, reason: str) -> None:
    """Each kind of bad copy is refused with its own reply (5xx, or 4xx where a retry after the
    archive reloads or upgrades could succeed) and a reason naming what was wrong."""
    refused = _refused(fields, body)
    assert refused.reply == reply
    assert refused.reason.startswith(reason), refused.reason
    assert str(refused) == refused.reason


def test_only_a_key_or_version_the_archive_lacks_defers() -> None:
    """The unknown key id and the unknown version are the only 4xx refusals; the rest are 5xx."""
    transient = {r for r in (UNSIGNED, UNKNOWN_KEY, UNKNOWN_VERSION, BAD_SIGNATURE, BODY_MISMATCH,
                             TRUNCATED, BAD_STATE) if r.is_transient}
    assert transient == {UNKNOWN_KEY, UNKNOWN_VERSION}
    assert all(r.code == 554 for r in (UNSIGNED, BAD_SIGNATURE, BODY_MISMATCH, TRUNCATED, BAD_STATE))


# --- rotation ------------------------------------------------------------------

def test_key_rotation() -> None:
    """A copy signed with the old key verifies while both keys are loaded and is deferred
    once the old key is removed; the newest key (last) signs."""
    old_signed = _signed(_state(), KeyRing.of(OLD))
    both = KeyRing.of(OLD, NEW)
    assert both.signing == NEW
    assert verify(old_signed, BODY, both) == _state()
    assert dict(_signed(_state(), both))["X-MPP-Key-Id"].strip() == NEW.id
    refused = _refused(old_signed, keys=KeyRing.of(NEW))
    assert refused.reply == UNKNOWN_KEY and OLD.id in refused.reason


# --- canonical form --------------------------------------------------------------

def test_reordered_and_refolded_fields_still_verify() -> None:
    """Fields in another order, refolded, with other case in their names and other white space
    between words, verify to the same state."""
    fields = _signed(_state(recipients=tuple(f"u{i}@example.com" for i in range(30))))
    moved = list(reversed(fields))
    refolded = []
    for name, value in moved:
        if name == "X-MPP-State":
            value = "\r\n ".join(value.replace("\r\n\t", "")[i:i + 40]
                                 for i in range(0, len(value.replace("\r\n\t", "")), 40))
        else:
            value = value.replace(" ", "\r\n  ")
        refolded.append((name.upper() if name.endswith("Helo") else name, value))
    assert verify(refolded, BODY, KEYS) == _state(recipients=tuple(f"u{i}@example.com" for i in range(30)))


@pytest.mark.parametrize("name", st_mod.READABLE + ("X-MPP-Key-Id", "X-MPP-Body-Digest", "X-MPP-State"))
def test_any_changed_value_is_refused(name: str) -> None:
    """Changing one character of any field's value makes the copy fail verification."""
    fields = _signed(_state())
    value = dict(fields)[name]
    # Change the last character that is not white space to another allowed one.
    i = len(value.rstrip()) - 1
    changed = value[:i] + ("B" if value[i] != "B" else "C") + value[i + 1:]
    refused = _refused(_replace_field(fields, name, changed))
    assert not refused.reply.is_positive
    assert refused.reply in (BAD_SIGNATURE, BAD_STATE, UNKNOWN_KEY)


def test_comparisons_are_constant_time() -> None:
    """The MAC and the body digest are compared with hmac.compare_digest."""
    with mock.patch.object(st_mod.hmac, "compare_digest", wraps=hmac.compare_digest) as compare:
        verify(_signed(_state()), BODY, KEYS)
    assert compare.call_count == 2


# --- key files -------------------------------------------------------------------

def _b64(secret: bytes) -> str:
    return base64.b64encode(secret).decode()


def _key_file(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "archive.keys"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_key_file_loads_and_the_last_key_signs(tmp_path: Path) -> None:
    """A key file with comments, blank lines and two keys (one URL-safe without padding) loads;
    the last key signs and both verify."""
    url_safe = base64.urlsafe_b64encode(b"\xfb" * 33).decode().rstrip("=")
    path = _key_file(tmp_path, f"# keys\n\n2024-01 = {_b64(OLD.secret)}\n  2024-07={url_safe}  \n")
    ring = load_keys(path)
    assert ring.signing == Key("2024-07", b"\xfb" * 33)
    assert ring.get("2024-01") == OLD
    assert "secret" not in repr(ring) and _b64(OLD.secret) not in repr(ring.signing)


@pytest.mark.parametrize("text, line, problem", [
    ("k1 = {good}\nno equals sign\n", 2, "expected 'key-id = base64-secret'"),
    ("\n\nbad id! = {good}\n", 3, "key id must be"),
    ("k1 = {good}\nk1 = {good}\n", 2, "key id k1 already given on line 1"),
    ("k1 = not*base64\n", 1, "key k1: the secret is not base64"),
    ("k1 = {short}\n", 1, "key k1: the secret is 31 octets, at least 32 are needed"),
])
def test_key_file_errors_name_file_and_line(tmp_path: Path, text: str, line: int, problem: str) -> None:
    """Each problem of a key file is a KeyFileError naming the file and line, without the secret."""
    path = _key_file(tmp_path, text.format(good=_b64(b"g" * 32), short=_b64(b"s" * 31)))
    with pytest.raises(KeyFileError) as info:
        load_keys(path)
    assert any(e.startswith(f"{path}:{line}: {problem}") for e in info.value.errors), info.value.errors
    assert _b64(b"g" * 32) not in str(info.value) and _b64(b"s" * 31) not in str(info.value)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_key_file_open_to_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    """A key file that group or others may read or write is refused with a message saying so."""
    path = _key_file(tmp_path, f"k1 = {_b64(b'g' * 32)}\n", mode)
    with pytest.raises(KeyFileError) as info:
        load_keys(path)
    assert info.value.errors == [f"{path}: the key file is readable or writable by group or others "
                                 f"(mode 0{mode:o}); it holds shared secrets: chmod 600 it"]


def test_missing_empty_and_odd_key_files_are_refused(tmp_path: Path) -> None:
    """A missing file, a file with no key, a directory and non-ASCII text are each refused by name."""
    with pytest.raises(KeyFileError, match="cannot open the key file"):
        load_keys(str(tmp_path / "nope"))
    with pytest.raises(KeyFileError, match="no key in the file"):
        load_keys(_key_file(tmp_path, "# nothing yet\n"))
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_keys(str(tmp_path / "dir"))
    with pytest.raises(KeyFileError, match=r"archive\.keys:2: not ASCII text"):
        load_keys(_key_file(tmp_path, "# one\n# zwei ü\n"))
    with pytest.raises(KeyFileError):
        parse_keys("", "inline")


# --- property ----------------------------------------------------------------------

_text = st.text(max_size=40)
_checks = st.builds(CheckState, name=_text, score=st.floats(-100, 100), reasons=st.tuples(_text),
                    skipped=_text, recipient=_text,
                    action=st.none() | st.sampled_from(list(HardAction)))
_states = st.builds(
    CopyState, node=_text, queue_id=_text, received=st.floats(0, 2 ** 33), client=_text,
    helo=st.none() | _text, tls=st.booleans(), sender=_text,
    recipients=st.lists(_text, max_size=5).map(tuple), policy=st.none() | _text,
    verdict=st.sampled_from(list(Disposition)), disposition=st.sampled_from(list(Disposition)),
    score=st.floats(-1e6, 1e6), reasons=st.lists(_text, max_size=3).map(tuple),
    checks=st.lists(_checks, max_size=3).map(tuple),
    checks_passed=st.lists(_text, max_size=3).map(tuple), smtputf8=st.booleans())


@settings(max_examples=150, deadline=None)
@given(state=_states, body=st.lists(st.binary(max_size=64), max_size=4))
def test_verify_inverts_sign(state: CopyState, body: list[bytes]) -> None:
    """For any state and body, verifying the rendered, signed fields gives the state back."""
    assert verify(parse_fields(render(sign(state, BodyDigest.of(body), KEYS))), body, KEYS) == state
