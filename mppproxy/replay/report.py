"""What ``mppproxy replay`` prints: a table of the messages whose fate
changes, the totals by transition, and the JSON report.

Stage: the output of the replay; plain values in, text out.  A row's
"old" side is the second configuration's judgement (``--against``) or the
one the message's X-MPP state recorded; None when neither is known (the
message then counts as "new only", never as changed).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Any, Optional, Union

from mppproxy.replay.envelope import Envelope, Past
from mppproxy.replay.judge import Judgement

Side = Union[Judgement, Past]


@dataclass
class Row:
    """One message of the replay."""

    path: str
    new: Optional[Judgement] = None
    old: Optional[Side] = None
    # Where the old side comes from: "against" or the state's field name.
    old_source: str = ""
    envelope: Optional[Envelope] = None
    # Why the message could not be judged ("" when it was).
    error: str = ""

    @property
    def changed(self) -> bool:
        return (self.new is not None and self.old is not None
                and self.new.disposition != self.old.disposition)

    @property
    def transition(self) -> str:
        old = str(self.old.disposition) if self.old is not None else "?"
        new = str(self.new.disposition) if self.new is not None else "error"
        return f"{old} -> {new}"


@dataclass
class Totals:
    messages: int = 0
    judged: int = 0
    errors: int = 0
    changed: int = 0
    # Messages without an old judgement (no --against, no X-MPP state).
    new_only: int = 0
    transitions: Counter[str] = field(default_factory=Counter)
    dispositions: Counter[str] = field(default_factory=Counter)

    def add(self, row: Row) -> None:
        self.messages += 1
        if row.error or row.new is None:
            self.errors += 1
            return
        self.judged += 1
        self.dispositions[str(row.new.disposition)] += 1
        if row.old is None:
            self.new_only += 1
        elif row.changed:
            self.changed += 1
            self.transitions[row.transition] += 1

    def as_json(self) -> dict[str, Any]:
        return {"messages": self.messages, "judged": self.judged, "errors": self.errors,
                "changed": self.changed, "without_old": self.new_only,
                "transitions": dict(sorted(self.transitions.items())),
                "dispositions": dict(sorted(self.dispositions.items()))}


def _score(value: float) -> str:
    return f"{round(value, 2) + 0.0:g}"


def _why(side: Optional[Side]) -> str:
    if side is None:
        return ""
    reasons = "; ".join(side.reasons[:2])
    if side.decided_by and reasons:
        return f"{side.decided_by}: {reasons}"
    return side.decided_by or reasons


def _printable(text: str, width: int = 0) -> str:
    # Reasons quote the message (a file name, a sender): no control
    # character may reach the terminal.
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if not width or len(clean) <= width else clean[:width - 3] + "..."


HEADER = ("PATH", "OLD -> NEW", "DECIDED BY (NEW)", "SCORE OLD/NEW")


def _cells(row: Row) -> tuple[str, str, str, str]:
    if row.error or row.new is None:
        return _printable(row.path), "ERROR", _printable(row.error), ""
    old_score = _score(row.old.score) if row.old is not None else "-"
    return (_printable(row.path), row.transition, _printable(_why(row.new), 80) or "-",
            f"{old_score}/{_score(row.new.score)}")


def table_line(row: Row) -> str:
    """One line of the table for ``row``, unpadded."""
    return "  ".join(c for c in _cells(row) if c)


def write_table(rows: list[Row], out: IO[str], every: bool) -> None:
    """The rows that changed or failed (every row with ``every``), in
    columns: path, transition, what decided the new disposition, scores."""
    shown = [_cells(r) for r in rows if every or r.changed or r.error or r.new is None]
    if not shown:
        return
    widths = [max(len(c[i]) for c in shown + [HEADER]) for i in range(3)]

    def line(cells: tuple[str, str, str, str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells[:3], widths)) + "  " + cells[3]

    print(line(HEADER).rstrip(), file=out)
    for cells in shown:
        print(line(cells).rstrip(), file=out)


def write_totals(totals: Totals, out: IO[str], against: bool) -> None:
    compared = "the --against configuration" if against else "the recorded judgement"
    print(f"{totals.messages} message(s): {totals.judged} judged, "
          f"{totals.errors} could not be judged; {totals.changed} changed against {compared}"
          + (f", {totals.new_only} without an old judgement" if totals.new_only else ""),
          file=out)
    for transition, n in sorted(totals.transitions.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {transition}: {n}", file=out)
    if totals.dispositions:
        print("new dispositions: " + ", ".join(
            f"{d} {n}" for d, n in sorted(totals.dispositions.items())), file=out)


def side_json(side: Optional[Side]) -> Optional[dict[str, Any]]:
    if side is None:
        return None
    out: dict[str, Any] = {"disposition": str(side.disposition),
                           "score": round(side.score, 2) + 0.0,
                           "decided_by": side.decided_by, "reasons": list(side.reasons),
                           "policy": side.policy}
    if isinstance(side, Judgement):
        out["refused"] = [{"recipient": r, "why": why} for r, why in side.refused]
        out["engines"] = dict(side.engines)
    else:
        out["engines"] = {name: ("clean" if s is None else
                                 {"score": s.score, "reasons": list(s.reasons),
                                  "action": s.action.value if s.action else None})
                          for name, s in side.engines.items()}
    return out


def row_json(row: Row) -> dict[str, Any]:
    """The report's object for one message."""
    env = row.envelope
    return {
        "path": row.path,
        "error": row.error or None,
        "envelope": None if env is None else {
            "sender": env.sender, "recipients": list(env.recipients), "client": env.client_ip,
            "helo": env.helo, "sources": dict(env.sources)},
        "old": side_json(row.old),
        "old_source": row.old_source or None,
        "new": side_json(row.new),
        "changed": row.changed,
        "transition": row.transition if row.new is not None else None,
    }


class JsonReport:
    """The JSON report, written as the replay goes (a corpus of a million
    messages needs no list in memory): ``{"config", "against", "options",
    "messages": [one object per message], "totals"}``."""

    def __init__(self, out: IO[str], head: dict[str, Any]):
        self.out = out
        self.count = 0
        text = json.dumps(head, indent=2, sort_keys=True)
        # The head's closing brace is reopened for the messages.
        out.write(text[:-2] + ',\n  "messages": [')

    def add(self, row: Row) -> None:
        self.out.write(("," if self.count else "") + "\n    "
                       + json.dumps(row_json(row), sort_keys=True, ensure_ascii=False))
        self.count += 1

    def close(self, totals: Totals) -> None:
        self.out.write(("\n  " if self.count else "") + '],\n  "totals": '
                       + json.dumps(totals.as_json(), sort_keys=True) + "\n}\n")
        self.out.flush()
