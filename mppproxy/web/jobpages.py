"""The pages of bulk jobs (``jobs.py``): a bulk action over more rows
than a page starts a job (``app.py``'s bulk handler) and redirects to
its page, which shows done/total and reloads itself every ``REFRESH``
seconds until the job ends -- with the ``Refresh`` header (HTML's declarative refresh, the
same as ``<meta http-equiv=refresh>``), so no JavaScript is needed.

Floor 3 (``mppproxy/web/``).  Handlers are ``(console, call) ->
Response`` as ``app.py``'s own, registered by ``service.py`` (this module
imports ``app.py``); a job of another admin answers exactly as a job
that does not exist (404).
"""
from __future__ import annotations

import re
from typing import Optional

from mppproxy.web.app import Call, Console, Response, Route, redirect
from mppproxy.web.jobs import Job

# Seconds between reloads of a running job's page.
REFRESH = 1


def routes() -> list[Route]:
    """This module's routes, for the console's table (service.py)."""
    return [
        Route(b"GET", re.compile(r"/jobs"), listing),
        Route(b"GET", re.compile(r"/jobs/([0-9a-f]{24})"), page),
        Route(b"POST", re.compile(r"/jobs/([0-9a-f]{24})/cancel"), cancel),
    ]


def _job(console: Console, call: Call) -> Optional[Job]:
    assert call.admin is not None
    return console.ctx.jobs.get(call.match.group(1), call.admin.id)


async def page(console: Console, call: Call) -> Response:
    """GET /jobs/ID: progress while running (reloading itself), then the
    summary."""
    job = _job(console, call)
    if job is None:
        return console._page(404, "Not found", "There is no such job.", call)
    body = console._render("job.html", call, title=_title(job), job=job,
                           elapsed=(job.finished or console.ctx.now()) - job.started)
    headers = {b"refresh": str(REFRESH).encode("ascii")} if job.running else {}
    return Response(200, body, headers=headers)


async def cancel(console: Console, call: Call) -> Response:
    """POST /jobs/ID/cancel: the job stops after the batch in flight."""
    job = _job(console, call)
    if job is None:
        return console._page(404, "Not found", "There is no such job.", call)
    job.cancel = True
    return redirect(f"/jobs/{job.id}")


async def listing(console: Console, call: Call) -> Response:
    """GET /jobs: this admin's jobs in this process, newest first."""
    assert call.admin is not None
    jobs = console.ctx.jobs.of(call.admin.id)
    return Response(200, console._render("jobs.html", call, title="Bulk actions", jobs=jobs))


def _title(job: Job) -> str:
    return f"{job.action.replace('-', ' ').capitalize()}: {job.state}"
