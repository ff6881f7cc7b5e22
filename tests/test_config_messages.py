"""Configuration and messages (issue #15): what check-config says, errors
that name the file and the key, refusals that carry a reference, and the
log line such a reference finds.

* ``thresholds.max_spam`` is refused in mode "policy" (nothing counts spam
  verdicts there);
* ``check-config`` describes the mode it checked;
* a missing certificate or a bad reply template is ``file: key: problem``,
  at check-config and at twistd start, never a traceback;
* the default refusals end with ``(ref <queue id>)`` within RFC 5321
  4.5.3.1.5's 512 octets, and a transaction refused before DATA is logged
  as ``refused`` with its sender, refused recipients and deciding check.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent

from fakes_policy import MemoryDatabase
from mppproxy.cli import main as cli_main
from mppproxy.config.errors import ConfigError
from mppproxy.config.load import check_files, from_mapping
from mppproxy.edge.context import make_context
from mppproxy.edge.handler import EdgeSession
from mppproxy.policy.runtime import PolicyRuntime
from mppproxy.smtp.server import SMTPServerFactory
from mppproxy.templates import REFUSALS, ReplyRenderer

ROOT = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def twistd_start(config: Path) -> subprocess.CompletedProcess:
    """twistd with the file, on a port the test does not need (it must refuse before binding)."""
    return subprocess.run(TWISTD + ["-n", "--pidfile=", "mppproxy", "--config", str(config),
                                    "--listen", "tcp:0:interface=127.0.0.1"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


# -- thresholds.max_spam in mode policy -----------------------------------------------

def test_max_spam_refused_in_policy_mode():
    """mode "policy" with thresholds.max_spam set is an error naming the file and the key."""
    with pytest.raises(ConfigError) as info:
        from_mapping({"mode": "policy", "policies": {"default": {"thresholds": {
            "enabled": True, "max_messages": 10, "max_spam": 5}}}}, source="/etc/mpp/policy.toml")
    assert info.value.errors == [
        "/etc/mpp/policy.toml: policies.default.thresholds.max_spam: mode 'policy' scans no "
        "messages, so no spam verdict is ever counted; remove it (or set it to 0) and use "
        "thresholds.max_messages"]


def test_max_spam_named_once_where_it_is_set():
    """A named policy that inherits the default's max_spam is not reported again; one that sets its own is."""
    with pytest.raises(ConfigError) as info:
        from_mapping({"mode": "policy", "policies": {
            "default": {"thresholds": {"max_spam": 5}},
            "school": {"domains": ["school.example"]},
            "shop": {"domains": ["shop.example"], "thresholds": {"max_spam": 9}}}})
    keys = [e.split(": ")[1] for e in info.value.errors]
    assert keys == ["policies.default.thresholds.max_spam", "policies.shop.thresholds.max_spam"]


@pytest.mark.parametrize("mode", ["edge", "all-in-one"])
def test_max_spam_accepted_where_messages_are_scanned(mode):
    """The modes that scan after DATA keep max_spam."""
    data: dict[str, Any] = {"mode": mode, "policies": {"default": {"thresholds": {"max_spam": 5}}}}
    if mode == "edge":
        data["backend"] = {"host": "127.0.0.1"}
    assert from_mapping(data).policies["default"].thresholds.max_spam == 5


def test_max_spam_refused_by_twistd_mode_policy(tmp_path):
    """`twistd mppproxy --mode policy` with max_spam in the file exits 1 naming it, no traceback."""
    cfg = write(tmp_path / "p.toml", "[policies.default.thresholds]\nmax_spam = 3\n")
    proc = subprocess.run(TWISTD + ["-n", "--pidfile=", "mppproxy", "--mode", "policy", "--config",
                                    str(cfg)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode != 0
    assert f"{cfg}: policies.default.thresholds.max_spam: mode 'policy'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


# -- check-config describes the mode it checked ------------------------------------------

@pytest.mark.parametrize("toml, expected", [
    ('mode = "policy"\n[policyd]\nlisten = ["tcp:10040:interface=127.0.0.1"]\n'
     '[policies.school]\ndomains = ["school.example"]\n',
     "OK (mode policy, policy server on tcp:10040:interface=127.0.0.1, policies default, school)"),
    ('mode = "scan"\n[scanservice]\nhttp_listen = []\n',
     "OK (mode scan, scan service: SMTP tcp:10026:interface=127.0.0.1, HTTP off, policies default)"),
    ('mode = "edge"\nlisten = ["tcp:25:interface=0.0.0.0"]\n[backend]\nhost = "127.0.0.1"\nport = 10025\n',
     "OK (mode edge, listen tcp:25:interface=0.0.0.0, relay to 127.0.0.1:10025)"),
    ('mode = "all-in-one"\n',
     "OK (mode all-in-one, listen tcp:2525:interface=127.0.0.1, local Maildir delivery)"),
])
def test_check_config_summary_describes_the_mode(tmp_path, capsys, toml, expected):
    """The OK line names what the checked mode would open and where its answers go."""
    cfg = write(tmp_path / "c.toml", f'data_dir = "{tmp_path}/data"\n' + toml)
    assert cli_main(["check-config", str(cfg)]) == 0
    assert capsys.readouterr().out == f"{cfg}: {expected}\n"


# -- certificates and templates: file and key named ----------------------------------------

@pytest.fixture
def cert(tmp_path):
    """A certificate and key pair from trustme."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    leaf = ca.issue_cert("mx.test")
    cert_path, key_path = tmp_path / "mx.crt", tmp_path / "mx.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert_path))
    leaf.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


@pytest.mark.parametrize("missing, key", [("cert", "tls.cert_file"), ("key", "tls.key_file")])
def test_missing_certificate_or_key_names_file_and_key(tmp_path, capsys, cert, missing, key):
    """A certificate or key file that cannot be read is `file: its key: cannot read path`,
    at check-config and at twistd start, without a traceback."""
    cert_path, key_path = cert
    gone = tmp_path / "gone.pem"
    paths = {"cert": gone if missing == "cert" else cert_path,
             "key": gone if missing == "key" else key_path}
    cfg = write(tmp_path / "tls.toml", f'data_dir = "{tmp_path}/data"\n[tls]\n'
                f'cert_file = "{paths["cert"]}"\nkey_file = "{paths["key"]}"\n')
    assert cli_main(["check-config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"{cfg}: {key}: cannot read {gone}: No such file or directory\n" in err
    proc = twistd_start(cfg)
    assert proc.returncode != 0
    assert f"{cfg}: {key}: cannot read {gone}" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_check_files_without_a_source_still_names_the_key(tmp_path):
    """check_files called without the file name (a library caller) keeps the key."""
    config = from_mapping({"data_dir": str(tmp_path), "tls": {"cert_file": str(tmp_path / "x")}})
    with pytest.raises(ConfigError) as info:
        check_files(config)
    assert info.value.errors[0].startswith("<config>: tls.cert_file: cannot read ")


def test_jinja_syntax_error_in_site_template_names_file_and_key(tmp_path, capsys):
    """A syntax error in a site template is `file: policy.templates_dir: template path: line N: ...`
    at check-config and at twistd start, without a traceback."""
    data = tmp_path / "data"
    bad = write(data / "site" / "replies" / "greylist.txt", "Wait {{ retry_seconds }\n")
    cfg = write(tmp_path / "t.toml", f'data_dir = "{data}"\n[policy]\ntemplates_dir = "site"\n')
    assert cli_main(["check-config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"{cfg}: policy.templates_dir: template {bad}: line 1: unexpected '}}'" in err
    assert err.count("greylist.txt") == 1  # once, though every policy's path holds it
    proc = twistd_start(cfg)
    assert proc.returncode != 0
    assert f"{cfg}: policy.templates_dir: template {bad}: line 1:" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_policy_template_error_names_the_policy_key(tmp_path, capsys):
    """A broken template in a policy's own directory names policies.NAME.templates_dir."""
    data = tmp_path / "data"
    bad = write(data / "schools" / "replies" / "access.txt", "{% if what %}no endif\n")
    cfg = write(tmp_path / "t.toml", f'data_dir = "{data}"\n[policies.school]\n'
                'domains = ["school.example"]\ntemplates_dir = "schools"\n')
    assert cli_main(["check-config", str(cfg)]) == 1
    assert f"{cfg}: policies.school.templates_dir: template {bad}: line 1:" in capsys.readouterr().err


def test_template_error_found_when_only_scanning_uses_the_templates(tmp_path, capsys):
    """With policy.enabled false and a policy scanning, a broken site template (a scan refusal's) is named by file and key; with nothing scanning either it is not read."""
    data = tmp_path / "data"
    bad = write(data / "site" / "replies" / "virus.txt", "Virus {{ virus }\n")
    head = f'data_dir = "{data}"\n[policy]\nenabled = false\ntemplates_dir = "site"\n'
    cfg = write(tmp_path / "t.toml", head + "[policies.default.scan]\nenabled = true\n")
    assert cli_main(["check-config", str(cfg)]) == 1
    assert (f"{cfg}: policy.templates_dir: template {bad}: line 1: unexpected '}}'"
            in capsys.readouterr().err)
    idle = write(tmp_path / "idle.toml", head)
    assert cli_main(["check-config", str(idle)]) == 0


def test_unknown_template_file_name_is_an_error(tmp_path, capsys):
    """A site template whose name is no reply (a typo: greylsit.txt) would never be used: an error naming the key."""
    data = tmp_path / "data"
    typo = write(data / "site" / "replies" / "greylsit.txt", "Wait\n")
    write(data / "site" / "replies" / "_footer.txt", "partials start with _\n")
    cfg = write(tmp_path / "t.toml", f'data_dir = "{data}"\n[policy]\ntemplates_dir = "site"\n')
    assert cli_main(["check-config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"{cfg}: policy.templates_dir: {typo}: 'greylsit' is not a reply template name" in err
    assert "_footer" not in err


def test_unknown_template_name_in_config_names_file_and_key():
    """scanners.command[].template must be a refusal the renderer knows (its codes are fixed there)."""
    with pytest.raises(ConfigError) as info:
        from_mapping({"scanners": {"command": [{"command": ["scan", "{file}"], "template": "virsu"}]}},
                     source="/etc/mpp.toml")
    assert info.value.errors[0].startswith(
        "/etc/mpp.toml: scanners.command[0].template: 'virsu' is not a reply template (one of: ")


# -- references in refusals -----------------------------------------------------------------

CONTEXT = {"client_ip": "192.0.2.1", "helo": "h.example", "sender": "s@x.example",
           "sender_domain": "x.example", "recipient": "r@y.example", "recipient_domain": "y.example",
           "policy": "default", "queue_id": "6K6GERZZ0000002", "reason": "policy violation",
           "what": "client 192.0.2.1", "reasons": ["listed in bl.test"], "retry_seconds": 300,
           "score": 16, "virus": "Eicar-Test", "problem": "bad boundary", "explanation": ""}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_every_default_refusal_ends_with_the_reference(name):
    """Each built-in refusal template ends with (ref <queue id>)."""
    reply = ReplyRenderer().reply(name, CONTEXT)
    assert reply.text.endswith(" (ref 6K6GERZZ0000002)"), reply.text


def test_no_reference_without_a_queue_id():
    """A refusal without a queue id (a Postfix policy request before one exists) has no empty "(ref )"."""
    assert "(ref" not in ReplyRenderer().reply("access", dict(CONTEXT, queue_id="")).text


@pytest.mark.parametrize("explanation", ["x" * 2000, "é" * 2000])
def test_long_refusal_keeps_reference_within_512_octets(explanation):
    """An over-long line (a long SPF explanation, ASCII or UTF-8) is shortened in the
    middle: the wire line stays within 512 octets with CRLF and still ends with the reference."""
    reply = ReplyRenderer().reply("spf", dict(CONTEXT, explanation=explanation))
    wire = reply.to_bytes()
    assert len(wire) <= 512, len(wire)
    assert wire.endswith(b"... (ref 6K6GERZZ0000002)\r\n"), wire[-60:]
    wire.decode("utf-8")  # no character cut in half


# -- the log line a reference finds ------------------------------------------------------------

def converse(commands: bytes, policy: dict) -> tuple[bytes, list]:
    """One SMTP session on a StringTransport through the edge handler with the real engine."""
    clock = MemoryReactorClock()
    config = from_mapping({"relay_domains": ["example.com"], "policies": {"default": policy}})
    runtime = PolicyRuntime(config, clock, "mx.test", database=MemoryDatabase(clock))
    ctx = make_context(config, clock, None, policy=runtime)
    factory = SMTPServerFactory(config, lambda: EdgeSession(ctx), clock,
                                is_trusted=ctx.trusted, hostname="mx.test")
    proto = factory.buildProtocol(IPv4Address("TCP", "198.51.100.7", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.7", 40000))
    with capturedLogs() as events:
        proto.makeConnection(transport)
        proto.dataReceived(commands)
    return transport.value(), [e for e in events if e.get("mpp_event") == "transaction"]


ACCESS = {"access": {"blacklist_recipients": ["closed@example.com", "gone@example.com"]}}


def test_all_recipients_refused_then_quit_is_logged_refused():
    """Recipients refused by policy then QUIT: one `refused` event with sender, the refused
    recipients and the deciding check, under the id the refusal's (ref ...) names."""
    out, [tx] = converse(b"EHLO c.example\r\nMAIL FROM:<a{b}@c.example>\r\n"
                         b"RCPT TO:<closed@example.com>\r\nRCPT TO:<gone@example.com>\r\nQUIT\r\n",
                         ACCESS)
    replies = out.split(b"\r\n")
    refusal = next(line for line in replies if line.startswith(b"554 5.7.1 Access denied"))
    assert refusal.endswith(f"(ref {tx['queue_id']})".encode()), refusal
    assert (tx["action"], tx["decided_by"], tx["sender"], tx["refused_recipients"], tx["reason"]) == \
        ("refused", "access", "a{b}@c.example", ["closed@example.com", "gone@example.com"], "QUIT")
    # The text line: the sender's "{" is a field value, never part of the format.
    assert formatEvent(tx) == (
        f"transaction {tx['queue_id']} from 198.51.100.7: refused <a{{b}}@c.example> to "
        "<closed@example.com>, <gone@example.com> by access (554 5.7.1 Access denied: recipient "
        f"<gone@example.com> is not accepted here (ref {tx['queue_id']}); then QUIT)")


def test_relay_control_refusal_is_logged_refused():
    """A recipient refused by relay control then QUIT is `refused` by "relay control"."""
    _, [tx] = converse(b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<x@evil.example>\r\n"
                       b"QUIT\r\n", {})
    assert (tx["action"], tx["decided_by"], tx["refused_recipients"]) == \
        ("refused", "relay control", ["x@evil.example"])
    assert " refused <a@c.example> to <x@evil.example> by relay control (554 5.7.1 " in formatEvent(tx)


def test_transaction_with_an_accepted_recipient_stays_aborted():
    """A transaction with an accepted recipient that the client abandons is `aborted`,
    still listing what was refused."""
    _, [tx] = converse(b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<closed@example.com>\r\n"
                       b"RCPT TO:<open@example.com>\r\nRSET\r\nQUIT\r\n", ACCESS)
    assert (tx["action"], tx["reason"], tx["recipients"]) == ("aborted", "RSET", ["open@example.com"])
    assert (tx["refused_recipients"], tx["decided_by"]) == (["closed@example.com"], "access")


def test_mail_then_quit_without_refusals_stays_aborted():
    """MAIL then QUIT, nothing refused: `aborted (QUIT)` as before."""
    _, [tx] = converse(b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nQUIT\r\n", {})
    assert (tx["action"], tx["decided_by"], tx["refused_recipients"]) == ("aborted", None, [])
    assert formatEvent(tx).endswith(": aborted <a@c.example> to (none), decided by - (QUIT)")


def test_refused_event_carries_the_reply_the_client_got():
    """The refused event's reply_code and reply_text are the refusal sent to the client."""
    out, [tx] = converse(b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<closed@example.com>\r\n"
                         b"QUIT\r\n", ACCESS)
    sent = next(line for line in out.split(b"\r\n") if line.startswith(b"554 "))
    assert (tx["reply_code"], tx["reply_text"].encode()) == (554, sent)
