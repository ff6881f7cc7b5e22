"""What the three top services (proxy, policy server, scan service) share
about signals (reload on SIGHUP, stop on SIGTERM/SIGINT) and the set of
open listeners.

A signal handler only schedules work on the reactor thread
(``reactor.callFromThread``: a list append and a non-blocking write to the
reactor's waker) and does nothing else: no logging, no lock.  Python runs a
handler between two bytecodes of the main thread, wherever it was, so
anything that takes a lock there can wait for itself for ever (issue 15:
Twisted's own SIGTERM handler logs, and the log observer's lock was held).

A reload reads and validates the whole configuration off the reactor
thread (``reload_config``, the same loader twistd used at start), then
hands it to the service's ``apply``; a configuration with errors is logged
with every problem and the running one is kept.
"""
from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Optional, TypeVar

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from twisted.logger import ILogObserver

from mppproxy import sdnotify
from mppproxy.config.errors import ConfigError
from mppproxy.logsetup import Logger

log = Logger()

_K = TypeVar("_K", bound=Hashable)

if TYPE_CHECKING:
    class _Multi(MultiService):
        """``MultiService`` with the signatures of the methods the top
        services override and call (Twisted leaves them unannotated)."""

        def __init__(self) -> None: ...

        def privilegedStartService(self) -> None: ...

        def startService(self) -> None: ...

        def stopService(self) -> defer.Deferred[Any]: ...

        def setServiceParent(self, parent: Any) -> Any: ...
else:
    _Multi = MultiService


class TopService(_Multi):
    """The base of the top services: a ``MultiService`` that hands twistd
    its text log observer (``logsetup.text_log_observer``) as the
    application's ``ILogObserver`` component, which twistd's
    ``AppLogger.start`` uses in place of its own.  twistd makes the
    application, sets this service's parent, then starts logging, so the
    component is there in time."""

    log_observer: Any = None

    def setServiceParent(self, parent: Any) -> Any:
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)
        return super().setServiceParent(parent)


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

    def reload(self) -> defer.Deferred[None]:
        """SIGHUP: read the configuration again and swap it in."""
        if self.reload_config is None:
            return defer.succeed(None)
        log.info("SIGHUP: reloading configuration")
        # systemd hears of the reload and of its end, applied or refused
        # (mppproxy/sdnotify.py; nothing without $NOTIFY_SOCKET).
        notify = sdnotify.notifier()
        notify.reloading()

        def failed(f: Any) -> None:
            _reload_failed(f)
            notify.ready("reload failed: the running configuration is kept (see the log)")

        d = deferToThread(self.reload_config)
        # addCallback then the errback: a failure inside apply() is reported too.
        d.addCallback(self.apply)
        d.addCallbacks(lambda _: notify.ready("configuration reloaded"), failed)
        d.addCallback(lambda _: None)
        return d


def stop_on_signals(reactor: Any, stop: Callable[[], None]) -> None:
    """Make SIGTERM and SIGINT call ``stop`` on the reactor thread, in place
    of the handlers Twisted installs as the reactor starts (so call this
    once it runs: ``reactor.callWhenRunning``).  ``stop`` stops the reactor
    once (``workers.StopOnce``); the services' ``stopService`` then let the
    messages in flight finish within ``timeouts.shutdown_grace``."""
    def handler(number: int, frame: Any) -> None:
        # twistd ends the process with this signal once the reactor has
        # stopped (twisted.application.app: _exitWithSignal), as after
        # Twisted's own handler.
        reactor._exitSignal = number
        reactor.callFromThread(_stop_for_signal, stop, number)

    for name in ("SIGTERM", "SIGINT"):
        signal.signal(getattr(signal, name), handler)


def _stop_for_signal(stop: Callable[[], None], number: int) -> None:
    # On the reactor thread: logging is safe here.
    log.info("{signal} received, stopping", signal=signal.Signals(number).name)
    stop()


def _reload_failed(f: Any) -> None:
    if f.check(ConfigError):
        log.error("reload failed, keeping the running configuration:\n{errors}",
                  errors=str(f.value))
    else:
        log.failure("reload failed, keeping the running configuration", f)


def sync_listeners(ports: dict[_K, Any], wanted: Iterable[_K],
                   open_one: Callable[[_K], Any],
                   closed: Optional[Callable[[_K], None]] = None) -> None:
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
