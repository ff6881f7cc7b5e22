"""The console's effective configuration page (issue 13, ``/config``):
superadmins see this node's configuration with the secrets masked as
``mppproxy show-config`` masks them; domain administrators get the
console's "no such page"; logged out, the login page.

The console is served for real on loopback over a real store (the set-up
of test_web_console.py); the configuration carries database and store
URLs with passwords and names an archive key file, whose contents (and
the console's own key file's) must never reach the page.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, update
from twisted.internet import reactor

from fakes_backend import poll_until
from test_db_stores import require_mariadb
from test_web_console import ANNA, BERT, ROOT_NAME, ConsoleCase
from mppproxy.config.load import from_mapping
from mppproxy.config.schema import ProxyConfig
from mppproxy.config.show import MASK
from mppproxy.config.web import secret_path
from mppproxy.db.models import StateTables
from mppproxy.db.nodeconfig import ConfigRecorder, NodeConfigRow, config_table, read_configs
from mppproxy.db.state import StateDatabase
from mppproxy.service import ProxyService
from mppproxy.web.statedb import StateHandle, use_state
from mppproxy.web.secret import load_or_create_secret

DB_PASSWORD = "DbPassw0rd-not-shown"
STORE_PASSWORD = "StorePassw0rd-not-shown"
ARCHIVE_KEY = "5f3c9a0b1d2e4f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8"


class ConfigPageTests(ConsoleCase):

    def secret_config(self) -> ProxyConfig:
        """The test's configuration with secrets in it (the console keeps
        using the test's SQLite store)."""
        key_file = self.data / "archive.keys"
        key_file.write_text(f"k1 = {ARCHIVE_KEY}\n", encoding="utf-8")
        os.chmod(key_file, 0o600)
        with_secrets = from_mapping({
            "data_dir": str(self.data),
            "database": {"url": f"mysql+pymysql://mpp:{DB_PASSWORD}@db.test/mpp"},
            "store": {"url": f"mysql+pymysql://store:{STORE_PASSWORD}@db.test/archive"},
            "archive": {"key_file": str(key_file)},
        })
        return dataclasses.replace(self.config, database=with_secrets.database,
                                   archive=with_secrets.archive,
                                   store=with_secrets.store)

    async def test_superadmin_sees_it_masked(self) -> None:
        """The superadmin's page shows the mode, the keys that differ from
        their defaults (every key with ?all=1), the key file's path, the
        URLs with their passwords masked; no password, no key file's
        contents (the archive key, the console's session key) anywhere."""
        config = self.secret_config()
        await self.start(config)
        root = await self.logged_in(ROOT_NAME)
        console_key = load_or_create_secret(secret_path(config.web, config.data_dir)).hex()
        for path in ("/config", "/config?all=1"):
            page = await root.get(path)
            self.assertEqual(page.code, 200, page.text[:300])
            self.assertIn("all-in-one", page.text)
            self.assertIn(f"database.url = &#34;mysql+pymysql://mpp:{MASK}@db.test/mpp&#34;",
                          page.text)
            self.assertIn(f"store:{MASK}@db.test/archive", page.text)
            self.assertIn(str(self.data / "archive.keys"), page.text)
            for secret in (DB_PASSWORD, STORE_PASSWORD, ARCHIVE_KEY, console_key):
                self.assertNotIn(secret, page.text)
        page = await root.get("/config?all=1")
        self.assertIn("web.session_idle = 1800.0", page.text)
        self.assertIn("digest.send_at = &#34;07:00&#34;", page.text)
        page = await root.get("/config")
        self.assertNotIn("web.session_idle", page.text)

    async def test_domain_admins_get_no_such_page(self) -> None:
        """A domain administrator gets the 404 a path the console does not
        have gets, the same page; logged out it is the login redirect."""
        await self.start(self.secret_config())
        for name in (ANNA, BERT):
            browser = await self.logged_in(name)
            page = await browser.get("/config")
            missing = await browser.get("/no-such-page")
            self.assertEqual((page.code, missing.code), (404, 404))
            self.assertEqual(page.body, missing.body)
            self.assertNotIn(DB_PASSWORD, page.text)
        page = await self.browser().get("/config")
        self.assertEqual((page.code, page.header("location")), (303, "/login"))

def _edge(data: Path, node: str, db_url: str, max_connections: int,
          policy: bool) -> ProxyConfig:
    """An all-in-one edge writing into the shared state database, with
    secrets in its configuration (a store password, a key file)."""
    data.mkdir(parents=True, exist_ok=True)
    key_file = data / "archive.keys"
    key_file.write_text(f"k1 = {ARCHIVE_KEY}\n", encoding="utf-8")
    os.chmod(key_file, 0o600)
    return from_mapping({
        "data_dir": str(data), "listen": ["tcp:0:interface=127.0.0.1"],
        "limits": {"max_connections": max_connections},
        "policy": {"enabled": policy},
        "database": {"url": db_url},
        "store": {"url": f"mysql+pymysql://store:{STORE_PASSWORD}@db.test/archive"},
        "archive": {"node_name": node, "key_file": str(key_file)},
        "web": {"enabled": False},
    })


def _rows(url: str, prefix: str = "mpp_") -> dict[str, NodeConfigRow]:
    engine = create_engine(url)
    try:
        return {r.node: r for r in read_configs(engine, StateTables(prefix))}
    finally:
        engine.dispose()


def _differences_section(text: str) -> str:
    start = text.index('id="h-diffs"')
    return text[start:text.index('id="h-config"')]


class EveryNodeTests(ConsoleCase):
    """Two real edges (ProxyService, one through its policy engine's state
    database, one with policy off: an engine of its own) write their rows
    into one SQLite state database; the console shows both."""

    async def edges(self, url: str) -> list[ProxyService]:
        services = []
        for node, limit, policy in (("edge-a", 100, True), ("edge-b", 200, False)):
            service = ProxyService(_edge(self.data / node, node, url, limit, policy), reactor)
            service.startService()
            self.addCleanup(service.stopService)
            services.append(service)
        await poll_until(reactor, lambda: len(_rows(url)) == 2, 10.0, "both rows written")
        return services

    async def test_superadmin_sees_every_node_and_the_differences(self) -> None:
        """The nodes' table lists edge-a and edge-b (mode, version, current);
        the differences list max_connections 100 / 200 and policy.enabled;
        ?node= shows an edge's lines; a reload of edge-b (300) shows at
        the next page with generation 2; a node whose row is old is stale;
        no password and no key file contents anywhere."""
        url = f"sqlite:///{self.data / 'shared-state.sqlite'}"
        services = await self.edges(url)
        config = dataclasses.replace(self.config, database=from_mapping(
            {"database": {"url": url}}).database)
        await self.start(config)
        root = await self.logged_in(ROOT_NAME)
        page = await root.get("/config")
        self.assertEqual(page.code, 200, page.text[:300])
        for node in ("edge-a", "edge-b"):
            self.assertIn(f'href="/config?node={node}&amp;mode=all-in-one"', page.text)
        self.assertIn("current", page.text)
        self.assertNotIn("stale", page.text.replace("is shown as stale", ""))
        diffs = _differences_section(page.text)
        self.assertIn("<code>limits.max_connections</code>", diffs)
        self.assertIn("<code>100</code>", diffs)
        self.assertIn("<code>200</code>", diffs)
        self.assertIn("<code>policy.enabled</code>", diffs)
        self.assertNotIn("<code>limits.max_message_size</code>", diffs)  # the same on both
        # This node's configuration, as before: the console's own.
        self.assertIn("(this node, as it runs now)", page.text)
        page = await root.get("/config?node=edge-b&mode=all-in-one")
        self.assertIn("Configuration of edge-b", page.text)
        self.assertIn("limits.max_connections = 200", page.text)
        self.assertIn(f"store:{MASK}@db.test/archive", page.text)
        page = await root.get("/config?node=edge-b&mode=all-in-one&all=1")
        self.assertIn("web.session_idle = 1800.0", page.text)
        # A reload of edge-b (SIGHUP's apply) updates its row.
        services[1].apply(_edge(self.data / "edge-b", "edge-b", url, 300, False))
        await poll_until(reactor, lambda: _rows(url)["edge-b"].generation == 2, 10.0,
                         "edge-b's row after the reload")
        page = await root.get("/config?node=edge-b&mode=all-in-one")
        self.assertIn("limits.max_connections = 300", page.text)
        self.assertIn("<code>300</code>", _differences_section(page.text))
        # edge-a stops writing (an hour ago): stale, with the time.
        await services[0].node_config.stop()  # type: ignore[union-attr]  # no tick rewrites it
        engine = create_engine(url)
        try:
            t = config_table(StateTables())
            with engine.begin() as conn:
                conn.execute(update(t).where(t.c.node == "edge-a")
                             .values(reported=time.time() - 3600))
        finally:
            engine.dispose()
        page = await root.get("/config")
        self.assertIn("<strong class=\"error\">stale</strong> (nothing for 60 min)", page.text)
        for path in ("/config", "/config?all=1", "/config?node=edge-a&mode=all-in-one&all=1"):
            text = (await root.get(path)).text
            for secret in (STORE_PASSWORD, ARCHIVE_KEY):
                self.assertNotIn(secret, text)
        stored = "\n".join(json.dumps([r.all_keys, r.changed]) for r in _rows(url).values())
        for secret in (STORE_PASSWORD, ARCHIVE_KEY):
            self.assertNotIn(secret, stored)

    async def test_domain_admins_get_no_such_page_with_nodes(self) -> None:
        """With rows of other nodes in the database, a domain admin still
        gets the console's 404, the body of a missing page."""
        url = f"sqlite:///{self.data / 'shared-state.sqlite'}"
        await self.edges(url)
        config = dataclasses.replace(self.config, database=from_mapping(
            {"database": {"url": url}}).database)
        await self.start(config)
        for name in (ANNA, BERT):
            browser = await self.logged_in(name)
            page = await browser.get("/config?node=edge-a&mode=all-in-one")
            missing = await browser.get("/no-such-page")
            self.assertEqual((page.code, missing.code), (404, 404))
            self.assertEqual(page.body, missing.body)
            self.assertNotIn("edge-a", page.text)


class MariaDBNodeTests(ConsoleCase):
    """The page over a MariaDB state database (a table prefix of the
    test's own): two nodes' rows written by their recorders."""

    backend = "mariadb"

    async def test_two_nodes_on_mariadb(self) -> None:
        """edge-a and edge-b's rows on MariaDB: both listed, their
        differing key shown, no secret on the page."""
        url = self.config.store.url or require_mariadb()
        prefix = f"t{uuid.uuid4().hex[:10]}_"
        handle = StateHandle(dataclasses.replace(
            self.config, database=from_mapping({"database": {"url": url}}).database), prefix)
        self.addCleanup(self._drop, url, handle)
        db = StateDatabase(from_mapping({"database": {"url": url}}).database, str(self.data),
                           reactor, table_prefix=prefix)
        db.start()
        self.addCleanup(db.stop)
        for node, limit in (("edge-a", 100), ("edge-b", 200)):
            config = _edge(self.data / node, node, url, limit, True)
            recorder = ConfigRecorder(reactor, config, lambda: db, table_prefix=prefix)
            self.addCleanup(recorder.stop)
            await recorder.record(config)
        console = await self.start()
        assert console.ctx is not None
        use_state(console.ctx, handle)
        root = await self.logged_in(ROOT_NAME)
        page = await root.get("/config")
        self.assertEqual(page.code, 200, page.text[:300])
        self.assertIn("edge-a", page.text)
        self.assertIn("edge-b", page.text)
        diffs = _differences_section(page.text)
        self.assertIn("<code>limits.max_connections</code>", diffs)
        self.assertIn("<code>200</code>", diffs)
        for secret in (STORE_PASSWORD, ARCHIVE_KEY):
            self.assertNotIn(secret, page.text)

    def _drop(self, url: str, handle: StateHandle) -> None:
        """Drop the test's state tables."""
        handle.close()
        engine = create_engine(url)
        try:
            config_table(handle.tables)
            handle.tables.metadata.drop_all(engine)
        finally:
            engine.dispose()
