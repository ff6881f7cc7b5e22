"""The effective configuration page (issue 13): superadmins only,
read-only, secrets masked.

Floor 3 (``mppproxy/web/``).  What this node runs with, as ``mppproxy
show-config`` prints it: ``config/show.py``'s tree and TOML lines, under
the same masking rule (keys named for passwords, secrets, tokens and keys;
the password of any URL; file paths shown, the files never read), with
``?all=1`` for every key.  The configuration is the one the console holds,
the newest a reload applied.

Other nodes (edges) are not shown: they record no snapshot anywhere this
node can read; an operator runs ``mppproxy show-config`` on each.

A domain administrator gets exactly the console's "no such page" answer,
so the page's existence is not told.
"""
from __future__ import annotations

import re
import socket

from mppproxy.config.show import MASK, config_tree, toml_lines
from mppproxy.web.app import Call, Console, Response, Route


async def show(console: Console, call: Call) -> Response:
    admin = call.admin
    assert admin is not None
    if not admin.superadmin:
        # The same page (and body) as a path the console does not have.
        return console._page(404, "Not found", "There is no such page.", None)
    config = console.ctx.config
    all_keys = call.field("all", 4) == "1"
    lines = toml_lines(config_tree(config, all_keys=all_keys))
    node = config.archive.node_name or config.smtp.hostname or socket.gethostname()
    body = console._render("config.html", call, title="Effective configuration", node=node,
                           mode=config.mode, all_keys=all_keys, lines=lines, mask=MASK)
    return Response(200, body)


def routes() -> list[Route]:
    return [Route(b"GET", re.compile(r"/config"), show)]
