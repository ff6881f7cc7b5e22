"""``mppproxy admin`` run as the operator runs it: a subprocess
(``python -m mppproxy admin ...``) against a real archive store (SQLite in
a temporary data directory), read back through ``store/accounts.py``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from helpers import free_port
from mppproxy.config.archive import StoreConfig
from mppproxy.store.accounts import Accounts
from mppproxy.store.store import ArchiveStore

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 60


def admin(config: Path, *args: str, stdin: Optional[str] = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "MPP_HOME"}
    return subprocess.run([sys.executable, "-m", "mppproxy", "admin", *args, "--config",
                           str(config)], input=stdin, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, cwd=ROOT, env=environment)


def site(tmp_path: Path, extra: str = "") -> Path:
    config = tmp_path / "mppproxy.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n{extra}', encoding="utf-8")
    return config


def accounts_of(tmp_path: Path) -> tuple[ArchiveStore, Accounts]:
    store = ArchiveStore(StoreConfig(), str(tmp_path / "data"))
    store.open()
    return store, Accounts(store)


def test_add_list_passwd_remove(tmp_path: Path) -> None:
    """add makes accounts whose passwords work (from --password-stdin),
    list shows them (text and JSON, no hash), passwd changes a password
    (--temporary asks for a new one at login), remove removes; every change
    is audited with the login name and cli:<user>@<host>."""
    config = site(tmp_path)
    done = admin(config, "add", "Ann", "--domain", "A.test", "--domain", "b.test",
                 "--password-stdin", stdin="first password\n")
    assert done.returncode == 0, done.stderr
    assert "account ann added: a.test, b.test" in done.stdout
    done = admin(config, "add", "root", "--superadmin", "--password-stdin",
                 stdin="root password\n")
    assert done.returncode == 0, done.stderr
    listing = admin(config, "list")
    assert listing.returncode == 0
    assert "ann  a.test, b.test  last login never" in listing.stdout
    assert "root  superadmin" in listing.stdout
    data = json.loads(admin(config, "list", "--json").stdout)
    assert [(a["name"], a["domains"], a["superadmin"]) for a in data] == [
        ("ann", ["a.test", "b.test"], False), ("root", [], True)]
    assert "hash" not in json.dumps(data)
    done = admin(config, "passwd", "ann", "--temporary", "--password-stdin",
                 stdin="second password\n")
    assert done.returncode == 0, done.stderr
    store, accounts = accounts_of(tmp_path)
    try:
        assert accounts.verify("ann", "first password") is None
        found = accounts.verify("ann", "second password")
        assert found is not None and found.must_change
        audit = store.audit_rows(action="admin-passwd")
        assert audit[0]["origin"].startswith("cli:") and audit[0]["detail"] == "ann"
    finally:
        store.close()
    assert admin(config, "remove", "ann").returncode == 0
    gone = admin(config, "remove", "ann")
    assert gone.returncode == 1 and "no account named" in gone.stderr


def test_refusals_and_exit_status(tmp_path: Path) -> None:
    """A short password, a bad domain, a domain admin without a domain and
    a name taken exit 2 with the reason; an empty list exits 1; a bad
    configuration exits 2; a store that cannot be reached exits 3."""
    config = site(tmp_path)
    assert admin(config, "list").returncode == 1
    for args, stdin, text in (
            (("add", "ann", "--superadmin", "--password-stdin"), "short\n", "at least 8"),
            (("add", "ann", "--domain", "not a domain", "--password-stdin"), "long enough\n",
             "not a domain"),
            (("add", "ann", "--password-stdin"), "long enough\n", "at least one domain")):
        done = admin(config, *args, stdin=stdin)
        assert (done.returncode, text in done.stderr) == (2, True), done.stderr
    assert admin(config, "add", "ann", "--superadmin", "--password-stdin",
                 stdin="long enough\n").returncode == 0
    taken = admin(config, "add", "ANN", "--superadmin", "--password-stdin", stdin="long enough\n")
    assert taken.returncode == 2 and "exists already" in taken.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("web = 3\n", encoding="utf-8")
    assert admin(bad, "list").returncode == 2
    down = site(tmp_path / "down" if (tmp_path / "down").mkdir() is None else tmp_path,
                f'[store]\nurl = "mysql+pymysql://u:secretpw@127.0.0.1:{free_port()}/x"\n')
    done = admin(down, "list")
    assert done.returncode == 3 and "unavailable" in done.stderr
    assert "secretpw" not in done.stderr
