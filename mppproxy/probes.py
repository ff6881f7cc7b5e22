"""Timing probes: where the stages report how long a check or an engine
took, for whoever listens (the metrics, issue 16).

Ground floor (docs/design.md, "Floors"): the policy engine and the scan
engine call in here without knowing the metrics, which register their
listeners at start (``mppproxy/metrics/``).  With no listener (metrics
off) a probe is one test of an empty list.

Only work that waits is timed: a check that answers without waiting (set
lookups, cached answers) runs on the engine's fast path, which reads no
clock on purpose (policy/engine.py); scanners always wait.
"""
from __future__ import annotations

from typing import Callable

# (name, seconds, outcome): outcome is "ok", "timeout" or "error" for a
# check; "ok" or the failure kind of scan/base.py ("down", "timeout",
# "garbage", "error") for an engine.
Timer = Callable[[str, float, str], None]

# Pre-DATA checks that waited (DNS lists, SPF, the state database).
check_timers: list[Timer] = []
# Post-DATA scanners, by engine name.
engine_timers: list[Timer] = []


def check_done(name: str, seconds: float, outcome: str) -> None:
    """A check that waited has finished (``policy/engine.py``)."""
    for timer in check_timers:
        timer(name, seconds, outcome)


def engine_done(name: str, seconds: float, outcome: str) -> None:
    """A scanner has answered or failed (``scan/engine.py``)."""
    for timer in engine_timers:
        timer(name, seconds, outcome)
