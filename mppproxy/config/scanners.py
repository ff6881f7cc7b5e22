"""``[scanners]``: the scanner engines a node can ask, one frozen dataclass
each (docs/design.md, "Configuration").

A leaf of ``config/``: each class is what one scanner in ``scan/scanners/``
takes as ``settings``; the health settings go to ``scan/health.py``.  They
follow ``config/schema.py``'s convention (a ``check`` in each field's
metadata, defaults with their reason), so ``config/load.py`` builds and
validates them from TOML as they are.  docs/configuration.md, "Scanners",
lists every key; tests/test_scanners.py checks the two agree.

Sizes are in octets and times in seconds.  ``validate`` runs every field's
check on a dataclass built in code (the loader runs them itself).
"""
from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from mppproxy.config.fields import (choice as _choice, finite as _finite, opt as _opt,
                                    regex as _regex)

__all__ = ["ClamdConfig", "SpamdConfig", "RspamdConfig", "CommandScannerConfig",
           "ScanHealthConfig", "parse_address", "validate", "parse_verdict_spec",
           "command_problems", "ENGINE_VERDICTS"]

# -- bounds and defaults -------------------------------------------------------

# clamd's own default StreamMaxLength is 25 MiB (clamd.conf(5)); a stream
# past the engine's limit is answered "INSTREAM size limit exceeded".
CLAMD_MAX_SIZE = 25 * 1024 * 1024
# spamc's default --max-size is 500 KiB: SpamAssassin is slow on big
# messages and spam is small, so bigger ones are not scanned.
SPAMD_MAX_SIZE = 500 * 1024
# rspamd has no such limit of its own; 20 MiB bounds what we send it.
RSPAMD_MAX_SIZE = 20 * 1024 * 1024
COMMAND_MAX_SIZE = 25 * 1024 * 1024
# A scan normally takes milliseconds to a second (docs: measured numbers);
# 30 s leaves room for a big attachment without holding a client near the
# ten minutes RFC 5321 4.5.3.2.6 gives us after its final dot.
DEFAULT_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_MAX_CONNECTIONS = 10
DEFAULT_RETRIES = 2
DEFAULT_RETRY_DELAY = 0.2
# clamd's default MaxThreads is 10; more connections than threads only queue.
# Upper bounds keep a typo from opening thousands of sockets.
MAX_CONNECTIONS_LIMIT = 1000
MAX_RETRIES_LIMIT = 10
MAX_PROCESSES_LIMIT = 256


# -- field checks ----------------------------------------------------------------

def _between(low: float, high: float) -> Callable[[Any], Optional[str]]:
    def check(value: Any) -> Optional[str]:
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, not {value!r}"
        if not low <= value <= high:
            return f"must be from {low} to {high}, not {value!r}"
        return None

    return check


def _positive(value: Any) -> Optional[str]:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        return f"must be a positive number, not {value!r}"
    return None


def parse_address(value: str) -> tuple[str, str, int]:
    """``"tcp:HOST:PORT"`` (an IPv6 host in brackets: ``tcp:[::1]:3310``) or
    ``"unix:/path/to/socket"``, as ``("tcp", host, port)`` or
    ``("unix", path, 0)``.  ValueError says what is wrong.  The host is an
    address or a name; a name is resolved at connect time."""
    kind, sep, rest = value.partition(":")
    if not sep:
        raise ValueError(f"{value!r} is not 'tcp:HOST:PORT' or 'unix:/path'")
    if kind == "unix":
        if not rest.startswith("/") or "\0" in rest:
            raise ValueError(f"{value!r}: a Unix socket needs an absolute path")
        return "unix", rest, 0
    if kind != "tcp":
        raise ValueError(f"{value!r}: the address must start with 'tcp:' or 'unix:'")
    if rest.startswith("["):
        host, bracket, port_text = rest[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise ValueError(f"{value!r}: an IPv6 host is written tcp:[::1]:PORT")
        port_text = port_text[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from None
    else:
        host, _, port_text = rest.rpartition(":")
        if ":" in host:
            raise ValueError(f"{value!r}: an IPv6 host is written tcp:[::1]:PORT")
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"{value!r}: no host")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: the port must be 1 to 65535")
    return "tcp", host, int(port_text)


def _address(value: str) -> Optional[str]:
    try:
        parse_address(value)
    except ValueError as e:
        return str(e)
    return None


def _http_url(value: str) -> Optional[str]:
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as e:
        return f"{value!r} is not a URL ({e})"
    if parts.scheme != "http" or not parts.hostname:
        return f"{value!r}: must be an http:// URL such as 'http://127.0.0.1:11333'"
    if parts.query or parts.fragment or parts.username or parts.password:
        return f"{value!r}: no user, query or fragment, please"
    if port == 0:
        return f"{value!r}: the port must be 1 to 65535"
    return None


def _header_value(value: str) -> Optional[str]:
    # Sent as an HTTP or SPAMC header line: CR, LF or NUL would end it early.
    if any(c in value for c in "\r\n\0"):
        return "must not contain CR, LF or NUL"
    return None


def _spamd_user(value: str) -> Optional[str]:
    if _header_value(value) or any(c.isspace() for c in value):
        return f"{value!r} is not a user name (no spaces or line breaks)"
    return None


def _spamd_command(value: str) -> Optional[str]:
    if value not in ("SYMBOLS", "REPORT"):
        return f"must be 'SYMBOLS' or 'REPORT', not {value!r}"
    return None


def _command(value: tuple[str, ...]) -> Optional[str]:
    # "{file}" is required of a one-shot program only: a persistent one
    # reads its messages on stdin (``command_problems``).
    if not value or not value[0]:
        return "needs a program and its arguments, e.g. ['clamdscan', '--no-summary', '{file}']"
    if any("\0" in arg for arg in value):
        return "arguments must not contain NUL"
    for arg in value:
        try:
            arg.format(file="x")
        except (KeyError, IndexError, ValueError):
            return f"{arg!r}: the only placeholder is {{file}} (write {{{{ and }}}} for braces)"
    return None


def _exit_codes(value: tuple[int, ...]) -> Optional[str]:
    if any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 255 for v in value):
        return f"exit codes are whole numbers from 0 to 255, not {list(value)!r}"
    return None


# What a command-line engine may say about a message (``exit_verdicts``,
# the named group ``verdict`` of ``output_pattern``, a JSON answer's
# "verdict").  "virus" refuses (a hard action, like clamd's find), "spam"
# and "clean" add the engine's score; per-engine actions may act on any.
ENGINE_VERDICTS = ("clean", "spam", "virus")
OUTPUT_MODES = ("exit", "pattern", "json")


def parse_verdict_spec(value: str) -> tuple[str, Optional[float]]:
    """``"spam:7.5"`` -> ("spam", 7.5), ``"clean"`` -> ("clean", None).
    Raises ValueError naming what is wrong."""
    word, sep, score_text = value.partition(":")
    if word not in ENGINE_VERDICTS:
        raise ValueError(f"{value!r}: the verdict must be one of {', '.join(ENGINE_VERDICTS)}"
                         " (optionally ':SCORE', e.g. 'spam:5')")
    if not sep:
        return word, None
    try:
        score = float(score_text)
    except ValueError:
        raise ValueError(f"{value!r}: {score_text!r} is not a number") from None
    if not math.isfinite(score):
        raise ValueError(f"{value!r}: the score must be finite")
    return word, score


def _exit_verdicts(value: dict[str, str]) -> Optional[str]:
    for code, spec in value.items():
        if not code.isdigit() or not 0 <= int(code) <= 255:
            return f"{code!r}: keys are exit codes, \"0\" to \"255\""
        try:
            # The loader gave strings (dict[str, str]); a dataclass built in
            # code may hold anything.
            parse_verdict_spec(str(spec))
        except ValueError as e:
            return f"{code!r}: {e}"
    return None


def _output_pattern(value: str) -> Optional[str]:
    problem = _regex(value)
    if problem or not value:
        return problem
    groups = re.compile(value).groupindex
    if "score" not in groups and "verdict" not in groups:
        return (f"{value!r}: needs a named group 'score' or 'verdict' "
                "(e.g. 'score=(?P<score>-?[0-9.]+)'), 'name' optional")
    return None


def _scanner_name(value: str) -> Optional[str]:
    if not re.fullmatch(r"[a-z0-9_-]{1,40}", value):
        return f"{value!r}: 1 to 40 of a-z, 0-9, '_' and '-'"
    return None


def _template_name(value: str) -> Optional[str]:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", value):
        return f"{value!r} is not a template name (letters, digits, '-' and '_')"
    return None


_TIMEOUT = _opt(_between(0.1, 3600), "seconds for one whole scan: waiting for a connection "
                "slot, connecting, retries, sending and the reply")
_CONNECT_TIMEOUT = _opt(_between(0.1, 600), "seconds to establish one connection")
_MAX_CONNECTIONS = _opt(_between(1, MAX_CONNECTIONS_LIMIT), "connections to the engine at once")
_RETRIES = _opt(_between(0, MAX_RETRIES_LIMIT), "new attempts after a refused or reset "
                "connection, only before any reply byte")
_RETRY_DELAY = _opt(_between(0, 60), "seconds between attempts")
_SIZE = _opt(_between(1, 2**40), "larger messages are not scanned")
_SCORE_FACTOR = _opt(_finite, "engine score x factor = our score")


# -- the settings ------------------------------------------------------------------

@dataclass(frozen=True)
class ClamdConfig:
    """ClamAV's clamd, asked with INSTREAM (clamd(8)).

    A virus found is a hard action (reject; the policy may turn it into
    quarantine) naming the signature.
    """

    address: str = field(default="tcp:127.0.0.1:3310", metadata=_opt(_address))
    timeout: float = field(default=DEFAULT_TIMEOUT, metadata=_TIMEOUT)
    connect_timeout: float = field(default=DEFAULT_CONNECT_TIMEOUT, metadata=_CONNECT_TIMEOUT)
    max_connections: int = field(default=DEFAULT_MAX_CONNECTIONS, metadata=_MAX_CONNECTIONS)
    retries: int = field(default=DEFAULT_RETRIES, metadata=_RETRIES)
    retry_delay: float = field(default=DEFAULT_RETRY_DELAY, metadata=_RETRY_DELAY)
    # Keep it at or below clamd's StreamMaxLength: past that clamd stops
    # reading and answers "INSTREAM size limit exceeded" (a scanner failure).
    max_size: int = field(default=CLAMD_MAX_SIZE, metadata=_SIZE)
    # INSTREAM chunk size; clamd reads each chunk whole into memory.
    chunk_size: int = field(default=64 * 1024, metadata=_opt(_between(512, 16 * 1024 * 1024)))


@dataclass(frozen=True)
class SpamdConfig:
    """SpamAssassin's spamd, asked with the SPAMC/1.5 protocol."""

    address: str = field(default="tcp:127.0.0.1:783", metadata=_opt(_address))
    timeout: float = field(default=DEFAULT_TIMEOUT, metadata=_TIMEOUT)
    connect_timeout: float = field(default=DEFAULT_CONNECT_TIMEOUT, metadata=_CONNECT_TIMEOUT)
    max_connections: int = field(default=DEFAULT_MAX_CONNECTIONS, metadata=_MAX_CONNECTIONS)
    retries: int = field(default=DEFAULT_RETRIES, metadata=_RETRIES)
    retry_delay: float = field(default=DEFAULT_RETRY_DELAY, metadata=_RETRY_DELAY)
    max_size: int = field(default=SPAMD_MAX_SIZE, metadata=_SIZE)
    # SpamAssassin's score x score_factor is added to ours.
    score_factor: float = field(default=1.0, metadata=_SCORE_FACTOR)
    # SPAMC "User:" header (per-user preferences in spamd); empty sends none.
    user: str = field(default="", metadata=_opt(_spamd_user))
    # SYMBOLS: the rule names; REPORT: also each rule's points (a longer reply).
    command: str = field(default="SYMBOLS", metadata=_opt(_spamd_command))


@dataclass(frozen=True)
class RspamdConfig:
    """rspamd's normal worker, asked over HTTP (POST /checkv2)."""

    url: str = field(default="http://127.0.0.1:11333", metadata=_opt(_http_url))
    timeout: float = field(default=DEFAULT_TIMEOUT, metadata=_TIMEOUT)
    connect_timeout: float = field(default=DEFAULT_CONNECT_TIMEOUT, metadata=_CONNECT_TIMEOUT)
    max_connections: int = field(default=DEFAULT_MAX_CONNECTIONS, metadata=_MAX_CONNECTIONS)
    retries: int = field(default=DEFAULT_RETRIES, metadata=_RETRIES)
    retry_delay: float = field(default=DEFAULT_RETRY_DELAY, metadata=_RETRY_DELAY)
    max_size: int = field(default=RSPAMD_MAX_SIZE, metadata=_SIZE)
    score_factor: float = field(default=1.0, metadata=_SCORE_FACTOR)
    # Sent as the "Password:" header when set (rspamd's controller or a
    # proxy in front of it asks for one; the normal worker does not).
    password: str = field(default="", metadata=_opt(_header_value))


@dataclass(frozen=True)
class CommandScannerConfig:
    """Any program that scans a file and answers by exit code and output.

    ``command`` is the argv (no shell); ``{file}`` in an argument becomes
    the message's file.  The verdict: infected when the exit code is one of
    ``infected_exit_codes`` or ``infected_pattern`` matches the output
    (stdout and stderr); otherwise clean when the exit code is one of
    ``clean_exit_codes``; anything else (another code, a signal, the
    timeout) is a scanner failure.  The pattern's group ``name`` (or its
    first group) names what was found.
    """

    command: tuple[str, ...] = field(default=(), metadata=_opt(_command))
    # The scanner's name in logs and results ("command" unless set).
    name: str = field(default="command", metadata=_opt(_scanner_name))
    timeout: float = field(default=DEFAULT_TIMEOUT, metadata=_TIMEOUT)
    # Programs running at once; more scans wait for a slot (within timeout).
    max_processes: int = field(default=4, metadata=_opt(_between(1, MAX_PROCESSES_LIMIT)))
    max_size: int = field(default=COMMAND_MAX_SIZE, metadata=_SIZE)
    infected_exit_codes: tuple[int, ...] = field(default=(1,), metadata=_opt(_exit_codes))
    clean_exit_codes: tuple[int, ...] = field(default=(0,), metadata=_opt(_exit_codes))
    infected_pattern: str = field(default="", metadata=_opt(_regex))
    # Reply template for an infected message.
    template: str = field(default="virus", metadata=_opt(_template_name))
    # Where a message held in memory is written for the program; empty
    # means the system's temporary directory.
    temp_dir: str = ""
    # -- spam engines (issue 14): a verdict and a score, not only virus/clean --
    # Where the answer is read: "exit" (the exit codes above, then
    # ``exit_verdicts``), "pattern" (``output_pattern`` over the output) or
    # "json" (the last output line that is a JSON object: {"verdict": "spam",
    # "score": 7.5, "name": "..."}).  A persistent engine always answers JSON.
    output: str = field(default="exit", metadata=_opt(_choice(*OUTPUT_MODES)))
    # Exit code (as a string: TOML keys are strings) -> "VERDICT[:SCORE]",
    # e.g. {"0" = "clean", "1" = "virus", "2" = "spam:5"}; asked after
    # infected_exit_codes and clean_exit_codes.
    exit_verdicts: dict[str, str] = field(default_factory=dict,
                                          metadata=_opt(_exit_verdicts))
    # For output "pattern": named groups score, verdict (clean, spam or
    # virus) and name; at least one of score and verdict.
    output_pattern: str = field(default="", metadata=_opt(_output_pattern))
    # The engine's score times this is added to ours (as spamd's).
    score_factor: float = field(default=1.0, metadata=_SCORE_FACTOR)
    # An answer with a score and no verdict is "spam" at and above this
    # score, "clean" below it; 0: always "clean" (the score still counts).
    spam_score: float = field(default=0.0, metadata=_opt(_finite))
    # -- persistent engines: one process reads message after message on stdin --
    # The framing (docs/configuration.md, "Persistent engines"): one JSON
    # line {"size": N, ...envelope}, N octets of message; one JSON line back.
    persistent: bool = False
    # Messages one process scans before it is replaced (a leak bound).
    max_messages: int = field(default=1000, metadata=_opt(_between(1, 10**9)))
    # Scans waiting for a free process; one more fails at once (the
    # policy's on_failure for the engine: tempfail or skip).
    max_queue: int = field(default=100, metadata=_opt(_between(0, 100000)))

    def __post_init__(self) -> None:
        # A TOML list arrives as a list; the dataclass is frozen and hashable.
        for name in ("command", "infected_exit_codes", "clean_exit_codes"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    def __hash__(self) -> int:
        # exit_verdicts is a dict: hash what identifies the engine.
        return hash((self.name, self.command))


def command_problems(commands: tuple[CommandScannerConfig, ...]) -> list[str]:
    """Rules between the keys of one ``[[scanners.command]]``, each as
    ``scanners.command[i].key: what``."""
    problems = []
    for i, c in enumerate(commands):
        key = f"scanners.command[{i}]"
        has_file = any("{file}" in arg for arg in c.command)
        if not c.persistent and not has_file:
            problems.append(f"{key}.command: one argument must hold the placeholder {{file}} "
                            "(the message's file), or set persistent = true for an engine "
                            "that reads messages on stdin")
        if c.persistent and has_file:
            problems.append(f"{key}.command: a persistent engine reads its messages on stdin; "
                            "remove {file}")
        if c.output == "pattern" and not c.output_pattern:
            problems.append(f"{key}.output_pattern: output = \"pattern\" needs a pattern")
        if c.output_pattern and c.output != "pattern":
            problems.append(f"{key}.output_pattern: is only read with output = \"pattern\"")
        if c.persistent and c.output == "pattern":
            problems.append(f"{key}.output: a persistent engine answers one JSON line per "
                            "message; output \"pattern\" is for one-shot programs")
    return problems


@dataclass(frozen=True)
class ScanHealthConfig:
    """The periodic engine check (``scan/health.py``)."""

    # Seconds between checks (VERSION, PING); 0 checks only at start.
    check_interval: float = field(default=300.0, metadata=_opt(_between(0, 86400)))
    # Warn when an engine's signatures are older than this many seconds
    # (freshclam updates several times a day; two days old means it stopped).
    # 0 turns the warning off.
    max_signature_age: float = field(default=172800.0, metadata=_opt(_between(0, 365 * 86400)))
    # Seconds one health question may take.
    timeout: float = field(default=10.0, metadata=_opt(_between(0.1, 600)))


def validate(settings: Any) -> Optional[str]:
    """The first problem of a settings dataclass as ``"field: what"``, or None."""
    for f in fields(settings):
        check = f.metadata.get("check")
        if check is not None:
            problem = check(getattr(settings, f.name))
            if problem:
                return f"{f.name}: {problem}"
    return None


@dataclass(frozen=True)
class ScannersConfig:
    """``[scanners]``: the engines this node can ask, shared by every policy
    (a connection bound per engine holds across policies).  A policy picks
    them with ``[policies.NAME.scan.engines.<name>]``."""

    clamd: Optional[ClamdConfig] = None
    spamd: Optional[SpamdConfig] = None
    rspamd: Optional[RspamdConfig] = None
    # [[scanners.command]] tables, each with its own ``name``.
    command: tuple[CommandScannerConfig, ...] = ()
    health: ScanHealthConfig = ScanHealthConfig()

    def names(self) -> list[str]:
        out = [n for n in ("clamd", "spamd", "rspamd") if getattr(self, n) is not None]
        return out + [c.name for c in self.command]

