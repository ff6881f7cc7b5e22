"""Bulk actions as background jobs: a bulk action over more rows than a
page (say "delete the 5,000 held messages from this sender") runs in the
console's process while the browser watches its progress (issue 13).

Floor 3 (``mppproxy/web/``).  A ``Job`` walks the matching rows newest
first by keyset (``Search.before_id``), ``BATCH`` rows at a time, and
hands each batch to ``Actions.apply`` -- the very code a single action
runs, so each row is audited as it is today and every store call runs in
the reactor's thread pool.  Between batches the reactor is free: pages
answer while a job runs, and the job's page reads ``done``/``total``.

The number to do is counted when the job starts; rows that arrive later
are not part of it (the walk starts at the newest row of that moment and
stops after ``total`` rows), and rows another admin changed meanwhile are
skipped by the action itself (a deleted row is not deleted twice).

A job belongs to the admin who started it: anybody else -- another
domain's admin, a superadmin -- gets the 404 of a job that does not
exist, and the ids are random (``secrets``), not counted.  Jobs live in
this process's memory only: a restart forgets them and stops a running
one after the batch in flight (the rows done stay done, each audited;
the rest are untouched).  Finished jobs are kept ``KEEP`` seconds.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

from twisted.internet import defer

from mppproxy._async import as_deferred
from mppproxy.logsetup import Logger
from mppproxy.store.store import Search, StoredRow
from mppproxy.web.actions import Actions, Applied, RowResult

log = Logger()

# Rows per batch: one store search and one action call (delete and hold
# change them in one transaction; release sends them one by one).
BATCH = 200
# Jobs running at once per admin and per process: each holds one thread
# of the pool at a time, and the pool serves every page too.
RUNNING_PER_ADMIN = 2
RUNNING_MAX = 6
# Seconds a finished job's page stays; at most KEPT jobs are remembered.
KEEP = 3600.0
KEPT = 200
# Rows whose release or forward did not succeed listed on the summary.
PROBLEMS_SHOWN = 100

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"


@dataclass
class Job:
    """One bulk action in progress or finished (``state``)."""

    id: str
    owner: int
    owner_name: str
    action: str
    what: str  # the search, in words, for the page
    total: int
    started: float
    back: str
    done: int = 0  # rows handled
    changed: int = 0  # rows the action changed (released, deleted...)
    allowed: int = 0  # senders put on the allow list (release-allow)
    state: str = RUNNING
    finished: Optional[float] = None
    error: str = ""
    cancel: bool = False
    recipients: tuple[str, ...] = ()
    problems: list[RowResult] = field(default_factory=list)
    problem_count: int = 0

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def percent(self) -> int:
        return 100 if self.total <= 0 else min(100, self.done * 100 // self.total)

    def summary(self) -> str:
        """The line the finished page shows, e.g. "4998 of 5000 deleted"."""
        return Applied(self.changed, self.allowed, [], self.recipients).summary(self.action,
                                                                                self.done)

    def add(self, applied: Applied, rows: int) -> None:
        self.done += rows
        self.changed += applied.done
        self.allowed += applied.allowed
        for result in applied.results:
            if result.outcome not in ("released", "forwarded"):
                self.problem_count += 1
                if len(self.problems) < PROBLEMS_SHOWN:
                    self.problems.append(result)


# Filter names in a job's description, in the list's order.
FILTER_WORDS = (("domain", "domain"), ("since", "from"), ("until", "to"), ("sender", "sender"),
                ("rcpt", "recipient"), ("subject", "subject"), ("reason", "reason"),
                ("ref", "reference"), ("status", "status"))


def describe(filters: dict[str, str]) -> str:
    """The search in words, e.g. "sender spam@x.test, status held"."""
    parts = [f"{word} {filters[name]}" for name, word in FILTER_WORDS if filters.get(name)]
    return ", ".join(parts) or "every row"


class TooBusy(Exception):
    """Too many jobs running (the text says whose)."""


class Jobs:
    """This process's jobs, by id."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._jobs: dict[str, Job] = {}
        self._running: dict[str, "defer.Deferred[None]"] = {}

    def get(self, job_id: str, admin_id: int) -> Optional[Job]:
        """The job if ``admin_id`` started it, else None (as for no job)."""
        job = self._jobs.get(job_id)
        return job if job is not None and job.owner == admin_id else None

    def of(self, admin_id: int) -> list[Job]:
        """An admin's jobs, newest first."""
        return sorted((j for j in self._jobs.values() if j.owner == admin_id),
                      key=lambda j: j.started, reverse=True)

    def start(self, actions: Actions, in_thread: Callable[..., Any], admin_id: int,
              actor: str, origin: str, action: str, search: Search, total: int,
              scope: Optional[tuple[str, ...]], to: str, what: str, back: str) -> Job:
        """Start ``action`` on the first ``total`` rows matching
        ``search`` (already within ``scope``), in the background."""
        self._prune()
        running = [j for j in self._jobs.values() if j.running]
        if sum(j.owner == admin_id for j in running) >= RUNNING_PER_ADMIN:
            raise TooBusy(f"You have {RUNNING_PER_ADMIN} bulk actions running: wait for one "
                          f"to end.")
        if len(running) >= RUNNING_MAX:
            raise TooBusy(f"{RUNNING_MAX} bulk actions are running: try again in a while.")
        recipients = actions.check(action, to)
        job = Job(secrets.token_hex(12), admin_id, actor, action, what, total, self.clock(),
                  back, recipients=recipients)
        self._jobs[job.id] = job
        log.info("web console: {name} started job {job}: {action} on {total} row(s) ({what})",
                 name=actor, job=job.id, action=action, total=total, what=what)
        d = as_deferred(self._run(job, actions, in_thread, actor, origin, search, scope, to))
        if not d.called:
            self._running[job.id] = d
            d.addCallback(self._ended, job.id)  # _run fails never: it records failures
        return job

    def _ended(self, _: None, job_id: str) -> None:
        self._running.pop(job_id, None)

    def stop(self) -> "defer.Deferred[Any]":
        """The console stops: every running job ends after its batch in
        flight; fires when they have."""
        for job in self._jobs.values():
            job.cancel = True
        return defer.DeferredList(list(self._running.values()))

    async def _run(self, job: Job, actions: Actions, in_thread: Callable[..., Any], actor: str,
                   origin: str, search: Search, scope: Optional[tuple[str, ...]],
                   to: str) -> None:
        try:
            before: Optional[int] = None
            # Bounded: each pass handles at least one row or ends the job.
            for _ in range(job.total // BATCH + 2):
                if job.cancel or job.done >= job.total:
                    break
                page = replace(search, limit=min(BATCH, job.total - job.done),
                               before_id=before)
                rows: list[StoredRow] = await in_thread(_search, actions, page)
                if not rows:
                    break
                applied = await actions.apply(job.action, rows, scope, actor, origin, to)
                job.add(applied, len(rows))
                before = rows[-1].id
            job.state = CANCELLED if job.cancel and job.done < job.total else DONE
        except Exception as e:
            job.state, job.error = FAILED, " ".join(str(e).split())[:300] or type(e).__name__
            log.failure("web console: job {job} ({action}) failed", job=job.id,
                        action=job.action)
        finally:
            job.finished = self.clock()
            log.info("web console: job {job} of {name} {state}: {summary} in {seconds:.1f} s",
                     job=job.id, name=actor, state=job.state, summary=job.summary(),
                     seconds=job.finished - job.started)

    def _prune(self) -> None:
        now = self.clock()
        for job in list(self._jobs.values()):
            if not job.running and job.finished is not None and now - job.finished > KEEP:
                del self._jobs[job.id]
        finished = sorted((j for j in self._jobs.values() if not j.running),
                          key=lambda j: j.started)
        for job in finished[:max(0, len(self._jobs) - KEPT)]:
            del self._jobs[job.id]


def _search(actions: Actions, page: Search) -> list[StoredRow]:
    return actions.store.search(page)
