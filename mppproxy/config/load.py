"""TOML (or a command's output) into ``ProxyConfig``, with every error named.

One loader validates everything up front and reports ``file: key.path: what
is wrong`` for each problem at once, never a traceback (STYLE.md,
Configuration).  Unknown keys are errors, so a typo never silently falls back
to a default.
"""
from __future__ import annotations

import dataclasses
import os
import difflib
import shlex
import subprocess
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Optional

from mppproxy.archive.keys import KeyFileError, load_keys
from mppproxy.config.database import ServerUrls, url_problems
from mppproxy.config.digest import digest_problems
from mppproxy.config.dns import parse_nameserver
from mppproxy.config.errors import ConfigError
from mppproxy.config.ladder import config_ladder_problems
from mppproxy.config.scan import engine_action_problems
from mppproxy.config.scanners import command_problems
from mppproxy.config.schema import ProxyConfig
from mppproxy.config.web import web_problems, web_wanted
from mppproxy.templates import REFUSALS, make_renderer, notice_problems
from mppproxy.tlsconfig import load_ca_certificate, load_private_certificate, load_server_certificate

# A config command that hangs must not hang startup or a reload forever.
CONFIG_COMMAND_TIMEOUT = 30.0


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _convert(value: Any, tp: Any, key: str, errors: list[str], source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return the converted
    value, or None after appending an error."""
    tp, optional = _unwrap_optional(tp)
    if value is None and optional:
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            errors.append(f"{source}: {key}: must be a table, not {type(value).__name__}")
            return None
        return _build(tp, value, key + ".", errors, source)
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{source}: {key}: must be true or false, not {value!r}")
            return None
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{source}: {key}: must be a whole number, not {value!r}")
            return None
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{source}: {key}: must be a number, not {value!r}")
            return None
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{source}: {key}: must be a string, not {value!r}")
            return None
        return value
    if tp == ServerUrls:
        # database.url, store.url: one URL, or a list of servers (a cluster).
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            errors.append(f"{source}: {key}: must be a URL or a list of URLs, not {value!r}")
            return None
        return tuple(value)
    if typing.get_origin(tp) is dict:
        item_tp = typing.get_args(tp)[1]
        if not isinstance(value, Mapping):
            errors.append(f"{source}: {key}: must be a table, not {type(value).__name__}")
            return None
        out = {}
        for name, item in value.items():
            converted = _convert(item, item_tp, f"{key}.{name}", errors, source)
            if converted is not None:
                out[name] = converted
        return out
    if typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, list):
            errors.append(f"{source}: {key}: must be a list of tables ([[{key}]]), not {value!r}")
            return None
        items = [_convert(item, item_tp, f"{key}[{i}]", errors, source) for i, item in enumerate(value)]
        return tuple(items) if all(i is not None for i in items) else None
    if typing.get_origin(tp) is tuple and typing.get_args(tp)[0] is int:
        if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            errors.append(f"{source}: {key}: must be a list of whole numbers, not {value!r}")
            return None
        return tuple(value)
    if typing.get_origin(tp) is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            errors.append(f"{source}: {key}: must be a list of strings, not {value!r}")
            return None
        return tuple(value)
    raise TypeError(f"schema type {tp!r} for {key} has no loader")  # a bug in schema.py


def _build(cls: Any, data: Mapping[str, Any], prefix: str, errors: list[str], source: str) -> Any:
    """An instance of the config dataclass ``cls`` (Any: whichever one the
    schema names) from ``data``, or None after appending errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            errors.append(f"{source}: {prefix}{name}: unknown key{hint}")
    kwargs: dict[str, Any] = {}
    before = len(errors)
    for name, f in fields.items():
        key = prefix + name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append(f"{source}: {key}: is required")
            continue
        value = _convert(data[name], hints[name], key, errors, source)
        if value is None:
            continue
        check = f.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            errors.append(f"{source}: {key}: {problem}")
            continue
        kwargs[name] = value
    if len(errors) != before:
        return None
    return cls(**kwargs)


def from_mapping(data: Mapping[str, Any], source: str = "<config>") -> ProxyConfig:
    """Build and validate a ProxyConfig from parsed TOML-like data."""
    errors: list[str] = []
    data = inherit_default_policy(data)
    # None when ``errors`` has grown: raised below, before any use.
    config: ProxyConfig = _build(ProxyConfig, data, "", errors, source)
    if not errors:
        errors = [f"{source}: {problem}" for problem in _cross_checks(config)]
    if errors:
        raise ConfigError(errors)
    return config


def inherit_default_policy(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """Each named policy starts from [policies.default]: a section it does
    not set is the default's, a key it does not set is the default's.  Only
    ``domains`` and ``recipients`` (what picks a policy) are never inherited."""
    policies = data.get("policies")
    if not isinstance(policies, Mapping):
        return data
    default = policies.get("default", {})
    if not isinstance(default, Mapping):
        return data
    base = {k: v for k, v in default.items() if k not in ("domains", "recipients")}
    merged = {name: (merge(base, own) if name != "default" and isinstance(own, Mapping) else own)
              for name, own in policies.items()}
    merged.setdefault("default", {})
    return {**data, "policies": merged}


def _cross_checks(config: ProxyConfig) -> list[str]:
    """Rules that involve more than one key."""
    problems = []
    if config.backend is not None and not config.backend.host.strip():
        problems.append("backend.host: must not be empty")
    if config.mode == "edge" and config.backend is None:
        problems.append("backend: mode 'edge' relays to a backend MTA: set [backend] host "
                        "(or --backend HOST:PORT), or use mode 'all-in-one'")
    for d in config.relay_domains:
        if "*" in d:
            problems.append(f"relay_domains: {d!r}: no wildcards; write '.{d.lstrip('*.')}' "
                            "for the subdomains of a domain")
    problems.extend(_policy_checks(config))
    if config.database.pool_min > config.database.pool_max:
        problems.append("database.pool_min: is larger than database.pool_max")
    if config.tls.key_file and not config.tls.cert_file:
        problems.append("tls.key_file: is set but tls.cert_file is not")
    problems.extend(_archive_node_checks(config))
    problems.extend(_archive_checks(config))
    problems.extend(web_problems(config.mode, config.web))
    problems.extend(digest_problems(config.digest))
    return problems


# The modes whose edge reads [archive] (the hold action, archive copies,
# the forwarder).
_ARCHIVE_MODES = ("all-in-one", "edge")


def _archive_checks(config: ProxyConfig) -> list[str]:
    """``[archive]`` on an edge: keys that need another (the files
    themselves: ``_archive_files``)."""
    if config.mode not in _ARCHIVE_MODES:
        return []
    archive = config.archive
    problems = []
    if archive.node and not archive.key_file.strip():
        problems.append("archive.key_file: archive.node is set, and the copies' state is signed "
                        "with these keys (the archive node's archive_node.key_file): set it")
    if archive.copy == "domains" and not archive.domains:
        problems.append("archive.domains: archive.copy is 'domains' and names none: list the "
                        "domains whose mail is copied")
    if archive.domains and archive.copy != "domains":
        problems.append(f"archive.domains: is set, but archive.copy is {archive.copy!r}, which "
                        "does not read it (copy = \"domains\" does)")
    for d in archive.domains:
        if "*" in d:
            problems.append(f"archive.domains: {d!r}: no wildcards; write '.{d.lstrip('*.')}' "
                            "for the subdomains of a domain")
    if archive.tls_cert_file and not archive.tls_key_file:
        problems.append("archive.tls_key_file: archive.tls_cert_file is set: set the key of "
                        "that client certificate too")
    if archive.tls_key_file and not archive.tls_cert_file:
        problems.append("archive.tls_key_file: is set but archive.tls_cert_file is not")
    if archive.tls_cert_file and archive.tls == "none":
        problems.append("archive.tls_cert_file: a client certificate is sent over STARTTLS, "
                        "and archive.tls is 'none'")
    if archive.retry_base > archive.retry_max:
        problems.append("archive.retry_base: is larger than archive.retry_max")
    return problems


def _archive_files(config: ProxyConfig) -> list[str]:
    """``[archive]``'s files: the key file loads (archive/keys.py: mode
    600, one good key a line), the client certificate and CA load, the
    queue directory can be made; each problem named by its key."""
    if config.mode not in _ARCHIVE_MODES:
        return []
    archive = config.archive
    problems = []
    problems += _key_file_problems("archive.key_file", archive.key_file)
    if archive.tls_cert_file and archive.tls_key_file:
        problem = load_private_certificate(archive.tls_cert_file, archive.tls_key_file)[1]
        if problem:
            problems.append(f"archive.tls_cert_file: {problem}")
    if archive.tls_ca_file:
        problems += _named("archive.tls_ca_file", load_ca_certificate(archive.tls_ca_file)[1])
    if archive.queue_dir:
        problems += _named("archive.queue_dir", _creatable_dir(archive.queue_dir))
    return problems


def _archive_node_checks(config: ProxyConfig) -> list[str]:
    """``[archive_node]`` in mode "archive": what the receiver cannot do
    without (the files themselves: ``_archive_node_files``)."""
    if config.mode != "archive":
        return []
    node = config.archive_node
    problems = []
    if not node.key_file.strip():
        problems.append("archive_node.key_file: mode 'archive' verifies the edges' copies with "
                        "the keys they sign with (their archive.key_file): set it")
    if node.require_client_cert:
        if not node.client_ca_file.strip():
            problems.append("archive_node.client_ca_file: archive_node.require_client_cert "
                            "needs the CA certificate that signs the edges' client certificates")
        if not config.tls.enabled:
            problems.append("archive_node.require_client_cert: client certificates come with "
                            "STARTTLS, and tls.enabled is false")
    return problems


def _archive_node_files(config: ProxyConfig) -> list[str]:
    """The key file loads (archive/keys.py: mode 600, one good key a
    line), the client CA certificate loads, the queue directory can be
    made; each problem named by its key."""
    if config.mode != "archive":
        return []
    node = config.archive_node
    problems = []
    problems += _key_file_problems("archive_node.key_file", node.key_file)
    if node.require_client_cert and node.client_ca_file.strip():
        problems += _named("archive_node.client_ca_file",
                           load_ca_certificate(node.client_ca_file)[1])
    if node.queue_dir:
        problems += _named("archive_node.queue_dir", _creatable_dir(node.queue_dir))
    return problems


def _web_files(config: ProxyConfig) -> list[str]:
    """The console's certificate and key load (config/web.py)."""
    web = config.web
    if not web_wanted(config.mode, web) or not web.tls_cert_file:
        return []
    return _named("web.tls_cert_file", load_server_certificate(
        web.tls_cert_file, web.tls_key_file or web.tls_cert_file)[1])


def _named(key: str, problem: Optional[str]) -> list[str]:
    """``key: problem`` when there is one."""
    return [f"{key}: {problem}"] if problem else []


def _key_file_problems(key: str, path: str) -> list[str]:
    """The archive key file at ``path`` (set) loads: mode 600, one good key
    a line (archive/keys.py); each of its problems named by ``key``."""
    if not path.strip():
        return []
    try:
        load_keys(path)
    except KeyFileError as e:
        return [f"{key}: {line}" for line in e.errors]
    return []


def _policy_checks(config: ProxyConfig) -> list[str]:
    problems = []
    if config.policies["default"].domains:
        problems.append("policies.default.domains: the default policy is for every domain "
                        "no other policy names; list domains only in named policies")
    if config.policies["default"].recipients:
        problems.append("policies.default.recipients: the default policy is for every "
                        "recipient no other policy takes; list recipients only in named policies")
    owner: dict[str, str] = {}
    engines = config.scanners.names()
    if len(set(engines)) != len(engines):
        problems.append("scanners.command: two scanners have the same name "
                        f"(names in use: {', '.join(engines)})")
    problems.extend(command_problems(config.scanners.command))
    for name, policy in config.policies.items():
        for engine in policy.scan.engines:
            if engine not in engines:
                problems.append(f"policies.{name}.scan.engines.{engine}: no such scanner in "
                                f"[scanners] (configured: {', '.join(engines) or 'none'})")
        problems.extend(engine_action_problems(f"policies.{name}", policy.scan, engines))
        for section in ("dkim", "dmarc"):
            # Authentication runs as a scanner: without scanning it would be
            # silently off (scan mode scans every policy anyway).
            if (getattr(policy.scan, section).enabled and not policy.scan.enabled
                    and config.mode != "scan"):
                problems.append(f"policies.{name}.scan.{section}.enabled: needs "
                                f"policies.{name}.scan.enabled = true")
        for d in policy.domains:
            key = d.strip().rstrip(".").lower()
            if key in owner and owner[key] != name:
                problems.append(f"policies.{name}.domains: {d!r} is already in policies.{owner[key]}")
            owner[key] = name
    problems.extend(_unfed_max_spam(config))
    problems.extend(_unknown_templates(config))
    # Thresholds that could never act (the verdict ladder, verdict.py).
    problems.extend(config_ladder_problems(config))
    for i, ns in enumerate(config.dns.nameservers):
        if parse_nameserver(ns) is None:
            problems.append(f"dns.nameservers[{i}]: {ns!r} is not IP or IP:PORT ([IPv6]:PORT)")
    if config.database.url != "":
        problems.extend(url_problems("database.url", config.database.url))
    if config.store.url != "":
        problems.extend(url_problems("store.url", config.store.url))
    return problems


def _unknown_templates(config: ProxyConfig) -> list[str]:
    """Template names a setting picks must be refusals the renderer knows:
    their reply codes are fixed there (templates.REFUSALS), so an unknown
    name would fail at the first refusal, in front of a client."""
    return [f"scanners.command[{i}].template: {c.template!r} is not a reply template "
            f"(one of: {', '.join(sorted(REFUSALS))})"
            for i, c in enumerate(config.scanners.command) if c.template not in REFUSALS]


def _unfed_max_spam(config: ProxyConfig) -> list[str]:
    """``thresholds.max_spam`` counts spam verdicts, which only the scanning
    after DATA gives; the Postfix policy server (mode "policy") never sees
    a message, so the limit could never be reached there."""
    if config.mode != "policy":
        return []
    default = config.policies["default"].thresholds.max_spam
    problems = []
    for name, policy in config.policies.items():
        value = policy.thresholds.max_spam
        # A named policy inherits the default's value: named once, where set.
        if value and (name == "default" or value != default):
            problems.append(f"policies.{name}.thresholds.max_spam: mode 'policy' scans no "
                            "messages, so no spam verdict is ever counted; remove it (or set "
                            "it to 0) and use thresholds.max_messages")
    return problems


def check_files(config: ProxyConfig, source: str = "<config>") -> None:
    """Check what the configuration names on disk: certificates load, log
    and data directories can be written, reply templates parse.  Done
    before starting (and by ``mppproxy check-config``), so a bad path is a
    message naming ``source`` (the config file) and the key, as every other
    error is, not a traceback."""
    errors = _file_problems(config)
    if errors:
        raise ConfigError([f"{source}: {problem}" for problem in errors])


def _file_problems(config: ProxyConfig) -> list[str]:
    errors = _certificate_problems(config)
    if config.backend is not None and config.backend.tls_ca_file:
        problem = load_ca_certificate(config.backend.tls_ca_file)[1]
        if problem:
            errors.append(f"backend.tls_ca_file: {problem}")
    if config.logging.json_file:
        problem = _writable_dir(os.path.dirname(os.path.abspath(config.logging.json_file)))
        if problem:
            errors.append(f"logging.json_file: {problem}")
    if (config.policy.enabled or config.mode == "scan"
            or any(p.scan.enabled for p in config.policies.values())):
        # Reply templates (the policy's refusals, scan mode's verdict, and
        # the refusals of post-DATA scanning, which runs with the policy
        # engine off too): directories exist, every template parses, no
        # file is misnamed.
        errors.extend(make_renderer(config).check_templates())
        errors.extend(notice_problems(config))
    errors.extend(_archive_files(config))
    errors.extend(_archive_node_files(config))
    errors.extend(_web_files(config))
    problem = _creatable_dir(config.data_dir)
    if problem:
        errors.append(f"data_dir: {problem}")
    elif config.spool_dir:
        problem = _creatable_dir(config.spool_dir)
        if problem:
            errors.append(f"spool_dir: {problem}")
    return errors


def _certificate_problems(config: ProxyConfig) -> list[str]:
    """The STARTTLS certificate and key, each named by its own key when it
    cannot be read, the pair by tls.cert_file when it does not load."""
    tls = config.tls
    if tls.enabled and tls.cert_dir:
        # The certificates per served name (SNI): every file must load, or
        # a reload would serve half a set.
        from mppproxy.tlsnames import CertificateDirectoryError, load_directory
        try:
            load_directory(tls.cert_dir)
        except CertificateDirectoryError as e:
            return [f"tls.cert_dir: {e}"]
    if not tls.enabled or not tls.cert_file:
        return []  # none configured: a self-signed one is made at start
    key_file = tls.key_file or tls.cert_file
    unreadable = [f"{key}: cannot read {path}: {problem}"
                  for key, path in (("tls.cert_file", tls.cert_file), ("tls.key_file", key_file))
                  if (problem := _unreadable(path))]
    if unreadable:
        return unreadable[:1] if key_file == tls.cert_file else unreadable
    problem = load_server_certificate(tls.cert_file, key_file)[1]
    return [f"tls.cert_file: {problem}"] if problem else []


def _unreadable(path: str) -> Optional[str]:
    try:
        with open(path, "rb"):
            return None
    except OSError as e:
        return e.strerror or str(e)


def _writable_dir(path: str) -> Optional[str]:
    if not os.path.isdir(path):
        return f"directory {path} does not exist"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"directory {path} is not writable"
    return None


def _creatable_dir(path: str) -> Optional[str]:
    """None if ``path`` is a writable directory or could be created."""
    path = os.path.abspath(path)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return f"{probe} is not a directory, so {path} cannot be created"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def parse_text(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{source}: not valid TOML: {e}"]) from None


def read_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot read the config file: {e}"]) from None
    return parse_text(text, path)


def read_command(command: str, timeout: float = CONFIG_COMMAND_TIMEOUT) -> dict[str, Any]:
    """Run ``command`` (split like a shell would, no shell) and parse its
    stdout as TOML, so many nodes can load one central config."""
    source = f"config command {command!r}"
    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise ConfigError([f"{source}: cannot split the command: {e}"]) from None
    if not argv:
        raise ConfigError([f"{source}: is empty"])
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError([f"{source}: could not run: {e}"]) from None
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip()[:500]
        raise ConfigError([f"{source}: exited with status {proc.returncode}: {err}"])
    try:
        text = proc.stdout.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{source}: output is not UTF-8: {e}"]) from None
    return parse_text(text, source)


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides (command-line options) win over the file, table by table."""
    out = dict(base)
    for k, v in overrides.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def source_name(path: Optional[str] = None, command: Optional[str] = None) -> str:
    """How errors name where the configuration came from, as ``load`` does."""
    if path:
        return path
    return f"config command {command!r}" if command else "<defaults>"


def load(path: Optional[str] = None, command: Optional[str] = None,
         overrides: Optional[Mapping[str, Any]] = None) -> ProxyConfig:
    """The one entry point: file or command, then overrides, then validation."""
    data: dict[str, Any] = {}
    source = source_name(path, command)
    if path and command:
        raise ConfigError(["--config and --config-command: give one, not both"])
    if path:
        data = read_file(path)
    elif command:
        data = read_command(command)
    if overrides:
        data = merge(data, overrides)
    return from_mapping(data, source)
