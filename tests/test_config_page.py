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
import os

from test_web_console import ANNA, BERT, ROOT_NAME, ConsoleCase
from mppproxy.config.load import from_mapping
from mppproxy.config.schema import ProxyConfig
from mppproxy.config.show import MASK
from mppproxy.config.web import secret_path
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