"""Jinja2 reply templates: every refusal's text comes from one.

Templates live in ``templates/replies/<name>.txt`` in the source tree (and
inside the installed package).  A site directory (``policy.templates_dir``)
and a per-policy directory (``policies.NAME.templates_dir``) override them
file by file.  The code and enhanced status code of each refusal are fixed
here, with the RFC they come from; the template gives only the text, so a
template can never turn a refusal into an acceptance.

A template that fails to render (a typo in a site template) must not lose
mail or crash a session: the built-in template is used instead and the
problem is logged.

Templates are read once per renderer (a reload builds a new renderer and
so reads them again), and a rendered text is remembered by the values of
the variables its template reads: a greylisting server renders "please
try again in 300 seconds" once, not for every deferral.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import jinja2
import jinja2.meta
from jinja2.sandbox import SandboxedEnvironment

from mppproxy.config.schema import ProxyConfig
from mppproxy.logsetup import Logger
from mppproxy.smtp.replies import Reply

log = Logger()

# template name -> (code, enhanced code)
REFUSALS: dict[str, tuple[int, str]] = {
    # RFC 5321 4.2.2 554 "Transaction failed"; RFC 3463 5.7.1 "Delivery not
    # authorized, message refused".
    "access": (554, "5.7.1"),
    "blacklist": (554, "5.7.1"),
    # RFC 5321 4.2.2 550 "mailbox unavailable" for the one recipient.
    "spamtrap": (550, "5.7.1"),
    # A recipient domain's own block list (db/allowlist.py): RFC 5321
    # 4.2.2/4.2.3 550 "command rejected for policy reasons", for that one
    # recipient; RFC 3463 3.8 X.7.1 "delivery not authorized".
    "domain_block": (550, "5.7.1"),
    "score": (550, "5.7.1"),
    # RFC 6647 section 2.1 and 4.1: greylisting answers a temporary failure;
    # 451 with RFC 3463 4.7.1 as the issue and Postfix's postscreen do.
    "greylist": (451, "4.7.1"),
    # RFC 7372 section 3.2: 5.7.23 "SPF validation failed".
    "spf": (550, "5.7.23"),
    # RFC 7372 section 3.2 / RFC 7208 section 2.6.6: temperror -> 451 4.4.3.
    "spf_temperror": (451, "4.4.3"),
    # RFC 5321 4.2.2 554 "Transaction failed"; RFC 3463 5.7.1 "message
    # refused" (the whole message: it carries a virus).
    "virus": (554, "5.7.1"),
    # RFC 3463 4.3.0: other or undefined mail system status.
    "tempfail": (451, "4.3.0"),
    # RFC 5321 4.5.3.1.10 and 3.3: 452 for recipients not taken in this
    # transaction, 4.5.3 "too many recipients" makes clients retry them.
    "policy_group": (452, "4.5.3"),
    # After DATA (scan/scanners/mime_check.py): RFC 3463 5.6.0 "other or
    # undefined media error", as for a NUL in the data (smtp/replies.py).
    "malformed": (550, "5.6.0"),
    # RFC 3463 5.7.1 "delivery not authorized, message refused": a policy
    # refusal of content.  Not 5.6.1 "media not supported", which says the
    # next system could not carry it, and that is not why it is refused.
    "attachment": (550, "5.7.1"),
    # A header content rule (scan/scanners/headers.py).
    "content": (550, "5.7.1"),
    # A DMARC fail under p=reject (scan/scanners/authentication.py): RFC
    # 7489 10.3 refuses during the transaction; RFC 3463 5.7.1 "delivery
    # not authorized, message refused".
    "dmarc": (550, "5.7.1"),
}

# The template a refusal falls back to when its own cannot be rendered.
_FALLBACK_TEXT = {name: "Refused by policy" for name in REFUSALS}
_FALLBACK_TEXT.update(greylist="Greylisted, please try again later",
                      tempfail="Temporary local problem, please try again later",
                      spf_temperror="Temporary SPF lookup failure, please try again later",
                      policy_group="Please send this recipient in a separate transaction")

# Octets of text per reply line (RFC 5321 4.5.3.1.5: a reply line is at
# most 512 octets with the code and CRLF; "554-" and an enhanced code of
# at most "5.999.999 " (RFC 3463 2) take 14, CRLF 2).
_MAX_LINE = 480
# The reference the default refusals end with (templates/replies/*.txt).
_REF_AT_END = re.compile(r" ?\(ref [^()]*\)$")
_MAX_LINES = 5
# Templates allowed more lines: the verdict of --mode scan has one per
# scanner (RFC 5321 4.2.1 sets no bound on the lines of a reply).
_MAX_LINES_OF = {"scan_result": 40}
# Rendered texts remembered per renderer; past this many the memory starts
# afresh (texts that show client data, such as an address, rarely repeat).
_RENDERED_SIZE = 4096


def builtin_templates_dir() -> Path:
    """Installed: mppproxy/templates; in a source checkout: ./templates."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "templates", package_dir.parent / "templates"):
        if (candidate / "replies").is_dir():
            return candidate
    raise RuntimeError(f"built-in templates not found next to {package_dir}")


def _clean_line(line: str) -> str:
    # Text from the client (addresses, HELO) may be shown: keep it printable,
    # never let it carry CR/LF into the reply (Reply.to_bytes splits lines).
    cleaned = "".join(c if c.isprintable() else "?" for c in line.strip())
    # The bound is in octets (UTF-8 on the wire: SMTPUTF8 addresses).
    if len(cleaned) <= _MAX_LINE // 4 or len(cleaned.encode("utf-8", "replace")) <= _MAX_LINE:
        return cleaned
    # Too long: shortened in the middle, so the "(ref ...)" a refusal ends
    # with survives and still finds the transaction's log line.
    ref = _REF_AT_END.search(cleaned)
    tail = "..." + ref.group() if ref is not None and len(ref.group()) <= _MAX_LINE // 4 else ""
    cut = cleaned.encode("utf-8", "replace")[:_MAX_LINE - len(tail.encode("utf-8", "replace"))]
    # A character cut in half is dropped, not turned into garbage.
    return cut.decode("utf-8", "ignore") + tail


def _clean_value(value: Any) -> Any:
    """Client-supplied text in the context (addresses, HELO) loses its
    control characters before a template sees it: a CR/LF in a value must
    not start a reply line of its own."""
    if isinstance(value, str):
        return "".join(c if c.isprintable() else "?" for c in value)
    if isinstance(value, (list, tuple)):
        return [_clean_value(v) for v in value]
    return value


class ReplyRenderer:
    """Renders refusals from templates; one per configuration.

    ``site_dir`` and each policy's directory are searched before the
    built-in templates.  Environments are built once per directory list."""

    def __init__(self, site_dir: str = "", policy_dirs: Optional[Mapping[str, str]] = None,
                 builtin: Optional[Path] = None):
        self._builtin = builtin or builtin_templates_dir()
        self._site_dir = site_dir
        self._policy_dirs = dict(policy_dirs or {})
        self._envs: dict[str, SandboxedEnvironment] = {}
        self._builtin_env = self._make_env([])
        # (policy, name) -> the variables its templates read, or None when
        # its texts are not remembered (see _variables).
        self._reads: dict[tuple[str, str], Optional[tuple[str, ...]]] = {}
        self._rendered: dict[tuple[Any, ...], str] = {}

    def _make_env(self, dirs: list[str]) -> SandboxedEnvironment:
        paths = [d for d in dirs if d] + [str(self._builtin)]
        # No auto_reload: a template is read once (no stat per reply); a
        # reload (SIGHUP) builds a new renderer.
        return SandboxedEnvironment(loader=jinja2.FileSystemLoader(paths),
                                    undefined=jinja2.StrictUndefined, autoescape=False,
                                    keep_trailing_newline=False, auto_reload=False)

    def _env(self, policy: str) -> SandboxedEnvironment:
        env = self._envs.get(policy)
        if env is None:
            env = self._envs[policy] = self._make_env([self._policy_dirs.get(policy, ""), self._site_dir])
        return env

    def render_text(self, name: str, context: Mapping[str, Any], policy: str = "default") -> str:
        reads = self._variables(policy, name)
        if reads is None or any(k not in context for k in reads):
            return self._render(name, {k: _clean_value(v) for k, v in context.items()}, policy)[0]
        values = [_clean_value(context[k]) for k in reads]
        try:
            key = (policy, name, *(tuple(v) if isinstance(v, list) else v for v in values))
            text = self._rendered.get(key)
        except TypeError:  # a value that cannot be a key
            return self._render(name, dict(zip(reads, values)), policy)[0]
        if text is None:
            text, ok = self._render(name, dict(zip(reads, values)), policy)
            if ok:  # a failing template is logged every time, as without memory
                if len(self._rendered) >= _RENDERED_SIZE:
                    self._rendered.clear()
                self._rendered[key] = text
        return text

    def _variables(self, policy: str, name: str) -> Optional[tuple[str, ...]]:
        """The variables the templates for ``name`` read (the policy's and
        the built-in fallback), or None: a template that includes, imports
        or extends another, or that cannot be parsed, is always rendered."""
        key = (policy, name)
        if key in self._reads:
            return self._reads[key]
        path = f"replies/{name}.txt"
        reads: set[str] = set()
        result: Optional[tuple[str, ...]] = None
        for env in (self._env(policy), self._builtin_env):
            loader = env.loader
            assert loader is not None  # _make_env gives each environment one
            try:
                source = loader.get_source(env, path)[0]
                ast = env.parse(source)
            except jinja2.TemplateError:
                break
            if any(True for _ in jinja2.meta.find_referenced_templates(ast)):
                break
            reads |= jinja2.meta.find_undeclared_variables(ast)
        else:  # every template parsed and includes nothing
            result = tuple(sorted(reads))
        self._reads[key] = result
        return result

    def _render(self, name: str, context: Mapping[str, Any], policy: str) -> tuple[str, bool]:
        """The text, and whether a template rendered it (not the fallback
        after an error)."""
        path = f"replies/{name}.txt"
        ok = True
        for env in (self._env(policy), self._builtin_env):
            try:
                text = env.get_template(path).render(**context)
            except jinja2.TemplateError as e:
                log.error("reply template {template} for policy {policy} failed: {error}",
                          template=path, policy=policy, error=str(e))
                ok = False
                continue
            lines = [_clean_line(line) for line in text.splitlines()]
            lines = [line for line in lines if line][:_MAX_LINES_OF.get(name, _MAX_LINES)]
            if lines:
                return "\n".join(lines), ok
        return _FALLBACK_TEXT.get(name, "Refused by policy"), False

    def reply(self, name: str, context: Mapping[str, Any], policy: str = "default") -> Reply:
        code, enhanced = REFUSALS[name]
        return Reply(code, enhanced, self.render_text(name, context, policy))

    def check_templates(self) -> list[str]:
        """Problems with the reply templates each policy would use, each as
        ``key: problem`` naming the setting whose directory holds the file
        (check-config and start-up prefix the config file): a missing
        directory, a syntax error, a file whose name is no reply template
        (a typo there would silently never be used)."""
        problems: list[str] = []
        dirs = {"policy.templates_dir": self._site_dir}
        dirs.update({f"policies.{p}.templates_dir": d for p, d in self._policy_dirs.items()})
        for key, d in dirs.items():
            if d and not os.path.isdir(d):
                problems.append(f"{key}: directory {d} does not exist")
            elif d:
                problems.extend(f"{key}: {problem}" for problem in _unknown_names(d))
        for policy in ["default", *self._policy_dirs]:
            env = self._env(policy)
            for name in TEMPLATE_NAMES:
                try:
                    env.get_template(f"replies/{name}.txt")
                except jinja2.TemplateSyntaxError as e:
                    where = e.filename or f"replies/{name}.txt"
                    problem = (f"{_key_of(where, dirs)}: template {where}: line {e.lineno}: "
                               f"{e.message}")
                    if problem not in problems:  # a site file is in every policy's path
                        problems.append(problem)
                except jinja2.TemplateNotFound as e:
                    problem = f"built-in templates: replies/{name}.txt not found ({e})"
                    if problem not in problems:
                        problems.append(problem)
        return problems


# Every template a reply is rendered from: the refusals and the verdict of
# --mode scan.
TEMPLATE_NAMES = (*REFUSALS, "scan_result")


def make_renderer(config: ProxyConfig) -> ReplyRenderer:
    """The renderer of ``config``: its site and per-policy template
    directories, relative to ``data_dir``.  The policy engine, scan mode and
    the config check (every template parses) build theirs here."""

    def resolve(path: str) -> str:
        return os.path.join(config.data_dir, path) if path else ""

    return ReplyRenderer(resolve(config.policy.templates_dir),
                         {name: resolve(p.templates_dir) for name, p in config.policies.items()
                          if p.templates_dir})


def _unknown_names(directory: str) -> list[str]:
    """``replies/*.txt`` files of a site directory that no reply uses.
    Names starting with "_" are left alone: partials that templates
    include."""
    replies = os.path.join(directory, "replies")
    try:
        names = sorted(os.listdir(replies))
    except OSError:
        return []  # no replies/ yet: every template is the built-in one
    known = set(TEMPLATE_NAMES)
    return [f"{os.path.join(replies, n)}: {n[:-4]!r} is not a reply template name "
            f"(known: {', '.join(sorted(known))}; start a partial's name with '_')"
            for n in names if n.endswith(".txt") and not n.startswith("_") and n[:-4] not in known]


def _key_of(path: str, dirs: Mapping[str, str]) -> str:
    """The setting whose directory holds ``path``."""
    full = os.path.abspath(path)
    for key, d in dirs.items():
        if d and os.path.commonpath([full, os.path.abspath(d)]) == os.path.abspath(d):
            return key
    return "built-in templates"


# -- notices: whole messages we send, not replies (issue 14) --------------------------

# templates/notices/<name>.txt: header fields (only Subject: is used) up to
# an empty line, then the text of the notice.
NOTICE_DIR = "notices"
# Renderers kept by their directory list (few: one per policy at most).
_NOTICE_RENDERERS: dict[tuple[str, ...], "NoticeRenderer"] = {}


class NoticeRenderer:
    """Renders notices (``templates/notices/<name>.txt``) from ``dirs``
    first, then the built-in templates; sandboxed, like the replies."""

    def __init__(self, dirs: list[str], builtin: Optional[Path] = None):
        paths = [d for d in dirs if d] + [str(builtin or builtin_templates_dir())]
        self.env = SandboxedEnvironment(loader=jinja2.FileSystemLoader(paths),
                                        undefined=jinja2.StrictUndefined, autoescape=False,
                                        auto_reload=False)

    def render(self, name: str, context: Mapping[str, Any]) -> tuple[str, str]:
        """(subject, text); raises jinja2.TemplateError when it cannot."""
        text = self.env.get_template(f"{NOTICE_DIR}/{name}.txt").render(**context)
        head, sep, body = text.lstrip("\n").partition("\n\n")
        if not sep:
            head, body = "", text
        subject = ""
        for line in head.splitlines():
            field, colon, value = line.partition(":")
            if colon and field.strip().lower() == "subject":
                subject = _clean_line(value)
        return subject, body.strip("\n") + "\n"


def notice_dirs(config: ProxyConfig, policy: str) -> list[str]:
    """The template directories a policy's notices are looked up in,
    relative to ``data_dir`` as the replies' are."""
    def resolve(path: str) -> str:
        return os.path.join(config.data_dir, path) if path else ""

    own = config.policies[policy].templates_dir if policy in config.policies else ""
    return [resolve(own), resolve(config.policy.templates_dir)]


def notice_renderer(dirs: list[str]) -> NoticeRenderer:
    key = tuple(dirs)
    renderer = _NOTICE_RENDERERS.get(key)
    if renderer is None:
        if len(_NOTICE_RENDERERS) > 64:  # a reload may change the directories
            _NOTICE_RENDERERS.clear()
        renderer = _NOTICE_RENDERERS[key] = NoticeRenderer(dirs)
    return renderer


def notice_problems(config: ProxyConfig) -> list[str]:
    """Each policy that sends notices finds its template, and it parses;
    a problem names ``policies.NAME.scan.delete_notice.template``."""
    problems = []
    for name, policy in config.policies.items():
        notice = policy.scan.delete_notice
        if not (notice.recipients or notice.admins):
            continue
        key = f"policies.{name}.scan.delete_notice.template"
        renderer = NoticeRenderer(notice_dirs(config, name))
        try:
            renderer.env.get_template(f"{NOTICE_DIR}/{notice.template}.txt")
        except jinja2.TemplateNotFound:
            problems.append(f"{key}: no {NOTICE_DIR}/{notice.template}.txt in the template "
                            "directories or the built-in templates")
        except jinja2.TemplateSyntaxError as e:
            problems.append(f"{key}: template {e.filename or notice.template}: line {e.lineno}: "
                            f"{e.message}")
    return problems
