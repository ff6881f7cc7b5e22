"""The proxy's own Python cost per relayed message, without sockets.

The session (server protocol + edge handler + lockstep relay + a pooled backend
connection) runs on StringTransports; a scripted backend answers each
command the way smtp-sink does.  Each message is smtp-source's dialogue:
a new session, HELO, MAIL, RCPT, DATA, 1 KiB, QUIT.  No kernel, no reactor,
no log file: what is left is our code, Deferreds and timers, which the
loopback benchmark (relay_bench.py) cannot show apart from the kernel's
share on a busy machine.

    python3 benchmarks/inproc.py                 # us per message, best of 5 rounds
    python3 benchmarks/inproc.py --profile       # cProfile, top functions
    python3 benchmarks/inproc.py --opcodes       # Python opcodes per message (deterministic)
    python3 benchmarks/inproc.py --corpus DIR    # relay DIR/*.eml (e.g. the scan corpus) instead

Run from the repository (it puts the repository first on sys.path).  The
numbers are for comparing two versions on the same machine, not absolute.
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import MemoryReactorClock, StringTransport  # noqa: E402

from mppproxy.config.load import load  # noqa: E402
from mppproxy.edge.context import make_context  # noqa: E402
from mppproxy.edge.handler import EdgeSession  # noqa: E402
from mppproxy.smtp.client import BackendProtocol  # noqa: E402
from mppproxy.smtp.server import SMTPServerFactory  # noqa: E402

BODY = (b"From: <a@example.com>\r\nTo: <b@example.net>\r\nSubject: test\r\n\r\n"
        + (b"x" * 78 + b"\r\n") * 12 + b".\r\n")
DIALOGUE = [b"HELO loadgen.test\r\n", b"MAIL FROM:<a@example.com>\r\n",
            b"RCPT TO:<b@example.net>\r\n", b"DATA\r\n", BODY, b"QUIT\r\n"]
CLIENT = IPv4Address("TCP", "127.0.0.1", 40000)
LOCAL = IPv4Address("TCP", "127.0.0.1", 2525)


class ScriptedBackend:
    """Answers what the proxy wrote to its pooled connection, as smtp-sink would."""

    def __init__(self, reactor: MemoryReactorClock):
        self.proto = BackendProtocol(reactor)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.proto.extensions = {"PIPELINING": "", "8BITMIME": "", "SIZE": "10240000"}
        self.in_data = False

    def answer(self) -> bool:
        out = self.transport.value()
        if not out:
            return False
        self.transport.clear()
        if self.in_data:
            assert out.endswith(b"\r\n.\r\n"), out[-20:]
            self.in_data = False
            self.proto.dataReceived(b"250 2.0.0 Ok: queued as X\r\n")
            return True
        for line in out.split(b"\r\n")[:-1]:
            verb = line[:4]
            if verb == b"DATA":
                self.in_data = True
                self.proto.dataReceived(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb in (b"MAIL", b"RCPT", b"RSET"):
                self.proto.dataReceived(b"250 2.0.0 Ok\r\n")
            else:
                raise AssertionError(f"unexpected command {line!r}")
        return True


def _dot_stuffed(message: bytes) -> bytes:
    """A message as DATA sends it: CRLF lines, dots doubled, the end mark."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines) + b".\r\n"


def build(data_dir: str) -> tuple[SMTPServerFactory, ScriptedBackend]:
    config = load(None, None, {"backend": {"host": "127.0.0.1", "port": 2526},
                               "relay_domains": ["example.net"],
                               "trusted_networks": ["127.0.0.0/8"], "data_dir": data_dir})
    reactor = MemoryReactorClock()
    ctx = make_context(config, reactor, None)
    factory = SMTPServerFactory(config, lambda: EdgeSession(ctx), reactor,
                                is_trusted=ctx.trusted, hostname=ctx.hostname)
    backend = ScriptedBackend(reactor)
    assert ctx.pool is not None
    ctx.pool.extensions = backend.proto.extensions
    ctx.pool.release(backend.proto, dirty=False)
    return factory, backend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=4000, help="messages per round")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--opcodes", action="store_true")
    ap.add_argument("--corpus", default="",
                    help="relay these .eml files (one per session, in turn) instead of 1 KiB")
    a = ap.parse_args()
    dialogues = [DIALOGUE]
    if a.corpus:
        dialogues = [DIALOGUE[:4] + [_dot_stuffed(open(os.path.join(a.corpus, name), "rb").read()),
                                     DIALOGUE[5]]
                     for name in sorted(os.listdir(a.corpus)) if name.endswith(".eml")]
    turn = [0]
    factory, backend = build(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                          "results", "inproc-data"))

    def one() -> None:
        session = factory.buildProtocol(CLIENT)
        transport = StringTransport(peerAddress=CLIENT, hostAddress=LOCAL)
        session.makeConnection(transport)
        dialogue = dialogues[turn[0] % len(dialogues)]
        turn[0] += 1
        for data in dialogue:
            session.dataReceived(data)
            while backend.answer():
                pass
        out = transport.value()
        assert out.count(b"\r\n") == 7 and b"250 2.0.0 Ok: queued" in out, out
        session.connectionLost(None)

    for _ in range(300):
        one()
    if a.profile:
        prof = cProfile.Profile()
        prof.runcall(lambda: [one() for _ in range(a.n)])
        pstats.Stats(prof).sort_stats("tottime").print_stats(35)
    elif a.opcodes:
        counts: collections.Counter[str] = collections.Counter()

        def tracer(frame, event, arg):  # type: ignore[no-untyped-def]
            if event == "call":
                frame.f_trace_opcodes = True
            elif event == "opcode":
                counts[frame.f_code.co_filename] += 1
            return tracer
        n = 200
        sys.settrace(tracer)
        for _ in range(n):
            one()
        sys.settrace(None)
        print(f"{sum(counts.values()) / n:.0f} Python opcodes per message")
    else:
        best = float("inf")
        for _ in range(5):
            t0 = time.process_time()
            for _ in range(a.n):
                one()
            best = min(best, (time.process_time() - t0) / a.n * 1e6)
        print(f"{best:.1f} us of CPU per message (best of 5 rounds of {a.n})")


if __name__ == "__main__":
    main()
