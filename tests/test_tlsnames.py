"""A certificate per served name for STARTTLS (mppproxy/tlsnames.py, issue 16
"TLS for operators").

Real TLS on loopback: the proxy's SMTP server (the state machine of
test_server.py on a real listening port) with the context
``tlsconfig.server_context`` builds from ``tls.cert_dir``; the client is
Python's ``ssl`` after a real EHLO/STARTTLS exchange, naming a server (SNI)
or not, and the test looks at the certificate it was served.
"""
from __future__ import annotations

import datetime
import shutil
import socket
import ssl
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import trustme
from cryptography import x509
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mppproxy.config.errors import ConfigError
from mppproxy.config.load import check_files
from mppproxy.config.schema import ProxyConfig, TLSConfig
from mppproxy.smtp.server import SMTPServerFactory
from mppproxy.tlsconfig import server_context
from mppproxy.tlsnames import CertificateDirectoryError, expiries, load_directory
from test_server import HOSTNAME, RecordingHandler

CA = trustme.CA()


def write_pem(directory: Path, name: str, *identities: str, split: bool = False,
              not_after: Optional[datetime.datetime] = None) -> None:
    cert = CA.issue_cert(*identities, not_after=not_after)
    if split:
        (directory / f"{name}.crt").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
        (directory / f"{name}.key").write_bytes(cert.private_key_pem.bytes())
    else:
        (directory / f"{name}.pem").write_bytes(cert.private_key_and_cert_chain_pem.bytes())


def served_names(port: int, server_name: Optional[str]) -> tuple[str, ...]:
    """EHLO, STARTTLS, handshake naming ``server_name`` (None: no SNI); the
    DNS names of the certificate served, then NOOP over TLS (blocking)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        f = raw.makefile("rb")
        assert f.readline().startswith(b"220")
        raw.sendall(b"EHLO client.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        raw.sendall(b"STARTTLS\r\n")
        assert f.readline().startswith(b"220")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            tls.sendall(b"NOOP\r\n")
            assert tls.recv(100).startswith(b"250")
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return tuple(san.value.get_values_for_type(x509.DNSName))


class SNITests(TestCase):

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mpp-sni-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.certs = self.dir / "certs"
        self.certs.mkdir()
        write_pem(self.certs, "mx1.example.com", "mx1.example.com", "mail.example.com")
        write_pem(self.certs, "example.net", "*.example.net", split=True)
        write_pem(self.dir, "default", "default.test")
        self.config = replace(ProxyConfig(data_dir=str(self.dir / "data")), tls=TLSConfig(
            cert_file=str(self.dir / "default.pem"), cert_dir=str(self.certs)))

    def listen(self, config: ProxyConfig) -> tuple[int, SMTPServerFactory]:
        factory = SMTPServerFactory(config, RecordingHandler, reactor, hostname=HOSTNAME,
                                    tls_context=server_context(config, HOSTNAME))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port, factory

    async def test_each_name_gets_its_certificate(self) -> None:
        """mx1/mail.example.com get theirs, a.example.net the wildcard's (.pem and .crt+.key files), no SNI or an unknown name the default."""
        port, _ = self.listen(self.config)
        for name, expected in (("mx1.example.com", "mx1.example.com"),
                               ("MAIL.example.com", "mx1.example.com"),
                               ("a.example.net", "*.example.net"),
                               ("b.a.example.net", "default.test"),
                               ("other.test", "default.test"),
                               (None, "default.test")):
            names = await deferToThread(served_names, port, name)
            self.assertEqual(names[0], expected, name)

    async def test_renewed_certificate_is_served_after_a_reload_without_cutting_sessions(self) -> None:
        """A reload builds the context again (as service.apply does): the next session gets the renewed certificate while one already in TLS carries on."""
        port, factory = self.listen(self.config)
        before = await deferToThread(served_names, port, "mx1.example.com")
        self.assertEqual(before, ("mx1.example.com", "mail.example.com"))
        write_pem(self.certs, "mx1.example.com", "mx1.example.com", "renewed.example.com")
        factory.tls_context = server_context(self.config, HOSTNAME)
        after = await deferToThread(served_names, port, "mx1.example.com")
        self.assertEqual(after, ("mx1.example.com", "renewed.example.com"))

    def test_broken_file_is_named_and_check_config_says_so(self) -> None:
        """A certificate whose key does not match, or a .crt without a key, is refused naming the file; check-config reports it under tls.cert_dir."""
        other = CA.issue_cert("x.test")
        (self.certs / "bad.crt").write_bytes(other.cert_chain_pems[0].bytes())
        (self.certs / "bad.key").write_bytes(CA.issue_cert("y.test").private_key_pem.bytes())
        with self.assertRaises(CertificateDirectoryError) as caught:
            load_directory(str(self.certs))
        self.assertIn("bad.crt", str(caught.exception))
        with self.assertRaises(ConfigError) as config_error:
            check_files(self.config, "mppproxy.toml")
        self.assertIn("tls.cert_dir", str(config_error.exception.errors))
        with self.assertRaises(ConfigError):
            server_context(self.config, HOSTNAME)

    def test_expiries_for_the_metrics(self) -> None:
        """Each named certificate's notAfter, by file."""
        soon = datetime.datetime(2030, 1, 2, tzinfo=datetime.timezone.utc)
        write_pem(self.certs, "mx1.example.com", "mx1.example.com", not_after=soon)
        got: Any = expiries(server_context(self.config, HOSTNAME))
        self.assertEqual(got[str(self.certs / "mx1.example.com.pem")], soon.timestamp())
        self.assertEqual(len(got), 2)
