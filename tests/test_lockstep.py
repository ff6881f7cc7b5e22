"""The lockstep relay's states (``RelayState``) with a backend on a StringTransport."""
from __future__ import annotations

from typing import Iterator

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mppproxy._transitions import TransitionError, unreachable
from mppproxy.config.schema import BackendConfig
from mppproxy.relay.lockstep import _RELAY_MOVES, LockstepRelay, RelayState
from mppproxy.relay.pool import BackendPool
from mppproxy.smtp.address import parse_path
from mppproxy.smtp.client import BackendProtocol, ClientState
from mppproxy.smtp.replies import Reply
from mppproxy.smtp.session import Session, Transaction


class _Message:
    """What LockstepRelay.data reads of an OutboundMessage."""

    def chunks(self) -> Iterator[bytes]:
        yield b"Subject: states\r\n\r\nbody\r\n"


def _session() -> Session:
    session = Session("198.51.100.7", 40000, "192.0.2.25", 25)
    session.helo, session.esmtp = "client.example", True
    return session


def _txn() -> Transaction:
    return Transaction(parse_path("<sender@client.example>", allow_null=True), {})


class RelayStateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        config = BackendConfig(host="127.0.0.1")
        self.pool = BackendPool(self.clock, config, "proxy.test")
        self.conn = BackendProtocol(self.clock)
        self.backend = StringTransport()
        self.conn.makeConnection(self.backend)
        # A parked connection: acquire() hands it out without connecting.
        self.pool._park(self.conn)
        self.relay = LockstepRelay(self.pool, config)
        self.session = _session()

    def answer(self, line: bytes) -> None:
        self.backend.clear()
        self.conn.dataReceived(line)

    def mail(self) -> Deferred[Reply]:
        d: Deferred[Reply] = Deferred.fromCoroutine(self.relay.mail(self.session, _txn()))
        self.answer(b"250 2.1.0 Ok\r\n")
        return d

    def test_table_covers_every_state_and_reaches_them_all(self) -> None:
        """Every RelayState has its row in the table, and each is reachable from IDLE."""
        self.assertEqual(set(_RELAY_MOVES), set(RelayState))
        self.assertEqual(unreachable(_RELAY_MOVES, RelayState.IDLE), set())

    def test_message_moves_idle_ready_transaction_sending_ready(self) -> None:
        """MAIL takes a connection and opens a transaction, DATA sends, the final reply ends it, the session's end gives the connection back."""
        self.assertIs(self.relay.state, RelayState.IDLE)
        self.assertEqual(self.successResultOf(self.mail()).code, 250)
        self.assertIs(self.relay.state, RelayState.TRANSACTION)
        sent = Deferred.fromCoroutine(self.relay.data(self.session, _txn(), _Message()))  # type: ignore[arg-type]
        self.answer(b"354 go ahead\r\n")
        self.assertIs(self.relay.state, RelayState.SENDING)
        self.assertIs(self.conn.state, ClientState.BODY)
        self.answer(b"250 2.0.0 queued\r\n")
        self.assertEqual(self.successResultOf(sent).code, 250)
        self.assertIs(self.relay.state, RelayState.READY)
        self.assertIs(self.conn.state, ClientState.OPEN)
        self.relay.finish()
        self.assertIs(self.relay.state, RelayState.IDLE)

    def test_reset_in_transaction_sends_rset(self) -> None:
        """The client's RSET with a backend transaction open sends RSET and leaves the relay READY."""
        self.mail()
        self.relay.reset()
        self.assertEqual(self.backend.value(), b"RSET\r\n")
        self.assertIs(self.relay.state, RelayState.READY)

    def test_second_mail_in_a_transaction_is_loud(self) -> None:
        """MAIL while a backend transaction is open raises TransitionError (a 451 at the session) and sends nothing."""
        self.mail()
        self.backend.clear()
        failure = self.failureResultOf(
            Deferred.fromCoroutine(self.relay.mail(self.session, _txn())), TransitionError)
        self.assertEqual((failure.value.old, failure.value.new),
                         (RelayState.TRANSACTION, RelayState.TRANSACTION))
        self.assertEqual(self.backend.value(), b"")

    def test_session_end_while_sending_drops_the_connection(self) -> None:
        """The session ending with the message still at the backend drops the connection instead of pooling it."""
        self.mail()
        Deferred.fromCoroutine(self.relay.data(self.session, _txn(), _Message()))  # type: ignore[arg-type]
        self.answer(b"354 go ahead\r\n")
        self.relay.finish()
        self.assertIs(self.relay.state, RelayState.IDLE)
        self.assertIs(self.conn.state, ClientState.CLOSED)
        self.assertTrue(self.backend.disconnecting or self.backend.disconnected)

    def test_unexpected_move_raises(self) -> None:
        """A move the table does not allow (IDLE straight to SENDING) raises TransitionError."""
        with self.assertRaises(TransitionError):
            self.relay._move_to(RelayState.SENDING)
        self.assertIs(self.relay.state, RelayState.IDLE)


def test_transition_error_names_the_move() -> None:
    """A TransitionError's text names the class and the refused move."""
    error = TransitionError(object(), RelayState.IDLE, RelayState.SENDING)
    assert str(error) == "object: IDLE -> SENDING is not allowed"
