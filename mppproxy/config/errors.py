"""The one error a configuration raises (docs/design.md, "Configuration":
``file: key.path: what is wrong``, never a traceback).

A module of its own so that whatever checks a configuration (the loader,
the TLS certificate loading in ``tlsconfig.py``) raises the same error
without importing the loader.
"""
from __future__ import annotations


class ConfigError(Exception):
    """A configuration that cannot be used; ``errors`` holds one line per
    problem, each naming the source and the key."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors
