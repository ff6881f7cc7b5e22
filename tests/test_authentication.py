"""DKIM (RFC 6376, RFC 8463) and DMARC (RFC 7489) after DATA, and the one
Authentication-Results field (RFC 8601): ``scan/auth/`` and
``scan/scanners/authentication.py``.

Keys and DMARC records are served by a real authoritative DNS server on
loopback (Twisted Names, ``dnszone.py``) and asked through our own resolver;
names in DROP are never answered (the resolver times out: temperror).
Messages are signed here with dkimpy (RSA 2048, RSA 512 for the key-size
rule, Ed25519); the RFC 8463 Appendix A.3 message is verified as published.
The end-to-end tests run the proxy on loopback with a fake backend: the
Authentication-Results field at the backend, and a p=reject DMARC fail
refused with 550 5.7.1.
"""
from __future__ import annotations

import base64
import smtplib
import time
from typing import Any, Optional

import dkim
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import reactor as _reactor
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs
from twisted.names import dns as tdns
from twisted.trial import unittest

from mppproxy.config.authentication import DkimConfig, DmarcConfig
from mppproxy.config.load import from_mapping
from mppproxy.config.errors import ConfigError
from mppproxy.config.policy import ScoringConfig
from mppproxy.dns.resolver import Resolver
from mppproxy.results import CheckResult, Disposition, HardAction, TransactionRecord
from mppproxy.scan.auth import dmarc as dmarc_
from mppproxy.scan.auth.psl import PublicSuffixList, default_list, organisational_domain
from mppproxy.scan.base import ScanInput
from mppproxy.scan.engine import ScanReport
from mppproxy.scan.scanners.authentication import AuthenticationScanner, AuthSettings
from mppproxy.verdict import decide

from dnszone import MemoryAuthority, ZoneServer, serve
from fakes_backend import FakeBackend, poll_until
from loopback import CLIENT_TIMEOUT, proxy_config, start_proxy, wait_reactor_quiet

reactor: Any = _reactor
TTL = 60

# -- keys ---------------------------------------------------------------------

_RSA = rsa.generate_private_key(65537, 2048)
RSA_PEM = _RSA.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())
RSA_PUB = base64.b64encode(_RSA.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
_ED = nacl.signing.SigningKey.generate()
ED_PRIVATE = base64.b64encode(bytes(_ED))
ED_PUB = base64.b64encode(bytes(_ED.verify_key)).decode()
# A 512-bit RSA key (made with openssl genrsa 512 for this test): RFC 8301
# 3.2 forbids accepting it, however good the signature.
RSA512_PEM = b"""-----BEGIN RSA PRIVATE KEY-----
MIIBPQIBAAJBAK/sucr7czEgtYJd3Svr8Fzrsny7PogGP8gzHRFYcMfdOWTYlKUL
nTu3/zEC+Ur+VsfbAZT0gjfoGoUnqqOBBQUCAwEAAQJBAKpEHimzpfBlbOcI+5eX
2eHFCNGp08KI8dBMkBSKmVUFT8NmdWYIWi4A/mkjuB1ahnifE9R/ET21ikvTZnS/
cT0CIQDXMF+1aBH2cV58Nfyeb/B2e7RtsUNDUDip+VIU3moCewIhANFKCSC7iIiQ
NdLWJKwg5Q6CWRk/utxNXH/n4oHX8D5/AiEAkjQEou0NX0JRbtUDSOZHG0kbIngQ
ejiT9zA1C4a9wecCIQDOCp1B5F5eU9spXjlsXFYlGp6tBNjp2h+erKOKQRT78QIh
AIIzPDJSVEf3PgCqAkxKVsCKuj9ImdRALLcgYB2TKu5F
-----END RSA PRIVATE KEY-----
"""
RSA512_PUB = base64.b64encode(serialization.load_pem_private_key(
    RSA512_PEM, None, unsafe_skip_rsa_key_validation=True).public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()

# RFC 8463 Appendix A.2 (keys) and A.3 (the message signed with both).
RFC8463_ED = "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
RFC8463_RSA = ("v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWR"
               "iGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutAC"
               "DfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3"
               "Ip3G+2kryOTIKT+l/K4w3QIDAQAB")
RFC8463_MESSAGE = (
    b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n"
    b" subject : date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus\r\n"
    b" Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=test; t=1528637909; h=from : to : subject :\r\n"
    b" date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3\r\n"
    b" DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz\r\n"
    b" dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=\r\n"
    b"From: Joe SixPack <joe@football.example.com>\r\n"
    b"To: Suzie Q <suzie@shopping.example.net>\r\n"
    b"Subject: Is dinner ready?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
    b"Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n"
    b"\r\n"
    b"Hi.\r\n"
    b"\r\n"
    b"We lost the game.  Are you hungry yet?\r\n"
    b"\r\n"
    b"Joe.\r\n")

# -- the zones ------------------------------------------------------------------

ZONES: dict[str, dict[str, list[str]]] = {
    "football.example.com": {
        "brisbane._domainkey.football.example.com": [RFC8463_ED],
        "test._domainkey.football.example.com": [RFC8463_RSA],
    },
    "sender.test": {
        "rsa._domainkey.sender.test": [f"v=DKIM1; k=rsa; p={RSA_PUB}"],
        "ed._domainkey.sender.test": [f"v=DKIM1; k=ed25519; p={ED_PUB}"],
        "short._domainkey.sender.test": [f"v=DKIM1; k=rsa; p={RSA512_PUB}"],
        "badp._domainkey.sender.test": ["v=DKIM1; k=rsa; p=MIIB!!not*base64$$"],
        "revoked._domainkey.sender.test": ["v=DKIM1; k=rsa; p="],
        "_dmarc.sender.test": ["v=DMARC1; p=reject; sp=quarantine; rua=mailto:d@sender.test"],
        "_dmarc.pct.sender.test": ["v=DMARC1; p=reject; pct=0"],
        "_dmarc.strict.sender.test": ["v=DMARC1; p=reject; adkim=s; aspf=s"],
        "_dmarc.two.sender.test": ["v=DMARC1; p=reject", "v=DMARC1; p=none"],
        "sender.test": ["v=spf1 ip4:127.0.0.1 -all"],
    },
    "other.test": {
        "rsa._domainkey.other.test": [f"v=DKIM1; k=rsa; p={RSA_PUB}"],
        "_dmarc.other.test": ["v=DMARC1; p=none"],
    },
    "slow.test": {},
}
# Never answered: the resolver's timeout, then temperror.
DROP = ("slow._domainkey.sender.test", "_dmarc.slow.test")


def _txt(text: str) -> Any:
    raw = text.encode()
    # A TXT record is character-strings of at most 255 octets (RFC 1035 3.3.14).
    return tdns.Record_TXT(*[raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""], ttl=TTL)


def start_dns(case: Any) -> int:
    authorities = [MemoryAuthority(zone, {name: [_txt(t) for t in texts]
                                          for name, texts in names.items()}, TTL, 30)
                   for zone, names in ZONES.items()]
    return serve(case, ZoneServer(authorities, drop=DROP))


# -- messages -------------------------------------------------------------------

def message(from_: str = "Alice <alice@sender.test>", subject: str = "hello",
            body: bytes = b"Hello there.\r\n", extra: bytes = b"") -> bytes:
    return (f"From: {from_}\r\nTo: bob@example.com\r\nSubject: {subject}\r\n"
            f"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <1@sender.test>\r\n"
            ).encode() + extra + b"\r\n" + body


def sign(msg: bytes, selector: str = "rsa", domain: str = "sender.test", key: bytes = RSA_PEM,
         algorithm: bytes = b"rsa-sha256", length: bool = False) -> bytes:
    sig: bytes = dkim.sign(msg, selector.encode(), domain.encode(), key,
                           signature_algorithm=algorithm, length=length,
                           include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return sig + msg


class AuthCase(unittest.TestCase):
    """A resolver on the test zones and a scanner built per test."""

    timeout = 30

    def setUp(self) -> None:
        self.port = start_dns(self)
        self.resolver = Resolver(reactor, [("127.0.0.1", self.port)], timeout=0.5)
        self.addCleanup(self.resolver.close)

    def scanner(self, dkim_: Optional[DkimConfig] = None, dmarc: Optional[DmarcConfig] = None,
                sample: float = 0.5) -> AuthenticationScanner:
        return AuthenticationScanner(
            AuthSettings(dkim_ or DkimConfig(enabled=True), dmarc or DmarcConfig(enabled=True)),
            reactor, self.resolver, "mx.test", sample=lambda: sample)

    async def scan(self, msg: bytes, scanner: Optional[AuthenticationScanner] = None,
                   spf: tuple[tuple[str, str], ...] = ()) -> CheckResult:
        scanner = scanner or self.scanner()
        with capturedLogs() as events:
            result = await scanner.scan(ScanInput(chunks=lambda: [msg], size=len(msg),
                                                  queue_id="Q1", spf=spf))
        # Never a traceback in the log.
        self.assertEqual([e for e in events if e.get("log_failure") is not None], [])
        return result

    def header(self, result: CheckResult) -> str:
        [(name, value)] = result.headers
        self.assertEqual(name, "Authentication-Results")
        self.assertTrue(value.startswith("mx.test; "), value)
        return value


class DkimTests(AuthCase):

    async def test_rfc8463_vector_both_signatures_pass(self) -> None:
        """The RFC 8463 A.3 message, as published, passes with both its Ed25519 and its RSA signature, keys from our DNS."""
        result = await self.scan(RFC8463_MESSAGE, self.scanner(dmarc=DmarcConfig()))
        value = self.header(result)
        self.assertIn("dkim=pass header.d=football.example.com header.i=@football.example.com "
                      "header.a=ed25519-sha256 header.s=brisbane", value)
        self.assertIn("dkim=pass header.d=football.example.com header.i=@football.example.com "
                      "header.a=rsa-sha256 header.s=test", value)
        self.assertNotIn("dmarc", value)

    async def test_rfc8463_vector_changed_body_fails(self) -> None:
        """One word of the RFC 8463 body changed: both signatures fail with "body hash mismatch"."""
        result = await self.scan(RFC8463_MESSAGE.replace(b"hungry", b"thirsty"),
                                 self.scanner(dmarc=DmarcConfig()))
        value = self.header(result)
        self.assertEqual(value.count('dkim=fail reason="body hash mismatch"'), 2, value)
        self.assertEqual(result.score, DkimConfig().score_fail)

    async def test_rsa_and_ed25519_signed_here_pass(self) -> None:
        """A message signed here with RSA 2048 and Ed25519 (dkimpy) passes both, each signature reported; DMARC passes by DKIM alignment."""
        msg = sign(sign(message()), selector="ed", key=ED_PRIVATE, algorithm=b"ed25519-sha256")
        result = await self.scan(msg)
        value = self.header(result)
        self.assertIn("header.a=ed25519-sha256 header.s=ed", value)
        self.assertIn("header.a=rsa-sha256 header.s=rsa", value)
        self.assertEqual(value.count("dkim=pass"), 2)
        self.assertIn("dmarc=pass header.from=sender.test", value)
        self.assertIsNone(result.action)
        self.assertEqual(result.score, 0.0)

    async def test_changed_header_fails(self) -> None:
        """A signed Subject changed after signing: the signature fails (signature did not verify)."""
        msg = sign(message()).replace(b"Subject: hello", b"Subject: HELLO")
        value = self.header(await self.scan(msg))
        self.assertIn('dkim=fail reason="signature did not verify"', value)

    async def test_second_subject_below_breaks_the_signature(self) -> None:
        """A second Subject: added below the signed one (the one verifiers read): fail."""
        msg = sign(message())
        head, _, body = msg.partition(b"\r\n\r\n")
        value = self.header(await self.scan(head + b"\r\nSubject: win money\r\n\r\n" + body))
        self.assertIn("dkim=fail", value)

    async def test_bad_base64_in_b_is_permerror(self) -> None:
        """Garbage in b= is a permerror with its reason, before any DNS query."""
        msg = sign(message())
        start = msg.index(b" b=") + 3
        broken = msg[:start] + b"!!!*" + msg[start + 4:]
        value = self.header(await self.scan(broken))
        self.assertIn("dkim=permerror", value)
        self.assertIn("not valid base64", value)

    async def test_bad_base64_in_p_is_permerror(self) -> None:
        """A key record whose p= is not base64: permerror naming the key record."""
        value = self.header(await self.scan(sign(message(), selector="badp")))
        self.assertIn("dkim=permerror", value)
        self.assertIn("key record", value)

    async def test_rsa_key_under_1024_bits_is_permerror(self) -> None:
        """A good signature made with a 512-bit RSA key is a permerror citing RFC 8301 3.2, and DMARC fails."""
        value = self.header(await self.scan(sign(message(), selector="short", key=RSA512_PEM)))
        self.assertIn('dkim=permerror reason="RSA key of 512 bits, under 1024 (RFC 8301 3.2)"', value)
        self.assertIn("dmarc=fail", value)

    async def test_revoked_and_missing_keys(self) -> None:
        """An empty p= is a revoked key, a name without a record is "no key for signature" (RFC 6376 6.1.2): both permerror."""
        value = self.header(await self.scan(sign(sign(message(), selector="revoked"),
                                                 selector="nosuch")))
        self.assertIn('reason="key revoked (empty p=)"', value)
        self.assertIn("no key for signature at nosuch._domainkey.sender.test", value)

    async def test_body_beyond_l_is_not_a_silent_pass(self) -> None:
        """l= covering part of the body and text appended after signing: "policy" by default, "pass" with the unsigned length when configured."""
        msg = sign(message(), length=True) + b"Click here: http://evil.example/\r\n"
        value = self.header(await self.scan(msg))
        self.assertIn('dkim=policy reason="body beyond l=: 34 octets not signed"', value)
        self.assertIn("dmarc=fail", value)
        lenient = self.scanner(DkimConfig(enabled=True, partial_body="pass"))
        value = self.header(await self.scan(msg, lenient))
        self.assertIn('dkim=pass reason="body beyond l=: 34 octets not signed"', value)

    async def test_l_covering_the_whole_body_passes(self) -> None:
        """l= equal to the body's length: a plain pass."""
        value = self.header(await self.scan(sign(message(), length=True)))
        self.assertIn("dkim=pass header.d=sender.test", value)
        self.assertNotIn("reason", value.split("dkim=pass")[1].split(";")[0])

    async def test_dns_timeout_is_temperror(self) -> None:
        """A key name the server never answers: temperror after the resolver's timeout, scored temperror, nothing raised or logged as a failure."""
        msg = sign(message(), selector="slow")
        started = time.monotonic()
        result = await self.scan(msg)
        self.assertLess(time.monotonic() - started, 5.0)
        self.assertIn('dkim=temperror reason="key slow._domainkey.sender.test: DNS timeout"',
                      self.header(result))

    async def test_signature_count_is_bounded(self) -> None:
        """Twenty signatures: only max_signatures are looked at."""
        msg = message()
        for _ in range(20):
            msg = sign(msg, selector="nosuch")
        result = await self.scan(msg, self.scanner(DkimConfig(enabled=True, max_signatures=3)))
        self.assertEqual(self.header(result).count("dkim=permerror"), 3)

    async def test_unsigned_is_dkim_none(self) -> None:
        """An unsigned message: dkim=none."""
        self.assertIn("dkim=none", self.header(await self.scan(message())))

    async def test_from_not_signed_is_permerror(self) -> None:
        """A signature whose h= leaves out From: is ignored with a permerror (RFC 6376 6.1.1)."""
        sig = dkim.sign(message(), b"rsa", b"sender.test", RSA_PEM, include_headers=[b"from", b"subject"])
        sig = sig.replace(b"h=from : subject", b"h=subject").replace(b"h=from:subject", b"h=subject")
        value = self.header(await self.scan(sig + message()))
        self.assertIn("dkim=permerror", value)

    async def test_big_message_verified_in_the_thread_pool(self) -> None:
        """A message above thread_above is verified off the reactor thread, same result."""
        body = b"x" * 70 + b"\r\n"
        msg = sign(message(body=body * 5000))
        scanner = self.scanner(DkimConfig(enabled=True, thread_above=1000))
        value = self.header(await self.scan(msg, scanner))
        self.assertIn("dkim=pass", value)


class DmarcTests(AuthCase):

    async def test_unaligned_signature_fails_p_reject(self) -> None:
        """From sender.test signed only by other.test: DMARC fail; scored by default, refused with template dmarc when reject_action is "reject"."""
        msg = sign(message(), domain="other.test")
        result = await self.scan(msg)
        value = self.header(result)
        self.assertIn("dkim=pass header.d=other.test", value)
        self.assertIn("dmarc=fail", value)
        self.assertIn("policy.dmarc=reject", value)
        self.assertIsNone(result.action)
        self.assertEqual(result.score, DmarcConfig().score_fail_reject)
        result = await self.scan(msg, self.scanner(dmarc=DmarcConfig(enabled=True,
                                                                     reject_action="reject")))
        self.assertIs(result.action, HardAction.REJECT)
        self.assertEqual(result.template, "dmarc")
        self.assertEqual(dict(result.template_vars), {"domain": "sender.test", "policy": "reject"})

    async def test_subdomain_uses_sp_of_the_organisational_domain(self) -> None:
        """From news.sender.test (no record of its own): sender.test's sp=quarantine applies; quarantine_action "quarantine" holds it."""
        msg = message(from_="news@news.sender.test")
        result = await self.scan(msg, self.scanner(dmarc=DmarcConfig(
            enabled=True, quarantine_action="quarantine")))
        value = self.header(result)
        self.assertIn("dmarc=fail", value)
        self.assertIn("header.from=news.sender.test policy.dmarc=quarantine", value)
        self.assertIs(result.action, HardAction.QUARANTINE)

    async def test_relaxed_alignment_of_a_parent_signature(self) -> None:
        """From news.sender.test signed by d=sender.test: relaxed DKIM alignment passes."""
        msg = sign(message(from_="news@news.sender.test"))
        self.assertIn("dmarc=pass", self.header(await self.scan(msg)))

    async def test_strict_alignment(self) -> None:
        """adkim=s/aspf=s: a d=sender.test signature and an SPF pass for sender.test do not align with strict.sender.test."""
        msg = sign(message(from_="x@strict.sender.test"))
        spf = (("result", "pass"), ("domain", "sender.test"), ("identity", "mailfrom"),
               ("sender", "a@sender.test"), ("client_ip", "127.0.0.1"), ("helo", "h.test"))
        value = self.header(await self.scan(msg, spf=spf))
        self.assertIn("dmarc=fail", value)
        self.assertIn("spf=pass (client 127.0.0.1) smtp.mailfrom=a@sender.test", value)

    async def test_spf_alone_aligns(self) -> None:
        """Unsigned, but SPF passed for the From: domain: DMARC pass by SPF."""
        spf = (("result", "pass"), ("domain", "sender.test"), ("identity", "mailfrom"),
               ("sender", "a@sender.test"), ("client_ip", "127.0.0.1"), ("helo", "h.test"))
        value = self.header(await self.scan(message(), spf=spf))
        self.assertIn("dmarc=pass", value)

    async def test_pct_zero_applies_the_next_lower_policy(self) -> None:
        """pct=0: a fail under p=reject is treated as quarantine (RFC 7489 6.6.4); honour_pct false applies reject."""
        msg = message(from_="x@pct.sender.test")
        result = await self.scan(msg, self.scanner(dmarc=DmarcConfig(enabled=True,
                                                                     reject_action="reject")))
        self.assertIn("policy.dmarc=quarantine", self.header(result))
        self.assertIsNone(result.action)
        strict = DmarcConfig(enabled=True, reject_action="reject", honour_pct=False)
        result = await self.scan(msg, self.scanner(dmarc=strict))
        self.assertIs(result.action, HardAction.REJECT)

    async def test_two_from_fields_is_permerror(self) -> None:
        """Two From: fields: DMARC permerror (RFC 7489 6.6.1), scored score_permerror, and the signature over From fails."""
        msg = sign(message())
        head, _, body = msg.partition(b"\r\n\r\n")
        result = await self.scan(head + b"\r\nFrom: ceo@bank.test\r\n\r\n" + body)
        value = self.header(result)
        self.assertIn('dmarc=permerror reason="2 From: fields (RFC 7489 6.6.1)"', value)
        self.assertIn("dkim=fail", value)
        self.assertEqual(result.score, DkimConfig().score_fail + DmarcConfig().score_permerror)

    async def test_from_of_two_domains_and_no_from(self) -> None:
        """A From: with addresses of two domains, and no From: at all: permerror."""
        value = self.header(await self.scan(message(from_="a@sender.test, b@other.test")))
        self.assertIn("dmarc=permerror", value)
        no_from = b"To: bob@example.com\r\nSubject: x\r\n\r\nbody\r\n"
        self.assertIn('dmarc=permerror reason="no From: field"',
                      self.header(await self.scan(no_from)))

    async def test_no_record_and_two_records_are_none(self) -> None:
        """No DMARC record anywhere, or two at one name (6.6.3): dmarc=none, nothing scored."""
        result = await self.scan(message(from_="x@nowhere.test"))
        self.assertIn("dmarc=none", self.header(result))
        self.assertEqual(result.score, 0.0)
        self.assertIn("dmarc=none", self.header(await self.scan(message(from_="x@two.sender.test"))))

    async def test_policy_timeout_is_temperror(self) -> None:
        """The policy record never answered: dmarc=temperror, no crash."""
        value = self.header(await self.scan(message(from_="x@slow.test")))
        self.assertIn('dmarc=temperror reason="DNS timeout for the policy"', value)

    async def test_p_none_fail_scores_only(self) -> None:
        """A fail under p=none scores score_fail_none and asks for nothing."""
        result = await self.scan(message(from_="x@other.test"),
                                 self.scanner(dmarc=DmarcConfig(enabled=True, reject_action="reject")))
        value = self.header(result)
        self.assertIn('dmarc=fail reason="no aligned DKIM or SPF pass"', value)
        self.assertIn("header.from=other.test policy.dmarc=none (p=none sp=none pct=100)", value)
        self.assertIsNone(result.action)
        self.assertEqual(result.score, DmarcConfig().score_fail_none)


class PieceTests(unittest.SynchronousTestCase):

    def test_public_suffix_list_rules(self) -> None:
        """The list's algorithm: normal, wildcard and exception rules, the implicit "*", IDN rules as A-labels."""
        psl = PublicSuffixList(["// comment", "com", "uk", "co.uk", "*.ck", "!www.ck", "公司.cn", "cn"])
        self.assertEqual(psl.organisational_domain("a.b.example.com"), "example.com")
        self.assertEqual(psl.organisational_domain("mail.example.co.uk"), "example.co.uk")
        self.assertEqual(psl.organisational_domain("a.b.foo.ck"), "b.foo.ck")
        self.assertEqual(psl.organisational_domain("x.www.ck"), "www.ck")
        self.assertEqual(psl.organisational_domain("a.b.example.unlisted"), "example.unlisted")
        self.assertEqual(psl.organisational_domain("a.xn--55qx5d.cn"), "a.xn--55qx5d.cn")
        self.assertEqual(psl.organisational_domain("com"), "com")

    def test_shipped_list(self) -> None:
        """The shipped list knows multi-label suffixes of both sections."""
        default_list()
        self.assertEqual(organisational_domain("mail.example.co.uk"), "example.co.uk")
        self.assertEqual(organisational_domain("a.b.c.example.com"), "example.com")
        self.assertEqual(organisational_domain("me.github.io"), "me.github.io")

    def test_openssl_rsa_check_agrees_with_dkimpy(self) -> None:
        """The RSA check by OpenSSL that replaces dkimpy's pure-Python one gives its answer on a good signature, a bad one and a wrong-length one."""
        import hashlib
        from mppproxy.scan.auth.dkim import _PURE_RSA_VERIFY, openssl_rsa_verify
        from dkim.crypto import parse_public_key
        pk = parse_public_key(base64.b64decode(RSA_PUB))
        digest = hashlib.sha256(b"signed headers")
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding
        good = _RSA.sign(b"signed headers", padding.PKCS1v15(), hashes.SHA256())
        bad = bytes([good[0] ^ 1]) + good[1:]
        for signature, expected in ((good, True), (bad, False)):
            self.assertEqual(openssl_rsa_verify(digest.copy(), signature, pk), expected)
            self.assertEqual(_PURE_RSA_VERIFY(digest.copy(), signature, pk), expected)
        self.assertFalse(openssl_rsa_verify(digest.copy(), good[:-1], pk))

    def test_record_parsing(self) -> None:
        """DMARC records: tags, defaults, an invalid p= with and without rua=."""
        rec = dmarc_.parse_record("v=DMARC1; p=quarantine; sp=reject; adkim=s; pct=20")
        assert rec is not None
        self.assertEqual((rec.policy, rec.subdomain_policy, rec.adkim, rec.aspf, rec.pct),
                         ("quarantine", "reject", "s", "r", 20))
        self.assertIsNone(dmarc_.parse_record("v=DMARC1; p=bogus"))
        rua = dmarc_.parse_record("v=DMARC1; p=bogus; rua=mailto:x@y.test")
        assert rua is not None
        self.assertEqual(rua.policy, "none")
        self.assertIsNone(dmarc_.parse_record("p=reject; v=DMARC1"))

    def test_quarantine_request_holds_unless_worse(self) -> None:
        """A scanner's QUARANTINE request holds the message; a score at reject still refuses it."""
        held = CheckResult(3.0, ("DMARC fail",), HardAction.QUARANTINE)
        report = ScanReport(score=3.0, holds=[("authentication", held)])
        self.assertIs(decide(TransactionRecord(score=3.0), ScoringConfig(), report).action,
                      Disposition.QUARANTINE)
        self.assertIs(decide(TransactionRecord(score=20.0), ScoringConfig(), report).action,
                      Disposition.REJECT)

    def test_config_validation_names_the_key(self) -> None:
        """check-config messages name the key: a bad reject_action, an RSA minimum under 1024."""
        for key, value, text in (("dmarc", {"reject_action": "bounce"}, "scan.dmarc.reject_action"),
                                 ("dkim", {"min_rsa_bits": 512}, "scan.dkim.min_rsa_bits"),
                                 ("dkim", {"partial_body": "x"}, "scan.dkim.partial_body")):
            with self.assertRaises(ConfigError) as caught:
                from_mapping({"policies": {"default": {"scan": {key: value}}}}, "t.toml")
            self.assertIn(f"policies.default.{text}", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            from_mapping({"policies": {"default": {"scan": {"dmarc": {"enabled": True}}}}}, "t.toml")
        self.assertIn("policies.default.scan.dmarc.enabled: needs policies.default.scan.enabled",
                      str(caught.exception))


# -- through the proxy ----------------------------------------------------------

def _send(port: int, sender: str, msg: bytes) -> Any:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test",
                      timeout=CLIENT_TIMEOUT) as s:
        s.ehlo("client.test")
        s.mail(sender)
        s.rcpt("bob@example.com")
        try:
            return s.data(msg)
        finally:
            s.quit()


class ProxyTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        wait_reactor_quiet(self)

    def start(self) -> tuple[FakeBackend, int]:
        dns_port = start_dns(self)
        fake = FakeBackend()
        backend_port = fake.start_for(self)
        policy = {
            "dns": {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": 2.0},
            "policies": {"default": {
                "spf": {"enabled": True},
                "scan": {"enabled": True, "dkim": {"enabled": True},
                         "dmarc": {"enabled": True, "reject_action": "reject"}}}},
        }
        config = proxy_config(self.mktemp(), backend_port, policy=policy)
        return fake, start_proxy(self, config).port

    async def test_authentication_results_at_the_backend(self) -> None:
        """A signed message through the proxy reaches the backend with one Authentication-Results field by the proxy: SPF, DKIM and DMARC."""
        fake, port = self.start()
        msg = sign(message())
        code, _ = await deferToThread(_send, port, "alice@sender.test", msg)
        self.assertEqual(code, 250)
        await poll_until(reactor, lambda: fake.messages, 5.0, "message at the backend")
        data = fake.messages[0].data
        head = data.split(b"\r\n\r\n", 1)[0].decode()
        unfolded = head.replace("\r\n\t", " ").replace("\r\n ", " ")
        fields = [line for line in unfolded.split("\r\n") if line.startswith("Authentication-Results:")]
        self.assertEqual(len(fields), 1, head)
        [field] = fields
        self.assertIn("proxy.test;", field)
        self.assertIn("spf=pass", field)
        self.assertIn("smtp.mailfrom=alice@sender.test", field)
        self.assertIn("dkim=pass header.d=sender.test", field)
        self.assertIn("dmarc=pass header.from=sender.test", field)
        # The signature still verifies at the backend (our fields sit above it).
        self.assertTrue(dkim.verify(data[:-3] if data.endswith(b"\r\n.\r\n") else data,
                                    dnsfunc=lambda name, timeout=5: f"v=DKIM1; k=rsa; p={RSA_PUB}".encode()))

    async def test_dmarc_reject_refused_with_550(self) -> None:
        """From sender.test (p=reject) from an unauthorised sender domain, unsigned: 550 5.7.1 citing RFC 7489, nothing relayed."""
        fake, port = self.start()
        # smtplib returns the reply to the end of DATA, whatever its code.
        code, reply = await deferToThread(_send, port, "x@other.test", message())
        self.assertEqual(code, 550)
        text = reply.decode()
        self.assertTrue(text.startswith("5.7.1 "), text)
        self.assertIn("RFC 7489", text)
        self.assertIn("sender.test", text)
        self.assertEqual([m for m in fake.messages if m.accepted], [])
