"""Bulk actions as background jobs (mppproxy/web/jobs.py, jobpages.py;
issue 13): a bulk action over more rows than a page starts a job, the
browser goes to its page, which shows done/total and reloads itself
(``Refresh`` header) until the job ends with a summary.

The console runs for real (``ConsoleCase`` of test_web_console.py: the
``WebConsole`` service on loopback, Twisted's ``Agent`` with a cookie
jar, a real store -- SQLite, and MariaDB with ``require_mariadb`` --
and releases to a real SMTP sink on loopback).
"""
from __future__ import annotations

import re
from typing import Any

from twisted.internet import task

from test_web_console import ANNA, BERT, ROOT_NAME, Browser, ConsoleCase, copy
from mppproxy.store.accounts import Accounts
from mppproxy.store.store import Search
from mppproxy.web import jobs as jobs_module

# Rows of a.test the jobs act on (the console's page is 5 rows).
MANY = 1200


def many_copies(count: int, prefix: str = "JOB", domain: str = "a.test") -> list[Any]:
    return [copy(f"{prefix}{n:05d}", (f"user{n}@{domain}",), f"Bulk {n}", 10 + n / 1000,
                 sender="flood@spam.test") for n in range(count)]


class JobCase(ConsoleCase):
    def add_many(self, count: int = MANY, prefix: str = "JOB") -> None:
        self.assertEqual(self.store.add_copies(many_copies(count, prefix)), count)

    async def start_job(self, browser: Browser, action: str, sender: str = "flood@spam.test",
                        **more: str) -> str:
        token = (await browser.get("/quarantine")).csrf()
        page = await browser.post("/quarantine/bulk", {
            "action": action, "csrf": token, "every": "1", "f_sender": sender,
            "f_status": "current", **more})
        self.assertEqual(page.code, 303, page.text[:500])
        location = page.header("location")
        self.assertRegex(location, r"^/jobs/[0-9a-f]{24}$")
        return location

    async def finished(self, browser: Browser, location: str, seconds: float = 60.0) -> Any:
        """The job's page once the job ended (polled every 50 ms, bounded);
        checks that a running job's page reloads itself."""
        for _ in range(int(seconds / 0.05)):
            page = await browser.get(location)
            self.assertEqual(page.code, 200, page.text[:300])
            if page.header("refresh") == "":
                return page
            self.assertEqual(page.header("refresh"), "1")
            self.assertIn("<progress", page.text)
            await task.deferLater(self.reactor, 0.05, lambda: None)
        self.fail(f"job {location} did not end within {seconds} s")

    @property
    def reactor(self) -> Any:
        from twisted.internet import reactor
        return reactor


class StoreFacingJobTests:
    """Run on SQLite and on MariaDB."""

    async def test_bulk_delete_runs_as_a_job_with_progress(self: Any) -> None:
        """A's admin deletes 1,200 matching rows: 303 to the job's page,
        which shows done/total and reloads itself while running, then
        "1200 of 1200 deleted"; every row is deleted and audited once with
        the admin as actor; b.test's row from the same sender is untouched."""
        self.add_many()
        self.store.add_copies([copy("JOBB", ("v@b.test",), "B too", 1, sender="flood@spam.test")])
        await self.start()
        anna = await self.logged_in(ANNA)
        location = await self.start_job(anna, "delete")
        running = await anna.get(location)
        self.assertIn(f"of <strong>{MANY}</strong> done", running.text)
        page = await self.finished(anna, location)
        self.assertIn(f"<strong>{MANY}</strong> of <strong>{MANY}</strong> done (100%)", page.text)
        self.assertIn(f"Done: {MANY} of {MANY} deleted", page.text)
        self.assertIn("sender flood@spam.test, status current", page.text)
        rows = self.store.search(Search(sender="flood@spam.test", status=None, limit=5000))
        self.assertEqual(sum(r.status == "deleted" for r in rows), MANY)
        self.assertEqual([r.status for r in rows if r.rcpt_domain == "b.test"], ["held"])
        audit = self.store.audit_rows(action="delete", limit=5000)
        self.assertEqual(len(audit), MANY)
        self.assertEqual({(a["actor"], a["origin"]) for a in audit},
                         {(ANNA, "web:127.0.0.1")})
        self.assertEqual(len({a["row_id"] for a in audit}), MANY)
        listing = await anna.get("/jobs")
        self.assertIn(location, listing.text)


class JobTests(StoreFacingJobTests, JobCase):
    """On SQLite."""

    async def test_job_belongs_to_its_admin(self) -> None:
        """Another domain's admin and the superadmin get for A's job page
        (and its Stop button) the 404 of a job that does not exist; the
        /jobs list shows only one's own; logged out it is the login page."""
        self.add_many(30)
        await self.start()
        anna = await self.logged_in(ANNA)
        location = await self.start_job(anna, "hold")
        await self.finished(anna, location)
        missing = "/jobs/" + "0" * 24
        for name in (BERT, ROOT_NAME):
            other = await self.logged_in(name)
            a, b = await other.get(location), await other.get(missing)
            self.assertEqual((a.code, b.code), (404, 404))
            self.assertEqual(a.body, b.body)
            token = (await other.get("/quarantine")).csrf()
            a = await other.post(location + "/cancel", {"csrf": token})
            b = await other.post(missing + "/cancel", {"csrf": token})
            self.assertEqual((a.code, b.code), (404, 404))
            self.assertEqual(a.body, b.body)
            self.assertNotIn(location, (await other.get("/jobs")).text)
        page = await self.browser().get(location)
        self.assertEqual((page.code, page.header("location")), (303, "/login"))

    async def test_bulk_release_job_reaches_the_route(self) -> None:
        """A bulk release of 12 rows (more than a page) runs as a job: the
        sink gets each message once, the summary says 12 of 12 released."""
        self.add_many(12)
        await self.start()
        anna = await self.logged_in(ANNA)
        location = await self.start_job(anna, "release")
        page = await self.finished(anna, location)
        self.assertIn("Done: 12 of 12 released", page.text)
        self.assertEqual(len(self.sink.messages), 12)
        self.assertEqual(sorted(m[1][0] for m in self.sink.messages),
                         sorted(f"user{n}@a.test" for n in range(12)))
        self.assertEqual(len(self.store.audit_rows(action="release", limit=100)), 12)

    async def test_stop_a_running_job(self) -> None:
        """Stop ends a running job after the batch in flight: cancelled,
        some rows done, the rest untouched."""
        self.patch(jobs_module, "BATCH", 10)
        self.add_many(1000)
        await self.start()
        anna = await self.logged_in(ANNA)
        location = await self.start_job(anna, "hold")
        page = await anna.get(location)
        self.assertIn(">Stop<", page.text)
        page = await anna.post(location + "/cancel", {"csrf": page.csrf()})
        self.assertEqual((page.code, page.header("location")), (303, location))
        page = await self.finished(anna, location)
        self.assertIn("Cancelled:", page.text)
        done = int(re.search(r"<strong>(\d+)</strong> of <strong>1000</strong>",
                             page.text).group(1))  # type: ignore[union-attr]
        self.assertTrue(10 <= done < 1000, done)
        held = self.store.search(Search(sender="flood@spam.test", status=None, limit=2000))
        self.assertEqual(sum(r.legal_hold for r in held), done)


    async def test_console_stop_ends_jobs_first(self) -> None:
        """Stopping the console (a restart) stops a running job after its
        batch in flight, before the store closes: the job ends cancelled,
        not failed, and what it did stays done (jobs live in the process)."""
        self.patch(jobs_module, "BATCH", 1)
        self.add_many(300)
        console = await self.start()
        anna = await self.logged_in(ANNA)
        location = await self.start_job(anna, "hold")
        assert console.ctx is not None
        job = console.ctx.jobs.get(location.rsplit("/", 1)[1], Accounts(self.store).by_name(
            ANNA).id)  # type: ignore[union-attr]
        assert job is not None
        await console.stopService()
        self.assertEqual(job.state, "cancelled")
        self.assertLess(job.done, 300)
        held = self.store.search(Search(sender="flood@spam.test", status=None, limit=2000))
        self.assertEqual(sum(r.legal_hold for r in held), job.done)


class JobLimitTests(JobCase):
    """The bounds, with web.bulk_job_max = 600."""

    extra = {"bulk_job_max": 600}

    async def test_limits(self) -> None:
        """More rows than web.bulk_job_max are refused with the count; a third
        job of one admin while two run waits (429); a forward without an
        address is refused before any job starts; ticked rows and small
        selections still answer in the request."""
        self.patch(jobs_module, "BATCH", 1)
        self.add_many(700)
        await self.start()
        anna = await self.logged_in(ANNA)
        token = (await anna.get("/quarantine")).csrf()
        page = await anna.post("/quarantine/bulk", {"action": "delete", "csrf": token,
                                                    "every": "1", "f_status": "current"})
        self.assertEqual(page.code, 400)
        self.assertIn("705 rows match", page.text)
        page = await anna.post("/quarantine/bulk", {"action": "forward", "csrf": token,
                                                    "every": "1", "f_sender": "flood@spam.test",
                                                    "f_subject": "Bulk 1"})
        self.assertEqual(page.code, 400)
        self.assertIn("forward needs an address", page.text)
        first = await self.start_job(anna, "hold", f_subject="Bulk 1")
        second = await self.start_job(anna, "hold", f_subject="Bulk 2")
        page = await anna.post("/quarantine/bulk", {"action": "hold", "csrf": token,
                                                    "every": "1", "f_subject": "Bulk 3"})
        self.assertEqual(page.code, 429)
        self.assertIn("bulk actions running", page.text)
        for location in (first, second):
            await self.finished(anna, location)
        page = await anna.post("/quarantine/bulk", {"action": "unhold", "csrf": token,
                                                    "every": "1", "f_subject": "Bulk 10"})
        self.assertEqual(page.code, 303)
        await self.finished(anna, page.header("location"))
        page = await anna.post("/quarantine/bulk", {"action": "unhold", "csrf": token,
                                                    "every": "1", "f_ref": "JOB00001"})
        self.assertEqual(page.code, 200)
        self.assertIn("1 of 1 taken off legal hold", page.text)


class MariaDBJobTests(StoreFacingJobTests, JobCase):
    """The store-facing job tests on MariaDB."""

    backend = "mariadb"
