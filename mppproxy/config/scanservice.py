"""``[scanservice]``: the listeners of ``--mode scan`` (docs/design.md,
"Configuration").

A leaf of ``config/``, read by ``scanservice/``; ``config/schema.py`` puts
it into ``ProxyConfig``.  Both listeners default to loopback: the service
answers any recipient and tells a client what the filters think of a
message, which is for the site's own scripts, not for the internet.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mppproxy.config.fields import endpoints as _endpoints, opt as _opt


def _endpoints_or_none(values: tuple[str, ...]) -> Optional[str]:
    """An empty list turns that listener off."""
    return _endpoints(values) if values else None


@dataclass(frozen=True)
class ScanServiceConfig:
    """Where the scan service listens (Twisted endpoint descriptions)."""

    # SMTP in, the verdict in the reply to the end of DATA; empty: off.
    # 10026: next to the usual content-filter ports (Postfix's
    # FILTER_README uses 10025/10026).
    smtp_listen: tuple[str, ...] = field(default=("tcp:10026:interface=127.0.0.1",),
                                         metadata=_opt(_endpoints_or_none))
    # HTTP in (POST /scan, GET /health), the verdict as JSON; empty: off.
    http_listen: tuple[str, ...] = field(default=("tcp:10080:interface=127.0.0.1",),
                                         metadata=_opt(_endpoints_or_none))
