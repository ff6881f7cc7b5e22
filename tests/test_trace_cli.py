"""``mppproxy trace`` (mppproxy/trace_cli.py, issue 16): a message's path
from the node's JSON log (its rotated files too) and its archive store.

The log lines are the ones the product writes: events logged through the
product's own ``log_transaction`` and ``Logger`` and turned into lines by
``logsetup.json_event_line`` (what ``logging.json_file`` gets); the store is
a real SQLite store in the configuration's data directory.
"""
from __future__ import annotations

import gzip
import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from twisted.logger import capturedLogs

from mppproxy.cli import main
from mppproxy.config.archive import StoreConfig
from mppproxy.logsetup import Logger, json_event_line
from mppproxy.results import Disposition
from mppproxy.smtp import replies
from mppproxy.smtp.address import parse_path
from mppproxy.smtp.session import Session, Transaction
from mppproxy.store.store import ArchiveStore, NewCopy
from mppproxy.trace_cli import log_files, parse_when
from mppproxy.txlog import log_transaction

log = Logger(namespace="mppproxy.test")


def _transaction(sender: str, rcpt: str, action: Disposition) -> tuple[list[str], str]:
    """The JSON lines of one session: a greylisting line before, the
    transaction event, an archive line after; and the reference id."""
    session = Session("192.0.2.7", 40000, "192.0.2.25", 25)
    session.helo = "client.example"
    txn = Transaction(parse_path(f"<{sender}>", allow_null=True), {})
    txn.recipients = [parse_path(f"<{rcpt}>", allow_null=False)]
    with capturedLogs() as events:
        log.info("greylisted {client} for {rcpt}", client=session.peer_host, rcpt=rcpt,
                 session_id=session.id)
        log_transaction(session, txn, action, replies.OK.with_reference(txn.id), {})
        log.info("archive copy {ref} queued as {item}", ref=txn.id, item="item-1")
    lines = [json_event_line(e) for e in events]
    return [line for line in lines if line], txn.id


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["trace", *argv])
    return code, out.getvalue(), err.getvalue()


def test_trace_by_reference_finds_the_session_and_the_archive(tmp_path: Path) -> None:
    """By reference id: the transaction, its session's earlier line, the archive line naming it, and the store's row for it, in time order; exit 0."""
    data = tmp_path / "data"
    log_path = tmp_path / "events.json"
    held, ref = _transaction("alice@example.org", "bob@example.com", Disposition.QUARANTINE)
    other, _ = _transaction("carol@example.org", "dan@example.com", Disposition.RELAY)
    log_path.write_text("".join(held + other), encoding="utf-8")
    config = tmp_path / "mppproxy.toml"
    config.write_text(f'data_dir = "{data}"\n[logging]\njson_file = "{log_path}"\n')
    store = ArchiveStore(StoreConfig(), str(data))
    store.open()
    store.add_copies([NewCopy(node="edge1", queue_id=ref, received=1.8e9, client="192.0.2.7",
                              helo="client.example", tls=False, sender="alice@example.org",
                              recipients=("bob@example.com",), policy="default",
                              verdict="quarantine", disposition="quarantine", score=9.0,
                              reasons=("spamd",), state_json="{}",
                              message=b"Subject: x\r\n\r\nbody\r\n")])
    store.close()
    code, out, err = _run(ref, "--config", str(config))
    assert (code, err) == (0, "")
    assert f"ref {ref}: quarantine <alice@example.org> to <bob@example.com>" in out
    assert "greylisted 192.0.2.7 for bob@example.com" in out
    assert f"archive copy {ref} queued as item-1" in out
    assert "archive: row" in out and "example.com: held" in out
    assert "carol@example.org" not in out
    code, out, _ = _run(ref, "--config", str(config), "--json")
    got = json.loads(out.splitlines()[0])
    assert got["transaction"]["queue_id"] == ref and got["archive"][0]["status"] == "held"
    assert len(got["related"]) == 2


def test_trace_by_sender_rcpt_and_time_across_rotated_files(tmp_path: Path) -> None:
    """--sender and --rcpt match without letter case across the live file and a rotated .gz; --since filters by time; nothing matched exits 1."""
    first, ref1 = _transaction("Alice@Example.org", "bob@example.com", Disposition.RELAY)
    second, ref2 = _transaction("alice@example.org", "eve@example.com", Disposition.RELAY)
    live = tmp_path / "events.json"
    live.write_text("".join(second), encoding="utf-8")
    with gzip.open(tmp_path / "events.json.1.gz", "wt", encoding="utf-8") as f:
        f.write("".join(first))
    assert log_files(str(live)) == [str(tmp_path / "events.json.1.gz"), str(live)]
    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{tmp_path / "d"}"\n[logging]\njson_file = "{live}"\n')
    code, out, _ = _run("--sender", "alice@example.org", "--config", str(config))
    assert code == 0 and ref1 in out and ref2 in out
    code, out, _ = _run("--rcpt", "EVE@example.com", "--config", str(config))
    assert code == 0 and ref2 in out and ref1 not in out
    code, out, _ = _run("--sender", "alice@example.org", "--since", "2099-01-01",
                        "--config", str(config))
    assert (code, out) == (1, "")
    code, out, _ = _run("--sender", "alice@example.org", "--since", "1h", "--config", str(config))
    assert code == 0 and ref1 in out


def test_text_log_and_usage_errors(tmp_path: Path) -> None:
    """A text log given with --log is searched as plain text; no query, a bad --since, a missing file or no JSON log configured exit 2 with a message."""
    text = tmp_path / "twistd.log"
    text.write_text("2026-12-07T10:00:00+0000 [x] transaction ABC123 from 192.0.2.7: relay\n"
                    "2026-12-07T10:00:01+0000 [x] something else\n")
    code, out, _ = _run("ABC123", "--log", str(text))
    assert code == 0 and "transaction ABC123" in out and "something else" not in out
    assert _run()[0] == 2
    code, _, err = _run("ABC123", "--since", "yesterday-ish", "--log", str(text))
    assert code == 2 and "30m, 2h, 1d" in err
    code, _, err = _run("ABC123", "--log", str(tmp_path / "missing.json"))
    assert code == 2 and "no such file" in err
    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{tmp_path / "d"}"\n')
    code, _, err = _run("ABC123", "--config", str(config))
    assert code == 2 and "logging.json_file" in err


def test_parse_when_forms() -> None:
    """Spans ago and ISO times (UTC unless an offset is given)."""
    assert parse_when("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_when("1970-01-01T01:00") == 3600.0
    assert parse_when("1970-01-01T01:00+01:00") == 0.0
