"""The effective configuration as text: ``mppproxy show-config``.

A leaf of ``config/`` (floor 1): it reads a validated ``ProxyConfig`` and
gives back plain data (``config_tree``) and its two renderings, TOML lines
(``toml_lines``) and JSON (``json.dumps`` of the tree).

What is shown.  By default only the keys whose value differs from their
default, like ``postconf -n``; with ``all_keys`` every key, defaults filled
in.  The default of a key of a named policy is the value the default policy
gives it (named policies inherit [policies.default], ``load.py``), except
``domains``, which is never inherited and always shown for a named policy
(so the policy exists when the lines are read back).

The lines are TOML with dotted keys (``limits.max_connections = 1000``),
one key a line, so an operator can paste them into a configuration file:
read back, they give the same configuration (secrets aside).  A list of
tables (``scanners.command``) is one line of inline tables; a section that
is set but has every key at its default (``scanners.clamd``) is ``= {}``;
an optional section that is not set is a comment in ``all_keys`` mode.

Secrets (``MASK`` in their place), the rule docs/operations.md states:

* a key whose name contains ``password``, ``passwd``, ``secret`` or
  ``token``, or is ``key`` or ends in ``_key`` (an inline key; none exists
  yet), when it is not empty;
* the password of any URL with one (``scheme://user:password@host``),
  wherever a string holds it: ``database.url``, ``store.url``, routes;
* nothing else: file paths (``tls.key_file``, ``archive.key_file``) are
  shown, and no file a key names is ever read.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Mapping

from mppproxy.config.schema import ProxyConfig

MASK = "********"

# Key names whose value is a secret (the last part of the key, lower case).
_SECRET_NAME = re.compile(r"password|passwd|secret|token|(^|_)key$")
# scheme://user:password@ (the user part may be empty: redis://:pw@host).
_URL_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*:)([^@/]*)(@)")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
# Marks a value equal to its default (never shown without all_keys).
_SAME = object()


def is_secret_key(name: str) -> bool:
    """Whether a key called ``name`` holds a secret by the rule above."""
    return bool(_SECRET_NAME.search(name.lower()))


def mask_url_password(text: str) -> str:
    """``text`` with the password of a URL at its start replaced by MASK."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{MASK}{m.group(3)}", text)


def config_tree(config: ProxyConfig, all_keys: bool = False) -> dict[str, Any]:
    """The configuration as nested dicts, lists and scalars, secrets masked:
    every key (``all_keys``; an unset optional section is None) or only
    those that differ from their defaults."""
    if all_keys:
        tree = _plain(config)
    else:
        tree = _changes(config, ProxyConfig())
        if tree is _SAME:
            tree = {}
        policies = _policy_changes(config.policies)
        if policies:
            tree["policies"] = policies
        else:
            tree.pop("policies", None)
    masked: dict[str, Any] = _mask(tree, "")
    return masked


def _field_default(f: "dataclasses.Field[Any]") -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING  # a required key: always shown


def _plain(value: Any) -> Any:
    """A config value as plain data (a dataclass: a dict of every field)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _changes(value: Any, base: Any) -> Any:
    """What of ``value`` differs from ``base`` (its default), as plain
    data, or _SAME.  ``base`` is None (or MISSING) where there is no
    default to compare with: a section or entry that the default lacks."""
    if value == base:
        return _SAME
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        same_kind = type(base) is type(value)
        for f in dataclasses.fields(value):
            field_base = getattr(base, f.name) if same_kind else _field_default(f)
            v = getattr(value, f.name)
            if field_base is dataclasses.MISSING:
                out[f.name] = _plain(v)
                continue
            changed = _changes(v, field_base)
            if changed is not _SAME:
                out[f.name] = changed
        return out  # {} for a section set with every key at its default
    if isinstance(value, Mapping):
        base_map = base if isinstance(base, Mapping) else {}
        if not value:
            return {}  # an empty table where the default has entries
        out = {}
        for k, v in value.items():
            changed = _changes(v, base_map.get(k))
            if changed is not _SAME:
                out[k] = changed
        return out if out else _SAME
    if isinstance(value, (tuple, list)):
        # A list is replaced whole; its tables show their own changes only.
        return [_item_changes(v) for v in value]
    return value


def _item_changes(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changed = _changes(value, None)
        return {} if changed is _SAME else changed
    return _plain(value)


def _policy_changes(policies: Mapping[str, Any]) -> dict[str, Any]:
    """Each policy's changes: the default policy's from the built-in
    defaults, a named one's from the default policy (``domains`` always)."""
    default = policies["default"]
    out: dict[str, Any] = {}
    changed = _changes(default, type(default)())
    if changed is not _SAME and changed:
        out["default"] = changed
    for name, policy in policies.items():
        if name == "default":
            continue
        own = _changes(policy, dataclasses.replace(default, domains=policy.domains))
        entry = {"domains": list(policy.domains)}
        if own is not _SAME:
            entry.update(own)
        out[name] = entry
    return out


def _mask(value: Any, name: str) -> Any:
    if isinstance(value, dict):
        return {k: _mask(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v, name) for v in value]
    if isinstance(value, str):
        if value and is_secret_key(name):
            return MASK
        return mask_url_password(value)
    return value


# -- rendering -------------------------------------------------------------------

def toml_lines(tree: Mapping[str, Any]) -> list[str]:
    """One ``dotted.key = value`` line per key of ``tree``."""
    lines: list[str] = []
    _lines(tree, [], lines)
    return lines


def _lines(tree: Mapping[str, Any], prefix: list[str], out: list[str]) -> None:
    for key, value in tree.items():
        path = [*prefix, _key(str(key))]
        dotted = ".".join(path)
        if isinstance(value, Mapping) and value:
            _lines(value, path, out)
        elif value is None:
            out.append(f"# {dotted}: not set")
        else:
            out.append(f"{dotted} = {toml_value(value)}")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name, ensure_ascii=False)


def toml_value(value: Any) -> str:
    """``value`` as a TOML value (inline tables for mappings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # JSON's string escapes are a subset of TOML's basic-string escapes.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{_key(str(k))} = {toml_value(v)}" for k, v in value.items()
                          if v is not None)
        return "{" + items + "}" if items else "{}"
    raise TypeError(f"no TOML form for {value!r}")
