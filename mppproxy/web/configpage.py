"""The effective configuration page (issue 13): superadmins only,
read-only, secrets masked, for every node.

Floor 3 (``mppproxy/web/``).  Each node's main process writes its
configuration into the state database at start and after each reload
(``db/nodeconfig.py``: ``config/show.py``'s trees, under the masking rule
of ``mppproxy show-config``: keys named for passwords, secrets, tokens and
keys, and the password of any URL; file paths shown, the files never
read).  This page reads those rows in the reactor's thread pool through
the console's state database handle (``statedb.py``) and shows:

* the nodes: name, mode, version, generation, when the configuration was
  loaded and last reported, and "stale" for a node that has not written
  for ``STALE_AFTER`` seconds (stopped, or cut off from the database);
* the keys whose values differ between the nodes of one mode, node by
  node (``differences``): an edge left behind after a change shows here;
* one node's configuration as TOML lines (``?node=NAME&mode=MODE``), by
  default this node's, from the configuration the console holds (the
  newest a reload applied), as before; ``?all=1`` for every key.

A state database that cannot be read still gives this node's
configuration, with the reason.  A domain administrator gets exactly the
console's "no such page" answer, so the page's existence is not told.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence
from urllib.parse import quote

from sqlalchemy.exc import SQLAlchemyError

from mppproxy.config.show import MASK, config_tree, toml_lines, toml_value
from mppproxy.db.models import NODE_LENGTH
from mppproxy.db.nodeconfig import (MODE_LENGTH, STALE_AFTER, NodeConfigRow, config_node,
                                    read_configs)
from mppproxy.web.app import Call, Console, Response, Route
from mppproxy.web.statedb import StateHandle, state_of

# Differing keys shown per mode at most (the rest are counted).
MAX_DIFFERENCES = 200
ABSENT = "(absent)"


@dataclass(frozen=True)
class NodeLine:
    """One line of the nodes' table."""

    node: str
    mode: str
    version: str
    generation: int
    digest: str
    loaded: float
    reported: float
    stale: bool
    age: float  # seconds since the node last wrote
    here: bool  # the node serving this console
    selected: bool


@dataclass
class Differences:
    """The keys whose values differ between the nodes of one mode."""

    mode: str
    nodes: list[str]
    keys: list[tuple[str, list[str]]] = field(default_factory=list)
    more: int = 0  # differing keys left out (past MAX_DIFFERENCES)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` as ``{"a.b": "1"}``: each leaf's dotted key and
    its value as a TOML value (a list whole; an unset section "not set")."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, dotted + "."))
        elif value is None:
            out[dotted] = "not set"
        else:
            out[dotted] = toml_value(value)
    return out


def differences(rows: Sequence[NodeConfigRow],
                limit: int = MAX_DIFFERENCES) -> list[Differences]:
    """Per mode with two nodes or more: the keys (every-key trees) whose
    value is not the same on every node, with each node's value (ABSENT
    where a node has no such key: another version)."""
    by_mode: dict[str, list[NodeConfigRow]] = {}
    for row in rows:
        by_mode.setdefault(row.mode, []).append(row)
    out = []
    for mode in sorted(by_mode):
        group = by_mode[mode]
        if len(group) < 2:
            continue
        flat = [flatten(row.all_keys) for row in group]
        found = Differences(mode, [row.node for row in group])
        for key in sorted(set().union(*flat)):
            values = [f.get(key, ABSENT) for f in flat]
            if len(set(values)) > 1:
                if len(found.keys) < limit:
                    found.keys.append((key, values))
                else:
                    found.more += 1
        out.append(found)
    return out


def _load(handle: StateHandle) -> tuple[list[NodeConfigRow], str]:
    """The stored rows, or none and why (blocking: run it in a thread)."""
    try:
        return read_configs(handle.engine, handle.tables), ""
    except (SQLAlchemyError, OSError, ValueError) as e:
        reason = getattr(e, "orig", None) or e
        return [], ("the other nodes' configurations cannot be read from the state database: "
                    f"{' '.join(str(reason).split())[:300]}")


async def show(console: Console, call: Call) -> Response:
    admin = call.admin
    assert admin is not None
    if not admin.superadmin:
        # The same page (and body) as a path the console does not have.
        return console._page(404, "Not found", "There is no such page.", None)
    ctx = console.ctx
    config = ctx.config
    all_keys = call.field("all", 4) == "1"
    here = (config_node(config), config.mode)
    wanted = (call.field("node", NODE_LENGTH), call.field("mode", MODE_LENGTH))
    rows, error = await ctx.in_thread(_load, state_of(ctx))
    now = ctx.now()
    chosen: Optional[NodeConfigRow] = None
    if wanted != here:
        chosen = next((r for r in rows if (r.node, r.mode) == wanted), None)
    selected = (chosen.node, chosen.mode) if chosen is not None else here
    lines_of = [NodeLine(r.node, r.mode, r.version, r.generation, r.digest[:12], r.loaded,
                         r.reported, r.stale(now), max(0.0, now - r.reported),
                         (r.node, r.mode) == here, (r.node, r.mode) == selected)
                for r in rows]
    if chosen is None:
        # This node, as it runs now (its row may lag or be missing).
        lines = toml_lines(config_tree(config, all_keys=all_keys))
        version, loaded = "", None
    else:
        lines = toml_lines(chosen.all_keys if all_keys else chosen.changed)
        version, loaded = chosen.version, chosen.loaded
    body = console._render(
        "config.html", call, title="Effective configuration", node=selected[0],
        mode=selected[1], this_node=chosen is None, version=version, loaded=loaded,
        all_keys=all_keys, lines=lines, mask=MASK, nodes=lines_of, here=here,
        diffs=differences(rows), error=error, stale_after=STALE_AFTER,
        node_query=("" if chosen is None else
                    f"node={_quote(chosen.node)}&mode={_quote(chosen.mode)}&"))
    return Response(200, body)


def _quote(text: str) -> str:
    return quote(text, safe="")


def routes() -> list[Route]:
    return [Route(b"GET", re.compile(r"/config"), show)]
