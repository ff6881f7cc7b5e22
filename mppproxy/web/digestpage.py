"""The page a digest's release link opens (issue 13): no login, bound to
its signed one-shot token (``digesttoken.py``).

Floor 3 (``mppproxy/web/``).  ``GET /digest/<token>`` only shows the
message's summary and a button: it never changes anything, because mail
scanners and link previews fetch links before a person clicks.  ``POST
/digest/<token>`` releases.  The form has no CSRF token of its own: the
secret it would carry is the token in its URL, which another site does not
have (and the console refuses a POST whose Origin is another site).

What a request may touch is the token's row *for the token's recipient*:
the store is searched by the row id AND the recipient (``Search.rcpt``,
in the SQL), and the recipient is checked again for an exact match, so a
token made for one recipient never reaches another recipient's row.  A
token that is not ours, or names a row that is gone or not the
recipient's, gets one page, "not valid", that says nothing more; an
expired or spent one says so.

A release goes through ``release.Releaser`` (claim, re-scan as
``[release]`` says, re-inject, audit) with the recipient as the actor and
``digest:<client address>`` as the origin.  The token is spent first (one
insert wins, ``store/digests.py``); a release that could not be done for
now (the route down, the re-scan unable to run) gives it back.
"""
from __future__ import annotations

import os
import re
from typing import Optional

from mppproxy.config.web import secret_path
from mppproxy.logsetup import Logger
from mppproxy.release import Outcome, Releaser
from mppproxy.store.digests import DigestLedger
from mppproxy.store.schema import HELD
from mppproxy.store.store import Search, StoredRow
from mppproxy.web.app import Call, Console, Response, Route
from mppproxy.web.digesttoken import DigestToken, TokenError, TokenSigner
from mppproxy.web.secret import load_or_create_secret

log = Logger()

# Signers by key file: the file is read once per process (as the session
# codec reads it at start); replacing it takes a restart.
_signers: dict[str, TokenSigner] = {}


async def signer_of(console: Console) -> TokenSigner:
    config = console.ctx.config
    path = os.path.abspath(secret_path(config.web, config.data_dir))
    signer = _signers.get(path)
    if signer is None:
        secret: bytes = await console.ctx.in_thread(load_or_create_secret, path)
        signer = _signers.setdefault(path, TokenSigner(secret))
    return signer


def _page(console: Console, code: int, title: str, message: str,
          row: Optional[StoredRow] = None, token: str = "",
          recipient: str = "") -> Response:
    body = console.ctx.pages.render("digest.html", admin=None, csrf="", title=title,
                                    message=message, row=row, token=token, recipient=recipient)
    # The token is in the URL: no referrer (the console sends no-referrer
    # everywhere) and no robots.
    return Response(code, body, headers={b"x-robots-tag": b"noindex"})


def _invalid(console: Console) -> Response:
    return _page(console, 404, "Link not valid",
                 "This link is not valid. Use the newest digest, or ask your mail administrator.")


Found = tuple[Optional[DigestToken], Optional[StoredRow], Optional[Response]]


async def _token_and_row(console: Console, call: Call) -> Found:
    """The token's content and its row, or the page that answers instead."""
    signer = await signer_of(console)
    try:
        token = signer.verify(call.match.group(1), console.ctx.now())
    except TokenError as e:
        if e.reason == "expired":
            return None, None, _page(console, 410, "Link expired", "This link has expired. "
                                     "The next digest has new links for what is still held.")
        return None, None, _invalid(console)
    ledger = DigestLedger(console.ctx.store)
    if await console.ctx.in_thread(ledger.spent, token.digest):
        return None, None, _page(console, 410, "Link already used",
                                 "This link has already been used; each link works once.")
    # Scope: the row id AND the recipient, in the query.
    rows: list[StoredRow] = await console.ctx.in_thread(
        console.ctx.store.search, Search(ids=(token.row_id,), rcpt=token.recipient,
                                         status=None, limit=1))
    row = rows[0] if rows else None
    if row is None or token.recipient.lower() not in {r.lower() for r in row.recipients}:
        return None, None, _invalid(console)
    return token, row, None


async def show(console: Console, call: Call) -> Response:
    """GET: the summary and the release button; nothing changes."""
    token, row, refusal = await _token_and_row(console, call)
    if refusal is not None:
        return refusal
    assert token is not None and row is not None
    if row.status != HELD:
        return _page(console, 410, "Not held any more",
                     f"This message is no longer held (it is {row.status}).", row,
                     recipient=token.recipient)
    return _page(console, 200, "Release a held message",
                 "This message to you was held. Release it only if you expected it.", row,
                 token=token.text, recipient=token.recipient)


async def release(console: Console, call: Call) -> Response:
    """POST: spend the token, release the row to its recipients."""
    token, row, refusal = await _token_and_row(console, call)
    if refusal is not None:
        return refusal
    assert token is not None and row is not None
    if row.status != HELD:
        return _page(console, 410, "Not held any more",
                     f"This message is no longer held (it is {row.status}).", row,
                     recipient=token.recipient)
    origin = f"digest:{call.client}"
    ledger = DigestLedger(console.ctx.store)
    if not await console.ctx.in_thread(ledger.spend, token.digest, row.id, token.recipient,
                                       float(token.expires), origin):
        return _page(console, 410, "Link already used",
                     "This link has already been used; each link works once.")
    releaser = Releaser(console.ctx.config, console.ctx.store, console.ctx.reactor,
                        console.ctx.actions.keys(), token.recipient, origin)
    try:
        result = await releaser.release(row)
    except BaseException:
        await console.ctx.in_thread(ledger.unspend, token.digest)
        raise
    finally:
        releaser.close()
    log.info("digest release of {ref} by {recipient} from {client}: {outcome}",
             ref=row.queue_id, recipient=token.recipient, client=call.client,
             outcome=str(result.outcome))
    if result.outcome is Outcome.RELEASED:
        return _page(console, 200, "Released", "The message is on its way to you.", row,
                     recipient=token.recipient)
    if result.outcome is Outcome.DEFERRED:
        await console.ctx.in_thread(ledger.unspend, token.digest)
        return _page(console, 503, "Not released yet", "The message could not be released "
                     "just now. Try the same link again later.", row, recipient=token.recipient)
    if result.outcome is Outcome.BUSY:
        return _page(console, 410, "Not held any more", "This message is no longer held.", row,
                     recipient=token.recipient)
    return _page(console, 409, "Not released", "This message cannot be released: it was "
                 "checked again and is still refused. Ask your mail administrator.", row,
                 recipient=token.recipient)


def routes() -> list[Route]:
    """The link's page: no login (the token is the credential)."""
    path = re.compile(r"/digest/([^/]{1,2000})")
    return [Route(b"GET", path, show, login=False), Route(b"POST", path, release, login=False)]
