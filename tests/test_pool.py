"""The backend connection pool (``mppproxy.relay.pool``): reuse and idle expiry."""
from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mppproxy.config.schema import BackendConfig
from mppproxy._transitions import TransitionError, unreachable
from mppproxy.relay.pool import _POOL_MOVES, BackendPool, PoolState
from mppproxy.smtp.client import BackendProtocol, ClientState


def idle_connection(clock: Clock) -> tuple[BackendProtocol, StringTransport]:
    proto = BackendProtocol(clock)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


class PoolIdleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = BackendPool(self.clock, BackendConfig(host="127.0.0.1", pool_idle_timeout=30.0),
                                "proxy.test")

    def test_each_connection_expires_after_its_own_idle_time(self) -> None:
        """A parked connection is closed (QUIT) pool_idle_timeout after it was parked, not earlier,
        whatever else is parked later."""
        first, first_t = idle_connection(self.clock)
        second, second_t = idle_connection(self.clock)
        self.pool.release(first, dirty=False)
        self.clock.advance(10)
        self.pool.release(second, dirty=False)
        self.clock.advance(19.5)
        self.assertIsNot(first.state, ClientState.CLOSED)
        self.clock.advance(0.5)
        self.assertIs(first.state, ClientState.CLOSED)
        self.assertEqual(first_t.value(), b"QUIT\r\n")
        self.assertIsNot(second.state, ClientState.CLOSED)
        self.clock.advance(10)
        self.assertIs(second.state, ClientState.CLOSED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_acquire_takes_the_newest_and_keeps_the_others_timed(self) -> None:
        """acquire reuses the most recently parked connection; the older one still expires on time."""
        first, _ = idle_connection(self.clock)
        second, _ = idle_connection(self.clock)
        self.pool.release(first, dirty=False)
        self.clock.advance(5)
        self.pool.release(second, dirty=False)
        from twisted.internet.defer import Deferred
        got = self.successResultOf(Deferred.fromCoroutine(self.pool.acquire()))
        self.assertEqual(got, (second, True))
        self.clock.advance(25)
        self.assertIs(first.state, ClientState.CLOSED)
        self.assertIsNot(second.state, ClientState.CLOSED)

    def test_close_all_stops_the_timer(self) -> None:
        """close_all closes what is parked and leaves no timer behind."""
        first, _ = idle_connection(self.clock)
        self.pool.release(first, dirty=False)
        self.pool.close_all()
        self.assertIs(first.state, ClientState.CLOSED)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PoolStateTests(SynchronousTestCase):
    """The pool's states (``PoolState``) and their table."""

    def test_table_covers_every_state_and_reaches_them_all(self) -> None:
        """Every PoolState has its row in the table, each reachable from OPEN, and CLOSED is final."""
        self.assertEqual(set(_POOL_MOVES), set(PoolState))
        self.assertEqual(unreachable(_POOL_MOVES, PoolState.OPEN), set())
        self.assertEqual(_POOL_MOVES[PoolState.CLOSED], frozenset({PoolState.CLOSED}))

    def test_closed_pool_parks_nothing(self) -> None:
        """After close_all (twice, as a reload then a stop may do) a connection given back is closed, not parked."""
        clock = Clock()
        pool = BackendPool(clock, BackendConfig(host="127.0.0.1"), "proxy.test")
        self.assertIs(pool.state, PoolState.OPEN)
        pool.close_all()
        pool.close_all()
        self.assertIs(pool.state, PoolState.CLOSED)
        proto, transport = idle_connection(clock)
        pool.release(proto, dirty=False)
        self.assertIs(proto.state, ClientState.CLOSED)
        self.assertEqual(transport.value(), b"QUIT\r\n")

    def test_reopening_is_loud(self) -> None:
        """Moving a closed pool back to OPEN raises TransitionError."""
        pool = BackendPool(Clock(), BackendConfig(host="127.0.0.1"), "proxy.test")
        pool.close_all()
        with self.assertRaises(TransitionError):
            pool._move_to(PoolState.OPEN)
