"""The web console's accounts (mppproxy/store/accounts.py) on a real store,
SQLite and MariaDB (``require_mariadb``: skipped locally without a server,
failing under ``MPP_REQUIRE_SERVICES=1``), and the revision that makes
their table, upgraded from the revision before it."""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from alembic import command
from sqlalchemy import inspect

from test_db_stores import require_mariadb
from mppproxy.config.archive import StoreConfig
from mppproxy.store import migrate
from mppproxy.store.accounts import FIRST_ADMIN, AccountError, Accounts
from mppproxy.store.store import ArchiveStore, NewCopy, Search

BACKENDS = ("sqlite", "mariadb")


def make_store(backend: str, tmp: Path, open_it: bool = True) -> ArchiveStore:
    url = require_mariadb() if backend == "mariadb" else ""
    prefix = f"t{uuid.uuid4().hex[:10]}_" if backend == "mariadb" else ""
    store = ArchiveStore(StoreConfig(url=url), str(tmp), table_prefix=prefix)
    if open_it:
        store.open()
    return store


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ArchiveStore]:
    made = make_store(request.param, tmp_path)
    yield made
    made.drop_all()
    made.close()


def test_add_verify_and_list(store: ArchiveStore) -> None:
    """An account is added with a hashed password, verified by it (not by
    another), listed without its hash, and its changes are audited."""
    accounts = Accounts(store)
    admin = accounts.add("Ann", "correct horse", False, ["Example.COM.", "example.org"],
                         "root", "cli:root@host")
    assert (admin.name, admin.domains, admin.superadmin) == ("ann", ("example.com", "example.org"),
                                                             False)
    assert admin.password_hash.startswith("$argon2id$")
    assert "correct horse" not in admin.password_hash and "hash" not in repr(admin)
    assert accounts.verify("ANN", "correct horse") == admin
    assert accounts.verify("ann", "wrong horse") is None
    assert accounts.verify("nobody", "correct horse") is None
    assert [a.name for a in accounts.list()] == ["ann"]
    assert "password_hash" not in json.dumps(admin.to_json())
    assert admin.scope() == ("example.com", "example.org")
    audit = store.audit_rows(action="admin-add")
    assert audit[0]["actor"] == "root" and "example.org" in audit[0]["detail"]


def test_refusals(store: ArchiveStore) -> None:
    """Duplicate names, bad names and domains, short passwords and a domain
    admin without a domain are refused with a message saying why."""
    accounts = Accounts(store)
    accounts.add("bob", "12345678", True, [], "t", "t")
    for args, text in (((" BOB", "12345678", True, []), "exists already"),
                       (("-bob", "12345678", True, []), "not an account name"),
                       (("carl", "1234567", True, []), "at least 8"),
                       (("carl", "12345678", False, []), "at least one domain"),
                       (("carl", "12345678", False, ["exa mple.com"]), "not a domain")):
        with pytest.raises(AccountError, match=text):
            accounts.add(*args, actor="t", origin="t")  # type: ignore[arg-type]
    assert [a.name for a in accounts.list()] == ["bob"]


def test_passwd_disable_remove(store: ArchiveStore) -> None:
    """A new password replaces the old one; a disabled account cannot log
    in; a removed one is gone."""
    accounts = Accounts(store)
    accounts.add("dana", "first password", True, [], "t", "t")
    accounts.set_password("dana", "second password", "t", "t", must_change=True)
    assert accounts.verify("dana", "first password") is None
    found = accounts.verify("dana", "second password")
    assert found is not None and found.must_change
    accounts.set_disabled("dana", True, "t", "t")
    assert accounts.verify("dana", "second password") is None
    assert accounts.remove("dana", "t", "t") and not accounts.remove("dana", "t", "t")
    assert accounts.by_name("dana") is None
    with pytest.raises(AccountError, match="no account"):
        accounts.set_password("dana", "third password", "t", "t")


def test_first_admin_once(store: ArchiveStore) -> None:
    """With no account the first superadmin is made with a one-time
    password that works and must be changed; a second call makes none."""
    accounts = Accounts(store)
    password = accounts.ensure_first_admin("mppproxy", "start")
    assert password is not None and len(password) >= 16
    admin = accounts.verify(FIRST_ADMIN, password)
    assert admin is not None and admin.superadmin and admin.must_change
    assert accounts.ensure_first_admin("mppproxy", "start") is None
    assert accounts.count() == 1


def test_count_by_is_scoped(store: ArchiveStore) -> None:
    """count_by groups the rows of a search, within the admin's domains."""
    copies = [NewCopy(node="n", queue_id=f"Q{i}", received=1.7e9 + i, client="192.0.2.1",
                      helo=None, tls=False, sender="s@x.test",
                      recipients=(f"u@{'a' if i % 3 else 'b'}.test",), policy=None,
                      verdict="reject" if i % 2 else "hold", disposition="quarantine",
                      score=1.0, reasons=(f"r{i % 2}",), state_json="{}",
                      message=b"Subject: x\r\n\r\nx\r\n") for i in range(9)]
    assert store.add_copies(copies) == 9
    everything = dict(store.count_by(Search(), "verdict"))
    assert everything == {"reject": 4, "hold": 5}
    scoped = dict(store.count_by(Search(domains=("b.test",)), "reason"))
    assert sum(scoped.values()) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_upgrade_from_the_previous_revision(backend: str, tmp_path: Path) -> None:
    """A store at revision 0001 (before the accounts) upgrades to the head:
    its rows stay, the accounts table appears."""
    store = make_store(backend, tmp_path, open_it=False)
    try:
        with store._some_engine() as engine:
            with engine.connect() as conn:
                config = migrate._config(store.tables.prefix, conn)
                command.upgrade(config, "0001")
                conn.commit()
            assert migrate.current(engine, store.tables.prefix) == "0001"
            names = inspect(engine).get_table_names()
            assert f"{store.tables.prefix}web_admins" not in names
        store.open()
        assert store.schema_revision() == migrate.head()
        assert Accounts(store).count() == 0
    finally:
        store.drop_all()
        store.close()
