"""The scan engine of one policy, built from its ``[policies.NAME.scan]``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from mppproxy.policy.config import ScanConfig
from mppproxy.scan.engine import ScanEngine, SlotSettings
from mppproxy.scan.scanners.attachments import AttachmentScanner
from mppproxy.scan.scanners.headers import HeaderFilterScanner
from mppproxy.scan.scanners.mime_check import MimeCheckScanner


@dataclass
class PolicyScanning:
    """The parser every message goes through first, and the engine that
    runs the scanners on the parsed message."""

    mime: MimeCheckScanner
    engine: ScanEngine
    config: ScanConfig


def build(config: ScanConfig, reactor: Any) -> Optional[PolicyScanning]:
    if not config.enabled:
        return None
    slot = SlotSettings(on_failure=config.on_failure)
    mime = MimeCheckScanner(config.mime, reactor)
    slots = [(mime, slot)]
    if config.attachments.enabled:
        slots.append((AttachmentScanner(config.attachments, reactor), slot))
    if config.headers.enabled and config.headers.rules:
        slots.append((HeaderFilterScanner(config.headers, reactor), slot))
    return PolicyScanning(mime, ScanEngine(slots, reactor), config)
