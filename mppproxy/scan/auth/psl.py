"""The organisational domain of a name (RFC 7489 section 3.2), from the
Public Suffix List shipped in the package (``mppproxy/data/``, its source
and date in the README there; never downloaded at run time).

Stage: scanning, a building block of DMARC (``scan/auth/dmarc.py``).  Pure
functions over a list read once per process, on first use (a 330 KB file,
~30 ms); ``PublicSuffixList`` can be built from any text for tests.

The matching is the list's own algorithm (https://publicsuffix.org/list/,
"Formal algorithm"): the rule matching the most labels wins, an exception
rule (``!``) wins over all and means its parent, a wildcard (``*``) matches
one label, and with no rule matching the implicit rule is ``*`` (the last
label is the suffix).  Names are compared as lower-case IDNA A-labels.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable, Optional

import idna

DATA_FILE = Path(__file__).resolve().parent.parent.parent / "data" / "public_suffix_list.dat"


def _a_label(label: str) -> str:
    """A rule's label as it appears in DNS (the list writes U-labels)."""
    if label.isascii():
        return label.lower()
    try:
        return idna.encode(label, uts46=True).decode("ascii")
    except idna.IDNAError:
        # A label the idna package refuses can never match a name we ask
        # about, which is always A-labels; kept as written.
        return label.lower()


class PublicSuffixList:
    """The rules of one list: ``exact`` (normal rules), ``wildcards`` (the
    parent of each ``*.`` rule), ``exceptions`` (``!`` rules), each a set of
    dotted lower-case A-label names."""

    def __init__(self, lines: Iterable[str]):
        self.exact: set[str] = set()
        self.wildcards: set[str] = set()
        self.exceptions: set[str] = set()
        for raw in lines:
            # The list: one rule per line, up to the first white space;
            # "//" starts a comment line.
            line = raw.strip().split(None, 1)[0] if raw.strip() else ""
            if not line or line.startswith("//"):
                continue
            exception = line.startswith("!")
            if exception:
                line = line[1:]
            labels = [_a_label(lab) for lab in line.split(".")]
            if exception:
                self.exceptions.add(".".join(labels))
            elif labels[0] == "*":
                self.wildcards.add(".".join(labels[1:]))
            else:
                self.exact.add(".".join(labels))

    def public_suffix(self, domain: str) -> str:
        """The public suffix of ``domain`` (lower case, no trailing dot)."""
        labels = domain.lower().rstrip(".").split(".")
        best = 1  # the implicit "*" rule
        for i in range(len(labels)):
            name = ".".join(labels[i:])
            count = len(labels) - i
            if name in self.exceptions:
                # The exception's parent is the suffix, whatever else matched.
                return ".".join(labels[i + 1:])
            if name in self.exact and count > best:
                best = count
            if i > 0 and name in self.wildcards and count + 1 > best:
                best = count + 1
        return ".".join(labels[-best:])

    def organisational_domain(self, domain: str) -> str:
        """RFC 7489 3.2: the public suffix and one label more; a name that
        is itself a public suffix is its own organisational domain."""
        labels = domain.lower().rstrip(".").split(".")
        suffix = self.public_suffix(domain)
        n = len(suffix.split(".")) + 1
        return ".".join(labels[-n:]) if len(labels) >= n else ".".join(labels)


@functools.lru_cache(maxsize=1)
def default_list() -> PublicSuffixList:
    """The list shipped in the package, read once."""
    with open(DATA_FILE, encoding="utf-8") as f:
        return PublicSuffixList(f)


@functools.lru_cache(maxsize=4096)
def organisational_domain(domain: str, psl: Optional[PublicSuffixList] = None) -> str:
    """The organisational domain of ``domain`` by ``psl`` (default: the
    shipped list); remembered (DMARC asks it twice or more per message,
    mostly for the same few domains; a list is keyed by identity)."""
    return (psl or default_list()).organisational_domain(domain)
