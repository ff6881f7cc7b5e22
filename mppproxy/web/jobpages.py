"""The pages of bulk jobs (``jobs.py``): a bulk action over more rows
than a page starts a job and redirects to its page, which shows
done/total and reloads itself every ``REFRESH`` seconds until the job
ends -- with the ``Refresh`` header (HTML's declarative refresh, the
same as ``<meta http-equiv=refresh>``), so no JavaScript is needed.

Floor 3 (``mppproxy/web/``).  Handlers are ``(console, call) ->
Response`` as ``app.py``'s own; a job of another admin answers exactly
as a job that does not exist (404).
"""
from __future__ import annotations

from typing import Optional

from mppproxy.store.store import Search
from mppproxy.web.actions import ActionError
from mppproxy.web.app import Call, Console, Response, redirect
from mppproxy.web.jobs import Job, TooBusy

# Seconds between reloads of a running job's page.
REFRESH = 1

# Filter names in the job's description, in the list's order.
FILTER_WORDS = (("domain", "domain"), ("since", "from"), ("until", "to"), ("sender", "sender"),
                ("rcpt", "recipient"), ("subject", "subject"), ("reason", "reason"),
                ("ref", "reference"), ("status", "status"))


def describe(filters: dict[str, str]) -> str:
    """The search in words, e.g. "sender spam@x.test, status held"."""
    parts = [f"{word} {filters[name]}" for name, word in FILTER_WORDS if filters.get(name)]
    return ", ".join(parts) or "every row"


async def start(console: Console, call: Call, search: Search, matching: int,
                filters: dict[str, str], back: str) -> Response:
    """Start the bulk action of ``call``'s form on the ``matching`` rows of
    ``search`` and send the browser to its page (303)."""
    admin = call.admin
    assert admin is not None
    ctx = console.ctx
    try:
        job = ctx.jobs.start(ctx.actions, ctx.in_thread, admin.id, admin.name, call.origin,
                             call.field("action", 32), search, matching, call.scope,
                             call.field("to", 2000), describe(filters), back)
    except ActionError as e:
        return console._page(400, "Cannot do that", str(e), call)
    except TooBusy as e:
        return console._page(429, "Busy", str(e), call, {b"retry-after": b"10"})
    return redirect(f"/jobs/{job.id}")


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
