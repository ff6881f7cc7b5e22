"""What the three top services (proxy, policy server, scan service) share
about reload on SIGHUP and the set of open listeners.

A reload reads and validates the whole configuration off the reactor
thread (``reload_config``, the same loader twistd used at start), then
hands it to the service's ``apply``; a configuration with errors is logged
with every problem and the running one is kept.
"""
from __future__ import annotations

import signal
from typing import Any, Callable, Hashable, Iterable, Optional

from twisted.internet import defer
from twisted.internet.threads import deferToThread

from mppproxy.config.load import ConfigError
from mppproxy.logsetup import Logger

log = Logger()


class ReloadOnHup:
    """Mixed into a service with ``reactor``, ``reload_config`` (None: no
    reload) and ``apply(config)``."""

    reactor: Any
    reload_config: Optional[Callable[[], Any]]

    def apply(self, config: Any) -> None:
        raise NotImplementedError

    def reload_on_hup(self) -> None:
        """Make SIGHUP call ``reload`` on the reactor thread."""
        if self.reload_config is not None and hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))

    def reload(self) -> defer.Deferred:
        """SIGHUP: read the configuration again and swap it in."""
        if self.reload_config is None:
            return defer.succeed(None)
        log.info("SIGHUP: reloading configuration")
        d = deferToThread(self.reload_config)
        # addCallback then addErrback: a failure inside apply() is reported too.
        d.addCallback(self.apply)
        d.addErrback(_reload_failed)
        return d


def _reload_failed(f: Any) -> None:
    if f.check(ConfigError):
        log.error("reload failed, keeping the running configuration:\n{errors}",
                  errors=str(f.value))
    else:
        log.failure("reload failed, keeping the running configuration", f)


def sync_listeners(ports: dict[Hashable, Any], wanted: Iterable[Hashable],
                   open_one: Callable[[Any], Any],
                   closed: Optional[Callable[[Any], None]] = None) -> None:
    """Close the listeners in ``ports`` a new configuration no longer
    names (``closed(key)`` after each) and open those it adds."""
    wanted = list(wanted)
    for key in set(ports) - set(wanted):
        ports.pop(key).stopListening()
        if closed is not None:
            closed(key)
    for key in wanted:
        if key not in ports:
            open_one(key)
