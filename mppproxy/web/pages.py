"""The console's Jinja2 environment: templates in ``templates/web/``
(installed inside the package as ``mppproxy/templates/web``, found as the
reply templates are: ``mppproxy.templates.builtin_templates_dir``).

Floor 3 (``mppproxy/web/``).  Autoescape is on for every template, and
undefined variables are errors, so a typo fails a test rather than
showing an empty field.  Message data reaches templates only as strings
(``mailview.py``); nothing is marked safe.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import jinja2

from mppproxy.templates import builtin_templates_dir


def web_templates_dir() -> Path:
    return builtin_templates_dir() / "web"


def utc_text(epoch: Optional[float]) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def size_text(octets: int) -> str:
    for unit, scale in (("MB", 1 << 20), ("kB", 1 << 10)):
        if octets >= scale:
            return f"{octets / scale:.1f} {unit}"
    return f"{octets} B"


class Pages:
    """Renders the console's pages."""

    def __init__(self, directory: Optional[Path] = None) -> None:
        self.directory = directory or web_templates_dir()
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(self.directory)), autoescape=True,
            undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.env.filters["utc"] = utc_text
        self.env.filters["size"] = size_text

    def render(self, template: str, /, **context: Any) -> bytes:
        return self.env.get_template(template).render(**context).encode("utf-8")

    def static(self, name: str) -> bytes:
        """A static file beside the templates (the style sheet)."""
        return (self.directory / name).read_bytes()
