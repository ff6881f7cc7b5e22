"""``mppproxy replay`` (issue 14): a corpus judged offline against a
configuration.

The corpus is built here: a Maildir (``cur/`` and ``new/``), an mbox and a
folder of ``.eml`` files, with a clean message, one to a spam trap, one
from a sender the new configuration blacklists, one with a banned
attachment (the MIME/attachment checks), a copy carrying X-MPP state and
broken ones.  The command runs as the operator runs it (a subprocess: the
reactor runs once per process); the envelope reader, the corpus reader
and the judge run in-process too.  No DNS (``--no-dns``); the clamd of
``--recorded`` listens nowhere, so only the recorded results can answer.
Real clamd: tests/realmta/test_replay_clamd.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest

from helpers import free_port
from mppproxy.archive.state import (STATE, CheckState, CopyState, encode_state, readable_fields,
                                    render)
from mppproxy.match import TrustedNetworks
from mppproxy.replay import corpus
from mppproxy.replay.envelope import (COMMAND_LINE, HEADER_SOURCE, STATE_SOURCE, EnvelopeMissing,
                                      Given, read_envelope)
from mppproxy.results import Disposition, HardAction

ROOT = Path(__file__).resolve().parents[1]
# Seconds one CLI run may take (imports included) on a loaded 2-core machine.
RUN_TIMEOUT = 120

OLD = """
relay_domains = ["example.com"]
[policies.default.spamtrap]
enabled = true
patterns = ["^trap@"]
[policies.default.scan]
enabled = true
"""
NEW = OLD + """
[policies.default.access]
blacklist_senders = ["bad@spam.example"]
"""


def mail(sender: str = "alice@example.org", rcpt: str = "bob@example.com",
         client: str = "203.0.113.5", extra: str = "", body: str = "Hello Bob.\n",
         headers: str = "") -> bytes:
    """A message as a mailbox stores it: LF line ends, the delivering MTA's
    Return-Path and Delivered-To, our MX's Received: below the backend's."""
    return (f"Return-Path: <{sender}>\n"
            f"Delivered-To: {rcpt}\n"
            "Received: from mx.example.com (localhost [127.0.0.1])\n"
            "\tby backend.example.com (Postfix); Sun, 1 Dec 2024 10:00:01 +0000\n"
            f"Received: from mail.sender.test (mail.sender.test [{client}])\n"
            "\tby mx.example.com (mppproxy); Sun, 1 Dec 2024 10:00:00 +0000\n"
            f"{headers}From: {sender}\nTo: {rcpt}\nSubject: hello\n"
            "Date: Sun, 1 Dec 2024 10:00:00 +0000\nMessage-ID: <m1@sender.test>\n"
            f"{extra}\n{body}").encode()


def banned_attachment() -> bytes:
    return mail(extra='MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b1"\n',
                body="--b1\nContent-Type: text/plain\n\nsee attached\n"
                     "--b1\nContent-Type: application/octet-stream\n"
                     "Content-Disposition: attachment; filename=\"setup.exe\"\n"
                     "Content-Transfer-Encoding: base64\n\nTVqQAAMAAAAEAAAA\n--b1--\n")


def state_copy(verdict: str = "relay", score: float = 0.0,
               checks: tuple[CheckState, ...] = (), passed: tuple[str, ...] = (),
               sender: str = "carol@example.org") -> bytes:
    """An archive copy: the X-MPP fields of archive/state.py on top (not
    signed: replay reads, it does not verify), no trace fields at all."""
    state = CopyState(node="edge1", queue_id="Q1", received=time.time(), client="198.51.100.7",
                      helo="mail.carol.test", tls=False, sender=sender,
                      recipients=("bob@example.com", "eve@example.com"), policy="default",
                      verdict=Disposition(verdict), disposition=Disposition(verdict),
                      score=score, checks=checks, checks_passed=passed)
    fields = readable_fields(state) + ((STATE, encode_state(state)),)
    return render(fields) + (f"From: {sender}\r\nTo: bob@example.com\r\nSubject: copy\r\n"
                             "\r\nA stored copy.\r\n").encode()


def mbox(*messages: bytes) -> bytes:
    out = b""
    for m in messages:
        body = m.replace(b"\r\n", b"\n").replace(b"\nFrom ", b"\n>From ")
        out += b"From alice@example.org Sun Dec  1 10:00:00 2024\n" + body + b"\n"
    return out


def build_corpus(root: Path) -> dict[str, Path]:
    """Maildir + mbox + .eml folder; returns the paths by role."""
    maildir = root / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "cur" / "1.host:2,S").write_bytes(mail())
    (maildir / "new" / "2.host").write_bytes(mail(rcpt="trap@example.com"))
    (maildir / "tmp" / "3.host").write_bytes(b"not finished")  # never read
    box = root / "mail.mbox"
    box.write_bytes(mbox(mail(sender="bad@spam.example"), banned_attachment()))
    emls = root / "eml"
    emls.mkdir()
    (emls / "a-copy.eml").write_bytes(state_copy())
    (emls / "b-broken.eml").write_bytes(b"this is not a message at all\n")
    (emls / "c-noenvelope.eml").write_bytes(b"From: x@example.org\nSubject: s\n\nbody\n")
    (emls / "ignored.txt").write_bytes(b"not a corpus file")
    return {"maildir": maildir, "mbox": box, "eml": emls}


def run(*args: str, cwd: Optional[Path] = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mppproxy", "replay", *args],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env,
                          cwd=cwd, check=False)


def configs(tmp_path: Path, new: str = NEW, old: str = OLD) -> tuple[str, str]:
    (tmp_path / "new.toml").write_text(new)
    (tmp_path / "old.toml").write_text(old)
    return str(tmp_path / "new.toml"), str(tmp_path / "old.toml")


def by_path(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {Path(m["path"]).name: m for m in report["messages"]}


# -- the command, end to end ------------------------------------------------------

def test_against_second_config_reports_the_changed(tmp_path: Path) -> None:
    """Two configurations that differ by a blacklisted sender: only that
    message changes (relay -> refused), the table and the totals say so,
    the broken messages are reported each with why, and the exit status is 1."""
    paths = build_corpus(tmp_path / "corpus")
    new, old = configs(tmp_path)
    report_path = tmp_path / "report.json"
    r = run("--config", new, "--against", old, "--no-dns", "--json", str(report_path),
            str(paths["maildir"]), str(paths["mbox"]), str(paths["eml"]))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    report = json.loads(report_path.read_text())
    rows = by_path(report)
    assert len(report["messages"]) == 7
    assert set(rows) == {"1.host:2,S", "2.host", "mail.mbox#1", "mail.mbox#2", "a-copy.eml",
                         "b-broken.eml", "c-noenvelope.eml"}
    clean = rows["1.host:2,S"]
    assert clean["new"]["disposition"] == clean["old"]["disposition"] == "relay"
    assert clean["envelope"] == {"sender": "alice@example.org", "recipients": ["bob@example.com"],
                                 "client": "203.0.113.5", "helo": "mail.sender.test",
                                 "sources": {k: HEADER_SOURCE for k in
                                             ("sender", "recipients", "client", "helo")}}
    trap = rows["2.host"]
    assert (trap["old"]["disposition"], trap["new"]["disposition"]) == ("refused", "refused")
    assert trap["new"]["decided_by"] == "spamtrap" and not trap["changed"]
    black = rows["mail.mbox#1"]
    assert black["changed"] and black["transition"] == "relay -> refused"
    assert black["new"]["decided_by"] == "access"
    assert "sender <bad@spam.example>" in black["new"]["reasons"][0]
    banned = rows["mail.mbox#2"]
    assert banned["new"]["disposition"] == banned["old"]["disposition"] == "reject"
    assert banned["new"]["decided_by"] == "scan:attachments"
    assert rows["a-copy.eml"]["new"]["disposition"] == "relay"
    assert rows["a-copy.eml"]["envelope"]["sources"]["client"] == STATE_SOURCE
    assert "does not start with a header field" in rows["b-broken.eml"]["error"]
    assert "no recipients" in rows["c-noenvelope.eml"]["error"]
    assert report["totals"] == {"messages": 7, "judged": 5, "errors": 2, "changed": 1,
                                "without_old": 0, "transitions": {"relay -> refused": 1},
                                "dispositions": {"refused": 2, "reject": 1, "relay": 2}}
    # The table: the changed message and the two errors, not the unchanged.
    lines = r.stdout.splitlines()
    assert lines[0].split()[:2] == ["PATH", "OLD"]
    assert any("mail.mbox#1" in line and "relay -> refused" in line for line in lines)
    assert not any("1.host" in line for line in lines)
    assert sum("ERROR" in line for line in lines) == 2
    assert "7 message(s): 5 judged, 2 could not be judged; 1 changed" in r.stdout
    assert "  relay -> refused: 1" in lines
    # Not a terminal: no progress bar on stderr.
    assert "replayed [" not in r.stderr


def test_recorded_judgement_is_the_old_side(tmp_path: Path) -> None:
    """Without --against the old side is the judgement the copy's X-MPP
    state recorded; a sender blacklisted since makes it change, and a
    run where every message is judged exits 0."""
    emls = tmp_path / "eml"
    emls.mkdir()
    (emls / "copy.eml").write_bytes(state_copy(sender="bad@spam.example", score=1.5))
    new, _ = configs(tmp_path)
    r = run("--config", new, "--no-dns", "--json", "-", str(emls))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    row = report["messages"][0]
    assert row["old_source"] == STATE_SOURCE
    assert row["old"]["disposition"] == "relay" and row["old"]["score"] == 1.5
    assert row["new"]["disposition"] == "refused" and row["changed"]
    # Both recipients of the recorded envelope were asked.
    assert [x["recipient"] for x in row["new"]["refused"]] == ["bob@example.com", "eve@example.com"]
    assert report["totals"]["transitions"] == {"relay -> refused": 1}
    # With --json - the table goes to stderr.
    assert "relay -> refused" in r.stderr


def test_recorded_engine_results(tmp_path: Path) -> None:
    """--recorded answers clamd from the copy's state (a virus, a clean
    scan) although no clamd listens; without it the dead clamd tempfails
    the message as the policy says."""
    port = free_port()
    cfg = OLD + f"""
[scanners.clamd]
address = "tcp:127.0.0.1:{port}"
timeout = 2.0
[policies.default.scan.engines.clamd]
"""
    virus = CheckState("scan:clamd", 0.0, ("virus Eicar-Test-Signature",),
                       action=HardAction.REJECT)
    emls = tmp_path / "eml"
    emls.mkdir()
    (emls / "clean.eml").write_bytes(state_copy(passed=("scan:clamd",)))
    (emls / "virus.eml").write_bytes(state_copy(verdict="reject", checks=(virus,)))
    (emls / "unrecorded.eml").write_bytes(mail())
    new, _ = configs(tmp_path, new=cfg)
    r = run("--config", new, "--no-dns", "--recorded", "--json", "-", "--all", str(emls))
    assert r.returncode == 0, r.stderr
    rows = by_path(json.loads(r.stdout))
    assert rows["clean.eml"]["new"]["disposition"] == "relay"
    assert rows["clean.eml"]["new"]["engines"] == {"clamd": "recorded"}
    virus_row = rows["virus.eml"]["new"]
    assert (virus_row["disposition"], virus_row["decided_by"]) == ("reject", "scan:clamd")
    assert virus_row["reasons"] == ["virus Eicar-Test-Signature"]
    assert not rows["virus.eml"]["changed"]
    # No record: the live clamd is asked, is down, and the policy tempfails.
    unrecorded = rows["unrecorded.eml"]["new"]
    assert unrecorded["disposition"] == "tempfail"
    assert unrecorded["engines"]["clamd"].startswith("skipped: failed")
    # Without --recorded every message meets the dead clamd.
    r = run("--config", new, "--no-dns", "--json", "-", str(emls))
    rows = by_path(json.loads(r.stdout))
    assert {m["new"]["disposition"] for m in rows.values()} == {"tempfail"}


def test_command_line_envelope(tmp_path: Path) -> None:
    """A message without trace fields is judged with --sender/--rcpt/--client;
    --override-envelope makes them win over Return-Path and Delivered-To."""
    emls = tmp_path / "eml"
    emls.mkdir()
    (emls / "bare.eml").write_bytes(b"From: x@example.org\nSubject: s\n\nbody\n")
    (emls / "traced.eml").write_bytes(mail(rcpt="bob@example.com"))
    new, _ = configs(tmp_path)
    r = run("--config", new, "--no-dns", "--json", "-", "--sender", "bad@spam.example",
            "--rcpt", "carol@example.com", "--client", "192.0.2.9", str(emls))
    assert r.returncode == 0, r.stderr
    rows = by_path(json.loads(r.stdout))
    bare = rows["bare.eml"]
    assert all(bare["envelope"]["sources"][k] == COMMAND_LINE
               for k in ("sender", "recipients", "client"))
    assert bare["new"]["disposition"] == "refused"
    assert rows["traced.eml"]["envelope"]["sender"] == "alice@example.org"
    r = run("--config", new, "--no-dns", "--json", "-", "--override-envelope",
            "--sender", "bad@spam.example", str(emls / "traced.eml"))
    row = json.loads(r.stdout)["messages"][0]
    assert row["envelope"]["sender"] == "bad@spam.example"
    assert row["new"]["disposition"] == "refused"


def test_usage_and_config_errors_exit_2(tmp_path: Path) -> None:
    """A missing path, a configuration with errors: exit 2, one line each, no traceback."""
    new, _ = configs(tmp_path)
    r = run("--config", new, str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "no such file or directory" in r.stderr
    (tmp_path / "bad.toml").write_text("[policies.default.scoring]\ntag = \"x\"\n")
    r = run("--config", str(tmp_path / "bad.toml"), str(tmp_path))
    assert r.returncode == 2 and "policies.default.scoring.tag" in r.stderr
    assert "Traceback" not in r.stderr


# -- the pieces, in-process --------------------------------------------------------------

def test_corpus_reader_orders_and_splits(tmp_path: Path) -> None:
    """Maildir cur/ then new/ by name (tmp/ left alone), mboxrd's >From
    unquoted, CRLF line ends, an over-large message kept by size only."""
    paths = build_corpus(tmp_path)
    (tmp_path / "big.eml").write_bytes(mail(body="x" * 5000))
    found = list(corpus.messages([str(paths["maildir"]), str(paths["mbox"]),
                                  str(tmp_path / "big.eml")], max_size=4000))
    assert [Path(m.path).name for m in found] == ["1.host:2,S", "2.host", "mail.mbox#1",
                                                  "mail.mbox#2", "big.eml"]
    assert all(m.data is None or b"\n" not in m.data.replace(b"\r\n", b"") for m in found)
    assert found[-1].data is None and found[-1].size > 4000
    quoted = mbox(mail(body="From here on\n"))
    (tmp_path / "q.mbox").write_bytes(quoted)
    (one,) = corpus.messages([str(tmp_path / "q.mbox")], max_size=10**6)
    assert one.data is not None and one.data.endswith(b"\r\nFrom here on\r\n")
    assert corpus.count([str(paths["maildir"]), str(paths["mbox"]), str(paths["eml"])]) == 7
    with pytest.raises(corpus.CorpusError):
        corpus.sources([str(tmp_path / "missing")])


def test_envelope_first_external_hop() -> None:
    """The client is the topmost Received from an address that is not
    trusted, loopback or private; X-Original-To wins over Delivered-To."""
    data = corpus.crlf(
        b"Return-Path: <>\n"
        b"X-Original-To: a@example.com, b@example.com\n"
        b"Delivered-To: alias@example.com\n"
        b"Received: from backend (localhost [127.0.0.1]) by x; Sun, 1 Dec 2024 10:00:00 +0000\n"
        b"Received: from relay.internal (relay.internal [10.1.2.3]) by x; d\n"
        b"Received: from trusted.example (t [192.0.2.50]) by x; d\n"
        b"Received: from mail.out.test (mail.out.test [IPv6:2001:db8::25])\n\tby x; d\n"
        b"Received: from earlier.test (earlier.test [198.51.100.1]) by y; d\n"
        b"Subject: s\n\nbody\n")
    envelope, past = read_envelope(data, Given(), TrustedNetworks(("192.0.2.0/24",)))
    assert envelope.sender == ""
    assert envelope.recipients == ("a@example.com", "b@example.com")
    assert (envelope.client_ip, envelope.helo) == ("2001:db8::25", "mail.out.test")
    assert past is None
    with pytest.raises(EnvelopeMissing, match="no client address"):
        read_envelope(corpus.crlf(b"Return-Path: <a@b.test>\nDelivered-To: c@d.test\n\nx\n"),
                      Given(), TrustedNetworks(()))


def test_envelope_from_state_and_scan_header() -> None:
    """The X-MPP-State blob gives envelope and past judgement with each
    engine's recorded result; a relayed message's X-MPP-Scan gives the
    past disposition and score only."""
    virus = CheckState("scan:clamd", 0.0, ("virus X",), action=HardAction.REJECT)
    data = state_copy(verdict="reject", checks=(virus,), passed=("scan:spamd", "access"))
    envelope, past = read_envelope(data, Given(), TrustedNetworks(()))
    assert envelope.client_ip == "198.51.100.7" and envelope.helo == "mail.carol.test"
    assert past is not None and past.disposition is Disposition.REJECT
    assert past.decided_by == "scan:clamd"
    assert past.engines == {"clamd": virus, "spamd": None}
    relayed = corpus.crlf(mail(headers="X-MPP-Scan: score=6.5; action=tag\n"))
    _, past = read_envelope(relayed, Given(), TrustedNetworks(()))
    assert past is not None and (past.disposition, past.score) == (Disposition.TAG, 6.5)



def test_shared_state_carries_the_blacklist(tmp_path: Path) -> None:
    """Alone, a message after a spam-trap hit from the same client is
    relayed; with --shared-state the scratch blacklist refuses it, and
    nothing reaches the state database (none is created)."""
    maildir = tmp_path / "Maildir"
    (maildir / "cur").mkdir(parents=True)
    (maildir / "cur" / "1").write_bytes(mail(rcpt="trap@example.com"))
    (maildir / "cur" / "2").write_bytes(mail())
    data_dir = tmp_path / "data"
    new, _ = configs(tmp_path, new=f'data_dir = "{data_dir}"\n' + OLD)
    alone = json.loads(run("--config", new, "--no-dns", "--json", "-", str(maildir)).stdout)
    assert [m["new"]["disposition"] for m in alone["messages"]] == ["refused", "relay"]
    shared = json.loads(run("--config", new, "--no-dns", "--shared-state", "--json", "-",
                            str(maildir)).stdout)
    second = shared["messages"][1]["new"]
    assert (second["disposition"], second["decided_by"]) == ("refused", "blacklist")
    assert not (data_dir / "state.sqlite").exists()


def test_recorded_scores_take_the_new_weight(tmp_path: Path) -> None:
    """A recorded spamd score (weighted 2 by the configuration that judged
    it) is divided by that weight: --against keeps it at 8 (tag), the new
    configuration's weight 1 makes it 4 (relay)."""
    port = free_port()

    def cfg(weight: float) -> str:
        return OLD + f"""
[scanners.spamd]
address = "tcp:127.0.0.1:{port}"
[policies.default.scoring]
tag = 5.0
[policies.default.scan.engines.spamd]
weight = {weight}
"""
    spam = CheckState("scan:spamd", 8.0, ("BAYES_99",))
    emls = tmp_path / "eml"
    emls.mkdir()
    (emls / "spam.eml").write_bytes(state_copy(verdict="tag", score=8.0, checks=(spam,)))
    new, old = configs(tmp_path, new=cfg(1.0), old=cfg(2.0))
    r = run("--config", new, "--against", old, "--no-dns", "--recorded", "--json", "-", str(emls))
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)["messages"][0]
    assert (row["old"]["disposition"], row["old"]["score"]) == ("tag", 8.0)
    assert (row["new"]["disposition"], row["new"]["score"]) == ("relay", 4.0)
    assert row["new"]["engines"] == {"spamd": "recorded"}
