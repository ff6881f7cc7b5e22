"""The web console in a real browser (issue 13): headless Chromium from
Debian's package driven by Playwright for Python, against a real
all-in-one ``twistd mppproxy`` (the console on its own listener, the
store in its data directory) whose release route is the real Postfix
backend.

A domain admin logs in, searches, opens a message and releases it -- and
the message is then in Postfix's Maildir; bulk-deletes 2,000 rows and
watches the job page count up by itself (no script: the Refresh header);
and gets "not found" for another domain's message typed as a URL.

Screenshots of the list, a message and (when the console has one) the
dashboard are written to ``docs/screenshots/`` (``MPP_SCREENSHOT_DIR``
elsewhere), which docs/console.md links.  The stored rows have fixed
dates, so the pictures come out the same on each run.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers import free_port, wait_for
from realmta.conftest import PostfixBackend, StartProxy
from mppproxy.config.archive import StoreConfig
from mppproxy.store.accounts import Accounts
from mppproxy.store.store import ArchiveStore, NewCopy, Search

REPO = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("MPP_SCREENSHOT_DIR", REPO / "docs" / "screenshots"))
PASSWORD = "browser test password"
# The superadmin, the admin of example.com, the admin of example.net.
ROOT_NAME, ANNA, BERT = "root", "anna", "bert"
BASE_TIME = datetime(2024, 5, 6, 9, 30, tzinfo=timezone.utc).timestamp()
FLOOD = 2000
# Milliseconds Playwright waits for a page or an element.
WAIT_MS = 20_000


def copy(ref: str, rcpt: str, subject: str, minutes_before: float, sender: str,
         verdict: str, score: float, checks: list[tuple[str, float, str]],
         body: str = "Hello,\r\n\r\nplease find the details below.\r\n") -> NewCopy:
    reasons = tuple(f"{name}: {why}" for name, _, why in checks)
    state = {"queue_id": ref, "policy": "default", "verdict": verdict, "score": score,
             "checks": [{"check": name, "score": points, "reasons": [why], "skipped": None,
                         "recipient": None, "action": None} for name, points, why in checks],
             "checks_passed": ["spf", "dnsbl", "greylist"]}
    message = (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
               f"Date: Mon, 06 May 2024 09:00:00 +0000\r\nMessage-ID: <{ref}@mx.sender.test>\r\n"
               f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
               f"{body}").encode("utf-8")
    return NewCopy(node="mx1", queue_id=ref, received=BASE_TIME - minutes_before * 60,
                   client="192.0.2.44", helo="mx.sender.test", tls=True, sender=sender,
                   recipients=(rcpt,), policy="default", verdict=verdict,
                   disposition="quarantine", score=score, reasons=reasons,
                   state_json=json.dumps(state), message=message)


ROWS = (
    copy("4VXQ1H2K7", "ann@example.com", "Invoice 2024-0419 overdue", 3, "billing@vendor.test",
         "hold", 7.5, [("rspamd", 6.0, "BAYES_SPAM (0.99)"), ("dnsbl", 1.5, "listed in bl.test")],
         body="Dear customer,\r\n\r\nyour invoice 2024-0419 is overdue. Pay within 3 days.\r\n"),
    copy("4VXQ1H2K8", "ann@example.com", "Your parcel is waiting", 11, "notice@parcel.test",
         "reject", 12.0, [("clamav", 12.0, "Heuristics.Phishing.Email.SpoofedDomain")]),
    copy("4VXQ1H2K9", "carl@example.com", "Weekly newsletter", 25, "news@letters.test",
         "hold", 5.2, [("spamd", 5.2, "HTML_MESSAGE, MIME_HTML_ONLY")]),
    copy("4VXQ1H2KA", "ann@example.com", "Meeting notes (team)", 47, "colleague@partner.test",
         "hold", 6.1, [("rspamd", 6.1, "FORGED_SENDER")]),
    copy("4VXQ1H2KB", "dora@example.com", "You are a winner!!!", 63, "prize@lottery.test",
         "reject", 18.4, [("spamd", 18.4, "GTUBE")]),
    copy("4VXQ1H2KC", "bob@example.net", "Board minutes, confidential", 5, "chair@board.test",
         "hold", 6.6, [("rspamd", 6.6, "SUSPICIOUS_RECIPS")]),
)


def flood_rows() -> list[NewCopy]:
    """Older rows of one spam run, for the bulk delete."""
    return [copy(f"FL{n:05d}", f"user{n % 40}@example.com", f"Cheap watches {n}",
                 600 + n, "flood@spam.test", "hold", 9.0, [("rspamd", 9.0, "SPAM_RUN")])
            for n in range(FLOOD)]


@dataclass
class Node:
    url: str
    store: ArchiveStore
    postfix: PostfixBackend

    def row(self, ref: str) -> Any:
        rows = self.store.search(Search(ref=ref, status=None))
        assert len(rows) == 1
        return rows[0]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, postfix_backend: PostfixBackend,
         proxy_process: StartProxy) -> Iterator[Node]:
    """An all-in-one proxy: SMTP and the console on free loopback ports,
    releases to Postfix; its store filled before it starts."""
    data = tmp_path_factory.mktemp("console-node")
    store = ArchiveStore(StoreConfig(), str(data))
    store.open()
    assert store.add_copies([*ROWS, *flood_rows()]) == len(ROWS) + FLOOD
    accounts = Accounts(store)
    accounts.add(ROOT_NAME, PASSWORD, True, (), "test", "test")
    accounts.add(ANNA, PASSWORD, False, ("example.com",), "test", "test")
    accounts.add(BERT, PASSWORD, False, ("example.net",), "test", "test")
    smtp_port, web_port = free_port(), free_port()
    config = data / "mppproxy.toml"
    config.write_text(f"""
data_dir = "{data}"
listen = ["tcp:{smtp_port}:interface=127.0.0.1"]
relay_domains = ["example.com", "example.net"]
[backend]
host = "{postfix_backend.host}"
port = {postfix_backend.port}
[release]
default_route = "{postfix_backend.address}"
rescan = false
[web]
listen = ["tcp:{web_port}:interface=127.0.0.1"]
page_size = 15
""")
    proc = proxy_process(["--config", str(config)], smtp_port, name="console", timeout=60)
    try:
        yield Node(f"http://127.0.0.1:{web_port}", store, postfix_backend)
    finally:
        proc.stop()
        store.close()


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    """A fresh browser context (no cookies) and page, 1280 wide."""
    context = chromium.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(WAIT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def log_in(page: Any, node: Node, name: str) -> None:
    page.goto(f"{node.url}/login")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("button:has-text('Log in')")
    page.wait_for_load_state()
    assert page.url == f"{node.url}/quarantine", (page.url, page.inner_text("body")[:500])


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name), full_page=True)


def test_log_in_search_open_and_release(page: Any, node: Node) -> None:
    """Anna (example.com) logs in, sees only her domain's rows, searches by
    sender, subject and dates, opens the message, releases it -- and it is
    in Postfix's Maildir for example.com; the row says released."""
    node.postfix.clear()
    log_in(page, node, ANNA)
    assert "anna" in page.inner_text("header")
    listing = page.inner_text("main")
    assert "Invoice 2024-0419 overdue" in listing
    assert "Board minutes" not in listing
    shot(page, "quarantine-list.png")
    page.fill("input[name=sender]", "billing@vendor.test")
    page.fill("input[name=subject]", "invoice")
    page.fill("input[name=since]", "2024-05-06")
    page.fill("input[name=until]", "2024-05-06")
    page.click("button:has-text('Search')")
    page.wait_for_url(re.compile(r".*sender=billing%40vendor\.test.*"))
    assert page.inner_text("p.counts").startswith("1 matching")
    page.click("a:has-text('Invoice 2024-0419 overdue')")
    row = node.row("4VXQ1H2K7")
    page.wait_for_url(f"{node.url}/quarantine/{row.id}")
    text = page.inner_text("main")
    for expected in ("4VXQ1H2K7", "billing@vendor.test", "BAYES_SPAM", "your invoice 2024-0419"):
        assert expected in text
    shot(page, "quarantine-message.png")
    page.click("button[value=release]")
    page.wait_for_selector("p.notice")
    assert "1 of 1 released" in page.inner_text("p.notice")
    delivered = node.postfix.wait_messages("example.com", 1, timeout=15)
    assert b"Subject: Invoice 2024-0419 overdue" in delivered[0]
    assert b"ann@example.com" in delivered[0]
    assert node.row("4VXQ1H2K7").status == "released"


def test_bulk_delete_with_progress(page: Any, node: Node) -> None:
    """Anna selects the 2,000 rows of one spam run ("every row matching
    the search") and deletes them: the job page shows done/total, reloads
    itself without any script until it says 2000 of 2000 deleted."""
    log_in(page, node, ANNA)
    page.goto(f"{node.url}/quarantine?sender=flood%40spam.test")
    assert page.inner_text("p.counts").startswith(f"{FLOOD} matching")
    page.check("input[name=every]")
    page.click("fieldset.bulk button[value=delete]")
    page.wait_for_url(re.compile(r".*/jobs/[0-9a-f]{24}$"))
    first = page.inner_text("#job-progress")
    assert f"of {FLOOD} done" in first
    assert page.locator("progress").count() == 1
    running = page.locator("#job-summary").count() == 0
    loads: list[str] = []
    page.on("load", lambda: loads.append(first))
    # No reload from here: the page's Refresh header brings the summary.
    page.wait_for_selector("#job-summary", timeout=60_000)
    assert loads or not running, "the running job's page did not reload itself"
    assert f"Done: {FLOOD} of {FLOOD} deleted" in page.inner_text("#job-summary")
    assert f"{FLOOD} of {FLOOD} done (100%)" in page.inner_text("#job-progress")
    rows = node.store.search(Search(sender="flood@spam.test", status=None, limit=FLOOD + 1))
    assert len(rows) == FLOOD and all(r.status == "deleted" for r in rows)
    page.click("a:has-text('Back to the search')")
    assert page.inner_text("p.counts").startswith("0 matching")


def test_domain_admin_blocked_by_url(page: Any, node: Node) -> None:
    """Anna types the address of example.net's message: the same "not
    found" as a message that does not exist; Bert (example.net) sees it."""
    foreign = node.row("4VXQ1H2KC").id
    log_in(page, node, ANNA)
    response = page.goto(f"{node.url}/quarantine/{foreign}")
    assert response.status == 404
    blocked = page.inner_text("main")
    assert "There is no such message." in blocked and "Board minutes" not in blocked
    response = page.goto(f"{node.url}/quarantine/999999999")
    assert response.status == 404 and page.inner_text("main") == blocked
    response = page.goto(f"{node.url}/quarantine/{foreign}/raw")
    assert response.status == 404
    page.context.clear_cookies()
    log_in(page, node, BERT)
    response = page.goto(f"{node.url}/quarantine/{foreign}")
    assert response.status == 200 and "Board minutes, confidential" in page.inner_text("h1")


def test_dashboard_screenshot(page: Any, node: Node) -> None:
    """The superadmin's dashboard, when the console has one, is saved as a
    screenshot for the docs."""
    log_in(page, node, ROOT_NAME)
    response = page.goto(f"{node.url}/dashboard")
    if response.status == 404:
        pytest.skip("this console has no /dashboard page yet")
    assert response.status == 200
    shot(page, "dashboard.png")
    wait_for(lambda: (SHOTS / "dashboard.png").exists(), 5, what="the dashboard screenshot")
