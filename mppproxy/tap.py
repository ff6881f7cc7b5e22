"""``twistd mppproxy``: options and ``makeService`` (the twistd entry).

Options follow ``twistd web``: the common case needs no config file, and
options given on the command line override the file.  A bad configuration
prints each problem with its key and exits non-zero, never a traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Optional

from twisted.python import usage

from mppproxy.config.errors import ConfigError
from mppproxy.config.load import check_files, load, source_name
from mppproxy.config.schema import IMPLEMENTED_MODES

MPP_HOME_ENV = "MPP_HOME"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("mppproxy: a transparent SMTP filtering proxy.  With no options it runs "
                "all-in-one on 127.0.0.1:2525 and delivers into Maildirs under "
                "./mppproxy-data (or $MPP_HOME).")
    optParameters = [
        ["config", "c", None, "TOML configuration file."],
        ["config-command", None, None, "Command whose standard output is the TOML configuration."],
        # Only the modes this version runs (the loader refuses the others,
        # naming the ones there are): --help promises no more.
        ["mode", "m", None, f"{' | '.join(IMPLEMENTED_MODES)} (default {IMPLEMENTED_MODES[0]}); "
                            "archive is the central archive node, which needs "
                            "[archive_node] key_file."],
        ["backend", "b", None, "Backend MTA as HOST:PORT ([v6addr]:PORT for IPv6); relay in lockstep to it."],
        ["data-dir", "d", None, "Data directory (default ./mppproxy-data or $MPP_HOME)."],
        ["workers", "w", None, "Processes sharing the listening sockets.", int],
        ["worker-fds", None, None, "(internal) listening descriptors inherited from the main process."],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Twisted's usage.Options is unannotated
        self["listen"] = []
        self["relay-domain"] = []
        self["trusted-network"] = []
        self.config: Any = None
        self.raw_args: list[str] = []

    def opt_listen(self, value: str) -> None:
        """Endpoint to listen on, e.g. tcp:25:interface=0.0.0.0 (repeatable; modes policy, scan, archive: that mode's listener)."""
        self["listen"].append(value)

    def opt_relay_domain(self, value: str) -> None:
        """Domain to accept mail for from any client (repeatable)."""
        self["relay-domain"].append(value)

    def opt_trusted_network(self, value: str) -> None:
        """Client network allowed to relay anywhere, CIDR (repeatable; replaces the default loopback)."""
        self["trusted-network"].append(value)

    def opt_version(self) -> None:
        """Print mppproxy's, Python's and Twisted's versions and exit."""
        from mppproxy.cli import version_text

        print(version_text())
        raise SystemExit(0)

    def parseOptions(self, options: Optional[list[str]] = None) -> None:
        self.raw_args = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)  # type: ignore[no-untyped-call]  # Twisted's usage.Options is unannotated

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self["mode"]:
            out["mode"] = self["mode"]
        if self["listen"]:
            out["listen"] = list(self["listen"])
        if self["relay-domain"]:
            out["relay_domains"] = list(self["relay-domain"])
        if self["trusted-network"]:
            out["trusted_networks"] = list(self["trusted-network"])
        if self["workers"] is not None:
            out["workers"] = self["workers"]
        if self["backend"]:
            out["backend"] = parse_host_port(self["backend"])
        return out

    def load_config(self) -> Any:
        overrides = self.overrides()
        data_dir = self["data-dir"] or os.environ.get(MPP_HOME_ENV)
        config = load(self["config"], self["config-command"], overrides)
        if data_dir and (self["data-dir"] or config.data_dir == "./mppproxy-data"):
            from dataclasses import replace
            config = replace(config, data_dir=data_dir)
        if config.mode == "policy" and self["listen"]:
            # The policy server listens on policyd.listen, not the SMTP listeners.
            from dataclasses import replace
            config = replace(config, policyd=replace(config.policyd, listen=tuple(self["listen"])))
        if config.mode == "scan" and self["listen"]:
            # The scan service's SMTP listeners are scanservice.smtp_listen.
            from dataclasses import replace
            config = replace(config, scanservice=replace(config.scanservice,
                                                         smtp_listen=tuple(self["listen"])))
        if config.mode == "archive" and self["listen"]:
            # The archive node's receiver listens on archive_node.listen.
            from dataclasses import replace
            config = replace(config, archive_node=replace(config.archive_node,
                                                          listen=tuple(self["listen"])))
        check_files(config, source_name(self["config"], self["config-command"]))
        return config

    def postOptions(self) -> None:
        try:
            self.config = self.load_config()
        except ConfigError as e:
            print("mppproxy: the configuration has errors:", file=sys.stderr)
            for line in e.errors:
                print(f"  {line}", file=sys.stderr)
            # SystemExit leaves twistd with status 1 and no traceback.
            raise SystemExit(1)


def parse_host_port(value: str) -> dict[str, Any]:
    """``host:port`` or ``[v6]:port`` into the backend table."""
    if value.startswith(":"):
        raise ConfigError([f"--backend: {value!r} has no host; give HOST:PORT"])
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = value.rpartition(":")
        if not host:
            host, port_text = value, ""
    if not host:
        raise ConfigError([f"--backend: {value!r} is not HOST:PORT"])
    out: dict[str, Any] = {"host": host}
    if port_text:
        if not port_text.isdigit():
            raise ConfigError([f"--backend: {value!r}: port must be a number"])
        out["port"] = int(port_text)
    return out


def _notify_systemd(reactor: Any, config: Any, ready_fd: Optional[int] = None) -> None:
    """Under systemd (``Type=notify``, $NOTIFY_SOCKET set): READY=1 once
    the reactor runs with the listeners open, STOPPING=1 when the stop
    begins (mppproxy/sdnotify.py; reloads: reloading.py).  The variable is
    taken out of the environment first, so workers and command scanners,
    started later, do not inherit it.  Started by a restart (``ready_fd``,
    mppproxy/restart.py): readiness goes to the previous process, which
    makes this one the unit's main process with MAINPID= and READY=1."""
    from mppproxy import sdnotify
    from mppproxy.cli import summary
    from mppproxy.listeners import start_failed
    from mppproxy.restart import report_ready

    notify = sdnotify.take_from_environment()
    if not notify.enabled and ready_fd is None:
        return
    status = f"{config.mode}: {summary(config)}"
    if config.workers > 1:
        status += f", {config.workers} workers"

    def ready() -> None:
        # A listener that failed has scheduled the stop (exit 1) at the
        # reactor's start, before this: systemd then sees a failed start,
        # not a ready service that stops at once.
        if start_failed():
            return
        if ready_fd is not None:
            report_ready(ready_fd, status)
        else:
            notify.ready(status)

    # startService opened the listeners before the reactor started; a turn
    # later the ones that failed have said so.
    reactor.callWhenRunning(reactor.callLater, 0, ready)
    if not notify.enabled:
        return
    reactor.addSystemEventTrigger(
        "before", "shutdown", notify.stopping,
        f"stopping: letting messages in flight finish (up to {config.timeouts.shutdown_grace:g} s)")


def makeService(options: Options) -> Any:
    from twisted.internet import reactor

    from mppproxy.gctune import tune_for_server
    from mppproxy.logsetup import reopen_on_usr1, start_json_log, text_log_observer
    from mppproxy.reloading import stop_on_signals
    from mppproxy.listeners import exit_code_hook
    from mppproxy.restart import refuse_usr2, take_inherited, take_ready_fd
    from mppproxy.workers import StopOnce, parse_worker_fds

    config = options.config
    start_json_log(config)
    # Started by a restart (mppproxy/restart.py): the previous process's
    # listening sockets, and the pipe that tells it this one serves.
    inherited_listeners = take_inherited()
    _notify_systemd(reactor, config, take_ready_fd())
    # twistd's text log, batched (logsetup.py); the top service hands it to
    # twistd (reloading.TopService).  None: twistd keeps its own.
    text_log = text_log_observer(getattr(options, "parent", None), reactor)
    # SIGUSR1 reopens the log files, for logrotate (docs/operations.md).
    reactor.callWhenRunning(reopen_on_usr1, reactor)
    # After start-up, before the first request (mppproxy/gctune.py).
    reactor.callWhenRunning(tune_for_server)
    exit_code_hook(reactor)
    # After Twisted's own handlers, which log inside the signal handler
    # (mppproxy/reloading.py says why that can hang a stop).
    reactor.callWhenRunning(stop_on_signals, reactor, StopOnce(reactor))
    # SIGUSR2 restarts the proxy (its service installs the handler); other
    # modes log it rather than die of it.
    refuse_usr2(reactor, config.mode)
    # Workers (``workers`` > 1) run this same command line with the main
    # process's listening descriptors added (mppproxy/workers.py).
    inherited = parse_worker_fds(options["worker-fds"] or "")
    worker_argv = list(options.raw_args)
    service = _top_service(config, reactor, options, inherited, worker_argv,
                           inherited_listeners)
    service.log_observer = text_log
    return service


def _top_service(config: Any, reactor: Any, options: Options, inherited: Any,
                 worker_argv: list[str], inherited_listeners: Any = None) -> Any:
    """The top service of the configured mode."""
    if inherited_listeners and config.mode not in ("all-in-one", "edge"):
        from mppproxy.logsetup import Logger

        Logger().critical("mode {mode} takes no listening sockets from a restart: closed; "
                          "it binds its own", mode=config.mode)
        for sockets in inherited_listeners.values():
            for sock in sockets:
                sock.close()
    if config.mode == "policy":
        from mppproxy.policyd.service import PolicyServerService

        return PolicyServerService(config, reactor, reload_config=options.load_config,
                                   inherited_fds=inherited, worker_argv=worker_argv)
    if config.mode == "scan":
        from mppproxy.scanservice.service import ScanService

        return ScanService(config, reactor, reload_config=options.load_config)
    if config.mode == "archive":
        from mppproxy.archivenode.service import ArchiveService

        return ArchiveService(config, reactor, reload_config=options.load_config)
    from mppproxy.service import ProxyService

    return ProxyService(config, reactor, reload_config=options.load_config,
                        inherited_fds=inherited, worker_argv=worker_argv,
                        inherited=inherited_listeners)
