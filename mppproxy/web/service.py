"""The web console as a twisted ``Service`` (issue 13): built by the
archive node's service and by the all-in-one proxy's (main process only
when ``workers`` > 1), from ``[web]`` (config/web.py).

Floor 3 (``mppproxy/web/``).  ``startService`` reads (or makes, once per
node) the cookie-signing key -- a small file, at start -- builds the site
and listens on ``web.listen`` (HTTPS with ``web.tls_cert_file``).  The
archive store is opened in the thread pool, its own engine beside the
writer's, so the console comes up while the database is down and says so
(503) until it can be reached; each request tries again.  The first open
makes the superadmin ``admin`` when there is no account at all and logs
its one-time password once, at warn level.

A listener that cannot be opened is logged (critical) and the node goes
on taking mail: the console is not worth losing mail for.
"""
from __future__ import annotations

from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.server import Site

from mppproxy._async import as_deferred
from mppproxy.archive.keys import KeyFileError, KeyRing, node_keys
from mppproxy.config.schema import ProxyConfig
from mppproxy.config.web import secret_path
from mppproxy.logsetup import Logger
from mppproxy.store.accounts import FIRST_ADMIN, Accounts
from mppproxy.store.store import ArchiveStore
from mppproxy.tlsconfig import load_server_certificate
from mppproxy.web.actions import Actions
from mppproxy.web.app import Console, ConsoleContext, ConsoleRequest
from mppproxy.web.csrf import Csrf
from mppproxy.web import configpage, digestpage
from mppproxy.web import jobpages
from mppproxy.web.digestrun import DigestScheduler
from mppproxy.web.pages import Pages
from mppproxy.web.secret import SecretFileError, load_or_create_secret
from mppproxy.web.sessions import SessionCodec
from mppproxy.web import listpages, tokenpages
from mppproxy.web.api import Api
from mppproxy.web.statedb import close_state

log = Logger()

# Seconds an idle HTTP connection is kept (twisted.web's HTTPFactory).
IDLE_TIMEOUT = 60


class WebConsole(Service):
    """``[web]`` of one node.  ``store``: a store to use instead of one
    built from ``[store]`` (tests: a table prefix on a shared MariaDB)."""

    def __init__(self, config: ProxyConfig, reactor: Any,
                 store: Optional[ArchiveStore] = None) -> None:
        self.config = config
        self.reactor = reactor
        self.store = store or ArchiveStore(config.store, config.data_dir)
        self._own_store = store is None
        self.ports: list[Any] = []
        self.site: Optional[Site] = None
        self.ctx: Optional[ConsoleContext] = None
        self._keys: Optional[KeyRing] = None
        self.digests: Optional[DigestScheduler] = None
        self._open = False
        self._opening = False
        self._stopped = False
        self._waiters: list[defer.Deferred[bool]] = []
        # Fires when the first listener listens (tests wait for it).
        self.listening: defer.Deferred[None] = defer.Deferred()

    # -- life ------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's is unannotated
        web = self.config.web
        path = secret_path(web, self.config.data_dir)
        try:
            secret = load_or_create_secret(path)
        except (OSError, SecretFileError) as e:
            log.critical("web console not started: web.secret_file: {error}", error=str(e))
            return
        tls: Any = None
        if web.tls_cert_file:
            tls, problem = load_server_certificate(web.tls_cert_file,
                                                   web.tls_key_file or web.tls_cert_file)
            if problem:
                log.critical("web console not started: web.tls_cert_file: {problem}",
                             problem=problem)
                return
        actions = Actions(lambda: self.config, self.store, self.reactor, lambda: self._keys)
        self.ctx = ConsoleContext(
            self.config, self.reactor, self.store,
            SessionCodec(secret, web.session_idle, web.session_lifetime), Csrf(secret), Pages(),
            actions, secure=tls is not None, ready=self.ready)
        console = Console(self.ctx)
        # The digest links' and the configuration pages (registered here:
        # their modules import app.py, which so need not import them).
        console.routes += [*digestpage.routes(), *configpage.routes()]
        console.routes += jobpages.routes()  # bulk jobs' pages (jobpages imports app.py)
        site = Site(console, timeout=IDLE_TIMEOUT)  # type: ignore[no-untyped-call]  # Twisted's is unannotated
        site.requestFactory = ConsoleRequest
        # The lists, state tables and API token pages, and the JSON API
        # (issue 13); their modules import app.py, which so need not
        # import them.
        site.resource.routes += [*listpages.routes(), *tokenpages.routes()]
        site.resource.api = Api(site.resource).serve
        site.displayTracebacks = False
        self.site = site
        factory: Any = site
        if tls is not None:
            factory = TLSMemoryBIOFactory(tls, False, factory)
        for desc in web.listen:
            self._listen(desc, factory, tls is not None)
        # User digests ([digest]): sent by the node that serves the console.
        self.digests = DigestScheduler(lambda: self.config, self.reactor, self.store, secret,
                                       self.ready)
        self.digests.start()
        # The store opens (and the first account is made) now, not at the
        # first request, so the one-time password is in the log at start.
        as_deferred(self.ready()).addErrback(
            lambda f: log.failure("web console: opening the archive store", f))

    # A process started by a restart (mppproxy/restart.py) sets this: the
    # previous process holds the console's port until it has handed over,
    # a moment later, so the listen is tried again once a second.
    listen_retries = 0

    def _listen(self, desc: str, factory: Any, secure: bool, attempt: int = 0) -> None:
        endpoint = serverFromString(self.reactor, desc)  # type: ignore[no-untyped-call]  # Twisted's is unannotated

        def listening(port: Any) -> None:
            self.ports.append(port)
            log.info("web console listening on {endpoint} ({scheme})", endpoint=desc,
                     scheme="https" if secure else "http")
            if not self.listening.called:
                self.listening.callback(None)

        def failed(failure: Any) -> None:
            if attempt < self.listen_retries and not self._stopped:
                self.reactor.callLater(1.0, self._listen, desc, factory, secure, attempt + 1)
                return
            log.critical("web console cannot listen on {endpoint}: {error}", endpoint=desc,
                         error=str(failure.value))

        endpoint.listen(factory).addCallbacks(listening, failed)

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's is unannotated
        self._stopped = True
        ds = [defer.maybeDeferred(port.stopListening) for port in self.ports]
        if self.digests is not None:
            ds.append(self.digests.stop())
        if self.ctx is not None:
            # Bulk jobs end after their batch in flight, before the store closes.
            ds.append(self.ctx.jobs.stop())
        if self.ctx is not None:
            # The lists and state pages' engine on the state database.
            ds.append(deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                        close_state, self.ctx))
        self.ports = []
        d: defer.Deferred[Any] = defer.DeferredList(ds)
        if self._own_store:
            d.addBoth(lambda _: as_deferred(self._close()))
        return d

    async def _close(self) -> None:
        if self._opening:
            # An open in the thread pool: let it end before closing.
            waiter: defer.Deferred[bool] = defer.Deferred()
            self._waiters.append(waiter)
            await waiter
        try:
            await deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.store.close)
        except Exception:
            log.failure("web console: closing the archive store")

    def apply(self, config: ProxyConfig) -> None:
        """A reload: release routes, page sizes and the like apply at
        once; listeners, TLS and the key file take a restart."""
        if config.web != self.config.web and (
                config.web.listen, config.web.tls_cert_file, config.web.tls_key_file,
                config.web.secret_file) != (self.config.web.listen, self.config.web.tls_cert_file,
                                            self.config.web.tls_key_file,
                                            self.config.web.secret_file):
            log.warn("web console: new listeners, TLS files or secret file take a restart; "
                     "the running ones are kept")
        self.config = config
        if self.ctx is not None:
            self.ctx.config = config

    # -- the store -------------------------------------------------------------

    async def ready(self) -> bool:
        """Whether the store is open, opening it if it is not (one attempt
        at a time; requests meanwhile wait for that one)."""
        if self._open:
            return True
        if self._stopped:
            return False
        if self._opening:
            waiter: defer.Deferred[bool] = defer.Deferred()
            self._waiters.append(waiter)
            return await waiter
        self._opening = True
        ok = False
        try:
            ok = await self._open_once()
        finally:
            self._opening = False
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(ok)
        return ok

    async def _open_once(self) -> bool:
        pool = self.reactor.getThreadPool()
        try:
            await deferToThreadPool(self.reactor, pool, self.store.open)
        except Exception as e:
            log.error("web console: the archive store at {url} cannot be opened: {error}",
                      url=self.store.display_url, error=" ".join(str(e).split())[:300])
            return False
        try:
            self._keys = await deferToThreadPool(self.reactor, pool, node_keys, self.config)
        except KeyFileError as e:
            # Releases go out unmarked (an edge on the route judges them
            # afresh); the console works all the same.
            log.error("web console: cannot read the archive keys ({error}): released "
                      "messages carry no X-MPP-Released mark", error="; ".join(e.errors))
        if not self._open and not self._stopped:
            self._open = True
            await self._first_admin()
        return not self._stopped

    async def _first_admin(self) -> None:
        accounts = Accounts(self.store)
        password = await deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                           accounts.ensure_first_admin, "mppproxy",
                                           "web:first-start")
        if password is None:
            return
        log.warn("web console: no account existed, so the superadmin {name!r} was made with "
                 "the one-time password {password} (shown this once): log in at {url} and "
                 "choose your own at once (the console asks), or set one with "
                 "'mppproxy admin passwd {name}'", name=FIRST_ADMIN, password=password,
                 url=self.url())

    def url(self) -> str:
        """The console's address for people (from the first listener)."""
        desc = self.config.web.listen[0]
        parts = desc.split(":")
        scheme = "https" if self.config.web.tls_cert_file else "http"
        host, port = "127.0.0.1", parts[1] if len(parts) > 1 else ""
        for option in parts[2:]:
            name, _, value = option.partition("=")
            if name == "interface" and value not in ("", "0.0.0.0", "::"):
                host = value
        return f"{scheme}://{host}:{port}/" if port.isdigit() else f"{scheme}://{desc}"
