"""The scanners of a configuration: the engines of ``[scanners]`` (built
once, shared by every policy so each engine's connection bound holds), and
each policy's scan engine built from ``[policies.NAME.scan]``."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

from mppproxy.config.schema import ProxyConfig
from mppproxy.config.scan import ScanConfig
from mppproxy.scan.base import Scanner
from mppproxy.scan.engine import ScanEngine, SlotSettings
from mppproxy.scan.scanners.attachments import AttachmentScanner
from mppproxy.scan.scanners.authentication import AuthenticationScanner, AuthSettings
from mppproxy.scan.scanners.headers import HeaderFilterScanner
from mppproxy.scan.scanners.mime_check import MimeCheckScanner


@dataclass(frozen=True)
class AuthServices:
    """What the authentication scanner (DKIM, DMARC) needs beside its
    settings: a DNS resolver and our authserv-id (RFC 8601 2.5)."""

    resolver: Any
    authserv_id: str


def wants_authentication(config: ScanConfig) -> bool:
    return config.enabled and (config.dkim.enabled or config.dmarc.enabled)


@dataclass
class PolicyScanning:
    """The parser every message goes through first, and the engine that
    runs the scanners on the parsed message."""

    mime: MimeCheckScanner
    engine: ScanEngine
    config: ScanConfig


def build_engines(config: ProxyConfig, reactor: Any) -> dict[str, Scanner]:
    """One scanner per engine of ``[scanners]``, by name; no I/O."""
    from mppproxy.scan.scanners.clamd import ClamdScanner
    from mppproxy.scan.scanners.command import CommandScanner
    from mppproxy.scan.scanners.rspamd import RspamdScanner
    from mppproxy.scan.scanners.spamd import SpamdScanner

    s = config.scanners
    engines: dict[str, Scanner] = {}
    if s.clamd is not None:
        engines["clamd"] = ClamdScanner(s.clamd, reactor)
    if s.spamd is not None:
        engines["spamd"] = SpamdScanner(s.spamd, reactor)
    if s.rspamd is not None:
        engines["rspamd"] = RspamdScanner(s.rspamd, reactor)
    for command in s.command:
        engines[command.name] = CommandScanner(command, reactor)
    return engines


def build(config: ScanConfig, reactor: Any,
          engines: Optional[dict[str, Scanner]] = None,
          auth: Optional[AuthServices] = None) -> Optional[PolicyScanning]:
    if not config.enabled:
        return None
    slot = SlotSettings(on_failure=config.on_failure)
    mime = MimeCheckScanner(config.mime, reactor)
    # The MIME check guards the engines: a message it refuses is never sent
    # to one (the engine runs it first, docs/design.md promise 4).
    slots: list[tuple[Scanner, SlotSettings]] = [(mime, replace(slot, guard=True))]
    for name, use in config.engines.items():
        if not use.enabled:
            continue
        scanner = (engines or {})[name]  # the loader checked the name
        # The scanner's own timeout bounds each scan; the engine's is a
        # backstop a little above it.
        timeout = float(getattr(scanner.settings, "timeout", 60.0)) + 5.0
        slots.append((scanner, SlotSettings(weight=use.weight, on_failure=use.on_failure,
                                            max_size=use.max_size, timeout=timeout)))
    # After the engines: when both a virus scanner and a rule refuse a
    # message, the reply names the virus (the first hard action wins).
    if config.attachments.enabled:
        slots.append((AttachmentScanner(config.attachments, reactor), slot))
    if config.headers.enabled and config.headers.rules:
        slots.append((HeaderFilterScanner(config.headers, reactor), slot))
    if (config.dkim.enabled or config.dmarc.enabled) and auth is not None:
        # Two DNS rounds at most (keys and the From: domain's policy at
        # once, then the organisational domain's), each bounded by the
        # resolver's timeout, and the verification: the engine's bound is
        # a backstop above that.
        timeout = 2 * float(getattr(auth.resolver, "timeout", 5.0)) + 10.0
        slots.append((AuthenticationScanner(AuthSettings(config.dkim, config.dmarc), reactor,
                                            auth.resolver, auth.authserv_id),
                      replace(slot, timeout=timeout)))
    return PolicyScanning(mime, ScanEngine(slots, reactor), config)
