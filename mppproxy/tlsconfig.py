"""TLS contexts: the server certificate for STARTTLS (RFC 3207) and the
client contexts for STARTTLS to the backend and to the archive node (with a
client certificate when the node asks for one).

The all-in-one default has no certificate configured, so one self-signed
certificate is generated into the data directory on first start and reused.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl

from mppproxy.config.errors import ConfigError
from mppproxy.config.schema import BackendConfig, ProxyConfig
from mppproxy.tlsnames import CertificateDirectoryError, with_names


def generate_self_signed(cert_path: str, key_path: str, hostname: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64] or "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = [x509.DNSName(hostname)] if hostname else []
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .sign(key, hashes.SHA256()))
    old = os.umask(0o077)
    try:
        with open(key_path, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
    finally:
        os.umask(old)


def server_context(config: ProxyConfig, hostname: str,
                   client_ca: Optional[Any] = None) -> Optional[Any]:
    """The STARTTLS context, or None when TLS is off.  With ``client_ca``
    (an ``ssl.Certificate``, from ``load_ca_certificate``) clients are asked
    for a certificate, and one it did not sign fails the handshake; a
    client that sends none still gets TLS, and the session decides (the
    archive node answers its MAIL 530, archive/receiver.py)."""
    tls = config.tls
    if not tls.enabled:
        return None
    cert_file, key_file = tls.cert_file, tls.key_file
    if not cert_file:
        cert_file = os.path.join(config.data_dir, "tls", "selfsigned.crt")
        key_file = os.path.join(config.data_dir, "tls", "selfsigned.key")
        if not (os.path.exists(cert_file) and os.path.exists(key_file)):
            os.makedirs(os.path.dirname(cert_file), mode=0o700, exist_ok=True)
            generate_self_signed(cert_file, key_file, hostname)
    key_file = key_file or cert_file
    options, problem = load_server_certificate(cert_file, key_file)
    if problem:
        raise ConfigError([f"tls.cert_file: {problem}"])
    if client_ca is not None and options is not None:
        # PrivateCertificate.options(ca) would also refuse a handshake
        # without a certificate (requireCertificate); a 530 at MAIL says
        # more to the client's administrator than a failed handshake.
        options = ssl.CertificateOptions(privateKey=options.privateKey,
                                         certificate=options.certificate, verify=True,
                                         caCerts=[client_ca.original], requireCertificate=False)
    try:
        # A certificate per served name (SNI), tls.cert_dir (tlsnames.py).
        return with_names(options, tls.cert_dir, client_ca)
    except CertificateDirectoryError as e:
        raise ConfigError([f"tls.cert_dir: {e}"]) from None


def load_server_certificate(cert_file: str, key_file: str) -> tuple[Optional[Any], Optional[str]]:
    """The TLS options for a PEM certificate and key, or why they cannot be used."""
    pem, problem = load_private_certificate(cert_file, key_file)
    return (pem.options() if pem is not None else None), problem


def load_ca_certificate(path: str) -> tuple[Optional[Any], Optional[str]]:
    try:
        with open(path, "rb") as f:
            return ssl.Certificate.loadPEM(f.read()), None
    except (OSError, ValueError, crypto.Error, SSL.Error) as e:
        return None, f"cannot load CA certificate {path}: {e or type(e).__name__}"


def backend_context(config: BackendConfig) -> Optional[Any]:
    """Client context for STARTTLS to the backend."""
    return client_context(config.host, config.tls, config.tls_verify, config.tls_ca_file,
                          section="backend")


def client_context(host: str, tls: str, verify: bool, ca_file: str = "", cert_file: str = "",
                   key_file: str = "", section: str = "backend") -> Optional[Any]:
    """Client context for STARTTLS to ``host`` (the backend, the archive
    node), None when ``tls`` is "none".  ``cert_file``/``key_file``: a
    client certificate, presented when the server asks for one (the
    archive node's require_client_cert).  Errors name ``section``'s keys."""
    if tls == "none":
        return None
    client: Optional[Any] = None
    if cert_file:
        client, problem = load_private_certificate(cert_file, key_file or cert_file)
        if problem:
            raise ConfigError([f"{section}.tls_cert_file: {problem}"])
    if not verify:
        # Opportunistic TLS between MTAs (RFC 7435): encrypt, don't authenticate.
        if client is None:
            return ssl.CertificateOptions()
        return ssl.CertificateOptions(privateKey=client.privateKey.original,
                                      certificate=client.original)
    trust = None
    if ca_file:
        cert, problem = load_ca_certificate(ca_file)
        if problem:
            raise ConfigError([f"{section}.tls_ca_file: {problem}"])
        trust = ssl.trustRootFromCertificates([cert])  # type: ignore[no-untyped-call]  # Twisted's, unannotated
    return ssl.optionsForClientTLS(host, trustRoot=trust, clientCertificate=client)


def load_private_certificate(cert_file: str, key_file: str) -> tuple[Optional[Any], Optional[str]]:
    """The ``PrivateCertificate`` of a PEM certificate and key (ours, as a
    server or as a client), or why it cannot be used."""
    try:
        with open(cert_file, "rb") as f:
            cert_pem = f.read()
        with open(key_file, "rb") as f:
            key_pem = f.read()
        # Twisted's ssl module is unannotated.
        return ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem), None  # type: ignore[no-untyped-call]
    except (OSError, ValueError, crypto.Error, SSL.Error) as e:
        return None, f"cannot load certificate {cert_file} with key {key_file}: {e or type(e).__name__}"
