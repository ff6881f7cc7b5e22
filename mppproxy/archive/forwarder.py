"""The forwarder: the edge's queued copies to the archive node over ESMTP
(issue 12, "Forwarder").

Stage: archive (floor 2), after the actions: the hold action and the
archive copies fill the durable queue (``copies.py``); the forwarder empties
it.  For each item it claims (in the thread pool) it signs the item's state
with the keys of the moment (``state.sign``: the X-MPP-* fields over the
state and a digest of the body), puts the fields on top of the queued
message and sends it with the project's own SMTP client
(``smtp/client.py``): ``MAIL FROM:<>``, because a copy must never bounce to
the original sender (RFC 5321 4.5.5 and 6.1: a null reverse-path for
messages that must not cause notifications), and ``RCPT TO:<...@archive.invalid>``
(RFC 2606: a name that can never route anywhere else; the node ignores the
recipient, the signed state carries the envelope).

What a reply does to the item:

* ``250`` to the end of DATA: ``finish`` (the copy is the node's now).
* a 4xx, a timeout, a lost or refused connection: ``retry``, after
  ``archive.retry_base`` seconds doubling up to ``archive.retry_max``; past
  ``archive.max_age`` the queue moves it to ``bad/`` (its limits are set
  where it is opened: ``copies.open_queue``).
* a 5xx to the end of DATA (the node refused this copy: bad signature,
  digest, state): ``bad`` with the reply as the reason, logged.
* a 5xx to MAIL, RCPT or DATA: the node refuses copies from us whatever
  they hold (we are not in its edge list, no client certificate): no fault
  of the item, so it is retried, and an error line says what to fix.

``archive.connections`` senders each keep one connection to the node
(``RSET`` between copies; closed after ``IDLE_CLOSE`` seconds without
work, so a connection a firewall dropped silently is not found at the next
copy by a reply timeout).  An empty queue is waited on: ``wake`` (the hold
action calls it after each enqueue) or a poll every ``POLL_INTERVAL``
(worker processes enqueue too, and their wake-ups do not reach this one).
While the node cannot be reached the senders pause between tries (doubling
from ``retry_base`` up to ``retry_max``) instead of failing every queued
item in turn; mail keeps flowing meanwhile, as holds need only the queue.
Every ``archive.stats_interval`` seconds the queue's depth and oldest age
are logged (``DurableQueue.log_stats``, in the thread pool).

``stop`` claims nothing more; copies in flight finish, or, after the
shutdown grace, are cut and handed back uncounted (``DurableQueue.release``:
a stop is no failure of the item).  A copy cut after its final dot may have
been stored by the node: sent again later, it stores nothing twice (the
node is idempotent on node name + queue id).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Generator, Iterable, Optional, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mppproxy._async import as_deferred
from mppproxy._transitions import StateEnum, TransitionError
from mppproxy.archive.copies import state_of
from mppproxy.archive.keys import KeyRing
from mppproxy.archive.state import BodyDigest, CopyState, render, sign
from mppproxy.config.archive import ArchiveConfig, split_host_port
from mppproxy.config.schema import BackendConfig
from mppproxy.logsetup import Logger
from mppproxy.smtp.client import BackendError, BackendProtocol, ClientState, connect_backend
from mppproxy.smtp.replies import Reply
from mppproxy.spool.queue import DurableQueue, QueueItem
from mppproxy.tlsconfig import client_context

log = Logger()

# Seconds between looks at an empty queue (other processes enqueue too).
POLL_INTERVAL = 1.0
# Seconds an idle connection to the node is kept.
IDLE_CLOSE = 30.0
# The archive node's port when archive.node names none: the default of
# archive_node.listen.
NODE_PORT = 10025
# RFC 2606 section 2: .invalid never resolves, so a copy can reach nobody
# but the node it was handed to.
ARCHIVE_RCPT = b"archive@archive.invalid"
# The shutdown grace when the service gives none (timeouts.shutdown_grace's default).
DEFAULT_GRACE = 30.0


class ForwarderState(StateEnum):
    """Where the forwarder stands (``Forwarder.state``).

    - ``STOPPED``: built, or stopped; no sender runs.  ``start`` moves it to
      RUNNING.
    - ``RUNNING``: the senders claim and send; the stats line is logged.
      ``stop`` moves it to STOPPING.
    - ``STOPPING``: nothing more is claimed; copies in flight finish, or are
      cut at the grace and handed back.  When every sender has ended it is
      STOPPED again (a stopped forwarder may be started again).
    """

    STOPPED = "stopped"
    RUNNING = "running"
    STOPPING = "stopping"


_MOVES: dict[ForwarderState, frozenset[ForwarderState]] = {
    ForwarderState.STOPPED: frozenset({ForwarderState.RUNNING}),
    ForwarderState.RUNNING: frozenset({ForwarderState.STOPPING}),
    ForwarderState.STOPPING: frozenset({ForwarderState.STOPPED}),
}
_RUNNING = ForwarderState.RUNNING


def node_backend_config(config: ArchiveConfig, helo_name: str) -> BackendConfig:
    """The client settings for the archive node: host and port of
    archive.node, its TLS keys, and archive.connect_timeout /
    archive.reply_timeout for every wait."""
    host, port = split_host_port(config.node, NODE_PORT)
    wait = config.reply_timeout
    return BackendConfig(host=host, port=port or NODE_PORT, tls=config.tls,
                         tls_verify=config.tls_verify, tls_ca_file=config.tls_ca_file,
                         helo_name=helo_name, pool_size=0,
                         connect_timeout=config.connect_timeout, greeting_timeout=wait,
                         mail_timeout=wait, rcpt_timeout=wait, data_init_timeout=wait,
                         data_block_timeout=wait, data_done_timeout=wait)


def node_tls_context(config: ArchiveConfig) -> Optional[Any]:
    """The STARTTLS client context for the node (None: archive.tls "none");
    reads the certificate files (``ConfigError`` naming the key)."""
    host, _ = split_host_port(config.node, NODE_PORT)
    return client_context(host, config.tls, config.tls_verify, config.tls_ca_file,
                          config.tls_cert_file, config.tls_key_file, section="archive")


def message_body_digest(chunks: Iterable[bytes]) -> BodyDigest:
    """The digest of a message's body: the octets after the empty line that
    ends its header section (the first CRLF CRLF; a message that starts with
    CRLF has an empty header section; one without the empty line has no
    body).  The receiver, seeing our X-MPP-* fields on top, finds the same
    line, so it digests the same octets."""
    # A CRLF in front makes "starts with CRLF" one more CRLF CRLF to find.
    window = b"\r\n"
    rest = iter(chunks)
    for chunk in rest:
        data = window + chunk
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            return BodyDigest.of(itertools.chain((data[end + 4:],), rest))
        # Keep what a CRLF CRLF split over the next chunk may begin with.
        window = data[-3:]
    return BodyDigest.of(())


class Forwarder:
    """Sends the queue's items to the archive node (see the module docstring).

    ``keys`` may be replaced while it runs (a reload after a key rotation):
    each copy is signed with the ring of the moment.  Construction does no
    I/O; ``start`` loads the TLS client certificate, if any."""

    def __init__(self, reactor: Any, threadpool: ThreadPool, queue: DurableQueue,
                 config: ArchiveConfig, keys: KeyRing, helo_name: str, *,
                 grace: float = DEFAULT_GRACE, tls_context: Optional[Any] = None,
                 poll_interval: float = POLL_INTERVAL, idle_close: float = IDLE_CLOSE):
        self.reactor = reactor
        self.threadpool = threadpool
        self.queue = queue
        self.config = config
        self.keys = keys
        self.helo_name = helo_name
        self.grace = grace
        self.poll_interval = poll_interval
        self.idle_close = idle_close
        self.state = ForwarderState.STOPPED
        self.node = config.node
        self._backend = node_backend_config(config, helo_name)
        self._tls = tls_context
        self._senders: list[Deferred[None]] = []
        # Sleeping senders: all are woken by stop, the wakeable ones
        # (an empty queue) by ``wake`` too.
        self._sleeping: dict[Deferred[None], bool] = {}
        # The sends in flight, cancelled when the grace is over.
        self._sending: set[Deferred[Any]] = set()
        self._cutting = False
        self._cut_call: Any = None
        self._stats: Optional[LoopingCall] = None
        self._stopped: list[Deferred[None]] = []
        # Connection failures in a row, and until when the senders pause.
        self._failures = 0
        self._paused_until = 0.0

    def _move_to(self, new: ForwarderState) -> None:
        if new not in _MOVES[self.state]:
            raise TransitionError(self, self.state, new)
        self.state = new

    # -- start, stop, wake ---------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Start the senders and the stats line; fires at once (a Deferred
        like ``stop``'s, for callers that treat both alike).  Loads the TLS
        client certificate: ``ConfigError`` when it cannot."""
        if self._tls is None and self.config.tls != "none":
            self._tls = node_tls_context(self.config)
        self._move_to(_RUNNING)
        self._cutting = False
        stats = self._stats = LoopingCall(self._log_stats)
        stats.clock = self.reactor
        stats.start(self.config.stats_interval, now=False).addErrback(
            lambda f: log.failure("archive queue stats stopped", f))
        self._senders = [as_deferred(self._sender(i)) for i in range(self.config.connections)]
        done = defer.DeferredList(self._senders)
        done.addCallback(lambda _: self._all_stopped())
        log.info("archive forwarder started: {connections} connection(s) to {node}",
                 connections=self.config.connections, node=self.node)
        return defer.succeed(None)

    def wake(self) -> None:
        """An item was enqueued: senders waiting on an empty queue look now."""
        for d, wakeable in list(self._sleeping.items()):
            if wakeable and not d.called:
                d.callback(None)

    def stop(self, grace: Optional[float] = None) -> Deferred[None]:
        """Claim nothing more; fires once every sender has ended: its copy
        sent, or cut after ``grace`` seconds (default: the constructor's)
        and handed back to the queue uncounted."""
        if self.state is ForwarderState.STOPPED:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._stopped.append(d)
        if self.state is _RUNNING:
            self._move_to(ForwarderState.STOPPING)
            if self._stats is not None and self._stats.running:
                self._stats.stop()
            # Armed before the sleepers wake: the last sender to end
            # (perhaps right now) cancels it.
            self._cut_call = self.reactor.callLater(
                self.grace if grace is None else grace, self._cut)
            for sleeper in list(self._sleeping):
                if not sleeper.called:
                    sleeper.callback(None)
        return d

    def _cut(self) -> None:
        self._cut_call = None
        self._cutting = True
        for send in list(self._sending):
            send.cancel()

    def _all_stopped(self) -> None:
        if self._cut_call is not None and self._cut_call.active():
            self._cut_call.cancel()
        self._cut_call = None
        self._move_to(ForwarderState.STOPPED)
        log.info("archive forwarder stopped")
        waiting, self._stopped = self._stopped, []
        for d in waiting:
            d.callback(None)

    # -- one sender ------------------------------------------------------------------

    async def _sender(self, index: int) -> None:
        conn: Optional[BackendProtocol] = None
        idle_since = self.reactor.seconds()
        try:
            while self.state is _RUNNING:
                try:
                    wait = self._paused_until - self.reactor.seconds()
                    if wait > 0:
                        await self._sleep(wait, wakeable=False)
                        continue
                    item = await self._claim()
                    if item is None:
                        if conn is not None and self.reactor.seconds() - idle_since >= self.idle_close:
                            conn.close()
                            conn = None
                        await self._sleep(self.poll_interval, wakeable=True)
                        continue
                    if self.state is not _RUNNING:
                        # Claimed while the stop began: not sent, not counted.
                        await self._settle(item, "release", self.queue.release, item)
                        break
                    conn = await self._forward(conn, item)
                    idle_since = self.reactor.seconds()
                except Exception:
                    # A bug, not the node or the item: say so, and go on.
                    log.failure("archive forwarder sender {index} failed", index=index)
                    if conn is not None:
                        conn.abort()
                        conn = None
                    await self._sleep(self.poll_interval, wakeable=False)
        finally:
            if conn is not None:
                conn.close()

    def _sleep(self, seconds: float, wakeable: bool) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        call = self.reactor.callLater(seconds, d.callback, None)
        self._sleeping[d] = wakeable

        def done(result: object) -> object:
            self._sleeping.pop(d, None)
            if call.active():
                call.cancel()
            return result

        d.addBoth(done)
        return d

    async def _claim(self) -> Optional[QueueItem]:
        try:
            item: Optional[QueueItem] = await deferToThreadPool(self.reactor, self.threadpool,
                                                                self.queue.claim)
        except OSError as e:
            log.error("archive queue {queue}: cannot claim an item: {error}",
                      queue=self.queue.directory, error=str(e))
            return None
        return item

    async def _settle(self, item: QueueItem, what: str, func: Callable[..., Any],
                      *args: Any) -> None:
        """Finish, retry, bad or release ``item`` in the thread pool.  A
        disk error leaves the item claimed: the next start's ``recover``
        puts it back (the node stores a copy sent twice once)."""
        try:
            await deferToThreadPool(self.reactor, self.threadpool, func, *args)
        except OSError as e:
            log.error("archive queue item {item_id}: {what} failed: {error}",
                      item_id=item.id, what=what, error=str(e), queue=self.queue.directory)

    async def _forward(self, conn: Optional[BackendProtocol],
                       item: QueueItem) -> Optional[BackendProtocol]:
        """Send one item and settle it; the connection to use next (None
        when it was lost)."""
        try:
            state, header = await deferToThreadPool(self.reactor, self.threadpool,
                                                    self._prepare, item)
        except ValueError as e:
            # The item's metadata is not a state we can sign: permanent.
            await self._settle(item, "bad", self.queue.bad, item, f"cannot be sent: {e}")
            return conn
        except OSError as e:
            await self._settle(item, "retry", self.queue.retry, item,
                               f"cannot read the item: {e}")
            return conn
        send = as_deferred(self._send(conn, item, state, header))
        self._sending.add(send)
        try:
            conn, reply, final = await send
        except Exception as e:
            if self._cutting:
                # stop()'s grace is over: not the item's fault, nor the node's.
                await self._settle(item, "release", self.queue.release, item)
            elif isinstance(e, BackendError):
                await self._settle(item, "retry", self.queue.retry, item,
                                   f"message {state.queue_id}: {e.detail}")
            else:
                # A bug: the item is not left claimed by it.
                await self._settle(item, "retry", self.queue.retry, item,
                                   f"message {state.queue_id}: forwarder error {e!r}")
                raise
            return None
        finally:
            self._sending.discard(send)
        await self._outcome(item, state, reply, final)
        return conn

    async def _outcome(self, item: QueueItem, state: CopyState, reply: Reply,
                       final: bool) -> None:
        if final and reply.is_positive:
            # The node took it.  Its store is idempotent on node + queue id,
            # so a removal a power cut undoes costs one more send that stores
            # nothing: no directory sync per copy (spool/queue.finish_many).
            await self._settle(item, "finish", self.queue.finish_many, [item], False)
            log.info("archive copy of message {queue_id} taken by {node}: {reply}",
                     queue_id=state.queue_id, item_id=item.id, node=self.node,
                     reply=str(reply))
        elif final and reply.code >= 500:
            await self._settle(item, "bad", self.queue.bad, item,
                               f"message {state.queue_id}: the archive node {self.node} "
                               f"refused the copy: {reply}")
        else:
            if reply.code >= 500:
                log.error("the archive node {node} refuses our copies before their content "
                          "({reply}): is this edge in its archive_node.edges, with the client "
                          "certificate it asks for?  Copies wait in the queue.",
                          node=self.node, reply=str(reply))
            await self._settle(item, "retry", self.queue.retry, item,
                               f"message {state.queue_id}: archive node said {reply}")

    def _prepare(self, item: QueueItem) -> tuple[CopyState, bytes]:
        """The item's state and its signed X-MPP-* fields (in the thread
        pool: reads the item's body for its digest).  ValueError when the
        metadata holds no state we can sign."""
        state = state_of(item.metadata)
        digest = message_body_digest(item.chunks())
        return state, render(sign(state, digest, self.keys))

    async def _send(self, conn: Optional[BackendProtocol], item: QueueItem, state: CopyState,
                    header: bytes) -> tuple[BackendProtocol, Reply, bool]:
        """One transaction with the node: (the connection, the last reply,
        whether it answered the end of DATA)."""
        conn = await self._ready(conn)
        wait = self.config.reply_timeout
        # A generator: closed below, with the item's file, when the send
        # stops half-way.
        chunks = cast(Generator[bytes, None, None], item.chunks())
        try:
            mail = b"MAIL FROM:<>"
            if "8BITMIME" in conn.extensions:
                mail += b" BODY=8BITMIME"
            if state.smtputf8 and "SMTPUTF8" in conn.extensions:
                mail += b" SMTPUTF8"
            reply = await conn.command(mail, wait)
            if reply.code != 250:
                return conn, reply, False
            reply = await conn.command(b"RCPT TO:<" + ARCHIVE_RCPT + b">", wait)
            if reply.code not in (250, 251):
                return conn, reply, False
            reply, sent = await conn.send_message(itertools.chain((header,), chunks),
                                                  self._backend)
            return conn, reply, sent
        except BaseException:
            conn.abort()
            raise
        finally:
            chunks.close()

    async def _ready(self, conn: Optional[BackendProtocol]) -> BackendProtocol:
        """A connection ready for a new transaction: the one we had, after
        RSET, or a new one.  A connection that fails here was not this
        item's fault: a new one is tried once before the item counts it."""
        if conn is not None and conn.state is ClientState.OPEN:
            try:
                reply = await conn.command(b"RSET", self.config.reply_timeout)
            except BackendError:
                reply = None
            except BaseException:
                conn.abort()
                raise
            if reply is not None and reply.code == 250:
                return conn
            conn.abort()
        try:
            conn = await connect_backend(self.reactor, self._backend, self.helo_name, self._tls)
        except BackendError as e:
            if not self._cutting:
                self._node_down(e.detail)
            raise
        self._node_up()
        return conn

    def _node_down(self, detail: str) -> None:
        now = self.reactor.seconds()
        if now < self._paused_until:
            return  # another sender found it down meanwhile
        self._failures += 1
        pause = min(self.config.retry_max, self.config.retry_base * 2.0 ** min(self._failures - 1, 64))
        self._paused_until = now + pause
        if self._failures == 1:
            log.warn("archive node {node} unreachable ({detail}): copies wait in the queue, "
                     "trying again in {pause:.1f} s", node=self.node, detail=detail, pause=pause)

    def _node_up(self) -> None:
        if self._failures:
            log.info("archive node {node} reachable again after {failures} failed "
                     "connection(s)", node=self.node, failures=self._failures)
        self._failures = 0
        self._paused_until = 0.0

    def _log_stats(self) -> Deferred[Any]:
        d = deferToThreadPool(self.reactor, self.threadpool, self.queue.log_stats)
        d.addErrback(lambda f: log.failure("archive queue stats failed", f))
        return d
