"""Session and Transaction: the plain facts every stage reads.

Only the session state machine (``server.py``) mutates them, as in aiosmtpd:
``Session`` lives as long as the connection, ``Transaction`` from MAIL to the
end of DATA or RSET.
"""
from __future__ import annotations

import base64
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from mppproxy.smtp.address import Address
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


@dataclass
class Transaction:
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
    # Facts later stages add (check results, backend reply, timings).
    facts: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None
