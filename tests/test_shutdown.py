"""A stop without sockets (``SMTPServerFactory.shut_down``, issue 15): new
sessions and sessions idle between commands hear 421 at once; a message in
flight is carried to its reply first; the wait is bounded by the grace.

Sessions run on a ``MemoryReactorClock`` and ``StringTransport``s, with the
recording handler of tests/test_server.py.
"""
from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mppproxy.smtp import replies
from mppproxy.smtp.server import SMTPServerFactory, SMTPServerProtocol
from test_server import CONFIG, HOSTNAME, RecordingHandler, RecordingTransport, codes

SHUTTING_DOWN = replies.SHUTTING_DOWN.to_bytes()
ENVELOPE = b"EHLO client.example\r\nMAIL FROM:<s@client.example>\r\nRCPT TO:<r@example.com>\r\n"


class ShutdownTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.handler = RecordingHandler()
        self.factory = SMTPServerFactory(CONFIG, lambda: self.handler, self.clock,
                                         hostname=HOSTNAME)

    def connect(self) -> tuple[SMTPServerProtocol, RecordingTransport]:
        proto = self.factory.buildProtocol(IPv4Address("TCP", "198.51.100.7", 40000))
        transport = RecordingTransport()
        proto.makeConnection(transport)
        return proto, transport

    def talk(self, proto: SMTPServerProtocol, transport: RecordingTransport, data: bytes) -> bytes:
        transport.clear()
        proto.dataReceived(data)
        return transport.value()

    def closed(self, proto: SMTPServerProtocol, transport: RecordingTransport) -> None:
        """What the reactor does once a closing transport has flushed."""
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(ConnectionDone()))

    def test_an_idle_session_hears_421_at_once_and_the_stop_waits_for_its_close(self) -> None:
        """A session between commands gets 421 4.3.2 at once, and the stop fires when it has closed."""
        proto, transport = self.connect()
        self.talk(proto, transport, b"EHLO client.example\r\n")
        transport.clear()
        stopped = self.factory.shut_down(30)
        self.assertEqual(transport.value(), SHUTTING_DOWN)
        self.assertNoResult(stopped)
        self.closed(proto, transport)
        self.successResultOf(stopped)

    def test_a_message_waiting_for_its_decision_hears_the_reply_then_421(self) -> None:
        """A session whose end-of-DATA decision is pending gets that reply, then 421; a pipelined MAIL after it is not read."""
        self.handler.deferred = True
        proto, transport = self.connect()
        self.talk(proto, transport, b"EHLO client.example\r\nMAIL FROM:<s@client.example>\r\n")
        self.handler.fire()
        self.talk(proto, transport, b"RCPT TO:<r@example.com>\r\n")
        self.handler.fire()
        self.talk(proto, transport, b"DATA\r\n")
        self.talk(proto, transport, b"Subject: x\r\n\r\nbody\r\n.\r\nMAIL FROM:<again@client.example>\r\n")
        transport.clear()
        stopped = self.factory.shut_down(30)
        self.assertEqual(transport.value(), b"")  # the backend has the message: no 421 yet
        self.assertNoResult(stopped)
        self.assertEqual(self.handler.fire(), "data_end")
        self.assertEqual(codes(transport.value()), [250, 421])
        self.assertTrue(transport.value().endswith(SHUTTING_DOWN))
        self.assertEqual(self.handler.calls.count("mail"), 1)
        self.assertEqual(len(self.handler.messages), 1)
        self.closed(proto, transport)
        self.successResultOf(stopped)

    def test_a_pending_rcpt_gets_its_reply_then_421(self) -> None:
        """A pending RCPT decision is answered, then 421 ends the session before the pipelined DATA."""
        self.handler.deferred = True
        proto, transport = self.connect()
        self.talk(proto, transport, b"EHLO client.example\r\nMAIL FROM:<s@client.example>\r\n")
        self.handler.fire()
        self.talk(proto, transport, b"RCPT TO:<r@example.com>\r\nDATA\r\n")
        transport.clear()
        stopped = self.factory.shut_down(30)
        self.assertEqual(transport.value(), b"")
        self.handler.fire()
        self.assertEqual(codes(transport.value()), [250, 421])
        self.assertNotIn("data_end", self.handler.calls)
        self.closed(proto, transport)
        self.successResultOf(stopped)

    def test_a_message_being_received_is_read_to_its_end_and_answered(self) -> None:
        """A session in the middle of DATA may finish sending; the message is processed, answered 250, then 421."""
        proto, transport = self.connect()
        self.talk(proto, transport, ENVELOPE + b"DATA\r\nSubject: half\r\n\r\nfirst half\r\n")
        transport.clear()
        stopped = self.factory.shut_down(30)
        self.assertEqual(transport.value(), b"")
        out = self.talk(proto, transport, b"second half\r\n.\r\n")
        self.assertEqual(codes(out), [250, 421])
        self.assertEqual(self.handler.messages,
                         [b"Subject: half\r\n\r\nfirst half\r\nsecond half\r\n"])
        self.closed(proto, transport)
        self.successResultOf(stopped)

    def test_a_new_connection_while_stopping_gets_421(self) -> None:
        """A connection accepted after the stop began is answered 421 4.3.2 instead of 220 (RFC 5321 3.8)."""
        stopped = self.factory.shut_down(30)
        self.successResultOf(stopped)  # nothing was open
        proto, transport = self.connect()
        self.assertEqual(transport.value(), SHUTTING_DOWN)
        self.assertNotIn("connect", self.handler.calls)

    def test_what_is_still_open_after_the_grace_is_cut(self) -> None:
        """A client that never finishes its DATA holds the stop for the grace, not longer: then it is cut."""
        proto, transport = self.connect()
        self.talk(proto, transport, ENVELOPE + b"DATA\r\nSubject: slow\r\n")
        stopped = self.factory.shut_down(5)
        self.clock.advance(4.9)
        self.assertNoResult(stopped)
        self.clock.advance(0.2)
        self.successResultOf(stopped)
        self.assertTrue(transport.disconnected)  # aborted, not a polite close

    def test_a_second_stop_waits_for_the_same_sessions(self) -> None:
        """shut_down called twice gives two Deferreds that fire together when the last session ends."""
        proto, transport = self.connect()
        self.talk(proto, transport, ENVELOPE + b"DATA\r\n")
        first, second = self.factory.shut_down(30), self.factory.shut_down(30)
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.talk(proto, transport, b".\r\n")
        self.closed(proto, transport)
        self.successResultOf(first)
        self.successResultOf(second)


# --- the stop signal --------------------------------------------------------------


class _SignalReactor:
    """What ``stop_on_signals`` asks of a reactor, recorded."""

    def __init__(self) -> None:
        self.scheduled: list[tuple] = []
        self._exitSignal = None

    def callFromThread(self, f, *args) -> None:  # noqa: N802 (Twisted's name)
        self.scheduled.append((f, args))


def test_the_stop_signal_handler_only_schedules_the_stop():
    """SIGTERM's handler logs nothing and takes no lock: it records the signal for twistd's exit and schedules the stop on the reactor thread, which then logs."""
    import signal

    from twisted.logger import globalLogPublisher

    from mppproxy.reloading import stop_on_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    reactor, stops, events = _SignalReactor(), [], []
    globalLogPublisher.addObserver(events.append)
    try:
        stop_on_signals(reactor, lambda: stops.append(1))
        handler = signal.getsignal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGINT) is handler
        handler(signal.SIGTERM, None)  # as Python runs it, between two bytecodes
        assert events == [] and stops == []
        assert reactor._exitSignal == signal.SIGTERM
        (f, args), = reactor.scheduled
        f(*args)  # the reactor thread, later
        assert stops == [1]
        assert any("SIGTERM received" in e.get("log_format", "").format(**e) for e in events)
    finally:
        globalLogPublisher.removeObserver(events.append)
        for s, h in before.items():
            signal.signal(s, h)


# --- workers ----------------------------------------------------------------------


def test_stopping_workers_waits_for_them_and_kills_the_late_ones():
    """The supervisor's stop fires once every worker has exited; a worker still running after the grace and margin is killed."""
    from twisted.internet.error import ProcessTerminated
    from twisted.internet.task import Clock

    from mppproxy.workers import WORKER_STOP_MARGIN, WorkerSupervisor

    class Transport:
        def __init__(self) -> None:
            self.signals: list[str] = []

        def signalProcess(self, name: str) -> None:  # noqa: N802
            self.signals.append(name)

    class Reactor(Clock):
        def spawnProcess(self, proto, executable, args, env=None, childFDs=None):  # noqa: N802,N803
            proto.transport = Transport()

    reactor = Reactor()
    sup = WorkerSupervisor(reactor, {"tcp:25": object()}, [], 3)
    sup.command = lambda index: ([], {})  # type: ignore[method-assign]
    sup.start()
    first, second = sup.processes
    stopped = sup.stop(10)
    assert first.transport.signals == ["TERM"] and second.transport.signals == ["TERM"]
    assert not stopped.called
    first.processEnded(Failure(ProcessTerminated(signal=15)))
    assert not stopped.called
    reactor.advance(10 + WORKER_STOP_MARGIN)
    assert second.transport.signals == ["TERM", "KILL"]
    assert stopped.called
    second.processEnded(Failure(ProcessTerminated(signal=9)))  # no restart while stopping
    assert reactor.getDelayedCalls() == []
