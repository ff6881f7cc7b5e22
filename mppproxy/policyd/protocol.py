"""The Postfix policy-delegation protocol (SMTPD_POLICY_README): the stage
that turns Postfix's questions into ``Facts`` for the policy engine and the
engine's ``Reply`` into an access(5) action.

On the wire a request is ``name=value`` lines ended by LF, closed by an
empty line; the answer is ``action=...`` and an empty line.  Postfix sends
one request at a time per connection and keeps the connection for many;
other clients may pipeline, so requests are evaluated as they arrive
(concurrently, the reactor never waits) and answered strictly in order.

What the engine answers becomes (docs/configuration.md, "[policyd]"):

* nothing to refuse: ``DUNNO`` (the restrictions after ours decide), or
  ``PREPEND Name: value`` when a check recorded a header for the message,
  one header per answer, each once per message;
* 5xx: ``5NN X.Y.Z text`` (access(5) "5NN text"), so the reply code and
  the RFC 3463 enhanced code survive; Postfix adds ``<rcpt>: Recipient
  address rejected:`` itself;
* 452 4.5.3 (recipient of another policy group, docs/design.md): ``452 4.5.3
  text``, so the client sends that recipient in a later transaction;
* any other 4xx (greylisting, a check's tempfail): ``DEFER_IF_PERMIT
  text``, as postgrey answers: a later restriction that rejects wins.

A request that cannot be evaluated (malformed, or the engine failed) is
logged with the problem and answered ``policyd.default_action`` (DUNNO
unless configured); the connection stays usable.  Only ``protocol_state=
RCPT`` runs the engine; the other states are answered DUNNO.
"""
from __future__ import annotations

import collections
import enum
import re
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from mppproxy._async import drive_started
from mppproxy._wire import send_now
from mppproxy.logsetup import Logger
from mppproxy.policy.base import Facts
from mppproxy.results import TransactionRecord, checks_for_log
from mppproxy.config.policyd import PolicydConfig
from mppproxy.smtp.replies import Reply

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IDelayedCall, ITransport

    class _Transport(ITransport):
        """What a policy connection calls on its TCP or UNIX transport,
        with ``self``: mypy cannot call a zope interface's own methods."""

        def getPeer(self) -> IAddress: ...

        def loseConnection(self) -> None: ...

        def pauseProducing(self) -> None: ...

        def resumeProducing(self) -> None: ...

log = Logger()

DUNNO = "DUNNO"
# The one request type Postfix sends (SMTPD_POLICY_README, "Protocol").
REQUEST_TYPE = "smtpd_access_policy"
# The state whose question is about one recipient; the others (CONNECT,
# EHLO, MAIL, DATA, END-OF-MESSAGE, VRFY, ETRN) are answered DUNNO.
RCPT_STATE = "RCPT"
# access(5): a policy-group refusal keeps its code so the client retries
# the recipient in another transaction (RFC 5321 4.5.3.1.10).
_KEEP_CODE_4XX = {(452, "4.5.3")}
# Postfix writes "<rcpt>: Recipient address rejected: " before our text.
_POSTFIX_PREFIX = re.compile(r"^recipient address rejected:\s*", re.IGNORECASE)
# Bytes no attribute may hold: C0 controls but TAB, and DEL.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# The same, LF allowed: checked over a whole request at once.
_CONTROL_IN_BLOCK = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")
# Postfix's reply line limit is far above this; templates are shorter.
_MAX_TEXT = 400


class FramingState(enum.Enum):
    """Where the reader is within the byte stream.

    * ``LINE``: reading ``name=value`` lines; an empty line ends the request.
    * ``SKIP``: discarding the rest of an over-long line up to its LF (the
      request it belongs to is already marked malformed); the LF moves back
      to ``LINE``.
    """

    LINE = "line"
    SKIP = "skip"


# -- mapping engine replies to access(5) actions --------------------------------

def _text(reply: Reply) -> str:
    text = " ".join(line.strip() for line in reply.lines() if line.strip())
    text = _POSTFIX_PREFIX.sub("", text)
    return text[:_MAX_TEXT]


def action_for_reply(reply: Reply) -> str:
    """The access(5) action for one engine refusal (see the module docstring)."""
    text = _text(reply)
    if reply.code >= 500 or (reply.code, reply.enhanced) in _KEEP_CODE_4XX:
        words = [str(reply.code), reply.enhanced, text]
        return " ".join(w for w in words if w)
    if reply.is_transient:
        return f"DEFER_IF_PERMIT {text}".rstrip()
    # The engine only refuses with 4xx/5xx; a 2xx here is a bug, and a
    # bug must not turn into OK (which would skip later restrictions).
    log.error("engine answered {reply}, not a refusal; answering DUNNO", reply=str(reply))
    return DUNNO


def header_action(name: str, value: str) -> str:
    """``PREPEND Name: value`` with anything that could break the line out."""
    clean = " ".join(value.replace("\r", " ").replace("\n", " ").split())
    return f"PREPEND {name}: {clean}"


def encode_answer(action: str) -> bytes:
    return b"action=" + action.encode("utf-8", "replace") + b"\n\n"


_DUNNO_BYTES = encode_answer(DUNNO)


# -- requests into facts ---------------------------------------------------------

def _domain(address: str) -> str:
    if "@" not in address:
        return ""
    return address.rpartition("@")[2].rstrip(".").lower()


def facts_from_request(attrs: dict[str, str]) -> Facts:
    """The engine's ``Facts`` for one RCPT request (client_address checked
    by the caller)."""
    sender = attrs.get("sender", "")
    recipient = attrs.get("recipient", "")
    client_name = attrs.get("client_name", "")
    return Facts(
        client_ip=attrs["client_address"],
        helo=attrs.get("helo_name", ""),
        sender=sender,
        sender_domain=_domain(sender),
        recipient=recipient,
        recipient_domain=_domain(recipient),
        # Postfix says "unknown" when the client has no verified name.
        client_name="" if client_name == "unknown" else client_name,
        session_id=attrs.get("instance", ""),
        queue_id=attrs.get("queue_id", ""),
        tls=bool(attrs.get("encryption_protocol")),
        stage="rcpt",
    )


# -- the shared state of one listener ----------------------------------------------

@dataclass
class PolicyTransaction:
    """The engine's record for one message (Postfix ``instance``): all its
    recipients share it, so TRANSACTION-scoped checks run once and the
    policy group of the first recipient holds."""

    record: TransactionRecord = field(default_factory=TransactionRecord)
    # Headers of record.headers already sent as PREPEND.
    prepended: int = 0
    # Fires when the evaluation still running for this message is done:
    # the next recipient waits for it (the record is not safe to share
    # concurrently).  None when nothing is running.
    tail: Optional[defer.Deferred[None]] = None


class PolicyServerFactory(Factory["PolicyProtocol"]):
    """What every policy connection of one listener set shares.

    ``engine`` is called for each request and returns the current
    ``PolicyEngine`` (or None when ``policy.enabled`` is false): a reload
    swaps it, and a request in flight keeps the one it started with.
    ``trusted`` tells whether a client address is in ``trusted_networks``
    (those skip the checks when ``policy.skip_trusted``).
    """

    noisy = False

    def __init__(self, config: PolicydConfig, engine: Callable[[], Any], reactor: Any,
                 trusted: Callable[[str], bool] = lambda ip: False, skip_trusted: bool = False):
        self.config = config
        self.engine = engine
        self.reactor = reactor
        self.trusted = trusted
        self.skip_trusted = skip_trusted
        self.connections: set["PolicyProtocol"] = set()
        # Fires when the last connection has gone, while stopping (drain).
        self._drained: Optional[defer.Deferred[None]] = None
        self._transactions: collections.OrderedDict[tuple[str, str], PolicyTransaction] = \
            collections.OrderedDict()

    def buildProtocol(self, addr: Any) -> "PolicyProtocol":
        p = PolicyProtocol()
        p.factory = self
        return p

    def drain(self, grace: float) -> defer.Deferred[None]:
        """The stop: every connection closes once it has answered what it
        was asked (an idle one at once; a request in flight is decided and
        answered first, so a restart costs Postfix no 451 4.3.5 "problem
        talking to server"); what is still open after ``grace`` seconds is
        cut.  Fires when every connection has gone."""
        done: defer.Deferred[None] = defer.Deferred()
        if not self.connections:
            done.callback(None)
            return done
        self._drained = done
        for conn in list(self.connections):
            conn.drain()

        def cut() -> None:
            if self.connections:
                log.warn("policy server stop: {count} connection(s) still deciding after "
                         "{grace:g} s (timeouts.shutdown_grace); cut",
                         count=len(self.connections), grace=grace)
                for conn in list(self.connections):
                    conn.transport.abortConnection()

        timer = self.reactor.callLater(grace, cut)

        def stop_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        done.addBoth(stop_timer)
        return done

    def gone(self, conn: "PolicyProtocol") -> None:
        """``conn`` has closed."""
        self.connections.discard(conn)
        if not self.connections and self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(None)

    def transaction(self, peer: str, instance: str) -> PolicyTransaction:
        """The record of one message, least recently used evicted first."""
        if not instance:
            return PolicyTransaction()
        key = (peer, instance)
        txn = self._transactions.get(key)
        if txn is None:
            txn = self._transactions[key] = PolicyTransaction()
            while len(self._transactions) > self.config.max_transactions:
                self._transactions.popitem(last=False)
        else:
            self._transactions.move_to_end(key)
        return txn


# -- one connection -----------------------------------------------------------------

class _Slot:
    """One request's place in the answer order."""

    __slots__ = ("answer",)

    def __init__(self) -> None:
        self.answer: Optional[bytes] = None


class PolicyProtocol(Protocol, TimeoutMixin):
    """One policy client connection (a Postfix smtpd process, usually).

    Framing is our own, not LineReceiver: an over-long line marks only its
    request malformed and the stream stays in step (``FramingState``).
    """

    factory: PolicyServerFactory
    # Set by makeConnection before any of these methods runs.
    transport: _Transport

    if TYPE_CHECKING:
        # TimeoutMixin's, which Twisted leaves unannotated; callLater is
        # the factory's reactor's (connectionMade).
        callLater: Callable[[float, Callable[[], object]], IDelayedCall]

        def setTimeout(self, period: Optional[float]) -> Optional[float]: ...

        def resetTimeout(self) -> None: ...

    def __init__(self) -> None:
        self._buffer = b""
        self._state = FramingState.LINE
        self._attrs: dict[str, str] = {}
        self._problem = ""
        self._pending: collections.deque[_Slot] = collections.deque()
        self._paused = False
        self._closed = False
        self._counted = False
        # Stopping: close once nothing is left to answer (drain).
        self._draining = False
        self.peer = "?"

    # -- connection lifetime

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = str(getattr(peer, "host", None) or "unix")
        config = self.factory.config
        if len(self.factory.connections) >= config.max_connections:
            log.warn("policy connection from {peer} refused: already {count} connections "
                     "(policyd.max_connections)", peer=self.peer,
                     count=len(self.factory.connections))
            self._closed = True
            self.transport.loseConnection()
            return
        self.factory.connections.add(self)
        self._counted = True
        self.callLater = self.factory.reactor.callLater
        self.setTimeout(config.idle_timeout)

    def connectionLost(self, reason: Any = None) -> None:
        self._closed = True
        self.setTimeout(None)
        if self._counted:
            self.factory.gone(self)
        if self._attrs or self._buffer:
            log.debug("policy client {peer} closed the connection within a request", peer=self.peer)

    def timeoutConnection(self) -> None:
        if self._pending:
            # Still deciding (each check is bounded by policy.check_timeout).
            self.resetTimeout()
            return
        log.info("policy connection from {peer} idle for {seconds}s; closing", peer=self.peer,
                 seconds=self.factory.config.idle_timeout)
        self.transport.loseConnection()

    def drain(self) -> None:
        """Close once every request read so far is answered (at once when
        there is none): the server is stopping."""
        self._draining = True
        self._close_if_drained()

    def _close_if_drained(self) -> None:
        # A request partly read is not waited for: the client hears the
        # connection close, as at any stop, and asks again on a new one.
        if self._draining and not self._pending and not self._closed:
            self._closed = True
            self.transport.loseConnection()

    # -- framing

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        self.resetTimeout()
        self._buffer = self._buffer + data if self._buffer else data
        self._read_lines()

    def _read_lines(self) -> None:
        buf = self._buffer
        config = self.factory.config
        max_line = config.max_line
        start = 0
        while not self._paused and not self._closed:
            if (self._state is FramingState.LINE and not self._attrs and not self._problem
                    and buf[start:start + 1] != b"\n"):
                # Fast path: a whole request in the buffer, parsed at once
                # (Postfix writes each request in one go).  Anything unusual
                # in it goes through the line-by-line path below instead.
                end = buf.find(b"\n\n", start)
                if end >= 0:
                    attrs = _parse_block(buf[start:end], max_line, config.max_attributes)
                    if attrs is not None:
                        start = end + 2
                        self._attrs = attrs
                        self._end_request()
                        continue
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            if self._state is FramingState.SKIP:
                self._state = FramingState.LINE
            elif nl - start + 1 > max_line:
                self._malformed_line(f"line longer than {max_line} bytes (policyd.max_line)")
            else:
                self._line(buf[start:nl])
            start = nl + 1
        rest = buf[start:] if start else buf
        if self._state is FramingState.SKIP:
            rest = b""
        elif len(rest) >= max_line and not self._paused and rest.find(b"\n") < 0:
            # No LF within max_line bytes: drop the rest of this line.
            self._malformed_line(f"line longer than {max_line} bytes (policyd.max_line)")
            self._state = FramingState.SKIP
            rest = b""
        self._buffer = rest

    def _malformed_line(self, problem: str) -> None:
        # The request it belongs to is answered when its empty line comes.
        if not self._problem:
            self._problem = problem

    def _line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            # Lines end with LF; a CR before it (a person typing with nc -C)
            # is tolerated.
            line = line[:-1]
        if not line:
            self._end_request()
            return
        if self._problem:
            return
        if len(self._attrs) >= self.factory.config.max_attributes:
            self._problem = (f"more than {self.factory.config.max_attributes} attributes "
                             "(policyd.max_attributes)")
            return
        name, sep, value = line.partition(b"=")
        if not sep or not name:
            self._problem = "a line is not name=value"
            return
        if _CONTROL.search(line):
            self._problem = f"attribute {_shown(name)} holds control characters"
            return
        try:
            key = name.decode("ascii")
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            self._problem = f"attribute {_shown(name)} is not UTF-8"
            return
        if key in self._attrs:
            self._problem = f"attribute {key} given twice"
            return
        self._attrs[key] = text

    def _end_request(self) -> None:
        attrs, problem = self._attrs, self._problem
        self._attrs, self._problem = {}, ""
        slot = _Slot()
        self._pending.append(slot)
        decided = self._decide(attrs, problem, slot)
        if decided is not None:
            self._answered(decided, slot)
        if len(self._pending) >= self.factory.config.max_pending and not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    # -- answers, in order

    def _answered(self, action: str, slot: _Slot) -> None:
        slot.answer = _DUNNO_BYTES if action == DUNNO else encode_answer(action)
        pending = self._pending
        if pending[0] is not slot:
            return  # an earlier request is still being decided
        ready: list[bytes] = []
        while pending:
            answer = pending[0].answer
            if answer is None:
                break
            pending.popleft()
            ready.append(answer)
        if not self._closed:
            # At once, not on the next reactor turn (_wire.send_now): with
            # Postfix's one request per connection, Twisted's buffered write
            # was two epoll_ctl calls and a loop turn per answer.
            send_now(self.transport, ready[0] if len(ready) == 1 else b"".join(ready))
        if self._paused and len(pending) < self.factory.config.max_pending and not self._closed:
            self._paused = False
            self.transport.resumeProducing()
            # Lines read ahead before the pause.
            self.factory.reactor.callLater(0, self._resume)
        self._close_if_drained()

    def _resume(self) -> None:
        if not self._paused and not self._closed and self._buffer:
            self._read_lines()

    # -- deciding

    def _decide(self, attrs: dict[str, str], problem: str, slot: _Slot) -> Optional[str]:
        """The action; or None when the engine has to wait (DNS, the
        database): ``slot`` is then answered when it has decided."""
        if not problem:
            problem = self._request_problem(attrs)
        if problem:
            return self._malformed(problem, attrs)
        if attrs.get("protocol_state") != RCPT_STATE:
            return DUNNO
        factory = self.factory
        engine = factory.engine()
        if engine is None:
            return DUNNO
        client = attrs["client_address"]
        if factory.skip_trusted and factory.trusted(client):
            return DUNNO
        facts = facts_from_request(attrs)
        txn = factory.transaction(self.peer, attrs.get("instance", ""))
        coro = self._evaluate(engine, facts, txn)
        # Most requests are decided from memory without waiting: the first
        # step runs inline and needs no driver (_async.py's fast path, as
        # PolicyEngine._run takes per check).
        try:
            awaited = coro.send(None)
        except StopIteration as done:
            action: str = done.value
            return action
        except Exception:
            return self._engine_failed(Failure(), facts)  # type: ignore[no-untyped-call]  # Twisted's Failure() is unannotated
        # It waits.  Later recipients of this message wait for it: the
        # record is not safe to share between two evaluations at once.
        gate: defer.Deferred[None] = defer.Deferred()
        txn.tail = gate

        def decided(outcome: Any) -> None:
            action = (self._engine_failed(outcome, facts) if isinstance(outcome, Failure)
                      else outcome)
            if txn.tail is gate:
                txn.tail = None
            gate.callback(None)
            self._answered(action, slot)

        drive_started(coro, awaited, decided)
        return None

    @staticmethod
    def _request_problem(attrs: dict[str, str]) -> str:
        if not attrs:
            return "empty request"
        request = attrs.get("request")
        if request is None:
            return "no request attribute"
        if request != REQUEST_TYPE:
            return f"request={_shown(request.encode())} is not {REQUEST_TYPE}"
        if attrs.get("protocol_state") == RCPT_STATE:
            client = attrs.get("client_address")
            if not client:
                return "no client_address"
            if not _is_ip(client):
                return f"client_address {_shown(client.encode())} is not an IP address"
        return ""

    def _malformed(self, problem: str, attrs: dict[str, str]) -> str:
        action = self.factory.config.default_action
        log.warn("malformed policy request from {peer}: {problem}; answering {action}",
                 peer=self.peer, problem=problem, action=action,
                 instance=attrs.get("instance", ""), queue_id=attrs.get("queue_id", ""))
        return action

    async def _evaluate(self, engine: Any, facts: Facts, txn: PolicyTransaction) -> str:
        previous = txn.tail
        if previous is not None:
            # Another recipient of this message is still being decided
            # (the last one to wait, which waits for those before it).
            await previous
        record = txn.record
        seen = len(record.recorded)
        reply = await engine.on_recipient(facts, record)
        if reply is not None:
            action = action_for_reply(reply)
        elif txn.prepended < len(record.headers):
            name, value = record.headers[txn.prepended]
            txn.prepended += 1
            action = header_action(name, value)
        else:
            action = DUNNO
        if action == DUNNO and not self.factory.config.log_dunno:
            return action
        log.info("policy {action} for {recipient} from {client}", action=action,
                 mpp_event="policy_decision",
                 recipient=facts.recipient, client=facts.client_ip, sender=facts.sender,
                 helo=facts.helo, policy=record.policy, score=record.score,
                 session_id=facts.session_id, queue_id=facts.queue_id,
                 # As the transaction log has them: hits in full, misses by name.
                 **checks_for_log(record.recorded[seen:]))
        return action

    def _engine_failed(self, failure: Any, facts: Facts) -> str:
        action = self.factory.config.default_action
        log.failure("policy engine failed for {recipient} from {client}; answering {action}",
                    failure, recipient=facts.recipient, client=facts.client_ip, action=action,
                    session_id=facts.session_id, queue_id=facts.queue_id)
        return action


def _is_ip(text: str) -> bool:
    # inet_pton is ~50x faster than ipaddress; a "%scope" may follow IPv6.
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text.split("%", 1)[0])
    except (OSError, ValueError):
        return False
    return True


def _parse_block(block: bytes, max_line: int, max_attributes: int) -> Optional[dict[str, str]]:
    """The attributes of one request's lines (without the empty line), or
    None when anything is off: over-long line, too many attributes, control
    characters or CR, not UTF-8, a line without "=", a name given twice.
    The caller then reads the request line by line and names the problem."""
    if not block or _CONTROL_IN_BLOCK.search(block):
        return None
    # A block shorter than max_line holds no over-long line (the usual case:
    # Postfix's requests are about 1 KiB).
    if len(block) >= max_line and max(map(len, block.split(b"\n"))) >= max_line:
        return None
    try:
        lines = block.decode("utf-8").split("\n")
        if len(lines) > max_attributes:
            return None
        attrs = dict([line.split("=", 1) for line in lines])  # no "=": ValueError
    except (UnicodeDecodeError, ValueError):
        return None
    if len(attrs) != len(lines) or "" in attrs:
        return None
    return attrs


def _shown(raw: bytes) -> str:
    # Client text in a log field, bounded and printable.
    text = raw[:64].decode("utf-8", "replace")
    return repr("".join(c if c.isprintable() else "?" for c in text))
