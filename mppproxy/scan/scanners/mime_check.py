"""Scanner ``mime``: the message's MIME structure, bounded (issue #5).

Stage: post-DATA, first.  The scan engine calls ``parse`` once and puts
the ``ParsedMessage`` into ``ScanInput.parsed`` for the later scanners;
``scan`` turns its defects into one ``CheckResult`` by the configured action
of each defect kind (``MimeCheckConfig.actions``): each kind found counts
once, scores add up, and the strongest hard action wins (reject over
tempfail).  A malformed message therefore never reaches another scanner in
a shape that could crash it: the others read the parsed tree, never
re-parse the raw bytes themselves.
"""
from __future__ import annotations

from typing import Any, Optional

from twisted.internet.threads import deferToThreadPool

from mppproxy.results import CheckResult, HardAction
from mppproxy.scan.base import Scanner, ScanInput
from mppproxy.config.scan import MimeCheckConfig, parse_action
from mppproxy.scan.mime import PROBLEMS, ParsedMessage, parse_message

# Messages up to this size are parsed on the reactor thread (a few
# milliseconds); larger ones in the reactor's thread pool, so a 50 MB
# message does not stall every other session for a second.
INLINE_BYTES = 262144


def evaluate(parsed: ParsedMessage, settings: MimeCheckConfig) -> CheckResult:
    """The result of the defects of ``parsed`` under ``settings.actions``."""
    score = 0.0
    reasons: list[str] = []
    action: Optional[HardAction] = None
    problem = ""
    for kind in parsed.kinds:
        hard, points = parse_action(settings.actions.get(kind))
        if hard is None and points == 0.0:
            continue
        reasons.append(f"mime:{kind}")
        score += points
        if hard is HardAction.REJECT and action is not HardAction.REJECT:
            action, problem = hard, PROBLEMS.get(kind, PROBLEMS["other"])
        elif hard is HardAction.TEMPFAIL and action is None:
            action = hard
    if action is HardAction.REJECT:
        return CheckResult(score, tuple(reasons), action, "malformed", (("problem", problem),))
    if action is HardAction.TEMPFAIL:
        return CheckResult(score, tuple(reasons), action, "tempfail")
    return CheckResult(score, tuple(reasons))


class MimeCheckScanner(Scanner):
    """Parses within ``MimeCheckConfig``'s bounds and maps defects to actions."""

    name = "mime"
    settings: MimeCheckConfig

    def __init__(self, settings: Optional[MimeCheckConfig] = None, reactor: Any = None):
        super().__init__(settings or MimeCheckConfig(), reactor)

    async def parse(self, message: ScanInput) -> ParsedMessage:
        """Parse ``message`` (never raises; problems are defects)."""
        if isinstance(message.parsed, ParsedMessage):
            return message.parsed
        args = (message.chunks(), self.settings, message.smtputf8)
        pool = getattr(self.reactor, "getThreadPool", None)
        if message.size <= INLINE_BYTES or pool is None:
            return parse_message(*args)
        return await deferToThreadPool(self.reactor, pool(), parse_message, *args)

    async def scan(self, message: ScanInput) -> CheckResult:
        if not self.settings.enabled:
            return CheckResult()
        return evaluate(await self.parse(message), self.settings)
