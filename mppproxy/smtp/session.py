"""Session and Transaction: the plain facts every stage reads.

Only the session state machine (``server.py``) mutates them, as in aiosmtpd:
``Session`` lives as long as the connection, ``Transaction`` from MAIL to the
end of DATA or RSET.  The one exception is the ``Transaction``'s typed record
of what later stages found (the engines' results, what was stripped or
added, where it went, what was refused): the handler fills it in and the
transaction log reads it (docs/design.md promise 5).
"""
from __future__ import annotations

import base64
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from mppproxy.results import TransactionRecord
from mppproxy.smtp.address import Address
from mppproxy.smtp.replies import Reply
from mppproxy.spool.spool import Spool


# A random prefix per process and a counter: unique across restarts and
# worker processes, and cheap (os.urandom per id cost a syscall each).
_ID_PREFIX = base64.b32encode(os.urandom(5)).decode("ascii")
_id_counter = itertools.count(1)


def new_id() -> str:
    """A short unique identifier for logs and the Received: header."""
    return f"{_ID_PREFIX}{next(_id_counter):07X}"


@dataclass
class Session:
    peer_host: str
    peer_port: int
    local_host: str
    local_port: int
    trusted: bool = False
    id: str = field(default_factory=new_id)
    started: float = field(default_factory=time.time)
    helo: Optional[str] = None
    esmtp: bool = False
    tls: bool = False
    tls_cipher: Optional[str] = None
    transactions: int = 0
    errors: int = 0
    # The upstream MTA's address when peer_host and helo are the facts it
    # forwarded (XFORWARD for this transaction, XCLIENT for the session;
    # smtp/forwarded.py); None: they are the connection's own.
    via: Optional[str] = None
    # The upstream MTA did relay control for this transaction (XFORWARD
    # from smtp.xforward_hosts): the proxy does not repeat it.
    relay_checked: bool = False


class StageRecord:
    """What later stages record on a ``Transaction``, typed, for its one
    log line (``txlog.py``; docs/design.md promise 5).

    Class-level defaults, not dataclass fields: most transactions set few
    of them, so making a ``Transaction`` (one per MAIL) costs nothing for
    them; a stage that writes one gives that transaction its own value.
    """

    # The pre-DATA checks' and the scanners' results and the policy that
    # judges the message; None while no policy or scan has run.
    record: Optional[TransactionRecord] = None
    # time.monotonic() at MAIL, for the log line's total_ms.
    t_mail: Optional[float] = None
    # Header fields removed at the edge (docs/design.md promise 7).
    stripped_headers: int = 0
    # "added", "skipped: why", or None when no disclaimer table matched.
    disclaimer: Optional[str] = None
    # The Maildir files written (local delivery or quarantine).
    delivered_to: Optional[list[str]] = None
    # (recipient, what decided, reply) per recipient refused before the
    # backend heard of it (relay control or a policy check); None: none.
    refusals: Optional[list[tuple[str, str, Reply]]] = None
    # Scanner -> "kind: reason" of each scanner not consulted after DATA.
    scan_skipped: Optional[dict[str, str]] = None
    # The archive queue item that holds this message or its archive copy
    # (actions/quarantine.py), for the log line; None when none was kept.
    archive_item: Optional[str] = None


@dataclass
class Transaction(StageRecord):
    sender: Address
    mail_params: dict[str, Optional[str]]
    id: str = field(default_factory=new_id)
    started: float = field(default_factory=time.time)
    recipients: list[Address] = field(default_factory=list)
    rcpt_params: list[dict[str, Optional[str]]] = field(default_factory=list)
    # Every recipient asked for and the reply it got, for the log line.
    rcpt_log: list[tuple[str, str]] = field(default_factory=list)
    spool: Optional[Spool] = None
    size: int = 0
    smtputf8: bool = False
    body_8bit: bool = False

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None
