"""``mppproxy state blacklist|greylist`` (issue 16, the administrator's CLI)
against the state database a running proxy uses.

Each test runs on SQLite (a file under a temporary data_dir) and on MariaDB
(``MPP_MARIADB_URL``; skipped without one, a failure under
``MPP_REQUIRE_SERVICES=1``), with tables of its own (``--table-prefix``).
The rows the commands list and remove are written by the real stores
(``StateDatabase``'s greylist and blacklist, as the checks call them), and
what the commands write is read back through those stores: a running
proxy's view once its cache time has passed.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial import unittest

from helpers import free_port
from mppproxy.cli import main
from mppproxy.config.load import load
from mppproxy.config.policy import GreylistConfig
from mppproxy.db import StateDatabase
from test_db_stores import drop_tables, require_mariadb

reactor: Any = _reactor
ROOT = Path(__file__).resolve().parents[1]
CACHE = 4.0
GREY = GreylistConfig(enabled=True, delay=300.0, retry_window=3600.0, lifetime=86400.0,
                      auto_whitelist_after=3)


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``mppproxy ARGV`` in this process: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


class StateCliTests:
    """Mixed into one TestCase per database backend."""

    backend = ""

    def setUp(self) -> None:
        self.url = require_mariadb() if self.backend == "mariadb" else ""
        self.data_dir = tempfile.mkdtemp(prefix="mpp-state-cli-")
        self.addCleanup(shutil.rmtree, self.data_dir, True)
        self.prefix = f"t{uuid.uuid4().hex[:10]}_"
        self.cfg = Path(self.data_dir) / "mpp.toml"
        db = f'url = "{self.url}"\n' if self.url else ""
        self.cfg.write_text(
            f'data_dir = "{self.data_dir}"\n[database]\n{db}cache_seconds = {CACHE}\n'
            "[policies.default.greylisting]\nenabled = true\nauto_whitelist_after = 3\n"
            "lifetime = 86400.0\n")
        self.clock = Clock()
        self.clock.advance(time.time())

    def cli(self, *argv: str) -> tuple[int, str, str]:
        table, command, *rest = argv
        return run_cli("state", table, command, "--config", str(self.cfg),
                       "--table-prefix", self.prefix, *rest)

    async def make_db(self) -> StateDatabase:
        config = load(str(self.cfg))
        db = StateDatabase(config.database, self.data_dir, reactor, clock=self.clock,
                           table_prefix=self.prefix)
        self.addCleanup(db.stop)
        if self.url:
            self.addCleanup(drop_tables, self.url, db)
        assert await db.start()
        return db

    async def reloaded(self, db: StateDatabase) -> None:
        """Let the blacklist mirror reload as it does every half cache time."""
        before = db.blacklist.mirrored_at
        self.clock.advance(CACHE / 2 + 0.01)
        for _ in range(500):
            if db.blacklist.mirrored_at != before:
                return
            await deferLater(reactor, 0.01, lambda: None)
        raise AssertionError("the blacklist mirror did not reload")

    # -- blacklist ----------------------------------------------------------

    async def test_blacklist_add_seen_by_the_proxy_within_cache_time(self) -> None:
        """An entry the command adds is found by a proxy's blacklist once its mirror reloads (within cache_seconds), and gone after remove."""
        db = await self.make_db()
        self.assertIsNone(await db.blacklist.lookup("192.0.2.7"))
        code, out, err = self.cli("blacklist", "add", "192.0.2.0/24", "--reason", "abuse desk",
                                  "--for", "2h")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("blacklisted 192.0.2.0/24 until ", out)
        self.assertIn(f"takes effect within {CACHE:g} s (database.cache_seconds)", out)
        await self.reloaded(db)
        entry = await db.blacklist.lookup("192.0.2.7")
        assert entry is not None
        self.assertEqual((entry.network, entry.reason), ("192.0.2.0/24", "abuse desk"))
        self.assertLess(abs(entry.expires - (time.time() + 7200)), 60)
        code, out, _ = self.cli("blacklist", "remove", "192.0.2.0/24")
        self.assertEqual(code, 0)
        self.assertIn("1 blacklist entry removed", out)
        await self.reloaded(db)
        self.assertIsNone(await db.blacklist.lookup("192.0.2.7"))

    async def test_blacklist_list_filters_and_json(self) -> None:
        """list shows the proxy's own entries; --client keeps those containing it; --json gives the rows; nothing matched exits 1."""
        db = await self.make_db()
        await db.blacklist.add("198.51.100.9", 3600, "spamtrap trap@example.com")
        await db.blacklist.add("203.0.113.0/24", 7200, "threshold messages")
        code, out, _ = self.cli("blacklist", "list")
        self.assertEqual(code, 0)
        lines = out.splitlines()
        self.assertTrue(lines[0].startswith("NETWORK"))
        self.assertEqual([line.split()[0] for line in lines[1:]],
                         ["203.0.113.0/24", "198.51.100.9/32"])  # latest expiry first
        code, out, _ = self.cli("blacklist", "list", "--client", "203.0.113.77", "--json")
        self.assertEqual(code, 0)
        rows = json.loads(out)
        self.assertEqual([(r["network"], r["reason"]) for r in rows],
                         [("203.0.113.0/24", "threshold messages")])
        code, out, _ = self.cli("blacklist", "list", "--limit", "1")
        self.assertEqual(len(out.splitlines()), 2)
        code, out, err = self.cli("blacklist", "list", "--client", "192.0.2.1")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("no blacklist entry", err)

    async def test_blacklist_add_replaces_and_remove_needs_all(self) -> None:
        """add sets reason and expiry of an existing entry (also shorter); a --client filter removes only with --all."""
        db = await self.make_db()
        await db.blacklist.add("192.0.2.7", 86400 * 7, "spamtrap x")
        code, out, _ = self.cli("blacklist", "add", "192.0.2.7", "--for", "10m")
        self.assertEqual(code, 0)
        self.assertIn("replacing an entry until", out)
        self.assertIn("manual, by ", out)
        rows = json.loads(self.cli("blacklist", "list", "--json")[1])
        self.assertLess(abs(rows[0]["expires"] - (time.time() + 600)), 60)
        self.cli("blacklist", "add", "192.0.2.0/24")
        code, out, err = self.cli("blacklist", "remove", "--client", "192.0.2.7")
        self.assertEqual(code, 2)
        self.assertIn("matches 2 entries", err)
        self.assertEqual(self.cli("blacklist", "remove", "--client", "198.51.100.1")[0], 1)
        code, out, _ = self.cli("blacklist", "remove", "--client", "192.0.2.7", "--all",
                                "--dry-run")
        self.assertEqual(code, 0)
        self.assertEqual(len(out.splitlines()), 3)
        self.assertEqual(len(json.loads(self.cli("blacklist", "list", "--json")[1])), 2)
        code, out, _ = self.cli("blacklist", "remove", "--client", "192.0.2.7", "--all")
        self.assertEqual(code, 0)
        self.assertIn("2 blacklist entries removed", out)
        self.assertEqual(self.cli("blacklist", "remove", "192.0.2.7")[0], 1)

    async def test_usage_errors_exit_2(self) -> None:
        """A bad address, a bad duration, remove without a selection: exit 2 with a message, nothing changed."""
        await self.make_db()
        for argv in (("blacklist", "add", "not-an-ip"), ("blacklist", "add", "192.0.2.1", "--for", "soon"),
                     ("blacklist", "remove"), ("greylist", "remove"),
                     ("greylist", "remove", "xyz"), ("greylist", "list", "--client", "a.b"),
                     ("greylist", "whitelist", "192.0.0.0/16")):
            code, out, err = self.cli(*argv)
            self.assertEqual(code, 2, argv)
            self.assertNotIn("Traceback", err)
            self.assertTrue(err.strip(), argv)
        self.assertEqual(self.cli("blacklist", "list")[0], 1)

    # -- greylist -----------------------------------------------------------

    async def _triplets(self, db: StateDatabase) -> None:
        """Three waiting triplets of two client networks, written by the real store."""
        for net, sender, rcpt in (("192.0.2.0/24", "a@example.org", "x@example.com"),
                                  ("192.0.2.0/24", "b@example.org", "y@example.com"),
                                  ("198.51.100.0/24", "a@example.org", "z@example.net")):
            self.assertIsNotNone(await db.greylist.check(net, sender, rcpt, GREY))

    async def test_greylist_list_and_filters(self) -> None:
        """list shows the store's triplets; --client, --sender (address or @domain) and --recipient filter them; --json gives every field."""
        db = await self.make_db()
        await self._triplets(db)
        code, out, _ = self.cli("greylist", "list")
        self.assertEqual(code, 0)
        self.assertEqual(len(out.splitlines()), 4)
        self.assertIn("waiting", out)
        code, out, _ = self.cli("greylist", "list", "--client", "192.0.2.200", "--json")
        rows = json.loads(out)
        self.assertEqual(sorted(r["sender"] for r in rows), ["a@example.org", "b@example.org"])
        self.assertEqual(set(rows[0]) >= {"id", "client_net", "recipient", "passed", "expires"},
                         True)
        rows = json.loads(self.cli("greylist", "list", "--sender", "A@Example.org", "--json")[1])
        self.assertEqual(len(rows), 2)
        rows = json.loads(self.cli("greylist", "list", "--recipient", "@example.net", "--json")[1])
        self.assertEqual([r["client_net"] for r in rows], ["198.51.100.0/24"])
        code, out, err = self.cli("greylist", "list", "--sender", "nobody@example.org")
        self.assertEqual((code, out), (1, ""))

    async def test_greylist_remove_by_id_and_filter(self) -> None:
        """remove takes an id prefix from list; a filter removes only with --all; a removed triplet starts again."""
        db = await self.make_db()
        await self._triplets(db)
        rows = json.loads(self.cli("greylist", "list", "--recipient", "x@example.com",
                                   "--json")[1])
        code, out, _ = self.cli("greylist", "remove", rows[0]["id"][:12])
        self.assertEqual(code, 0)
        self.assertIn("1 triplet(s) removed", out)
        self.assertIn("takes effect within", out)
        code, _, err = self.cli("greylist", "remove", "--client", "192.0.2.1")
        self.assertEqual(code, 2)
        self.assertIn("match 1 triplet(s)", err)
        code, _, err = self.cli("greylist", "remove", "--sender", "a@example.org")
        self.assertEqual(code, 2)
        self.assertIn("match 1 triplet(s)", err)
        code, out, _ = self.cli("greylist", "remove", "--sender", "a@example.org", "--all")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(self.cli("greylist", "list", "--json")[1])[0]["sender"],
                         "b@example.org")
        # The store, asked again past its cache time, greylists the removed triplet anew.
        self.clock.advance(CACHE + 1)
        self.assertEqual(await db.greylist.check("192.0.2.0/24", "a@example.org",
                                                 "x@example.com", GREY), GREY.delay)

    async def test_greylist_whitelist_lets_the_network_pass(self) -> None:
        """whitelist keys the client at the policy's /24 and the store passes that network's new triplets; remove --whitelist undoes it."""
        db = await self.make_db()
        code, out, err = self.cli("greylist", "whitelist", "192.0.2.77")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("whitelisted 192.0.2.0/24", out)
        self.assertIn("takes effect within", out)
        self.assertIsNone(await db.greylist.check("192.0.2.0/24", "new@example.org",
                                                  "x@example.com", GREY))
        code, out, _ = self.cli("greylist", "list", "--whitelist", "--json")
        self.assertEqual([r["client_net"] for r in json.loads(out)], ["192.0.2.0/24"])
        code, out, _ = self.cli("greylist", "remove", "--whitelist", "192.0.2.0/24")
        self.assertEqual(code, 0)
        self.assertEqual(self.cli("greylist", "list", "--whitelist")[0], 1)
        self.clock.advance(CACHE + 1)
        self.assertIsNotNone(await db.greylist.check("192.0.2.0/24", "other@example.org",
                                                     "x@example.com", GREY))


class SqliteStateCliTests(StateCliTests, unittest.TestCase):
    backend = "sqlite"


class MariadbStateCliTests(StateCliTests, unittest.TestCase):
    backend = "mariadb"


# -- without a database ------------------------------------------------------------

def _config(tmp_path: Path, url: str = "") -> Path:
    path = tmp_path / "mpp.toml"
    db = f'[database]\nurl = "{url}"\n' if url else ""
    path.write_text(f'data_dir = "{tmp_path / "data"}"\n{db}')
    return path


def test_unreachable_database_exits_3_without_traceback_or_password(tmp_path):
    """A MariaDB URL nobody listens on: each command says which database failed and why, exit 3, no traceback, no password."""
    url = f"mysql+pymysql://mpp:Pa55word@127.0.0.1:{free_port()}/mpp"
    cfg = _config(tmp_path, url)
    for argv in (("blacklist", "list"), ("blacklist", "add", "192.0.2.1"),
                 ("greylist", "remove", "--all"), ("greylist", "whitelist", "192.0.2.1")):
        code, out, err = run_cli("state", *argv, "--config", str(cfg))
        assert code == 3, (argv, err)
        assert "Pa55word" not in err + out
        assert "Traceback" not in err
        assert "the state database mysql+pymysql://mpp:***@127.0.0.1:" in err
        assert "Can't connect" in err


def test_unreachable_database_as_a_process(tmp_path):
    """Run as a process, the exit status is 3 and stderr is one line."""
    url = f"mysql+pymysql://mpp:secret@127.0.0.1:{free_port()}/mpp"
    proc = subprocess.run([sys.executable, "-m", "mppproxy", "state", "blacklist", "list",
                           "--config", str(_config(tmp_path, url))],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 3
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "secret" not in proc.stderr


def test_missing_sqlite_file_is_not_created_by_list(tmp_path):
    """list on a data_dir without a state database exits 3 naming the file, and creates nothing."""
    cfg = _config(tmp_path)
    code, out, err = run_cli("state", "greylist", "list", "--config", str(cfg))
    assert code == 3
    assert str(tmp_path / "data" / "state.sqlite") in err
    assert not (tmp_path / "data" / "state.sqlite").exists()


def test_bad_config_exits_2(tmp_path):
    """A configuration with errors prints them naming the key and exits 2."""
    path = tmp_path / "mpp.toml"
    path.write_text("[database]\ncache_seconds = -1\n")
    code, out, err = run_cli("state", "blacklist", "list", "--config", str(path))
    assert code == 2
    assert f"{path}: database.cache_seconds: must be at least 0" in err


def test_whitelist_without_a_reading_policy_warns(tmp_path):
    """whitelist with no policy reading the auto-whitelist writes the row and warns that it has no effect."""
    cfg = _config(tmp_path)
    code, out, err = run_cli("state", "greylist", "whitelist", "2001:db8::1", "--config", str(cfg))
    assert code == 0
    assert "whitelisted 2001:db8::/64" in out
    assert "no effect" in err
    assert os.path.exists(tmp_path / "data" / "state.sqlite")
