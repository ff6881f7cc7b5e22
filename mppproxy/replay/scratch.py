"""In-memory stand-ins for the state database while a corpus is replayed.

Stage: the policy engine's services (``policy/services.py``) in ``mppproxy
replay``.  The replay must touch nothing live: no greylist triplet written,
no client put on the shared auto-blacklist, no rate counted where the edge
counts.  So the checks get these instead of the stores of ``mppproxy/db``:

* ``ScratchBlacklist``: starts empty; a spam trap or threshold that hits
  lists the client here, where the ``blacklist`` check (and, with
  ``--shared-state``, the later messages of the replay) find it;
* ``PassingGreylist``: every triplet passes.  A stored message was
  delivered, so its sender came back after the delay; greylisting only
  ever delays, so it cannot change a stored message's fate.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Optional

from mppproxy.db.blacklist import BlacklistEntry, normalise_network


class ScratchBlacklist:
    """The ``BlacklistStore`` protocol in a dict, timed by ``clock``."""

    def __init__(self, clock: Any):
        self.clock = clock
        self.entries: dict[str, BlacklistEntry] = {}

    async def lookup(self, client_ip: str) -> Optional[BlacklistEntry]:
        try:
            ip = ipaddress.ip_address(client_ip)
        except ValueError:
            return None
        now = float(self.clock.seconds())
        for entry in self.entries.values():
            if entry.expires > now and ip in ipaddress.ip_network(entry.network):
                return entry
        return None

    async def add(self, network: str, seconds: float, reason: str) -> None:
        key = normalise_network(network)
        expires = float(self.clock.seconds()) + seconds
        old = self.entries.get(key)
        if old is None or old.expires < expires:
            self.entries[key] = BlacklistEntry(key, reason, expires)


class PassingGreylist:
    """The ``GreylistStore`` protocol: every triplet may pass now."""

    async def check(self, client_net: str, sender: str, recipient: str,
                    settings: Any) -> Optional[float]:
        return None
