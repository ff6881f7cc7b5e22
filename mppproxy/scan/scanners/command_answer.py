"""What a command-line engine answered, read from its exit code, a regular
expression over its output, or a JSON line, and turned into a result.

Stage: post-DATA scanning, a helper of ``command.py`` (one-shot programs)
and ``command_pool.py`` (persistent engines).  Issue 14: the command
scanner was virus-or-clean; spam engines that run on the command line
(the original product ran Cloudmark, Commtouch and Mailshell so) answer a
verdict and a score, which join the combined score like spamd's.

The three readings (``CommandScannerConfig.output``):

* ``exit``: ``infected_pattern`` or ``infected_exit_codes`` mean a virus;
  then ``exit_verdicts`` ("2" = "spam:5"); then ``clean_exit_codes``.
* ``pattern``: ``output_pattern`` searched in the output, its named groups
  ``verdict`` (clean, spam, virus), ``score`` and ``name``.
* ``json``: the last output line that is a JSON object
  ``{"verdict": "spam", "score": 7.5, "name": "..."}`` (every key
  optional, one of verdict and score needed).

Anything else -- no match, no JSON, a verdict word we do not know, a score
that is no finite number -- is ``BadAnswer``, which the scanners turn into
``ScannerUnavailable`` of kind GARBAGE: never a clean result the engine did
not give (docs/design.md promise 4).

The result carries the engine's verdict word as the fact ``verdict``, which
the per-engine actions (``verdict.py``) match.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from mppproxy.config.scanners import ENGINE_VERDICTS, CommandScannerConfig, parse_verdict_spec
from mppproxy.results import CheckResult, HardAction

__all__ = ["EngineAnswer", "BadAnswer", "from_exit", "from_pattern", "from_json_line",
           "from_json_output", "to_result", "printable_tail"]

# A name (signature, rule) is cut to this many characters for reasons and logs.
MAX_NAME = 200


class BadAnswer(ValueError):
    """The engine's answer cannot be read; the text says why (for the log)."""


@dataclass(frozen=True)
class EngineAnswer:
    """One engine's word on one message: ``verdict`` (clean, spam, virus,
    or "" when it gave only a score), its own ``score`` (None: none given)
    and what it found (``name``)."""

    verdict: str = ""
    score: Optional[float] = None
    name: str = ""


def printable_tail(text: str, limit: int = 200) -> str:
    """The end of an engine's output on one line, control characters as
    "?": what a log line shows of it."""
    flat = " ".join("".join(c if c.isprintable() else "?" for c in text).split())
    return flat[-limit:] if flat else "(no output)"


def _name(value: Any) -> str:
    if not isinstance(value, str):
        return ""
    return "".join(c if c.isprintable() else "?" for c in value.strip())[:MAX_NAME]


def _verdict_word(value: Any) -> str:
    if not isinstance(value, str) or value.strip().lower() not in ENGINE_VERDICTS:
        raise BadAnswer(f"verdict {str(value)[:40]!r} is not one of {', '.join(ENGINE_VERDICTS)}")
    return value.strip().lower()


def _score(value: Any) -> float:
    if isinstance(value, bool):
        raise BadAnswer(f"score {value!r} is not a number")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise BadAnswer(f"score {value[:40]!r} is not a number") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadAnswer(f"score {str(value)[:40]!r} is not a finite number")
    return float(value)


def from_exit(settings: CommandScannerConfig, code: Optional[int], text: str,
              infected: Optional[re.Match[str]]) -> Optional[EngineAnswer]:
    """The answer of exit code ``code`` (``infected``: the match of
    ``infected_pattern``), or None when the code means nothing we know."""
    if infected is not None or code in settings.infected_exit_codes:
        name = ""
        if infected is not None:
            groups = infected.re.groupindex
            name = _name(infected.group("name") if "name" in groups else
                         infected.group(1) if infected.re.groups else infected.group(0))
        return EngineAnswer("virus", None, name)
    spec = settings.exit_verdicts.get(str(code)) if code is not None else None
    if spec is not None:
        verdict, score = parse_verdict_spec(spec)  # checked at load
        return EngineAnswer(verdict, score)
    if code in settings.clean_exit_codes:
        return EngineAnswer("clean")
    return None


def from_pattern(pattern: re.Pattern[str], text: str) -> EngineAnswer:
    found = pattern.search(text)
    if found is None:
        raise BadAnswer(f"output does not match output_pattern: {printable_tail(text)}")
    groups = found.groupdict()
    verdict = _verdict_word(groups["verdict"]) if groups.get("verdict") is not None else ""
    score = _score(groups["score"]) if groups.get("score") is not None else None
    if not verdict and score is None:
        raise BadAnswer(f"output_pattern matched without a verdict or a score: "
                        f"{printable_tail(found.group(0))}")
    return EngineAnswer(verdict, score, _name(groups.get("name")))


def from_json_line(line: str) -> EngineAnswer:
    """One JSON object line; BadAnswer when it is not one we can read."""
    try:
        data = json.loads(line)
    except ValueError:
        raise BadAnswer(f"not a JSON line: {printable_tail(line, 120)}") from None
    if not isinstance(data, dict):
        raise BadAnswer(f"not a JSON object: {printable_tail(line, 120)}")
    verdict = _verdict_word(data["verdict"]) if data.get("verdict") is not None else ""
    score = _score(data["score"]) if data.get("score") is not None else None
    if not verdict and score is None:
        raise BadAnswer(f"a JSON answer without verdict or score: {printable_tail(line, 120)}")
    return EngineAnswer(verdict, score, _name(data.get("name")))


def from_json_output(text: str) -> EngineAnswer:
    """The last output line that is a JSON object (programs may print
    other lines first)."""
    for line in reversed(text.splitlines()):
        if line.strip().startswith("{"):
            return from_json_line(line)
    raise BadAnswer(f"no JSON line in the output: {printable_tail(text)}")


def to_result(settings: CommandScannerConfig, name: str, answer: EngineAnswer,
              detail: str = "") -> CheckResult:
    """The scan engine's result for ``answer``: a virus refuses (the
    policy's virus_action may hold or delete it instead); spam and clean
    add the engine's score times ``score_factor``.  ``detail`` names the
    answer when the engine named nothing ("exit 1")."""
    if answer.verdict == "virus":
        what = answer.name or f"found by {name}{f' ({detail})' if detail else ''}"
        return CheckResult(reasons=(f"virus {what}",), action=HardAction.REJECT,
                           template=settings.template, template_vars=(("virus", what),),
                           facts=(("verdict", "virus"),))
    raw = answer.score if answer.score is not None else 0.0
    verdict = answer.verdict
    if not verdict:
        verdict = "spam" if settings.spam_score > 0 and raw >= settings.spam_score else "clean"
    if verdict == "spam":
        return CheckResult(score=raw * settings.score_factor,
                           reasons=(f"spam {answer.name}" if answer.name else f"spam score={raw:g}",),
                           facts=(("verdict", "spam"),))
    # Clean is what a result without a verdict fact means (scan/engine.py
    # engine_verdict), so a plain clean answer is the plain miss.
    reasons = (answer.name or f"score={raw:g}",) if answer.name or raw else ()
    return CheckResult(score=raw * settings.score_factor, reasons=reasons)
