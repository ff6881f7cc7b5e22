"""Write to a TCP transport at once when nothing is queued before it.

Twisted's ``transport.write`` always buffers and registers the socket for
writability, then sends on the next reactor turn and unregisters: two
``epoll_ctl`` calls and a loop iteration per write.  SMTP is a dialogue of
small replies, so that was a quarter of the proxy's CPU per message (py-spy,
1 KiB messages).  When the transport's buffer is empty we make the send its
``writeSomeData`` would make (``socket.send``) and hand only what the kernel
did not take to ``transport.write``, so ordering is unchanged.

Anything that is not a plain, connected, idle TCP transport (TLS after
STARTTLS, test transports, a closing connection) takes the ordinary path.
This reads FileDescriptor's buffer attributes, which Twisted has kept since
long before our minimum version; tests/test_wire.py checks both paths.
"""
from __future__ import annotations

from typing import Any

from twisted.internet import main
from twisted.python.failure import Failure


def _idle_tcp(transport: Any) -> bool:
    """A plain, connected TCP transport with nothing waiting to be written."""
    return (getattr(transport, "TLS", True) is False
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnected
            and not transport._tempDataBuffer
            and transport.offset == len(transport.dataBuffer))


def send_now(transport: Any, data: bytes) -> None:
    # _idle_tcp, inline: this runs ~11 times per relayed message.
    if (getattr(transport, "TLS", True) is False
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnected
            and not transport._tempDataBuffer
            and transport.offset == len(transport.dataBuffer)):
        # The send writeSomeData would make, without its three Python
        # calls.  Any error (a full buffer, a reset) leaves the data to
        # transport.write, whose own send then sees the same condition and
        # handles it as usual.
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0
        if sent == len(data):
            return
        if sent > 0:
            data = data[sent:]
    transport.write(data)


def close_now(transport: Any) -> bool:
    """Close an idle TCP transport at once; False (nothing done) for any
    other, which the caller then closes with ``loseConnection``.

    ``loseConnection`` with nothing left to write still registers the socket
    for writability and waits a reactor turn to find the buffer empty (two
    ``epoll_ctl`` calls and an event per connection).  With the buffer
    already empty this does at once what that turn would do, the way
    ``loseConnection`` itself does when the write side is already shut:
    the socket is shut down and closed, and the protocol's
    ``connectionLost`` runs before this returns."""
    if not _idle_tcp(transport):
        return False
    transport.stopReading()
    transport.stopWriting()
    transport.connectionLost(Failure(main.CONNECTION_DONE))  # type: ignore[no-untyped-call]  # Twisted's Failure() is unannotated
    return True
