"""User digests (issue 13): who gets one, what it says, and sending it.

Floor 3 (``mppproxy/web/``), beside the console whose pages the release
links open.  ``collect`` finds, per domain of ``digest.domains``, the held
(quarantined) rows and groups them by recipient -- each row lists the
recipients of its domain, and each of them gets it; ``compose`` renders
one digest from ``templates/digest/`` (text, and an HTML alternative with
autoescape on) with a signed one-shot link per message
(``digesttoken.py``); ``send_digests`` sends each through the project's
SMTP client, one message and one connection per recipient, to
``digest.relay`` or the release route of the recipient's domain.

The day's claims (``store/digests.py``) make a run safe to repeat: a
recipient claimed today is skipped, a failed send gives its claim back.
The node's scheduler (``digestrun.py``) and ``mppproxy digest send`` both
run ``send_digests``.
"""
from __future__ import annotations

import email.policy
import email.utils
import socket
import unicodedata
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from email.message import EmailMessage
from typing import Any, Callable, Optional, Sequence

import jinja2
from twisted.internet.threads import deferToThreadPool

from mppproxy.config.archive import split_host_port
from mppproxy.config.schema import BackendConfig, ProxyConfig
from mppproxy.logsetup import Logger
from mppproxy.release import route_for
from mppproxy.results import Disposition
from mppproxy.smtp.client import BackendError, connect_backend
from mppproxy.store.digests import DigestLedger
from mppproxy.store.schema import HELD
from mppproxy.store.store import ArchiveStore, Search, StoredRow
from mppproxy.templates import builtin_templates_dir
from mppproxy.tlsconfig import backend_context
from mppproxy.web.digesttoken import TokenSigner

log = Logger()

DAY = 86400.0
# Rows read per store call while collecting.
PAGE = 500
# Rows looked at per domain in one run: a bound, far above any real
# quarantine's day (the benchmark store holds 1,000,000 in all).
MAX_ROWS_PER_DOMAIN = 2_000_000
# Seconds for each SMTP step of a digest (RFC 5321 4.5.3.2's minutes are
# for a queue that retries; a digest that waits that long holds the run).
SEND_TIMEOUT = 60.0
SUBJECT_MAX = 200


@dataclass(frozen=True)
class Item:
    row_id: int
    received: str
    sender: str
    subject: str
    reason: str
    link: str


@dataclass
class Held:
    """One recipient's held rows as collected: the newest (up to
    max_items) and how many there are in all."""

    recipient: str
    domain: str
    rows: list[StoredRow] = field(default_factory=list)
    count: int = 0


@dataclass(frozen=True)
class Digest:
    recipient: str
    domain: str
    subject: str
    count: int
    items: tuple[Item, ...]
    message: bytes


@dataclass
class RunReport:
    """What one run did; ``digests``: the composed digests (all of them
    with ``dry_run``, else those sent)."""

    sent: int = 0
    failed: int = 0
    skipped: int = 0
    digests: list[Digest] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def day_of(now: float) -> str:
    """The digest day (UTC) of ``now``."""
    return datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%d")


def _printable(text: str) -> str:
    """Text from a held message (sender, subject) made harmless in a
    digest: control, format (bidi overrides) and separator characters
    become "?" -- in a text part they could rewrite what is shown."""
    return "".join(c if c == " " or unicodedata.category(c)[0] not in "CZ" else "?"
                   for c in text)


# -- who gets what ---------------------------------------------------------------


def collect(store: ArchiveStore, domains: Sequence[str], days: int, max_items: int,
            now: float) -> list[Held]:
    """Each recipient's held (quarantined) rows in ``domains`` (blocking),
    newest first, at most ``max_items`` kept per recipient with the full
    count; recipients in order of domain, then address."""
    out: list[Held] = []
    since = now - days * DAY if days > 0 else None
    for domain in sorted({d.lower().rstrip(".") for d in domains}):
        by_rcpt: dict[str, Held] = {}
        search = Search(domain=domain, status=(HELD,), since=since, limit=PAGE)
        seen = 0
        while seen < MAX_ROWS_PER_DOMAIN:
            rows = store.search(search)
            for row in rows:
                if row.disposition != str(Disposition.QUARANTINE):
                    continue  # an archive copy of mail that was delivered
                for rcpt in dict.fromkeys(r.lower() for r in row.recipients):
                    if rcpt.rpartition("@")[2] != domain:
                        continue
                    held = by_rcpt.setdefault(rcpt, Held(rcpt, domain))
                    held.count += 1
                    if len(held.rows) < max_items:
                        held.rows.append(row)
            seen += len(rows)
            if len(rows) < PAGE:
                break
            search = replace(search, before_id=rows[-1].id)
        out.extend(by_rcpt[r] for r in sorted(by_rcpt))
    return out


# -- what it says ----------------------------------------------------------------


class DigestWriter:
    """Renders digests from ``templates/digest/`` (text and HTML)."""

    def __init__(self, config: ProxyConfig, signer: TokenSigner) -> None:
        self.config = config
        self.signer = signer
        directory = builtin_templates_dir() / "digest"
        loader = jinja2.FileSystemLoader(str(directory))
        # HTML escaped; text not (it is not markup), but cleaned (_printable).
        self.env = jinja2.Environment(loader=loader, undefined=jinja2.StrictUndefined,
                                      autoescape=jinja2.select_autoescape(["html"]),
                                      trim_blocks=True, lstrip_blocks=True)
        self.subject_template = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(
            config.digest.subject)
        self.helo = config.smtp.hostname or socket.getfqdn()

    def compose(self, held: Held, now: float) -> Digest:
        digest = self.config.digest
        base = digest.base_url.rstrip("/")
        expires = now + digest.token_days * DAY
        items = tuple(
            Item(row.id,
                 datetime.fromtimestamp(row.received, timezone.utc).strftime("%Y-%m-%d %H:%M"),
                 _printable(row.sender or "<>"), _printable(row.subject or "(no subject)"),
                 _printable(row.reason or row.verdict),
                 f"{base}/digest/{self.signer.make(row.id, held.recipient, expires)}")
            for row in held.rows)
        values = {"recipient": held.recipient, "domain": held.domain, "count": held.count,
                  "shown": len(items)}
        subject = " ".join(_printable(self.subject_template.render(**values)).split())
        subject = subject[:SUBJECT_MAX] or "Quarantine digest"
        context = {**values, "items": items, "more": held.count - len(items),
                   "expires": datetime.fromtimestamp(expires, timezone.utc)
                   .strftime("%Y-%m-%d %H:%M UTC"), "token_days": digest.token_days,
                   "console": base}
        text = self.env.get_template("digest.txt").render(**context)
        html = self.env.get_template("digest.html").render(**context)
        message = EmailMessage(policy=email.policy.SMTP)
        message["From"] = digest.sender
        message["To"] = held.recipient
        message["Subject"] = subject
        message["Date"] = email.utils.formatdate(now, usegmt=True)
        message["Message-ID"] = email.utils.make_msgid("digest", digest.sender.rpartition("@")[2])
        # RFC 3834 5: an automatic message; vacation responders stay quiet.
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(text)
        message.add_alternative(html, subtype="html")
        return Digest(held.recipient, held.domain, subject, held.count, items,
                      message.as_bytes())


# -- sending ---------------------------------------------------------------------


def relay_for(config: ProxyConfig, domain: str) -> tuple[str, int]:
    """Where a digest for a recipient of ``domain`` is sent."""
    if config.digest.relay:
        host, port = split_host_port(config.digest.relay, 25)
        assert port is not None  # the loader checked it
        return host.strip("[]"), port
    return route_for(config, domain)


async def send_one(reactor: Any, config: ProxyConfig, helo: str, digest: Digest) -> str:
    """Send ``digest``; "" when the relay took it, else what went wrong."""
    try:
        host, port = relay_for(config, digest.domain)
    except ValueError as e:
        return str(e)
    backend = BackendConfig(
        host=host, port=port, tls="opportunistic", connect_timeout=SEND_TIMEOUT,
        greeting_timeout=SEND_TIMEOUT, mail_timeout=SEND_TIMEOUT, rcpt_timeout=SEND_TIMEOUT,
        data_init_timeout=SEND_TIMEOUT, data_block_timeout=SEND_TIMEOUT,
        data_done_timeout=SEND_TIMEOUT)
    where = f"{host}:{port}"
    try:
        proto = await connect_backend(reactor, backend, helo, backend_context(backend))
    except BackendError as e:
        return f"relay {where}: {e.detail}"
    try:
        for line in (f"MAIL FROM:<{config.digest.sender}>", f"RCPT TO:<{digest.recipient}>"):
            reply = await proto.command(line.encode("utf-8"), SEND_TIMEOUT)
            if reply.code not in (250, 251):
                return f"relay {where} refused {line.split(':')[0]}: {reply.code}"
        reply, _ = await proto.send_message(iter((digest.message,)), backend)
        if reply.code != 250:
            return f"relay {where} refused the message: {reply.code}"
        return ""
    except BackendError as e:
        return f"relay {where}: {e.detail}"
    finally:
        proto.close()


async def send_digests(config: ProxyConfig, store: ArchiveStore, reactor: Any,
                       signer: TokenSigner, now: float, domains: Optional[Sequence[str]] = None,
                       dry_run: bool = False, skip_claimed: bool = True,
                       progress: Callable[[str], None] = lambda line: None) -> RunReport:
    """One run over ``domains`` (default: ``digest.domains``; others are
    refused by the caller).  ``skip_claimed``: a recipient claimed today
    gets nothing (the scheduler); without it (``mppproxy digest send``)
    every recipient gets one and the sends are recorded all the same."""

    def in_thread(f: Callable[..., Any], *args: Any) -> Any:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    digest = config.digest
    ledger = DigestLedger(store)
    day = day_of(now)
    report = RunReport()
    held: list[Held] = await in_thread(collect, store, list(domains or digest.domains),
                                       digest.days, digest.max_items, now)
    writer = DigestWriter(config, signer)
    for one in held:
        composed = writer.compose(one, now)
        if dry_run:
            report.digests.append(composed)
            continue
        if skip_claimed:
            if not await in_thread(ledger.claim, day, one.recipient):
                report.skipped += 1
                continue
        problem = await send_one(reactor, config, writer.helo, composed)
        if problem:
            report.failed += 1
            report.errors.append(f"{one.recipient}: {problem}")
            log.warn("digest for {recipient} not sent: {problem}", recipient=one.recipient,
                     problem=problem)
            if skip_claimed:
                await in_thread(ledger.unclaim, day, one.recipient)
            continue
        if not skip_claimed:
            await in_thread(ledger.claim, day, one.recipient)
        report.sent += 1
        report.digests.append(composed)
        progress(f"sent {one.recipient}: {one.count} held")
    log.info("digests for {day}: {sent} sent, {failed} failed, {skipped} already sent",
             day=day, sent=report.sent, failed=report.failed, skipped=report.skipped)
    return report
