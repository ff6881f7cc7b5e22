"""A certificate per served name (SNI, RFC 6066 section 3) for STARTTLS,
from a directory (issue 16, "TLS for operators").

Ground floor.  ``tls.cert_dir`` holds one PEM file per certificate, its
chain and its private key (``mx1.example.com.pem``), or a certificate
file with its key beside it (``name.crt`` + ``name.key``, as ACME clients
such as certbot's deploy hooks or dehydrated write them).  Each
certificate serves the DNS names of its subjectAltName (its CN when it has
none), ``*.example.com`` for one label below.  A client that names no
server (old MTAs) or a name no certificate has gets the default
certificate (``tls.cert_file``, or the self-signed one).

The contexts are built when the configuration is loaded, at start and at
every SIGHUP reload (``service.apply``), so a renewed certificate is used
from the next session on; sessions already in TLS keep theirs.
``expiries`` gives each certificate's notAfter, for the metrics.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer  # type: ignore[import-untyped]  # no stubs or py.typed

# Files read in the directory, and the extension of a key beside a .crt.
CERT_SUFFIXES = (".pem", ".crt")
KEY_SUFFIX = ".key"


@dataclass(frozen=True)
class NamedCertificate:
    """One certificate of the directory: its file, names, expiry and the
    TLS options serving it."""

    path: str
    names: tuple[str, ...]
    not_after: datetime.datetime
    options: Any


class CertificateDirectoryError(ValueError):
    """A file of the directory that cannot be served, with why."""


def load_directory(directory: str, client_ca: Optional[Any] = None) -> list[NamedCertificate]:
    """Every certificate of ``directory``, sorted by file name, asking
    clients for a certificate ``client_ca`` signed when it is given (as
    ``tlsconfig.server_context`` does for the default one);
    ``CertificateDirectoryError`` naming the first file that is broken (a
    key that does not match, no key at all, an unreadable file), so a
    reload keeps the running certificates rather than serve half a set."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        raise CertificateDirectoryError(f"cannot read {directory}: {e.strerror or e}") from None
    out = []
    for name in names:
        stem, suffix = os.path.splitext(name)
        if suffix not in CERT_SUFFIXES or name.startswith("."):
            continue
        path = os.path.join(directory, name)
        key_path = os.path.join(directory, stem + KEY_SUFFIX)
        out.append(_load(path, key_path if os.path.exists(key_path) else path, client_ca))
    return out


def _load(cert_path: str, key_path: str, client_ca: Optional[Any]) -> NamedCertificate:
    try:
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
        key_pem = cert_pem
        if key_path != cert_path:
            with open(key_path, "rb") as f:
                key_pem = f.read()
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
        chain = [crypto.load_certificate(crypto.FILETYPE_PEM, block)
                 for block in _pem_blocks(cert_pem)]
    except (OSError, ValueError, crypto.Error) as e:
        raise CertificateDirectoryError(f"{cert_path}: cannot load the certificate and its key "
                                        f"({e or type(e).__name__})") from None
    if not chain:
        raise CertificateDirectoryError(f"{cert_path}: no certificate in the file")
    verify: dict[str, Any] = {}
    if client_ca is not None:
        verify = dict(verify=True, caCerts=[client_ca.original], requireCertificate=False)
    options = ssl.CertificateOptions(
        privateKey=key, certificate=chain[0], extraCertChain=chain[1:] or None, **verify)
    try:
        options.getContext()  # checks that the key is the certificate's
    except SSL.Error as e:
        raise CertificateDirectoryError(f"{cert_path}: the key does not match the certificate "
                                        f"({e})") from None
    return NamedCertificate(cert_path, certificate_names(cert), _not_after(cert), options)


def _pem_blocks(pem: bytes) -> list[bytes]:
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    out: list[bytes] = []
    at = 0
    while True:
        start = pem.find(begin, at)
        if start < 0:
            return out
        stop = pem.find(end, start)
        if stop < 0:
            return out
        out.append(pem[start:stop + len(end)])
        at = stop + len(end)


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The DNS names of the subjectAltName, lower-cased; the CN when the
    certificate has no such extension (RFC 6125 6.4.4)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(n.lower().rstrip(".") for n in names if n)


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    # not_valid_after_utc is cryptography >= 42; pyproject allows 41.
    when: Optional[datetime.datetime] = getattr(cert, "not_valid_after_utc", None)
    if when is None:
        when = cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    return when


class NameIndex:
    """Served name -> TLS options: exact names first, then ``*.parent``
    for one label below (RFC 6125 6.4.3); the first file wins a name two
    files share."""

    def __init__(self, certificates: list[NamedCertificate]):
        self._exact: dict[str, Any] = {}
        self._wild: dict[str, Any] = {}
        for c in certificates:
            for name in c.names:
                if name.startswith("*."):
                    self._wild.setdefault(name[2:], c.options)
                else:
                    self._exact.setdefault(name, c.options)

    def lookup(self, name: str) -> Optional[Any]:
        name = name.lower().rstrip(".")
        found = self._exact.get(name)
        if found is None and "." in name:
            found = self._wild.get(name.split(".", 1)[1])
        return found


@implementer(IOpenSSLContextFactory)
class SNIContextFactory:
    """What STARTTLS is given (``transport.startTLS``): the default
    certificate's context, whose servername callback switches the
    connection to the named certificate's context before the handshake
    goes on."""

    def __init__(self, default: Any, certificates: list[NamedCertificate]):
        self.default = default
        self.certificates = certificates
        self.index = NameIndex(certificates)
        self._context: Optional[SSL.Context] = None

    def getContext(self) -> SSL.Context:  # noqa: N802 (Twisted's name)
        if self._context is None:
            context = self.default.getContext()
            context.set_tlsext_servername_callback(self._servername)
            self._context = context
        return self._context

    def _servername(self, connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        if not raw:
            return  # no SNI: the default certificate
        options = self.index.lookup(raw.decode("ascii", "replace"))
        if options is not None:
            connection.set_context(options.getContext())


def with_names(default: Any, directory: str, client_ca: Optional[Any] = None) -> Any:
    """The default options alone when ``directory`` is empty, else an
    ``SNIContextFactory`` over its certificates (``load_directory``)."""
    if not directory:
        return default
    return SNIContextFactory(default, load_directory(directory, client_ca))


def expiries(factory: Any) -> dict[str, float]:
    """Each named certificate's notAfter (epoch seconds) by file, for the
    metrics; {} for a single certificate."""
    if not isinstance(factory, SNIContextFactory):
        return {}
    return {c.path: c.not_after.timestamp() for c in factory.certificates}
