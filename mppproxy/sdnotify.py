"""systemd's readiness protocol (``sd_notify(3)``), for ``Type=notify``
units (contrib/systemd/mppproxy.service).

Floor 0 (ground): the standard library only.  The protocol is a few lines,
so it is written here rather than taken from a library: newline-separated
``KEY=VALUE`` fields in one datagram to the ``AF_UNIX`` socket named by
``$NOTIFY_SOCKET``, a path or, starting with ``@``, an abstract socket
(Linux).  Without ``$NOTIFY_SOCKET`` (not started by systemd, or a unit of
another type) nothing is sent.

What mppproxy reports (``tap.py``, ``reloading.py``):

* ``READY=1`` once the reactor runs, when the service has bound and
  listens on its sockets (``startService`` opened them before the reactor
  started); ``STATUS=`` says what runs;
* ``RELOADING=1`` (with ``MONOTONIC_USEC``, as ``Type=notify-reload`` of
  systemd 253 wants) when SIGHUP starts a reload, ``READY=1`` when it has
  ended, applied or refused (the running configuration then stays);
* ``STOPPING=1`` when the stop begins, before the messages in flight are
  let finish (``timeouts.shutdown_grace``);
* ``MAINPID=`` of the new process when a restart hands over to it
  (``hand_over``; the new process reports ``READY`` to the old one, which
  tells systemd).

Only the main process speaks: ``take_from_environment`` removes
``$NOTIFY_SOCKET`` from the environment, so worker processes, command
scanners and anything else started later do not inherit it (systemd's
``NotifyAccess=main`` would refuse them, with a log line each).

A send never blocks the reactor (the socket is non-blocking) and never
raises: a datagram systemd cannot take is logged and dropped.
"""
from __future__ import annotations

import os
import socket
import time
from typing import MutableMapping, Optional

from mppproxy.logsetup import Logger

log = Logger()

ENV = "NOTIFY_SOCKET"


class Notifier:
    """Sends notifications to one socket address (None: sends nothing)."""

    def __init__(self, address: Optional[str]):
        self.address = address or None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def _target(self) -> Optional[str | bytes]:
        address = self.address
        if address is None:
            return None
        if address.startswith("@"):
            # An abstract socket: its name starts with a NUL byte.
            return b"\0" + address[1:].encode("utf-8")
        if address.startswith("/"):
            return address
        return None  # vsock: and others: not for a proxy on this host

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``KEY=VALUE`` each) as one datagram; True when
        it was sent."""
        if self.address is None:
            return False
        target = self._target()
        if target is None:
            if not self._failed:
                log.warn("NOTIFY_SOCKET={address}: not a path or an abstract socket; "
                         "nothing is sent to systemd", address=self.address)
                self._failed = True
            return False
        data = "\n".join(fields).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(data, target)
        except OSError as e:
            log.warn("systemd notification {fields} not sent to {address}: {error}",
                     fields=" ".join(f.split("=", 1)[0] for f in fields),
                     address=self.address, error=e.strerror or str(e))
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """The service is up (or back after a reload)."""
        return self.notify("READY=1", *_status(status))

    def reloading(self, status: str = "reloading the configuration") -> bool:
        """A reload begins (``READY=1`` ends it)."""
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}",
                           *_status(status))

    def stopping(self, status: str = "") -> bool:
        """The stop begins."""
        return self.notify("STOPPING=1", *_status(status))

    def status(self, status: str) -> bool:
        """A line for ``systemctl status``."""
        return self.notify(*_status(status))

    def hand_over(self, pid: int, status: str = "") -> bool:
        """Process ``pid`` is the service's main process from now on (a
        restart, mppproxy/restart.py): ``MAINPID=`` with ``READY=1``, sent
        while systemd still takes this process for the main one
        (``NotifyAccess=main`` lets it; the new process is in the unit's
        control group, so systemd takes it).  This notifier sends nothing
        afterwards: systemd would refuse the old process's lines."""
        sent = self.notify(f"MAINPID={pid}", "READY=1", *_status(status))
        self.address = None
        return sent


def _status(text: str) -> list[str]:
    # One line: a newline would start another field.
    return [f"STATUS={' '.join(text.split())}"] if text else []


# The process's notifier: none until ``take_from_environment``.
_notifier = Notifier(None)


def take_from_environment(environ: Optional[MutableMapping[str, str]] = None) -> Notifier:
    """The notifier of ``$NOTIFY_SOCKET`` (none when unset), which becomes
    the process's (``notifier()``); the variable is removed from the
    environment so that no child process inherits it."""
    global _notifier
    env = os.environ if environ is None else environ
    _notifier = Notifier(env.pop(ENV, None))
    return _notifier


def notifier() -> Notifier:
    """The process's notifier (one that sends nothing unless
    ``take_from_environment`` found a socket)."""
    return _notifier
