"""What the reply renderer remembers of a template (``templates.py``,
``ReplyRenderer._variables``): the variables it reads, or None when its
texts must be rendered every time."""
from __future__ import annotations

from pathlib import Path

from mppproxy.templates import ReplyRenderer


def _site(tmp_path: Path, text: str) -> ReplyRenderer:
    (tmp_path / "replies").mkdir()
    (tmp_path / "replies" / "greylist.txt").write_text(text)
    return ReplyRenderer(site_dir=str(tmp_path))


def test_variables_are_those_of_the_site_template_and_the_fallback(tmp_path: Path) -> None:
    """A plain template's variables, with the built-in fallback's, sorted, are remembered."""
    renderer = _site(tmp_path, "Wait {{ retry_seconds }}s, {{ client_ip }}\n")
    reads = renderer._variables("", "greylist")
    assert reads is not None
    assert {"client_ip", "retry_seconds"} <= set(reads)
    assert list(reads) == sorted(reads)
    assert renderer._reads[("", "greylist")] == reads


def test_a_template_that_does_not_parse_is_never_remembered(tmp_path: Path) -> None:
    """A template with a syntax error reads None: its text is rendered (and fails) each time."""
    renderer = _site(tmp_path, "{% if %}")
    assert renderer._variables("", "greylist") is None
    assert renderer._reads[("", "greylist")] is None


def test_a_template_that_includes_another_is_never_remembered(tmp_path: Path) -> None:
    """A template that includes another reads None: what it reads is not its own text."""
    renderer = _site(tmp_path, "No {% include 'replies/part.txt' %}\n")
    (tmp_path / "replies" / "part.txt").write_text("from {{ client_ip }}")
    assert renderer._variables("", "greylist") is None
