"""``mppproxy quarantine`` run as the operator runs it: a subprocess
(``python -m mppproxy quarantine ...``) against a real archive store.

The store is SQLite in a temporary data directory, filled through
``ArchiveStore.add_copies`` (the writer's own path), and read back through
the command line: JSON fields, filters, exit codes, bulk actions with their
audit rows, exports parsed back with the standard library (``mailbox``,
``zipfile``), and a subject full of control characters.  One test lists
a MariaDB store (``require_mariadb``: skipped locally without a server,
failing under ``MPP_REQUIRE_SERVICES=1``).
"""
from __future__ import annotations

import dataclasses
import json
import mailbox
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import pytest
from sqlalchemy import select

from helpers import free_port
from test_db_stores import require_mariadb
from mppproxy.config.archive import StoreConfig
from mppproxy.store.store import ArchiveStore, NewCopy, Search

ROOT = Path(__file__).resolve().parents[1]
NOW = time.time()
HOUR = 3600.0
DAY = 86400.0
# Seconds one CLI run may take (imports included) on a loaded 2-core machine.
RUN_TIMEOUT = 60


def message(subject: bytes, body: bytes = b"Hello.\r\n", sender: bytes = b"a@b.test") -> bytes:
    return (b"From: " + sender + b"\r\nTo: someone\r\nSubject: " + subject +
            b"\r\nMessage-ID: <" + uuid.uuid4().hex.encode() + b"@test>\r\n\r\n" + body)


def copy(queue_id: str, received: float, sender: str, recipients: tuple[str, ...],
         subject: bytes, verdict: str = "reject", score: float = 10.0,
         reasons: tuple[str, ...] = ("clamav: Eicar-Signature",), body: bytes = b"Hello.\r\n",
         node: str = "edge1") -> NewCopy:
    state = {"queue_id": queue_id, "node": node, "verdict": verdict, "score": score,
             "checks": [{"name": "clamav", "score": score}]}
    return NewCopy(node=node, queue_id=queue_id, received=received, client="192.0.2.7",
                   helo="mx.sender.test", tls=False, sender=sender, recipients=recipients,
                   policy="default", verdict=verdict, disposition="hold", score=score,
                   reasons=reasons, state_json=json.dumps(state),
                   message=message(subject, body, sender.encode() or b"<>"))


# A subject a hostile sender writes: terminal escapes, a bell, a bidi
# override, a line break, bytes that are not UTF-8, a broken encoded word.
GARBAGE_SUBJECT = b"\x1b[2J\x1b[31mred\x07 =?utf-8?B?!!!?= \xe2\x80\xae\xff\xfe caf\xc3\xa9"

COPIES = (
    copy("REFA0001", NOW - 1 * HOUR, "virus@bad.test", ("alice@example.com", "bob@example.org"),
         b"Invoice 42", body=b"From here on\r\n>From quoted\r\nbye\r\n"),
    copy("REFA0002", NOW - 3 * DAY, "pills@spam.test", ("carol@example.com",),
         b"Cheap pills", verdict="hold", score=7.5, reasons=("rspamd: spam",)),
    copy("REFA0003", NOW - 40 * DAY, "", ("dave@example.com",), b"Old bounce",
         verdict="hold", score=5.0),
    copy("REFA0004", NOW - 2 * HOUR, "weird@bad.test", ("erin@example.net",), GARBAGE_SUBJECT),
)


@dataclass
class Site:
    """One data directory with a store, and the config file naming it."""

    data_dir: Path
    config: Path

    def store(self) -> ArchiveStore:
        store = ArchiveStore(StoreConfig(), str(self.data_dir))
        store.open()
        return store


def make_site(tmp: Path, extra: str = "") -> Site:
    data_dir = tmp / "data"
    data_dir.mkdir()
    config = tmp / "mppproxy.toml"
    config.write_text(f'data_dir = "{data_dir}"\n{extra}', encoding="utf-8")
    site = Site(data_dir, config)
    store = site.store()
    try:
        assert store.add_copies(COPIES) == 5
    finally:
        store.close()
    return site


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """A store read by the tests that change nothing."""
    return make_site(tmp_path_factory.mktemp("quarantine"))


@pytest.fixture
def fresh(tmp_path: Path) -> Site:
    """A store of the test's own, for the tests that change rows."""
    return make_site(tmp_path)


@dataclass
class Result:
    code: int
    out: str
    err: str
    raw: bytes


def run(*args: str, config: Optional[Path] = None, env: Optional[dict[str, str]] = None) -> Result:
    command = [sys.executable, "-m", "mppproxy", "quarantine", *args]
    if config is not None:
        command += ["--config", str(config)]
    environment = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "MPP_HOME")}
    environment.update(env or {})
    done = subprocess.run(command, capture_output=True, timeout=RUN_TIMEOUT, cwd=ROOT,
                          env=environment)
    return Result(done.returncode, done.stdout.decode("utf-8", "replace"),
                  done.stderr.decode("utf-8", "replace"), done.stdout)


def run_json(*args: str, config: Path) -> Any:
    result = run(*args, "--json", config=config)
    assert result.code == 0, result.err
    return json.loads(result.out)


def audit(site: Site) -> list[dict[str, Any]]:
    store = site.store()
    try:
        return store.audit_rows(limit=1000)
    finally:
        store.close()


# -- list and show ------------------------------------------------------------


def test_list_json_has_every_field_newest_first(site: Site) -> None:
    """list --json is one array of rows, newest first, each with every field of the row."""
    rows = run_json("list", config=site.config)
    assert [r["queue_id"] for r in rows] == ["REFA0001", "REFA0001", "REFA0004", "REFA0002",
                                             "REFA0003"]
    first = rows[0]
    for field in ("id", "node", "queue_id", "rcpt_domain", "received", "sender", "recipients",
                  "subject", "verdict", "disposition", "score", "reason", "client_ip", "helo",
                  "size", "status", "legal_hold", "released_at", "raw_key", "received_iso"):
        assert field in first, field
    assert {r["rcpt_domain"] for r in rows[:2]} == {"example.com", "example.org"}
    assert first["subject"] == "Invoice 42"
    assert first["status"] == "held" and first["legal_hold"] is False
    assert abs(first["received"] - (NOW - HOUR)) < 0.01


def test_list_human_columns(site: Site) -> None:
    """The human list has a header and one aligned plain-ASCII line per row, no colours off a terminal."""
    result = run("list", "--domain", "example.com", config=site.config)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].split()[:3] == ["ID", "RECEIVED", "(UTC)"]
    assert len(lines) == 1 + 3
    assert "\x1b" not in result.out
    ref_column = lines[0].index("REF")
    assert all(line[ref_column:].startswith("REFA") for line in lines[1:])
    assert "virus@bad.test" in lines[1] and "reject/10" in lines[1] and "Invoice 42" in lines[1]


def test_list_cuts_the_subject_to_the_terminal_width(site: Site) -> None:
    """With COLUMNS set, each line fits it (the subject is cut with '...')."""
    result = run("list", config=site.config, env={"COLUMNS": "100"})
    assert result.code == 0, result.err
    assert all(len(line) <= 100 for line in result.out.splitlines())


def test_filters(site: Site) -> None:
    """Each filter narrows the list: domain, sender, subject, reason, ref, dates."""
    def refs(*args: str) -> list[str]:
        return [r["queue_id"] for r in run_json("list", *args, config=site.config)]

    assert refs("--domain", "EXAMPLE.org") == ["REFA0001"]
    assert refs("--sender", "pills@spam.test") == ["REFA0002"]
    assert refs("--sender", "@bad.test") == ["REFA0001", "REFA0001", "REFA0004"]
    assert refs("--subject", "cheap") == ["REFA0002"]
    assert refs("--reason", "rspamd") == ["REFA0002"]
    assert refs("--ref", "REFA0003") == ["REFA0003"]
    assert refs("--rcpt", "carol@example.com") == ["REFA0002"]
    assert refs("--since", "2d") == ["REFA0001", "REFA0001", "REFA0004"]
    assert refs("--since", "7d", "--until", "1d") == ["REFA0002"]
    day = time.strftime("%Y-%m-%d", time.gmtime(NOW - 40 * DAY))
    assert refs("--since", day, "--until", day) == ["REFA0003"]
    assert refs("--limit", "2") == ["REFA0001", "REFA0001"]


def test_nothing_matched_is_exit_1(site: Site) -> None:
    """No row matched: exit 1, an empty JSON array (and a note on stderr without --json)."""
    result = run("list", "--domain", "nowhere.test", "--json", config=site.config)
    assert (result.code, json.loads(result.out)) == (1, [])
    result = run("list", "--domain", "nowhere.test", config=site.config)
    assert result.code == 1 and result.out == "" and "nothing matched" in result.err


def test_bad_since_is_a_usage_error(site: Site) -> None:
    """A date that does not parse: exit 2, the option named, no traceback."""
    result = run("list", "--since", "last tuesday", config=site.config)
    assert result.code == 2
    assert "--since" in result.err and "Traceback" not in result.err
    result = run("list", "--status", "gone", config=site.config)
    assert result.code == 2 and "--status" in result.err


def test_config_error_is_exit_2(tmp_path: Path) -> None:
    """A configuration with errors: each printed as check-config prints it, exit 2."""
    config = tmp_path / "bad.toml"
    config.write_text('data_dir = "/tmp"\n[store]\nurl = 5\nno_such_key = 1\n', encoding="utf-8")
    result = run("list", config=config)
    assert result.code == 2
    assert "store.url" in result.err and "the configuration is not valid" in result.err
    assert "Traceback" not in result.err


def test_missing_sqlite_store_is_exit_3(tmp_path: Path) -> None:
    """A data_dir without a store: exit 3 naming the file; no empty store is created."""
    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{tmp_path}"\n', encoding="utf-8")
    result = run("list", config=config)
    assert result.code == 3 and "archive.sqlite" in result.err
    assert not (tmp_path / "archive.sqlite").exists()


def test_database_down_is_exit_3_with_a_clean_message(tmp_path: Path) -> None:
    """A MariaDB store on a closed port: exit 3, the URL without its password, no traceback."""
    port = free_port()
    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{tmp_path}"\n[store]\n'
                      f'url = "mysql+pymysql://test:s3cretpw@127.0.0.1:{port}/test"\n',
                      encoding="utf-8")
    result = run("list", config=config)
    assert result.code == 3, result.err
    assert f"127.0.0.1:{port}" in result.err and "unavailable" in result.err
    assert "s3cretpw" not in result.err + result.out
    assert "Traceback" not in result.err
    assert len(result.err.splitlines()) == 1


def test_show_json_has_state_and_raw(site: Site) -> None:
    """show --json --raw gives the row, its parsed state and the exact message."""
    row = run_json("list", "--domain", "example.org", config=site.config)[0]
    shown = run_json("show", str(row["id"]), "--raw", config=site.config)
    assert len(shown) == 1
    assert shown[0]["state"]["queue_id"] == "REFA0001"
    store = site.store()
    try:
        stored = store.get(row["id"])
        assert stored is not None
        expected = store.raw(stored)
    finally:
        store.close()
    import base64
    assert base64.b64decode(shown[0]["raw_base64"]) == expected
    assert shown[0]["raw"].startswith("From: virus@bad.test")


def test_show_raw_writes_the_message_alone(site: Site) -> None:
    """show ID --raw prints the stored message byte for byte, and leaves a "view" audit row."""
    row = run_json("list", "--ref", "REFA0002", config=site.config)[0]
    result = run("show", str(row["id"]), "--raw", "--actor", "viewer", config=site.config)
    assert result.code == 0, result.err
    assert result.raw.startswith(b"From: pills@spam.test\r\n")
    assert result.raw.endswith(b"Hello.\r\n")
    assert any(a["action"] == "view" and a["actor"] == "viewer" for a in audit(site))


def test_show_human_and_no_selection(site: Site) -> None:
    """show by --ref prints each domain's row with its state; show without a selection is exit 2."""
    result = run("show", "--ref", "REFA0001", config=site.config)
    assert result.code == 0, result.err
    assert result.out.count("reference:   REFA0001") == 2
    assert '"queue_id": "REFA0001"' in result.out
    assert run("show", config=site.config).code == 2


def test_garbage_subject_cannot_reach_the_terminal(site: Site) -> None:
    """A subject of escapes, controls and bad bytes is listed without a control character; JSON keeps it readable."""
    result = run("list", "--ref", "REFA0004", config=site.config)
    assert result.code == 0, result.err
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\u202e]", result.out)
    assert "red" in result.out
    shown = run("show", "--ref", "REFA0004", config=site.config)
    assert shown.code == 0 and "\x1b" not in shown.out
    rows = run_json("list", "--ref", "REFA0004", config=site.config)
    assert "red" in rows[0]["subject"]


def test_help_documents_exit_codes() -> None:
    """quarantine --help lists the subcommands and the exit codes."""
    result = run("--help")
    assert result.code == 0
    for word in ("list", "show", "delete", "hold", "export", "exit status", "nothing matched",
                 "unavailable"):
        assert word in result.out, word


# -- delete and hold ------------------------------------------------------------


def test_bulk_without_a_filter_is_refused(fresh: Site) -> None:
    """delete and hold with no filter act on nothing and exit 2 unless --all is given."""
    for command in ("delete", "hold"):
        result = run(command, config=fresh.config)
        assert result.code == 2 and "--all" in result.err
        # --status alone still means "everything held".
        assert run(command, "--status", "held", config=fresh.config).code == 2
    assert len(run_json("list", config=fresh.config)) == 5


def test_delete_with_dry_run_and_audit(fresh: Site) -> None:
    """delete --dry-run changes nothing; delete marks the rows deleted, says how many, audits who and where."""
    dry = run("delete", "--domain", "example.com", "--dry-run", config=fresh.config)
    assert dry.code == 0, dry.err
    assert "would change 3 row(s)" in dry.out
    assert len(run_json("list", "--domain", "example.com", config=fresh.config)) == 3
    result = run("delete", "--domain", "example.com", "--actor", "alice", config=fresh.config)
    assert result.code == 0, result.err
    assert "3 row(s) deleted" in result.out
    assert run("list", "--domain", "example.com", config=fresh.config).code == 1
    deleted = run_json("list", "--domain", "example.com", "--status", "deleted",
                       config=fresh.config)
    assert len(deleted) == 3
    rows = [a for a in audit(fresh) if a["action"] == "delete"]
    assert len(rows) == 3
    assert {a["actor"] for a in rows} == {"alice"}
    assert all(re.fullmatch(r"cli:[^@]+@.+", a["origin"]) for a in rows)
    # Again: nothing left to delete.
    assert run("delete", "--domain", "example.com", config=fresh.config).code == 1


def test_hold_protects_from_delete_and_lifts(fresh: Site) -> None:
    """A legal hold keeps rows through delete; hold --off lifts it; both audited."""
    held = run("hold", "--ref", "REFA0001", "--json", config=fresh.config)
    assert held.code == 0, held.err
    assert json.loads(held.out) == {"action": "hold", "changed": 2}
    dry = run_json("delete", "--sender", "@bad.test", "--dry-run", config=fresh.config)
    assert (dry["changed"], dry["unchanged"]) == (1, 2)
    assert [r["queue_id"] for r in dry["rows"]] == ["REFA0004"]
    result = run("delete", "--sender", "@bad.test", config=fresh.config)
    assert "1 row(s) deleted" in result.out
    rows = run_json("list", "--ref", "REFA0001", config=fresh.config)
    assert [r["legal_hold"] for r in rows] == [True, True]
    assert run("hold", "--ref", "REFA0001", "--off", config=fresh.config).code == 0
    assert not any(r["legal_hold"] for r in run_json("list", "--ref", "REFA0001",
                                                     config=fresh.config))
    actions = [a["action"] for a in audit(fresh)]
    assert actions.count("delete") == 1 and len(actions) >= 5


def test_delete_all(fresh: Site) -> None:
    """delete --all deletes every row (what the guard is for)."""
    result = run("delete", "--all", config=fresh.config)
    assert result.code == 0 and "5 row(s) deleted" in result.out
    assert run("list", config=fresh.config).code == 1


# -- export -------------------------------------------------------------------


def _unquote(data: bytes) -> bytes:
    """mboxrd's quoting taken away (one '>' from each >+From line)."""
    return re.sub(rb"(?m)^>(>*From )", rb"\1", data)


def _raws(site: Site) -> list[tuple[dict[str, Any], bytes]]:
    rows = run_json("list", config=site.config)
    store = site.store()
    try:
        out = []
        for r in rows:
            row = store.get(r["id"])
            assert row is not None
            out.append((r, store.raw(row)))
        return out
    finally:
        store.close()


def test_export_mbox(site: Site, tmp_path: Path) -> None:
    """An mbox export reads back with mailbox.mbox: every message, byte for byte after mboxrd unquoting."""
    target = tmp_path / "out.mbox"
    result = run("export", "--output", str(target), config=site.config)
    assert result.code == 0, result.err
    assert "5 message(s)" in result.err and "\r" not in result.err  # no bar off a terminal
    box = mailbox.mbox(str(target), create=False)
    try:
        keys = list(box.keys())
        assert len(keys) == 5
        expected = _raws(site)
        for key, (row, raw) in zip(keys, expected):
            got = _unquote(box.get_bytes(key))
            assert got.rstrip(b"\n") == raw.replace(b"\r\n", b"\n").rstrip(b"\n")
            sender = row["sender"] or "MAILER-DAEMON"
            assert box.get_message(key).get_from().startswith(sender + " ")
    finally:
        box.close()
    data = target.read_bytes()
    assert b"\n>From here on\n>>From quoted\n" in data
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_export_mbox_to_stdout(site: Site) -> None:
    """--output - writes the mbox to standard output."""
    result = run("export", "--ref", "REFA0002", "--output", "-", config=site.config)
    assert result.code == 0, result.err
    assert result.raw.startswith(b"From pills@spam.test ")
    assert result.raw.count(b"\nFrom ") == 0


def test_export_zip(site: Site, tmp_path: Path) -> None:
    """A zip export holds <ref>-<domain>.eml per row and a manifest whose rows match them."""
    target = tmp_path / "out.zip"
    result = run("export", "--format", "zip", "--output", str(target), "--since", "30d",
                 config=site.config)
    assert result.code == 0, result.err
    expected = {row["id"]: (row, raw) for row, raw in _raws(site)
                if row["queue_id"] != "REFA0003"}
    with zipfile.ZipFile(target) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        assert manifest["count"] == 4 == len(manifest["rows"])
        assert sorted(archive.namelist()) == sorted(["manifest.json"] +
                                                    [e["file"] for e in manifest["rows"]])
        for entry in manifest["rows"]:
            row, raw = expected[entry["id"]]
            assert entry["file"] == f"{row['queue_id']}-{row['rcpt_domain']}.eml"
            assert archive.read(entry["file"]) == raw
            assert {k: v for k, v in entry.items() if k != "file"} == row


def test_export_nothing_and_refusals(site: Site, tmp_path: Path) -> None:
    """Nothing matched: exit 1 and no file; a zip to stdout is a usage error."""
    target = tmp_path / "none.mbox"
    result = run("export", "--domain", "nowhere.test", "--output", str(target),
                 config=site.config)
    assert result.code == 1 and not target.exists()
    assert run("export", "--format", "zip", "--output", "-", config=site.config).code == 2
    assert run("export", "--output", str(tmp_path / "no" / "dir.mbox"),
               config=site.config).code == 2
    result = run("export", "--output", str(target), "--actor", "auditor", config=site.config)
    assert result.code == 0
    assert any(a["action"] == "export" and a["actor"] == "auditor" for a in audit(site))


def test_export_progress_on_a_terminal(site: Site, tmp_path: Path) -> None:
    """With stderr on a terminal, export draws a one-line progress bar (rows done / total)."""
    import pty

    master, slave = pty.openpty()
    try:
        command = [sys.executable, "-m", "mppproxy", "quarantine", "export", "--config",
                   str(site.config), "--output", str(tmp_path / "p.mbox")]
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=slave, cwd=ROOT,
                              timeout=RUN_TIMEOUT)
        os.close(slave)
        slave = -1
        seen = b""
        for _ in range(100):  # bounded: the pty holds the few lines written
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the writer is gone and everything was read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert done.returncode == 0
    assert b"\r" in seen and b"5/5 (100%)" in seen


def test_paging_walks_every_row_once(tmp_path: Path) -> None:
    """Past one page (500 rows), with many rows sharing a time, list and export see every row exactly once."""
    site = make_site(tmp_path)
    store = site.store()
    try:
        copies = [copy(f"PAGE{n:05d}", NOW - 10 * DAY - (n // 7), "bulk@bad.test",
                       (f"u@d{n % 3}.example", f"v@e{n % 2}.example"), f"Bulk {n}".encode())
                  for n in range(600)]
        assert store.add_copies(copies) == 1200
    finally:
        store.close()
    rows = run_json("list", "--sender", "bulk@bad.test", "--limit", "5000", config=site.config)
    assert len(rows) == 1200 == len({r["id"] for r in rows})
    keys = [(r["received"], r["id"]) for r in rows]
    assert keys == sorted(keys, reverse=True)
    target = tmp_path / "bulk.mbox"
    result = run("export", "--sender", "bulk@bad.test", "--output", str(target),
                 config=site.config)
    assert result.code == 0, result.err
    box = mailbox.mbox(str(target), create=False)
    try:
        assert len(box) == 1200
    finally:
        box.close()


# -- release --stuck ---------------------------------------------------------------

# Seconds an SmtpSink serves at most, and waits for one client's line.
SINK_LIFETIME = 300.0
SINK_READ_TIMEOUT = 10.0


class SmtpSink:
    """A minimal SMTP server on loopback, in a thread: it accepts every
    command (RFC 5321 4.3.2's replies for a successful transaction) and
    keeps each message's envelope and content (dot-stuffing undone), so
    the CLI's release, run as a subprocess, has a real route to deliver
    to.  Every loop is bounded: the thread ends when stopped or after
    SINK_LIFETIME, a session after 1,000 commands or a silent client."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="smtp-sink", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(10)
        self.sock.close()

    def _serve(self) -> None:
        deadline = time.monotonic() + SINK_LIFETIME
        while not self.stopped.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            with conn:
                try:
                    self._session(conn)
                except OSError:
                    pass  # the client went away or fell silent: next one

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(SINK_READ_TIMEOUT)
        stream = conn.makefile("rwb")

        def reply(text: str) -> None:
            stream.write(text.encode("ascii") + b"\r\n")
            stream.flush()

        reply("220 sink.test ESMTP")
        sender, recipients = "", []
        for _ in range(1000):
            line = stream.readline(65536)
            if not line:
                return
            verb = line[:4].upper()
            argument = line.decode("utf-8", "replace").partition(":")[2].strip()
            if verb in (b"EHLO", b"HELO"):
                reply("250 sink.test")
            elif verb == b"MAIL":
                sender, recipients = argument.split(">")[0].lstrip("<"), []
                reply("250 2.1.0 ok")
            elif verb == b"RCPT":
                recipients.append(argument.split(">")[0].lstrip("<"))
                reply("250 2.1.5 ok")
            elif verb == b"DATA":
                reply("354 go on")
                lines = []
                for _ in range(1_000_000):
                    data = stream.readline(65536)
                    if not data or data == b".\r\n":
                        break
                    lines.append(data[1:] if data.startswith(b".") else data)
                self.messages.append((sender, recipients, b"".join(lines)))
                reply("250 2.0.0 queued")
            elif verb == b"QUIT":
                reply("221 2.0.0 bye")
                return
            else:
                reply("250 2.0.0 ok")  # RSET, NOOP


@pytest.fixture
def sink() -> Any:
    """An SmtpSink for the test, stopped after it."""
    server = SmtpSink()
    yield server
    server.stop()


STUCK_REF = "REFSTUCK1"


def leave_releasing(site: Site, minutes_ago: float) -> int:
    """A held (quarantined) message claimed for release by a process that
    then died: claim_release without finish_release, its claim's audit
    time moved ``minutes_ago`` into the past.  Returns the row's id."""
    stuck = dataclasses.replace(
        copy(STUCK_REF, NOW - 2 * HOUR, "friend@partner.test", ("frank@example.com",),
             b"Quarterly report"), disposition="quarantine")
    store = site.store()
    try:
        assert store.add_copies([stuck]) == 1
        row = store.search(Search(ref=STUCK_REF))[0]
        assert store.claim_release(row.id, "ann", "cli:ann@laptop") is not None
        a = store.tables.audit
        with store.engine.begin() as conn:
            # Read, then write the earlier time (SQLite keeps DATETIME as
            # text: arithmetic in SQL would not give a date back).
            claims = conn.execute(select(a.c.id, a.c.at).where(
                a.c.row_id == row.id, a.c.action == "release-claim")).all()
            assert len(claims) == 1
            for audit_id, at in claims:
                conn.execute(a.update().where(a.c.id == audit_id)
                             .values(at=at - timedelta(minutes=minutes_ago)))
        return row.id
    finally:
        store.close()


def test_release_stuck_resets_and_releases_once(tmp_path: Path, sink: SmtpSink) -> None:
    """A row left in releasing by a dead release is busy for release; with
    --stuck it is listed by a dry run, left alone while its claim is younger
    than the minutes given, then reset to held with a warning and an audit
    row and released: the route gets it once; a second --stuck finds nothing."""
    site = make_site(tmp_path, f'[release]\ndefault_route = "127.0.0.1:{sink.port}"\n')
    row_id = leave_releasing(site, 45)
    plain = run("release", "--ref", STUCK_REF, "--no-rescan", config=site.config)
    assert plain.code == 1 and "nothing to release" in plain.out, plain.err
    assert "release --stuck" in plain.err
    busy = run("release", "--ref", STUCK_REF, "--status", "releasing", "--no-rescan",
               config=site.config)
    assert busy.code == 1 and f"{row_id} {STUCK_REF} example.com: busy" in busy.out, busy.err
    dry = run("release", "--ref", STUCK_REF, "--stuck", "--dry-run", config=site.config)
    assert dry.code == 0, dry.err
    assert "would reset to held: the release claimed at" in dry.out
    assert "by ann (cli:ann@laptop)" in dry.out and "would reset 1 row(s)" in dry.out
    young = run("release", "--ref", STUCK_REF, "--stuck", "60", "--no-rescan",
                config=site.config)
    assert young.code == 1 and "may still be running" in young.err, young.out + young.err
    assert run_json("list", "--ref", STUCK_REF, config=site.config)[0]["status"] == "releasing"
    assert sink.messages == []
    done = run("release", "--ref", STUCK_REF, "--stuck", "--no-rescan", "--actor", "bob",
               config=site.config)
    assert done.code == 0, done.out + done.err
    lines = done.out.splitlines()
    assert lines[0].startswith(f"{row_id} {STUCK_REF} example.com: reset to held: "
                               "the release claimed at ")
    assert lines[0].endswith("did not finish; the message may already have been delivered")
    assert lines[1].startswith(f"{row_id} {STUCK_REF} example.com: released: route 127.0.0.1:")
    assert len(sink.messages) == 1
    sender, recipients, data = sink.messages[0]
    assert (sender, recipients) == ("friend@partner.test", ["frank@example.com"])
    assert b"Subject: Quarterly report" in data
    assert run_json("list", "--ref", STUCK_REF, config=site.config)[0]["status"] == "released"
    trail = [(a["action"], a["actor"]) for a in audit(site) if a["row_id"] == row_id]
    assert trail == [("release", "bob"), ("release-claim", "bob"), ("release-reset", "bob"),
                     ("release-claim", "ann")]
    again = run("release", "--ref", STUCK_REF, "--stuck", "--no-rescan", config=site.config)
    assert again.code == 1 and "nothing to reset" in again.out
    assert len(sink.messages) == 1


def test_release_stuck_json_and_refusals(tmp_path: Path, sink: SmtpSink) -> None:
    """release --stuck --json reports the reset row and the release in one
    document; --stuck with --status, with no filter, or with 0 minutes is
    a usage error that changes nothing."""
    site = make_site(tmp_path, f'[release]\ndefault_route = "127.0.0.1:{sink.port}"\n')
    row_id = leave_releasing(site, 31)
    for bad in (("--ref", STUCK_REF, "--stuck", "--status", "releasing"), ("--stuck",),
                ("--ref", STUCK_REF, "--stuck", "0")):
        refused = run("release", *bad, "--no-rescan", config=site.config)
        assert refused.code == 2, (bad, refused.out, refused.err)
    assert run_json("list", "--ref", STUCK_REF, config=site.config)[0]["status"] == "releasing"
    result = run("release", str(row_id), "--stuck", "--no-rescan", "--json", config=site.config)
    assert result.code == 0, result.err
    document = json.loads(result.out)
    assert document["stuck_minutes"] == 30
    [reset] = document["reset"]
    assert (reset["id"], reset["ref"], reset["claimed_by"]) == (row_id, STUCK_REF, "ann")
    assert "may already have been delivered" in reset["detail"]
    assert [r["outcome"] for r in document["results"]] == ["released"]
    assert len(sink.messages) == 1


# -- MariaDB --------------------------------------------------------------------


def test_list_on_mariadb(tmp_path: Path) -> None:
    """list --json reads a MariaDB store the same way as SQLite."""
    url = require_mariadb()
    # The command line names no table prefix: the rows go into the store's
    # own tables, under a domain and references of this run, and only they
    # are removed afterwards (another test may use those tables meanwhile).
    tag = uuid.uuid4().hex[:10]
    domain = f"{tag}.example"
    copies = [copy(f"{tag}-{n}", NOW - n * HOUR, f"s{n}@bad.test", (f"u{n}@{domain}",),
                   f"Subject {n}".encode()) for n in range(3)]
    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{tmp_path}"\n[store]\nurl = "{url}"\n', encoding="utf-8")
    store = ArchiveStore(StoreConfig(url=url), str(tmp_path))
    store.open()
    try:
        assert store.add_copies(copies) == 3
        rows = run_json("list", "--domain", domain, config=config)
        assert [r["queue_id"] for r in rows] == [f"{tag}-0", f"{tag}-1", f"{tag}-2"]
        assert rows[0]["subject"] == "Subject 0" and rows[0]["rcpt_domain"] == domain
        assert run("list", "--domain", f"none.{domain}", config=config).code == 1
    finally:
        tables = store.tables
        with store.engine.begin() as connection:
            keys = [r.raw_key for r in store.search(Search(domain=domain, status=None))]
            connection.execute(tables.messages.delete().where(
                tables.messages.c.rcpt_domain == domain))
            connection.execute(tables.raw.delete().where(tables.raw.c.raw_key.in_(keys)))
            connection.execute(tables.audit.delete().where(
                tables.audit.c.rcpt_domain == domain))
        store.close()
