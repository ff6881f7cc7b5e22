"""The backend connection pool (``mppproxy.relay.pool``): reuse and idle expiry."""
from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mppproxy.config.schema import BackendConfig
from mppproxy.relay.pool import BackendPool
from mppproxy.smtp.client import BackendProtocol


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
        self.assertFalse(first.closed)
        self.clock.advance(0.5)
        self.assertTrue(first.closed)
        self.assertEqual(first_t.value(), b"QUIT\r\n")
        self.assertFalse(second.closed)
        self.clock.advance(10)
        self.assertTrue(second.closed)
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
        self.assertTrue(first.closed)
        self.assertFalse(second.closed)

    def test_close_all_stops_the_timer(self) -> None:
        """close_all closes what is parked and leaves no timer behind."""
        first, _ = idle_connection(self.clock)
        self.pool.release(first, dirty=False)
        self.pool.close_all()
        self.assertTrue(first.closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])
