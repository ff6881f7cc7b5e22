"""SPF (RFC 7208): ``check_host()``, evaluated asynchronously on our own DNS client.

Stage: policy, as a building block.  The SPF check (``policy/checks/spf.py``)
hands over the client IP, the domain to check (MAIL FROM's, or the HELO name
for the null sender), the sender and the HELO name, and gets back one
``SpfResult``: one of the seven results of RFC 7208 section 2.6, the
explanation for a "fail" (section 6.2) and the term that decided.

Every DNS query goes through ``Resolver.query`` (``dns/resolver.py``:
dnspython messages over Twisted UDP/TCP, cached by TTL): no blocking
resolver, no threads.  The evaluation follows the record left to right, one
query at a time, as the RFC describes it, and is bounded three ways so a
hostile record cannot make it run long or wide (section 4.6.4, section 11.1):

- at most ``lookup_limit`` (10) terms that cost a DNS query (include, a,
  mx, ptr, exists, redirect), over all includes and redirects together;
  past it, "permerror".  An include or redirect loop ends there;
- at most ``void_limit`` (2) of them answered NXDOMAIN or NODATA;
- at most 10 MX names per "mx" (more is "permerror") and 10 PTR names per
  "ptr" or ``%{p}`` (the rest are ignored); and the whole evaluation within
  ``timeout`` seconds, past which it is "temperror".

A DNS failure (timeout, SERVFAIL...) is "temperror", a syntax error anywhere
in a record is "permerror" (section 4.6), and a domain that cannot be an SPF
domain at all (an address literal, one label, an empty or over-long label)
is "none" (section 4.3).
"""
from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Optional, Union
from urllib.parse import quote

import dns.name
import dns.reversename
import idna
from twisted.internet import defer

from mppproxy._async import as_deferred
from mppproxy.logsetup import Logger
from mppproxy.dns.names import to_query_name
from mppproxy.dns.resolver import DnsAnswer, DnsError

log = Logger()

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")

# RFC 7208 4.6.4: at most 10 terms that cause DNS queries, at most 2 void
# lookups (the recommended default), at most 10 MX and 10 PTR names.
DEFAULT_LOOKUP_LIMIT = 10
DEFAULT_VOID_LIMIT = 2
MX_LIMIT = 10
PTR_LIMIT = 10
# RFC 7208 4.6.4: the time limit for the whole evaluation "SHOULD allow at
# least 20 seconds"; the runtime passes less when the engine's per-check
# timeout is shorter, so that the bound ends in "temperror" here rather than
# in an engine timeout that scores nothing.
DEFAULT_TIMEOUT = 20.0
# An explanation may end up in a reply line (RFC 5321 4.5.3.1.5).
MAX_EXPLANATION = 200
# RFC 7208 7.3: a macro-expanded name is cut from the left to 253 characters.
MAX_DOMAIN = 253

_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
# Section 7.2: c, r and t only in explanation strings.
_DOMAIN_LETTERS = frozenset("slodipvh")
_EXP_LETTERS = _DOMAIN_LETTERS | frozenset("crt")

IpAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


@dataclass(frozen=True)
class SpfResult:
    """The outcome of ``check_host()``.

    ``result`` is one of RESULTS.  ``explanation`` is the expanded "exp"
    text for a "fail" when the domain published one (empty otherwise; made
    printable ASCII and at most MAX_EXPLANATION characters).  ``mechanism``
    is the term that matched (``-all``, ``include:_spf.example.com``),
    "default" when none did (neutral, section 4.7), empty for the others.
    ``problem`` says why for none, permerror and temperror, for the log.
    """

    result: str
    explanation: str = ""
    mechanism: str = ""
    problem: str = ""


class _PermError(Exception):
    """A permanent error (section 2.6.7): ends the evaluation."""


class _TempError(Exception):
    """A transient (DNS) error (section 2.6.6): ends the evaluation."""


# -- record syntax (RFC 7208 section 4.6.1, section 12) ------------------------

@dataclass(frozen=True)
class _Macro:
    """One ``%{...}`` (section 7.1): letter, rightmost-parts count (0 all),
    reversal, split characters and URL escaping (an upper-case letter)."""

    letter: str
    digits: int
    reverse: bool
    delimiters: str
    escape: bool


MacroString = tuple[Union[str, _Macro], ...]

_MACRO_EXPAND = re.compile(r"%\{([A-Za-z])([0-9]*)([rR]?)([.\-+,/_=]*)\}")
_TOPLABEL = r"(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9])"
# domain-end = ( "." toplabel [ "." ] ) / macro-expand
_DOMAIN_END = re.compile(r"(?:\." + _TOPLABEL + r"\.?|%\{[^}]*\}|%%|%_|%-)\Z")
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.\-]*)=(.*)\Z", re.S)
_DIRECTIVE = re.compile(r"([+\-~?]?)([A-Za-z][A-Za-z0-9]*)(.*)\Z", re.S)
# [ ":" domain-spec ] [ ip4-cidr-length ] [ "/" ip6-cidr-length ]
_DOMAIN_CIDR = re.compile(r"(?::(.*?))?(?:/([0-9]+))?(?://([0-9]+))?\Z", re.S)
_QNUM = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IP4 = re.compile(r":(" + _QNUM + r"(?:\." + _QNUM + r"){3})(?:/([0-9]+))?\Z")
_IP6 = re.compile(r":([0-9A-Fa-f:.]+)(?:/([0-9]+))?\Z")
_CIDR_TEXT = re.compile(r"(?:0|[1-9][0-9]*)\Z")


def parse_macro_string(text: str, explanation: bool = False) -> MacroString:
    """A macro-string (section 7.1) as literal text and ``_Macro`` parts.
    ``explanation`` allows spaces and the c, r and t letters (an
    explain-string).  _PermError for a syntax error."""
    out: list[Union[str, _Macro]] = []
    literal: list[str] = []
    letters = _EXP_LETTERS if explanation else _DOMAIN_LETTERS
    i = 0
    while i < len(text):
        c = text[i]
        if c == "%":
            nxt = text[i + 1:i + 2]
            if nxt in ("%", "_", "-"):
                literal.append({"%": "%", "_": " ", "-": "%20"}[nxt])
                i += 2
                continue
            m = _MACRO_EXPAND.match(text, i)
            if m is None:
                raise _PermError(f"bad macro at {text[i:i + 12]!r}")
            letter, digits, reverse, delimiters = m.groups()
            if letter.lower() not in letters:
                raise _PermError(f"macro letter {letter!r} not allowed here")
            count = int(digits) if digits else 0
            if digits and count == 0:
                raise _PermError("a macro's part count must not be zero (section 7.3)")
            if literal:
                out.append("".join(literal))
                literal = []
            out.append(_Macro(letter.lower(), count, bool(reverse), delimiters, letter.isupper()))
            i = m.end()
            continue
        # macro-literal = %x21-24 / %x26-7E; explain-string also has SP.
        if not ("\x21" <= c <= "\x7e" or (explanation and c == " ")):
            raise _PermError(f"character {c!r} not allowed in an SPF record")
        literal.append(c)
        i += 1
    if literal:
        out.append("".join(literal))
    return tuple(out)


def _parse_domain_spec(text: str) -> MacroString:
    """domain-spec = macro-string domain-end (section 7.1)."""
    if not text:
        raise _PermError("empty domain-spec")
    parsed = parse_macro_string(text)
    if not _DOMAIN_END.search(text):
        raise _PermError(f"domain-spec {text!r} does not end in a macro or a top label")
    return parsed


def _cidr(text: Optional[str], most: int) -> int:
    if text is None:
        return most
    if not _CIDR_TEXT.match(text) or int(text) > most:
        raise _PermError(f"bad CIDR length /{text}")
    return int(text)


@dataclass(frozen=True)
class _Directive:
    qualifier: str
    mechanism: str
    domain: Optional[MacroString] = None
    network: Optional[Union[ipaddress.IPv4Network, ipaddress.IPv6Network]] = None
    cidr4: int = 32
    cidr6: int = 128
    text: str = ""


@dataclass(frozen=True)
class SpfRecord:
    directives: tuple[_Directive, ...]
    redirect: Optional[MacroString] = None
    explanation: Optional[MacroString] = None


def _parse_directive(term: str) -> _Directive:
    m = _DIRECTIVE.match(term)
    if m is None:
        raise _PermError(f"unknown term {term!r}")
    qualifier, name, rest = m.group(1) or "+", m.group(2).lower(), m.group(3)
    if name == "all":
        if rest:
            raise _PermError(f"'all' takes no argument: {term!r}")
        return _Directive(qualifier, name, text=term)
    if name in ("include", "exists", "ptr"):
        if name == "ptr" and not rest:
            return _Directive(qualifier, name, text=term)
        if not rest.startswith(":"):
            raise _PermError(f"bad {name} term {term!r}")
        return _Directive(qualifier, name, _parse_domain_spec(rest[1:]), text=term)
    if name in ("a", "mx"):
        dm = _DOMAIN_CIDR.match(rest)
        if dm is None:
            raise _PermError(f"bad {name} term {term!r}")
        spec, c4, c6 = dm.groups()
        domain = _parse_domain_spec(spec) if spec is not None else None
        return _Directive(qualifier, name, domain, cidr4=_cidr(c4, 32), cidr6=_cidr(c6, 128),
                          text=term)
    if name == "ip4":
        im = _IP4.match(rest)
        if im is None:
            raise _PermError(f"bad ip4 term {term!r}")
        net4 = ipaddress.IPv4Network(f"{im.group(1)}/{_cidr(im.group(2), 32)}", strict=False)
        return _Directive(qualifier, name, network=net4, text=term)
    if name == "ip6":
        im = _IP6.match(rest)
        if im is None:
            raise _PermError(f"bad ip6 term {term!r}")
        try:
            addr6 = ipaddress.IPv6Address(im.group(1))
        except ValueError:
            raise _PermError(f"bad ip6 address in {term!r}") from None
        net6 = ipaddress.IPv6Network(f"{addr6}/{_cidr(im.group(2), 128)}", strict=False)
        return _Directive(qualifier, name, network=net6, text=term)
    raise _PermError(f"unknown mechanism {name!r}")


@functools.lru_cache(maxsize=512)
def parse_record(text: str) -> SpfRecord:
    """An SPF record (section 4.6.1, 12) parsed whole: a syntax error
    anywhere is a _PermError before anything is evaluated (section 4.6)."""
    if not text.isascii():
        raise _PermError("non-ASCII character in the record (section 3.1)")
    terms = [t for t in text.split(" ") if t]
    if not terms or terms[0].lower() != "v=spf1":
        raise _PermError("not a v=spf1 record")
    directives: list[_Directive] = []
    redirect = explanation = None
    for term in terms[1:]:
        m = _MODIFIER.match(term)
        if m is None:
            directives.append(_parse_directive(term))
            continue
        name, value = m.group(1).lower(), m.group(2)
        # Section 6: each at most once.  A known modifier's value must be a
        # domain-spec; it is not an unknown modifier when it is not.
        if name == "redirect":
            if redirect is not None:
                raise _PermError("two redirect modifiers")
            redirect = _parse_domain_spec(value)
        elif name == "exp":
            if explanation is not None:
                raise _PermError("two exp modifiers")
            explanation = _parse_domain_spec(value)
        else:
            parse_macro_string(value)  # unknown modifiers are ignored once valid
    return SpfRecord(tuple(directives), redirect, explanation)


def is_spf_record(text: str) -> bool:
    """Section 4.5: the version section "v=spf1" (ABNF: any case) ends in a
    space or at the end of the record."""
    return text[:7].lower() == "v=spf1 " or text.lower() == "v=spf1"


def spf_domain(domain: str) -> Optional[str]:
    """``domain`` fit to be checked (section 4.3), in A-labels without a
    trailing dot, or None: empty, an address literal or IP address, a single
    label, an empty label, a label over 63 or a name over 253 octets."""
    d = domain.strip()
    if d.endswith("."):
        d = d[:-1]
    if not d or d.startswith("["):
        return None
    try:
        ipaddress.ip_address(d)
        return None
    except ValueError:
        pass
    if not d.isascii():
        try:
            d = idna.encode(d, uts46=True).decode("ascii")
        except idna.IDNAError:
            return None
    labels = d.split(".")
    if len(labels) < 2 or len(d) > MAX_DOMAIN:
        return None
    if any(not 0 < len(label) <= 63 or not label.isprintable() or " " in label for label in labels):
        return None
    return d


def _nibbles(ip: IpAddress) -> str:
    if ip.version == 4:
        return str(ip)
    return ".".join(ip.exploded.replace(":", ""))


def _truncate(name: str) -> str:
    """Section 7.3: drop labels from the left until 253 characters fit."""
    while len(name.rstrip(".")) > MAX_DOMAIN and "." in name:
        name = name.split(".", 1)[1]
    return name


def _printable(text: str) -> str:
    cleaned = "".join(c if " " <= c <= "~" else " " for c in text)
    return cleaned[:MAX_EXPLANATION]


# -- evaluation ----------------------------------------------------------------

class SpfEvaluator:
    """``check_host()`` of RFC 7208 over a ``Resolver`` (anything with
    ``async query(name, rdtype) -> DnsAnswer`` raising ``DnsError``).

    ``lookup_limit`` and ``void_limit`` are section 4.6.4's limits;
    ``timeout`` bounds one whole evaluation on ``reactor``'s clock (the
    resolver's by default).  ``hostname`` is what ``%{r}`` expands to in
    explanations.  Construction does no I/O; the evaluator keeps no state
    between evaluations (the resolver caches the answers).
    """

    def __init__(self, resolver: Any, *, lookup_limit: int = DEFAULT_LOOKUP_LIMIT,
                 void_limit: int = DEFAULT_VOID_LIMIT, timeout: float = DEFAULT_TIMEOUT,
                 hostname: str = "", reactor: Any = None, mx_limit: int = MX_LIMIT,
                 ptr_limit: int = PTR_LIMIT):
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        if lookup_limit < 1 or void_limit < 0 or mx_limit < 1 or ptr_limit < 1:
            raise ValueError("limits must be positive")
        self.resolver = resolver
        self.lookup_limit = lookup_limit
        self.void_limit = void_limit
        self.mx_limit = mx_limit
        self.ptr_limit = ptr_limit
        self.timeout = timeout
        self.hostname = hostname
        self.reactor = reactor if reactor is not None else resolver.reactor

    async def check_host(self, ip: Union[str, IpAddress], domain: str, sender: str,
                         helo: str) -> SpfResult:
        """The SPF result for mail from ``sender`` (an address; its local
        part may be empty) at ``ip`` that said HELO ``helo``, checked
        against ``domain``'s record (section 4).  Never raises for DNS or
        record trouble: that is "temperror" or "permerror"."""
        try:
            addr = ipaddress.ip_address(ip.strip() if isinstance(ip, str) else ip)
        except ValueError:
            return SpfResult("none", problem=f"no client address: {ip!r}")
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # section 5: IPv4-mapped IPv6 is IPv4
        checked = spf_domain(domain)
        if checked is None:
            return SpfResult("none", problem=f"not a domain to check: {domain!r}")
        local, at, sender_domain = sender.rpartition("@")
        if not at:
            local, sender_domain = "", checked
        if not local:  # section 4.3
            local = "postmaster"
        evaluation = _Evaluation(self, addr, f"{local}@{sender_domain}", local,
                                 sender_domain, helo)
        d = as_deferred(evaluation.run(checked))
        d.addTimeout(self.timeout, self.reactor)
        try:
            result: SpfResult = await d
        except defer.TimeoutError:
            return SpfResult("temperror", problem=f"no result within {self.timeout:g}s")
        return result


class _Evaluation:
    """One ``check_host()`` call: its facts and its counters."""

    def __init__(self, evaluator: SpfEvaluator, ip: IpAddress, sender: str, local: str,
                 sender_domain: str, helo: str):
        self.e = evaluator
        self.ip = ip
        self.sender = sender
        self.local = local
        self.sender_domain = sender_domain
        self.helo = helo
        self.lookups = 0
        self.voids = 0
        self._validated: Optional[list[dns.name.Name]] = None
        self._ptr_void = False

    async def run(self, domain: str) -> SpfResult:
        try:
            result, mechanism, explanation = await self._check(domain, explain=True)
        except _PermError as e:
            return SpfResult("permerror", problem=str(e))
        except _TempError as e:
            return SpfResult("temperror", problem=str(e))
        if result == "none":
            return SpfResult("none", problem=f"no SPF record at {domain}")
        return SpfResult(result, explanation, mechanism)

    # -- the recursion ---------------------------------------------------------

    async def _check(self, domain: str, explain: bool) -> tuple[str, str, str]:
        """(result, mechanism, explanation) for ``domain``; "none" when it
        has no record.  ``explain``: fetch the exp of a fail (not inside an
        include, section 6.2)."""
        text = await self._fetch_record(domain)
        if text is None:
            return "none", "", ""
        record = parse_record(text)
        for directive in record.directives:
            if await self._matches(directive, domain):
                result = _QUALIFIERS[directive.qualifier]
                explanation = ""
                if result == "fail" and explain and record.explanation is not None:
                    explanation = await self._explain(record.explanation, domain)
                return result, directive.text, explanation
        if record.redirect is not None:
            # Section 6.1: only when no mechanism matched; the target's
            # result is ours, its exp (not ours) explains a fail.
            self._count_lookup()
            target = await self._target(record.redirect, domain)
            outcome = await self._check(target, explain)
            if outcome[0] == "none":
                raise _PermError(f"redirect to {target}, which has no SPF record")
            return outcome
        return "neutral", "default", ""

    async def _fetch_record(self, domain: str) -> Optional[str]:
        """Section 4.4/4.5: the one v=spf1 TXT record; None when there is none;
        _PermError for more than one, _TempError for a DNS failure."""
        answer = await self._query(domain, "TXT")
        if answer is None:
            return None
        found = [t for t in answer.texts if is_spf_record(t)]
        if len(found) > 1:
            raise _PermError(f"{len(found)} SPF records at {domain}")
        return found[0] if found else None

    async def _matches(self, d: _Directive, domain: str) -> bool:
        m = d.mechanism
        if m == "all":
            return True
        if m in ("ip4", "ip6"):
            assert d.network is not None
            return d.network.version == self.ip.version and self.ip in d.network
        self._count_lookup()
        target = domain if d.domain is None else await self._target(d.domain, domain)
        if m == "include":
            result, _, _ = await self._check(target, explain=False)
            if result == "none":  # section 5.2
                raise _PermError(f"include:{target} has no SPF record")
            return result == "pass"
        if m == "a":
            answer = await self._void_counted(target, self._address_type)
            return self._in_any(answer, d)
        if m == "mx":
            answer = await self._void_counted(target, "MX")
            exchanges = answer.mx if answer is not None else ()
            if len(exchanges) > self.e.mx_limit:
                raise _PermError(f"mx:{target} has {len(exchanges)} MX names, "
                                 f"over the limit of {self.e.mx_limit}")
            for _, exchange in exchanges:
                if exchange == dns.name.root:  # a null MX (RFC 7505)
                    continue
                if self._in_any(await self._query(exchange, self._address_type), d):
                    return True
            return False
        if m == "ptr":
            names = await self._validated_names(count_void=True)
            try:
                target_name = to_query_name(target)
            except ValueError:
                return False
            return any(n.is_subdomain(target_name) for n in names)
        if m == "exists":
            answer = await self._void_counted(target, "A")  # A even for IPv6 (5.7)
            return answer is not None and not answer.void
        raise AssertionError(f"unparsed mechanism {m}")

    # -- pieces ------------------------------------------------------------------

    @property
    def _address_type(self) -> str:
        return "A" if self.ip.version == 4 else "AAAA"

    def _in_any(self, answer: Optional[DnsAnswer], d: _Directive) -> bool:
        if answer is None:
            return False
        cidr = d.cidr4 if self.ip.version == 4 else d.cidr6
        for addr in answer.addresses:
            if addr.version == self.ip.version and \
                    self.ip in ipaddress.ip_network(f"{addr}/{cidr}", strict=False):
                return True
        return False

    def _count_lookup(self) -> None:
        self.lookups += 1
        if self.lookups > self.e.lookup_limit:
            raise _PermError(f"more than {self.e.lookup_limit} DNS-querying terms (section 4.6.4)")

    def _count_void(self, answer: Optional[DnsAnswer]) -> None:
        if answer is None or answer.void:
            self.voids += 1
            if self.voids > self.e.void_limit:
                raise _PermError(f"more than {self.e.void_limit} void lookups (section 4.6.4)")

    async def _void_counted(self, name: Union[str, dns.name.Name], rdtype: str) -> Optional[DnsAnswer]:
        answer = await self._query(name, rdtype)
        self._count_void(answer)
        return answer

    async def _query(self, name: Union[str, dns.name.Name], rdtype: str) -> Optional[DnsAnswer]:
        """The answer, or None for a name no query can be made of (an empty
        or over-long label after macro expansion: treated as not existing,
        the choice RFC 7208 leaves open).  _TempError for a DNS failure."""
        try:
            answer: DnsAnswer = await self.e.resolver.query(name, rdtype)
        except ValueError:
            return None
        except DnsError as e:
            raise _TempError(f"DNS {e.kind} for {name} {rdtype}") from None
        return answer

    async def _validated_names(self, count_void: bool = False) -> list[dns.name.Name]:
        """Section 5.5: the PTR names of the client whose A/AAAA records
        hold its address (the first PTR_LIMIT only), looked up once per
        evaluation.  A failed PTR lookup gives none; a failed address
        lookup skips that name.  ``count_void``: a "ptr" term, whose empty
        PTR answer is a void lookup each time."""
        if self._validated is None:
            self._validated = []
            try:
                ptr = await self.e.resolver.query(dns.reversename.from_address(str(self.ip)),
                                                  "PTR")
            except DnsError:
                self._ptr_void = False
                return self._validated
            self._ptr_void = ptr.void
            for name in ptr.names[:self.e.ptr_limit]:
                try:
                    answer = await self.e.resolver.query(name, self._address_type)
                except (DnsError, ValueError):
                    continue
                if self.ip in answer.addresses:
                    self._validated.append(name)
        if count_void and self._ptr_void:
            self._count_void(None)
        return self._validated

    async def _target(self, spec: MacroString, domain: str) -> str:
        """A domain-spec expanded, cut to length and without a trailing dot
        (section 7.3: the dot is ignored for domains)."""
        name = _truncate(await self._expand(spec, domain))
        return name[:-1] if name.endswith(".") else name

    async def _expand(self, spec: MacroString, domain: str) -> str:
        """Section 7.3: the macro-string with each macro replaced."""
        out = []
        for part in spec:
            if isinstance(part, str):
                out.append(part)
                continue
            value = await self._macro_value(part.letter, domain)
            pieces = re.split("[" + re.escape(part.delimiters or ".") + "]", value)
            if part.reverse:
                pieces.reverse()
            if part.digits:
                pieces = pieces[-part.digits:]
            value = ".".join(pieces)
            if part.escape:
                value = quote(value, safe="")  # leaves RFC 3986 "unreserved"
            out.append(value)
        return "".join(out)

    async def _macro_value(self, letter: str, domain: str) -> str:
        if letter == "s":
            return self.sender
        if letter == "l":
            return self.local
        if letter == "o":
            return self.sender_domain
        if letter == "d":
            return domain
        if letter == "i":
            return _nibbles(self.ip)
        if letter == "v":
            return "in-addr" if self.ip.version == 4 else "ip6"
        if letter == "h":
            return self.helo
        if letter == "c":
            return str(self.ip)
        if letter == "r":
            return self.e.hostname or "unknown"
        if letter == "t":
            return str(int(self.e.reactor.seconds()))
        if letter == "p":
            return await self._p_value(domain)
        raise AssertionError(f"unparsed macro letter {letter}")

    async def _p_value(self, domain: str) -> str:
        """Section 7.3 %{p}: the validated name equal to the domain, else one
        under it, else any; "unknown" if none (or on a DNS error)."""
        names = await self._validated_names()
        if not names:
            return "unknown"
        try:
            target = to_query_name(domain)
        except ValueError:
            target = None
        chosen = names[0]
        if target is not None:
            exact = [n for n in names if n == target]
            under = [n for n in names if n.is_subdomain(target)]
            chosen = (exact or under or names)[0]
        return chosen.to_text(omit_final_dot=True)

    async def _explain(self, spec: MacroString, domain: str) -> str:
        """Section 6.2: best effort; any trouble means no explanation.  The
        lookup counts against no limit."""
        try:
            target = await self._target(spec, domain)
            answer = await self._query(target, "TXT")
            if answer is None or len(answer.texts) != 1 or not answer.texts[0].isascii():
                return ""
            text = await self._expand(parse_macro_string(answer.texts[0], explanation=True), domain)
        except (_PermError, _TempError) as e:
            log.debug("no SPF explanation for {domain}: {why}", domain=domain, why=str(e))
            return ""
        return _printable(text)
