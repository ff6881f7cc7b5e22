"""Issue #11, "Done when": edge and scan mode share one post-DATA step, so
scan mode answers every message with the verdict the edge gives it under
the same configuration.

For each message of the mixed corpus (CPython's email test messages,
tests/data/email_corpus), the hostile messages of tests/test_mime.py (every
defect kind, bombs, deep nesting, huge header sections, endless lines) and
a set made to reach each rung of the ladder (clean, tagged, quarantined,
rejected, discarded, infected, attachment refused, malformed, an engine
skipped or failing), one configuration (MIME guard, attachment rules, header
rules, clamd and spamd, tag/quarantine/reject/discard) judges it three
times:

* at the edge: ``EdgeSession.on_data_end`` in process, the policy engine off
  (the default policy judges, as scan mode has no pre-DATA checks), Maildir
  delivery, its transaction log event and reply read;
* in scan mode over SMTP: the scan service's ``ScanSessionHandler.on_data_end``,
  its 250/451 reply read;
* in scan mode over HTTP: ``POST /scan`` on the scan service's resource, its
  JSON read.

All three must agree on the disposition, the score, the reasons, each
scanner's score, rules and skip, and the refusal (its template, and the
edge's reply code is that template's).  Each message is its own test, named
after the message, so a failure names it.

The engines are content-aware fakes on loopback driven by the real clamd and
spamd clients: clamd finds the EICAR test string, spamd scores tokens.  With
``MPP_CLAMD_ADDRESS`` set (an endpoint such as ``tcp:127.0.0.1:3310``) a
real clamd is asked instead of the fake.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import zipfile
from typing import Any, Callable, Optional

from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from fakes_scanners import clamd_complete, instream_payload, spamd_complete, spamd_reply
from mppproxy.config.load import from_mapping
from mppproxy.config.schema import ProxyConfig, spool_directory
from mppproxy.edge.context import make_context
from mppproxy.edge.handler import EdgeSession
from mppproxy.scanservice.core import ScanRuntime
from mppproxy.scanservice.http import ScanResource
from mppproxy.scanservice.smtp import ScanSessionHandler
from mppproxy.smtp.replies import Reply
from mppproxy.templates import REFUSALS
from test_edge_handler import make_session, make_txn
from test_mime import CORPUS, DEFECT_CASES, HEAD, MB, MIXED, big_message, crlf, msg, nested
from test_scan_fixes import ContentEngine

reactor: Any = _reactor

# A real clamd to ask instead of the fake (an endpoint: tcp:127.0.0.1:3310).
CLAMD = os.environ.get("MPP_CLAMD_ADDRESS", "")

SENDER = "<sender@client.example>"
RECIPIENT = "<r@example.com>"

# -- the messages ----------------------------------------------------------------------

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def _plain(subject: str, body: str | bytes = "Just a note.", *extra: str) -> bytes:
    return msg("From: <sender@client.example>", "To: <r@example.com>", f"Subject: {subject}",
               "Date: Mon, 1 Jan 2024 00:00:00 +0000", "Message-ID: <1@client.example>",
               *extra, "", body)


def _attached(subject: str, filename: str, content: bytes,
              ctype: str = "application/octet-stream") -> bytes:
    encoded = base64.encodebytes(content).decode().replace("\n", "\r\n").rstrip("\r\n")
    return msg(*HEAD[:2], f"Subject: {subject}", "MIME-Version: 1.0",
               "Content-Type: multipart/mixed; boundary=\"b\"", "",
               "--b", "Content-Type: text/plain", "", "see attached",
               "--b", f"Content-Type: {ctype}",
               f"Content-Disposition: attachment; filename=\"{filename}\"",
               "Content-Transfer-Encoding: base64", "", encoded, "--b--")


def _zip(name: str, content: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr(name, content)
    return out.getvalue()


# name -> (the disposition this configuration gives it, the message).  The
# fake spamd scores by the tokens in it (see _spamd_answer); the fake clamd
# finds EICAR and answers garbage to "clamd-garbage".
LADDER: dict[str, tuple[str, bytes]] = {
    "clean": ("relay", _plain("hello")),
    "tagged by spamd": ("tag", _plain("spam-seven")),
    "tagged by a header rule": ("tag", _plain("cheap pills")),
    "quarantined by spamd": ("quarantine", _plain("spam-twelve")),
    "quarantined by a rule and spamd together": ("quarantine", _plain("cheap pills spam-seven")),
    "quarantined: spamd 16 less a negative rule": (
        "quarantine", _plain("spam-sixteen", "ok", "X-Mailer: TrustedMailer")),
    "rejected by score": ("reject", _plain("spam-sixteen")),
    "discarded": ("discard", _plain("spam-twentyfive")),
    "infected inline": ("reject", _plain("hello", EICAR)),
    "infected attachment": ("reject", _attached("invoice", "eicar.txt", EICAR, "text/plain")),
    "infected and over the discard score": ("reject", _plain("spam-twentyfive", EICAR)),
    "attachment refused": ("reject", _attached("invoice", "invoice.pdf.exe", b"MZ\x90\x00\x03")),
    "attachment refused in a zip": ("reject", _attached("archive", "files.zip",
                                                        _zip("setup.exe", b"MZ"),
                                                        "application/zip")),
    "refused by a header rule": ("reject", _plain("hello", "hi", "X-Mailer: BadMailer 1.0")),
    "malformed: no boundary": ("reject", msg(*HEAD, "MIME-Version: 1.0",
                                             "Content-Type: multipart/mixed", "", "--x",
                                             "Content-Type: text/plain", "", "spam-twentyfive",
                                             "--x--")),
    "malformed and a program": ("reject", msg(
        "From: a@example.org", "From: m@example.org", *HEAD[1:], "MIME-Version: 1.0",
        "Content-Type: multipart/mixed; boundary=b", "", "--b",
        "Content-Type: application/octet-stream", "Content-Disposition: attachment; filename=x.exe",
        "", "MZ", "--b--")),
    "8-bit header without SMTPUTF8": ("reject", msg(*HEAD[:2], b"Subject: caf\xc3\xa9 spam-seven",
                                                    "", "body")),
    "spamd garbage, skipped": ("relay", _plain("spamd-garbage")),
    "clamd garbage, tempfail": ("tempfail", _plain("clamd-garbage")),
    "inbound result headers": ("tag", _plain("spam-seven", "body", "X-MPP-Scan: score=0",
                                             "X-Spam-Flag: NO", "X-Spam-Score: -100")),
    "unix from line": ("relay", b"From nobody Mon Jan  1 00:00:00 2024\r\n" + _plain("hello")),
}
MIXED_SET = {name: data for name, (_, data) in LADDER.items()}


def _hostile() -> dict[str, bytes]:
    """tests/test_mime.py's hostile messages, bounded for a unit test: every
    defect kind's message, and its bombs at sizes past this config's bounds."""
    out = {f"defect {kind}": data for kind, (data, _) in sorted(DEFECT_CASES.items())}
    out.update({
        "10000 headers": msg(*HEAD, *[f"X-Header-{i}: value {i}" for i in range(10000)], "", "body"),
        "huge header block": msg(*HEAD, *["X-Filler: " + "a" * 900] * 150, "", "body"),
        "100 deep nesting": nested(100),
        "mime bomb of many parts": msg(*MIXED, *["--XYZ", "", "x"] * 3000, "--XYZ--"),
        "nested message bomb": msg(*HEAD, *["Content-Type: message/rfc822", ""] * 500,
                                   "Subject: bottom", "", "x"),
        "big body, program after it": b"".join(big_message(MB + MB // 2)),
        "over the size bound": b"".join(big_message(3 * MB)),
        "one endless line": msg(*HEAD, "", "A" * (2 * MB)),
    })
    return out


def _corpus() -> dict[str, bytes]:
    return {path.name: crlf(path.read_bytes()) for path in sorted(CORPUS.glob("msg_*.txt"))}


MESSAGES: dict[str, bytes] = {
    **{f"corpus {name}": data for name, data in _corpus().items()},
    **{f"hostile {name}": data for name, data in _hostile().items()},
    **{f"mixed {name}": data for name, data in MIXED_SET.items()},
}


# Scan mode judges the message as the edge passes it on (our Received: on
# top, the client's X-MPP-*, X-Spam-* and our Authentication-Results
# removed: docs/design.md promise 7), so every message here, the leading
# mbox "From " line, the leading folded line and forged X-Spam-Flag ones
# included, gets one verdict, score and rules in both.


# -- the engines -----------------------------------------------------------------------

def _clamd_answer(engine: ContentEngine, request: bytes) -> bytes:
    if request == b"zVERSION\0":
        return b"ClamAV 1.0.0/27000/Mon Jan  1 00:00:00 2024\0"
    if request == b"zPING\0":
        return b"PONG\0"
    payload = instream_payload(request)
    engine.scanned.append(payload)
    if b"clamd-garbage" in payload:
        return b"what?\0"
    # clamd decodes the parts: a base64 EICAR is found as well.
    found = EICAR in payload or base64.b64encode(EICAR)[:40] in payload.replace(b"\r\n", b"")
    return b"stream: Eicar-Signature FOUND\0" if found else b"stream: OK\0"


SPAMD_SCORES = ((b"spam-twentyfive", 25.0), (b"spam-sixteen", 16.0), (b"spam-twelve", 12.0),
                (b"spam-seven", 7.0))


def _spamd_answer(engine: ContentEngine, request: bytes) -> bytes:
    if request.startswith(b"PING "):
        return b"SPAMD/1.5 0 PONG\r\n\r\n"
    body = request.split(b"\r\n\r\n", 1)[1]
    engine.scanned.append(body)
    if b"spamd-garbage" in body:
        return b"SPAMD/1.1 0 EX_OK\r\nContent-length: 3\r\n\r\n???"
    score = next((s for token, s in SPAMD_SCORES if token in body), 0.0)
    if not score:
        return spamd_reply(b"", spam="False ; 0.0 / 5.0")
    return spamd_reply(b"FAKE_SPAM,FAKE_TOKEN", spam=f"True ; {score:.1f} / 5.0")


# -- the configuration -----------------------------------------------------------------

def configuration(data_dir: str, clamd: str, spamd: str) -> ProxyConfig:
    """The one configuration all three judge with."""
    return from_mapping({
        "data_dir": data_dir,
        "relay_domains": ["example.com"],
        "smtp": {"hostname": "mx.example.test"},
        # Off: the default policy judges at the edge, as in scan mode (which
        # has no pre-DATA checks); scanning runs all the same.
        "policy": {"enabled": False},
        "scanners": {"clamd": {"address": clamd, "retries": 0, "timeout": 10.0},
                     "spamd": {"address": spamd, "retries": 0, "timeout": 10.0}},
        "policies": {"default": {
            "scoring": {"tag": 5, "quarantine": 10, "reject": 15},
            "scan": {
                "enabled": True, "result_headers": True, "discard_score": 20,
                "engines": {"clamd": {}, "spamd": {"on_failure": "skip"}},
                "mime": {"max_depth": 10, "max_parts": 100, "max_header_lines": 200,
                         "max_header_bytes": 65536, "memory_bytes": MB, "max_size": 2 * MB,
                         "actions": {"header_invalid": "score:1.5", "encoding_invalid": "score:2"}},
                "headers": {"rules": [
                    {"header": "Subject", "pattern": "cheap pills", "action": "score:6",
                     "name": "pills"},
                    {"header": "X-Mailer", "pattern": "^BadMailer", "action": "reject",
                     "name": "bad mailer"},
                    {"header": "X-Mailer", "pattern": "^TrustedMailer", "action": "score:-3",
                     "name": "trusted mailer"},
                    {"header": "X-Spam-Flag", "pattern": ".", "action": "score:2",
                     "name": "inbound spam flag"}]},
            }}},
    })


# -- what each side answered -----------------------------------------------------------

def _printable(text: str) -> str:
    # As scan mode shows rules and reasons (no control character in a reply).
    return "".join(c if c.isprintable() else "?" for c in text)


def _sizeless(skipped: str) -> str:
    # "over max_size: size N > M": the edge's N counts its Received: field.
    return re.sub(r"\bsize \d+ >", "size N >", skipped)


def _edge_answer(event: dict[str, Any], reply: Reply) -> dict[str, Any]:
    """The edge's verdict as its log event and reply tell it."""
    action = str(event["action"])
    skipped = event["scan_skipped"]
    scanners = {}
    for hit in event["checks"]:
        if hit["check"].startswith("scan:"):
            name = hit["check"][5:]
            # A scanner not consulted: "kind: reason" (scan_skipped), as
            # scan mode names it, rather than the check's "failed: reason".
            scanners[name] = (round(hit["score"], 2) + 0.0,
                              [_printable(r) for r in hit.get("reasons", ())],
                              _sizeless(_printable(skipped.get(name, hit.get("skipped", "")))))
    for name in event["checks_passed"]:
        if name.startswith("scan:"):
            scanners[name[5:]] = (0.0, [], "")
    refused = action in ("reject", "tempfail")
    return {
        # Without a backend the edge's relay is local delivery.
        "action": "relay" if action == "deliver" else action,
        "score": event["score"],
        "reasons": event["reason"],
        "refusal": event["decided_by"] if refused else "",
        "reply": (reply.code, reply.enhanced) if refused else None,
        "scanners": scanners,
        "skipped": {name: _sizeless(why) for name, why in skipped.items()},
    }


def _http_answer(body: dict[str, Any], status: int) -> dict[str, Any]:
    refusal = body["refusal"]
    return {
        "action": body["action"],
        "score": body["score"],
        "reasons": "; ".join(body["reasons"]) or None,
        "refusal": refusal,
        "reply": REFUSALS[refusal] if refusal else None,
        "scanners": {name: (s["score"], s["rules"], _sizeless(s["skipped"]))
                     for name, s in body["scanners"].items()},
        "skipped": {name: _sizeless(s["skipped"])
                    for name, s in body["scanners"].items() if s["skipped"]},
        "status": status,
    }


FIRST_LINE = re.compile(r"action=(\S+) score=(\S+) policy=\S+ queue_id=\S+(?: refusal=(\S+))?$")


def _smtp_answer(reply: Reply) -> tuple[str, float, str, Optional[str], tuple[int, str]]:
    """(action, score, refusal, reasons, reply code) from scan_result.txt's lines."""
    lines = reply.text.split("\n")
    m = FIRST_LINE.match(lines[0])
    assert m is not None, reply.text
    reasons = next((line[len("reasons: "):] for line in lines if line.startswith("reasons: ")),
                   None)
    return m.group(1), float(m.group(2)), m.group(3) or "", reasons, (reply.code, reply.enhanced)


# -- the tests -------------------------------------------------------------------------

class _Judges:
    """The edge and the two front ends of scan mode over one configuration."""

    def __init__(self, case: unittest.TestCase):
        clamd_address = CLAMD
        engines = [ContentEngine(spamd_complete, _spamd_answer)]
        if not clamd_address:
            engines.append(ContentEngine(clamd_complete, _clamd_answer))
        for engine in engines:
            engine.port = reactor.listenTCP(0, engine, interface="127.0.0.1")
            case.addCleanup(engine.port.stopListening)
        data_dir = case.mktemp()
        self.config = configuration(data_dir, clamd_address or engines[1].address,
                                    engines[0].address)
        os.makedirs(spool_directory(self.config))
        ctx = make_context(self.config, reactor, reactor.getThreadPool())
        self.edge = EdgeSession(ctx)
        self.runtime = ScanRuntime(self.config, reactor)
        self.smtp = ScanSessionHandler(lambda: self.runtime, self.config.limits.max_message_size)
        self.http = ScanResource(lambda: self.runtime, lambda host: True)


def _post(resource: ScanResource, data: bytes) -> Any:
    """POST /scan with ``data``; the request, answered when its ``finished`` is set."""
    request = DummyRequest([b""])
    request.method = b"POST"
    request.content = io.BytesIO(data)
    request.client = IPv4Address("TCP", "127.0.0.1", 40000)
    request.args = {b"rcpt": [RECIPIENT.strip("<>").encode()],
                    b"sender": [SENDER.strip("<>").encode()],
                    b"client_ip": [b"198.51.100.7"], b"helo": [b"client.example"]}
    resource.render(request)
    return request


class ScanModeEqualsEdgeTests(unittest.TestCase):
    """One test per message (``test_<message>``), generated below."""

    timeout = 60

    async def judge(self, name: str) -> None:
        data = MESSAGES[name]
        judges = _Judges(self)
        with capturedLogs() as events:
            reply = await judges.edge.on_data_end(make_session(), make_txn(data, SENDER, (RECIPIENT,)))
        [event] = [e for e in events if e.get("mpp_event") == "transaction"]
        edge = _edge_answer(event, reply)

        smtp_reply = await judges.smtp.on_data_end(make_session(), make_txn(data, SENDER, (RECIPIENT,)))

        request = _post(judges.http, data)
        for _ in range(2000):
            if request.finished:
                break
            await _turn()
        self.assertTrue(request.finished, f"{name}: no HTTP answer")
        http = _http_answer(json.loads(b"".join(request.written)), request.responseCode)

        where = f"{name}: edge {edge} / http {http}"
        expected = LADDER.get(name[len("mixed "):]) if name.startswith("mixed ") else None
        if expected is not None and not (name.startswith("mixed clamd") and CLAMD):
            self.assertEqual(edge["action"], expected[0], f"{name}: not on its rung; {where}")
        for key in ("action", "score", "refusal", "reply", "scanners", "skipped"):
            self.assertEqual(edge[key], http[key], f"{key} differs for {name}; {where}")
        if edge["reasons"] is not None:  # logged when refused or discarded
            self.assertEqual(edge["reasons"], http["reasons"], f"reasons differ for {name}; {where}")
        self.assertEqual(http["status"], 503 if http["action"] == "tempfail" else 200, where)
        action, score, refusal, reasons, code = _smtp_answer(smtp_reply)
        self.assertEqual((action, score, refusal, reasons),
                         (http["action"], http["score"], http["refusal"], http["reasons"]),
                         f"the SMTP answer differs for {name}: {smtp_reply.text!r}; {where}")
        self.assertEqual(code, (451, "4.3.0") if action == "tempfail" else (250, "2.0.0"), name)



async def _turn() -> None:
    await deferLater(reactor, 0.001, lambda: None)


def _test_name(name: str) -> str:
    return "test_" + re.sub(r"\W+", "_", name).strip("_").lower()


def _case(name: str) -> Callable[[ScanModeEqualsEdgeTests], Any]:
    async def judge(self: ScanModeEqualsEdgeTests) -> None:
        await self.judge(name)

    judge.__name__ = _test_name(name)
    judge.__doc__ = f"Scan mode over SMTP and HTTP gives {name!r} the edge's verdict."
    return judge


for _name in MESSAGES:
    assert not hasattr(ScanModeEqualsEdgeTests, _test_name(_name)), _name
    setattr(ScanModeEqualsEdgeTests, _test_name(_name), _case(_name))


class CoverageTests(unittest.SynchronousTestCase):

    def test_every_corpus_is_there(self) -> None:
        """The comparison covers the 48 corpus messages, every defect kind of test_mime and the mixed set."""
        names = list(MESSAGES)
        self.assertEqual(sum(n.startswith("corpus ") for n in names), 48)
        self.assertEqual(sum(n.startswith("hostile defect ") for n in names), len(DEFECT_CASES))
        self.assertEqual(len(MIXED_SET) + len(_hostile()) + 48, len(names))
