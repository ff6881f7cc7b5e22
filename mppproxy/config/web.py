"""``[web]``: the web console (issue 13), served by the archive node and in
all-in-one mode (``mppproxy/web/``).

A leaf of ``config/`` (docs/design.md floor 1): ``schema.py`` puts
``WebConfig`` into ``ProxyConfig``; ``load.py`` calls ``web_problems``
(rules across keys) and checks the certificate files.  The console reads
nothing else of the configuration at this level.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from mppproxy.config.fields import at_least as _at_least, endpoints as _endpoints, opt as _opt

# The modes that serve the console: the archive node (the store lives
# there) and all-in-one (the embedded store).  An edge keeps nothing to show.
WEB_MODES = ("all-in-one", "archive")
# The signing key made under data_dir when web.secret_file is empty.
DEFAULT_SECRET_FILE = "web.secret"


def _secret_file(value: str) -> Optional[str]:
    if value and value.endswith(os.sep):
        return f"{value!r} names a directory; name the key file itself"
    return None


@dataclass(frozen=True)
class WebConfig:
    """``[web]``: where the console listens and how its sessions live."""

    # Off: no console even in the modes that serve one.
    enabled: bool = True
    # Twisted endpoint descriptions.  Loopback by default: the console holds
    # the quarantined mail of every domain; put it behind TLS (tls_cert_file)
    # or a reverse proxy before opening it to a network.
    listen: tuple[str, ...] = field(default=("tcp:8025:interface=127.0.0.1",),
                                    metadata=_opt(_endpoints))
    # PEM certificate (chain) and key: HTTPS on every listener, and the
    # session cookie gets the Secure flag.  Empty: plain HTTP.
    tls_cert_file: str = ""
    # Empty: the key is in tls_cert_file.
    tls_key_file: str = ""
    # The key that signs session cookies (HMAC-SHA256), made with mode 0600
    # at first start; empty: data_dir/web.secret.  Shared by every process
    # of a node, and by nodes behind one load balancer (copy the file).
    secret_file: str = field(default="", metadata=_opt(_secret_file))
    # Seconds without a request after which a session ends (OWASP's session
    # management cheat sheet: 15-30 minutes for an administrative console).
    session_idle: float = field(default=1800.0, metadata=_opt(_at_least(60)))
    # Seconds after login after which a session ends, however active.
    session_lifetime: float = field(default=43200.0, metadata=_opt(_at_least(60)))
    # Failed logins (per account name and per client address) before each
    # further attempt waits; the wait starts at login_lockout seconds and
    # doubles with each further failure, up to an hour.
    login_failures: int = field(default=5, metadata=_opt(_at_least(1)))
    login_lockout: float = field(default=30.0, metadata=_opt(_at_least(1)))
    # Rows per page of the quarantine list.
    page_size: int = field(default=50, metadata=_opt(_at_least(5)))
    # Rows a bulk action touches in one request (ticked rows, the JSON
    # API's bulk call); a larger selection is refused with the count.
    bulk_max: int = field(default=1000, metadata=_opt(_at_least(1)))
    # Rows a background job may touch: the console's bulk action over
    # "every matching row" runs as a job with a progress page (web/jobs.py)
    # when more than page_size rows match; more than this is refused with
    # the count, to be narrowed.
    bulk_job_max: int = field(default=100_000, metadata=_opt(_at_least(1)))


def web_wanted(mode: str, web: WebConfig) -> bool:
    """Whether a node of ``mode`` serves the console."""
    return web.enabled and mode in WEB_MODES


def secret_path(web: WebConfig, data_dir: str) -> str:
    """The cookie-signing key file (relative paths are under data_dir)."""
    return os.path.join(data_dir, web.secret_file or DEFAULT_SECRET_FILE)


def web_problems(mode: str, web: WebConfig) -> list[str]:
    """Rules across ``[web]``'s keys (each named by its key)."""
    if not web_wanted(mode, web):
        return []
    problems = []
    if web.tls_key_file and not web.tls_cert_file:
        problems.append("web.tls_key_file: is set but web.tls_cert_file is not")
    if web.session_idle > web.session_lifetime:
        problems.append("web.session_idle: is longer than web.session_lifetime")
    return problems
