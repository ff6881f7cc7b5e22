"""The console's page for an administrator's own API tokens (issue 13):
``/tokens`` (list), ``/tokens/add`` (make one: shown once, on the answer
to the POST, never again), ``/tokens/ID/revoke``.

Floor 3 (``mppproxy/web/``).  Tokens are ``store/tokens.py``'s; each
administrator sees and revokes only their own (another's token id answers
404 as a missing one; superadmins revoke others' with ``mppproxy admin
token revoke``).  Made and revoked tokens are audited (``token-add``,
``token-revoke``) with ``web:<address>`` as origin.
"""
from __future__ import annotations

import re
from typing import Optional

from mppproxy.store.tokens import ApiToken, TokenError, Tokens
from mppproxy.web.app import Call, Console, Response, Route


def routes() -> list[Route]:
    """This module's routes, for the console's table (service.py)."""
    return [
        Route(b"GET", re.compile(r"/tokens"), tokens),
        Route(b"POST", re.compile(r"/tokens/add"), add),
        Route(b"POST", re.compile(r"/tokens/(\d{1,18})/revoke"), revoke),
    ]


async def tokens(console: Console, call: Call, message: str = "", error: str = "",
                 code: int = 200, made: Optional[ApiToken] = None,
                 token: str = "") -> Response:
    admin = call.admin
    assert admin is not None
    found: list[ApiToken] = await console.ctx.in_thread(Tokens(console.ctx.store).list,
                                                        admin.id)
    body = console._render("tokens.html", call, title="API tokens", tokens=found,
                           message=message, error=error, made=made, token=token,
                           now=console.ctx.now())
    return Response(code, body)


async def add(console: Console, call: Call) -> Response:
    admin = call.admin
    assert admin is not None
    days_text = call.field("expires", 20).strip()
    days: Optional[float] = None
    if days_text:
        try:
            days = float(days_text)
        except ValueError:
            return await tokens(console, call, error="expires: a number of days, or empty",
                                code=400)
    try:
        made, token = await console.ctx.in_thread(
            Tokens(console.ctx.store).add, admin, call.field("label", 200), days, admin.name,
            call.origin)
    except TokenError as e:
        return await tokens(console, call, error=str(e), code=400)
    return await tokens(console, call, made=made, token=token)


async def revoke(console: Console, call: Call) -> Response:
    admin = call.admin
    assert admin is not None
    token_id = int(call.match.group(1))
    done = await console.ctx.in_thread(Tokens(console.ctx.store).revoke, token_id, admin.name,
                                       call.origin, admin.id)
    if not done:
        return console._page(404, "Not found", "There is no such token.", call)
    return await tokens(console, call, message=f"Token {token_id} revoked.")
