"""The configuration as frozen, typed dataclasses.

Defaults live here, each with the RFC or the reason it comes from.  The loader
(``load.py``) fills these from TOML and validates every field through the
``check`` functions named in the field metadata, so a bad value is reported
as ``file: key.path: what is wrong`` before anything starts.  docs/
configuration.md lists every key; tests/test_config.py checks the two agree.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional

from mppproxy.config.archive import ArchiveConfig, ArchiveNodeConfig, ReleaseConfig, StoreConfig
from mppproxy.config.database import DatabaseConfig
from mppproxy.config.digest import DigestConfig
from mppproxy.config.metrics import MetricsConfig
from mppproxy.config.dns import DnsConfig
from mppproxy.config.fields import (at_least as _at_least, choice as _choice, endpoints as _endpoints,
                                    networks as _networks, opt as _opt)
from mppproxy.config.policy import PolicyConfig, PolicyEngineConfig
from mppproxy.config.policyd import PolicydConfig
from mppproxy.config.scanners import ScannersConfig
from mppproxy.config.scanservice import ScanServiceConfig
from mppproxy.config.web import WebConfig

MODES = ("all-in-one", "edge", "archive", "policy", "scan")
# Modes whose services this build can start.  The others are named in
# docs/design.md and arrive with their issues; asking for one is a config error
# that says so, not a half-started process.
IMPLEMENTED_MODES = ("all-in-one", "edge", "archive", "policy", "scan")


def _port(value: int) -> Optional[str]:
    if not 1 <= value <= 65535:
        return f"must be a TCP port from 1 to 65535, not {value!r}"
    return None


def _domains(values: tuple[str, ...]) -> Optional[str]:
    for v in values:
        d = v.strip().rstrip(".")
        if not d or any(c.isspace() for c in d) or "@" in d:
            return f"{v!r} is not a domain name"
    return None


# RFC 5322 2.2: a field name is printable ASCII but ":"; a glob adds *?[].
_FIELD_GLOB = re.compile(r"^[!-9;-~]+$")


def _field_globs(values: tuple[str, ...]) -> Optional[str]:
    for v in values:
        if not _FIELD_GLOB.match(v):
            return f"{v!r} is not a header field name pattern (such as 'X-Spam-*')"
    return None


def _authserv_ids(values: tuple[str, ...]) -> Optional[str]:
    # RFC 8601 2.5: the authserv-id is a token, in practice a host name.
    for v in values:
        if not v or any(c.isspace() or c in ';()"' for c in v):
            return f"{v!r} is not an authserv-id (a host name such as 'mx.example.com')"
    return None


def _mode(value: str) -> Optional[str]:
    if value not in MODES:
        return f"must be one of {', '.join(MODES)}, not {value!r}"
    if value not in IMPLEMENTED_MODES:
        return (f"mode {value!r} is not available in this version yet "
                f"(available: {', '.join(IMPLEMENTED_MODES)})")
    return None


@dataclass(frozen=True)
class BackendConfig:
    """The MTA behind the proxy, spoken to in lockstep."""

    host: str
    port: int = field(default=25, metadata=_opt(_port))
    # none: plain; opportunistic: STARTTLS when offered; required: 4xx when not.
    tls: str = field(default="none", metadata=_opt(_choice("none", "opportunistic", "required")))
    tls_verify: bool = False
    tls_ca_file: str = ""
    # Name we send in EHLO; empty means smtp.hostname.
    helo_name: str = ""
    # Postfix XFORWARD / XCLIENT, sent only when the backend offers them, so
    # the backend's logs and checks see the real client.
    xforward: bool = False
    xclient: bool = False
    # Idle connections kept for reuse across transactions (RSET between).
    pool_size: int = field(default=32, metadata=_opt(_at_least(0)))
    pool_idle_timeout: float = field(default=30.0, metadata=_opt(_at_least(0)))
    connect_timeout: float = field(default=30.0, metadata=_opt(_at_least(0.1)))
    # RFC 5321 4.5.3.2.1-4.5.3.2.6 client timeouts.
    greeting_timeout: float = field(default=300.0, metadata=_opt(_at_least(0.1)))
    mail_timeout: float = field(default=300.0, metadata=_opt(_at_least(0.1)))
    rcpt_timeout: float = field(default=300.0, metadata=_opt(_at_least(0.1)))
    data_init_timeout: float = field(default=120.0, metadata=_opt(_at_least(0.1)))
    data_block_timeout: float = field(default=180.0, metadata=_opt(_at_least(0.1)))
    data_done_timeout: float = field(default=600.0, metadata=_opt(_at_least(0.1)))


@dataclass(frozen=True)
class SmtpConfig:
    """What the proxy's own SMTP server says and how strict it is."""

    # Name in the greeting, EHLO reply and Received: header; empty means the
    # machine's fully qualified name.
    hostname: str = ""
    banner: str = "ESMTP mppproxy"
    # reject: a bare CR or LF in DATA or a command is refused (RFC 5321 2.3.8);
    # normalise: turned into CRLF before the end-of-data search.
    bare_newline: str = field(default="reject", metadata=_opt(_choice("reject", "normalise")))
    received_header: bool = True
    # Seconds to wait before the greeting; a client that talks first is an
    # early talker and refused (0 turns the test off).
    greet_pause: float = field(default=0.0, metadata=_opt(_at_least(0)))
    # Header fields removed from every client's message (glob patterns of
    # field names, any case): downstream filters and users trust X-Spam-*
    # as a spam filter's verdict, so one from outside is a forgery.  Ours,
    # added after the removal, stay.  X-MPP-* go always (design promise 7).
    strip_headers: tuple[str, ...] = field(default=("X-Spam-*",), metadata=_opt(_field_globs))
    # Authentication-Results fields claiming one of these authserv-ids are
    # removed (RFC 8601 section 5: a forgery of our own verdict).  Our own
    # name (smtp.hostname), which our Authentication-Results carry, is
    # always among them; list here the other names of our ADMD.
    authserv_ids: tuple[str, ...] = field(default=(), metadata=_opt(_authserv_ids))
    # Upstream MTAs (Postfix before or after the queue) that may tell the
    # real client with XFORWARD (that transaction; they did relay control)
    # or XCLIENT (the rest of the connection), like Postfix's
    # smtpd_authorized_xforward_hosts / smtpd_authorized_xclient_hosts.
    # Empty: neither is announced nor accepted (smtp/forwarded.py).
    xforward_hosts: tuple[str, ...] = field(default=(), metadata=_opt(_networks))
    xclient_hosts: tuple[str, ...] = field(default=(), metadata=_opt(_networks))


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds that keep a hostile client from pinning the proxy (promise 6)."""

    max_connections: int = field(default=1000, metadata=_opt(_at_least(1)))
    max_connections_per_ip: int = field(default=50, metadata=_opt(_at_least(1)))
    # RFC 1870: announced in EHLO; never more than the backend's own SIZE.
    max_message_size: int = field(default=52428800, metadata=_opt(_at_least(1024)))
    # RFC 5321 4.5.3.1.8: at least 100 recipients must be accepted.
    max_recipients: int = field(default=100, metadata=_opt(_at_least(1)))
    # Postfix's smtpd_hard_error_limit is 20.  Only 5xx replies count (a
    # 452 "send it later" does not): smtp/server.py counts_as_error.
    max_errors: int = field(default=20, metadata=_opt(_at_least(1)))
    # A message with more Received: fields than this is refused with 554
    # 5.4.6 as a mail loop (RFC 5321 6.3).  Postfix's hopcount_limit is 50
    # (Exim's received_headers_max 30); RFC 5321 6.3 suggests "normally at
    # least 100" -- raise it if legitimate mail ever hits it.
    max_hop_count: int = field(default=50, metadata=_opt(_at_least(1)))
    # RFC 5321 4.5.3.1.4: 512 octets with CRLF.
    max_command_line: int = field(default=512, metadata=_opt(_at_least(512)))
    # RFC 5321 4.5.3.1.6: 1000 octets with CRLF.
    max_line_length: int = field(default=1000, metadata=_opt(_at_least(1000)))
    # Messages larger than this spool to a temporary file, so memory stays flat.
    memory_spool_bytes: int = field(default=1048576, metadata=_opt(_at_least(0)))


@dataclass(frozen=True)
class TimeoutsConfig:
    """Server-side timeouts, RFC 5321 4.5.3.2."""

    # 4.5.3.2.7: the server waits at least 5 minutes for the next command.
    command: float = field(default=300.0, metadata=_opt(_at_least(0.1)))
    # 4.5.3.2.5: 3 minutes for each data block.
    data_block: float = field(default=180.0, metadata=_opt(_at_least(0.1)))
    # The whole of DATA, however the client trickles it (each byte would
    # otherwise restart data_block).  50 MiB at 256 kbit/s takes ~27 min.
    data_total: float = field(default=3600.0, metadata=_opt(_at_least(1)))
    tls_handshake: float = field(default=60.0, metadata=_opt(_at_least(0.1)))
    # How long a stop (SIGTERM/SIGINT) waits for messages in flight to get
    # the backend's reply to their client before the rest is cut.  30 s
    # covers a backend's end-of-DATA answer in practice and stays well under
    # systemd's default TimeoutStopSec (90 s), after which it sends SIGKILL.
    shutdown_grace: float = field(default=30.0, metadata=_opt(_at_least(0)))


@dataclass(frozen=True)
class TLSConfig:
    """STARTTLS offered to clients (RFC 3207)."""

    enabled: bool = True
    # Empty: a self-signed certificate is generated into the data directory.
    cert_file: str = ""
    key_file: str = ""
    # A directory of certificates, one per served name (SNI, tlsnames.py);
    # cert_file (or the self-signed one) serves clients that name none.
    cert_dir: str = ""


@dataclass(frozen=True)
class DeliveryConfig:
    """Local delivery used when no backend is configured."""

    # Relative paths are below data_dir.  Macros: %U% %D% (user, domain part
    # of the recipient), %U1% %U2% %D1% %D2% (its first and second letter).
    maildir: str = "maildir/%D%/%U%"


@dataclass(frozen=True)
class LoggingConfig:
    # Also write every event as a JSON line into this file.
    json_file: str = ""


def spool_directory(config: "ProxyConfig") -> str:
    return config.spool_dir or os.path.join(config.data_dir, "spool")


@dataclass(frozen=True)
class ProxyConfig:
    """The whole configuration of one node."""

    mode: str = field(default="all-in-one", metadata=_opt(_mode))
    data_dir: str = "./mppproxy-data"
    # Where messages larger than limits.memory_spool_bytes are spooled
    # (unlinked temporary files); empty means data_dir/spool.  Not /tmp by
    # default: on many systems that is a RAM disk.
    spool_dir: str = ""
    listen: tuple[str, ...] = field(default=("tcp:2525:interface=127.0.0.1",), metadata=_opt(_endpoints))
    # listen(2) backlog for tcp/tcp6 endpoints that do not set their own
    # "backlog=": Twisted's default of 50 makes the kernel drop connections
    # when an MX is hit by 100 clients at once.
    listen_backlog: int = field(default=1024, metadata=_opt(_at_least(1)))
    # Processes that share the listening sockets (both cores).
    workers: int = field(default=1, metadata=_opt(_at_least(1)))
    backend: Optional[BackendConfig] = None
    relay_domains: tuple[str, ...] = field(default=(), metadata=_opt(_domains))
    # Like Postfix's mynetworks: setting it replaces the default (docs/design.md 3).
    trusted_networks: tuple[str, ...] = field(default=("127.0.0.0/8", "::1/128"), metadata=_opt(_networks))
    smtp: SmtpConfig = SmtpConfig()
    limits: LimitsConfig = LimitsConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    tls: TLSConfig = TLSConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    logging: LoggingConfig = LoggingConfig()
    policy: PolicyEngineConfig = PolicyEngineConfig()
    # Named policies; "default" always exists (config/policy.py).
    policies: dict[str, PolicyConfig] = field(default_factory=lambda: {"default": PolicyConfig()})
    dns: DnsConfig = DnsConfig()
    database: DatabaseConfig = DatabaseConfig()
    scanners: ScannersConfig = ScannersConfig()
    # The Postfix policy server of mode "policy" (config/policyd.py).
    policyd: PolicydConfig = PolicydConfig()
    # The listeners of mode "scan" (config/scanservice.py).
    scanservice: ScanServiceConfig = ScanServiceConfig()
    # Quarantine and archive copies (config/archive.py): what the edge
    # keeps and sends, the archive node's receiver, the store, release.
    archive: ArchiveConfig = ArchiveConfig()
    archive_node: ArchiveNodeConfig = ArchiveNodeConfig()
    store: StoreConfig = StoreConfig()
    release: ReleaseConfig = ReleaseConfig()
    # The web console of the archive node and all-in-one mode (config/web.py).
    web: WebConfig = WebConfig()
    # User digests with one-shot release links (config/digest.py).
    digest: DigestConfig = DigestConfig()
    # The Prometheus exposition (config/metrics.py, mppproxy/metrics/).
    metrics: MetricsConfig = MetricsConfig()
