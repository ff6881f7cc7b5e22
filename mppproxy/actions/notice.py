"""Notices: a short message we write ourselves and send through the backend
-- today, that a message carrying a virus was deleted (``actions/delete.py``).

Stage: an action's helper (``mppproxy/actions/``).  The text comes from a
Jinja2 template (``templates/notices/<name>.txt``, a site's own first;
``templates.NoticeRenderer``).  Each notice goes in its own SMTP
transaction over a fresh connection made by the project's SMTP client
(``smtp/client.py`` ``connect_backend``, the backend's own settings and
TLS), with the null reverse-path ``MAIL FROM:<>`` (RFC 5321 4.5.5: a
notification must not bounce back and start a loop) and
``Auto-Submitted: auto-generated`` (RFC 3834 5).

A notice is best effort: it cannot be sent (no backend, refused, the
timeout) -> a warning naming why; it never changes what happened to the
message, and never raises.
"""
from __future__ import annotations

import email.utils
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from typing import Any, Mapping, Optional, Sequence

import jinja2
from twisted.internet import defer

from mppproxy._async import as_deferred
from mppproxy.config.schema import BackendConfig
from mppproxy.logsetup import Logger
from mppproxy.smtp.client import BackendError, connect_backend
from mppproxy.templates import NoticeRenderer

log = Logger()

# When a template cannot be rendered (a site's typo): this, and the error logged.
_FALLBACK_SUBJECT = "Message deleted: virus found"
_FALLBACK_TEXT = ("A message addressed to {recipients} from <{sender}> was deleted by the mail "
                  "filter because it carried a virus ({virus}).\nReference: {queue_id}\n")


@dataclass(frozen=True)
class NoticeRoute:
    """How notices leave: the backend, our HELO name, its TLS context
    (``tlsconfig.backend_context``'s, or None)."""

    reactor: Any
    backend: BackendConfig
    helo: str
    tls: Any = None


def compose(renderer: NoticeRenderer, template: str, context: Mapping[str, Any], to: str,
            sender: str, hostname: str) -> bytes:
    """The notice to ``to`` as octets with CRLF line ends (RFC 5322)."""
    try:
        subject, text = renderer.render(template, context)
    except jinja2.TemplateError as e:
        log.error("notice template {template} failed: {error}; the built-in text is sent",
                  template=template, error=str(e))
        subject = _FALLBACK_SUBJECT
        text = _FALLBACK_TEXT.format(recipients=", ".join(context.get("recipients", [])),
                                     sender=context.get("sender", ""),
                                     virus=context.get("virus", "") or "unnamed",
                                     queue_id=context.get("queue_id", ""))
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject or _FALLBACK_SUBJECT
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=hostname or None)
    # RFC 3834 5: an automatic notice; autoresponders must not answer it.
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(text)
    return msg.as_bytes()


async def send(route: NoticeRoute, to: str, data: bytes, timeout: float) -> str:
    """Send one notice; what happened, for the log (never raises)."""
    d = as_deferred(_send(route, to, data))
    d.addTimeout(timeout, route.reactor)
    try:
        return await d
    except defer.TimeoutError:
        return f"not sent to <{to}>: no answer within {timeout:g}s"
    except BackendError as e:
        return f"not sent to <{to}>: {e.detail or e.reply}"
    except Exception as e:  # never lets a notice break the action
        log.failure("notice to {to} failed", to=to)
        return f"not sent to <{to}>: {e}"


async def _send(route: NoticeRoute, to: str, data: bytes) -> str:
    backend = route.backend
    proto = await connect_backend(route.reactor, backend, route.helo, route.tls)
    done = False
    try:
        # RFC 5321 4.5.5: notifications use the null reverse-path.
        reply = await proto.command(b"MAIL FROM:<>", backend.mail_timeout)
        if reply.code != 250:
            return f"not sent to <{to}>: MAIL refused: {reply}"
        reply = await proto.command(f"RCPT TO:<{to}>".encode("utf-8"), backend.rcpt_timeout)
        if reply.code not in (250, 251):
            return f"not sent to <{to}>: RCPT refused: {reply}"
        reply, _ = await proto.send_message(iter((data,)), backend)
        if reply.code != 250:
            return f"not sent to <{to}>: refused: {reply}"
        done = True
        return f"sent to <{to}>"
    finally:
        if done:
            proto.close()
        else:
            proto.abort()


async def send_all(route: Optional[NoticeRoute], recipients: Sequence[str],
                   build: Any, timeout: float) -> list[str]:
    """Each recipient's notice (``build(to) -> bytes``), one after the other;
    the outcomes for the log.  Without a route (no backend), none is sent."""
    if not recipients:
        return []
    if route is None:
        return [f"not sent to <{to}>: no backend to send notices through"
                for to in recipients]
    return [await send(route, to, build(to), timeout) for to in recipients]
