"""Rule hits into one result: the step the content scanners with rules
(``scanners/headers.py``, ``scanners/attachments.py``) share
(docs/design.md, "The stages of one session": scanning -> results).
"""
from __future__ import annotations

from typing import Optional

from mppproxy.results import CheckResult, HardAction


def combine(hits: list[tuple[str, Optional[HardAction], float]], reject_template: str) -> CheckResult:
    """One result from rule hits (label, hard action, score): scores add up,
    reject beats tempfail."""
    if not hits:
        return CheckResult()
    actions = {a for _, a, _ in hits}
    action = HardAction.REJECT if HardAction.REJECT in actions else (
        HardAction.TEMPFAIL if HardAction.TEMPFAIL in actions else None)
    template = (reject_template if action is HardAction.REJECT else
                "tempfail" if action is HardAction.TEMPFAIL else "")
    return CheckResult(sum(s for _, _, s in hits), tuple(label for label, _, _ in hits), action, template)
