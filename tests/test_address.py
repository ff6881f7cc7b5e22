"""Envelope addresses (``mppproxy.smtp.address``): MAIL/RCPT argument
splitting, path parsing (RFC 5321 4.1.2), relay domains and the relay
refusal rules behind docs/design.md promise 3."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mppproxy.smtp.address import (
    NULL_PATH, Address, AddressError, RelayDomains, normalise_domain, parse_path,
    relay_refusal_reason, split_argument,
)


class SplitArgumentTests(SynchronousTestCase):
    """``split_argument``: the path and its ESMTP parameters."""

    GOOD = [
        ("FROM:<a@b.example>", "FROM:", "<a@b.example>", {}),
        ("from:<a@b.example>", "FROM:", "<a@b.example>", {}),
        ("FROM: <a@b.example>", "FROM:", "<a@b.example>", {}),
        ("FROM:<>", "FROM:", "<>", {}),
        ("FROM:<a@b.example> SIZE=10", "FROM:", "<a@b.example>", {"SIZE": "10"}),
        ("FROM:<a@b.example> size=10 body=8BITMIME SMTPUTF8", "FROM:", "<a@b.example>",
         {"SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": None}),
        ("FROM:<a@b.example>  SIZE=10", "FROM:", "<a@b.example>", {"SIZE": "10"}),
        ("FROM:a@b.example SIZE=10", "FROM:", "a@b.example", {"SIZE": "10"}),
        ('FROM:<"a>b c"@b.example> SIZE=1', "FROM:", '<"a>b c"@b.example>', {"SIZE": "1"}),
        ('FROM:<"a\\">"@b.example>', "FROM:", '<"a\\">"@b.example>', {}),
        ("TO:<c@d.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c@d.example", "TO:",
         "<c@d.example>", {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;c@d.example"}),
        ("TO:<c@d.example> X-EXT-1=v", "TO:", "<c@d.example>", {"X-EXT-1": "v"}),
    ]

    BAD = [
        ("FROM<a@b.example>", "FROM:"),
        ("TO:<a@b.example>", "FROM:"),
        ("FROM:", "FROM:"),
        ("FROM:   ", "FROM:"),
        ("FROM:<a@b.example", "FROM:"),
        ('FROM:<"a>@b.example', "FROM:"),
        ("FROM:<a@b.example>SIZE=10", "FROM:"),
        ("FROM:<a@b.example> SIZE=", "FROM:"),
        ("FROM:<a@b.example> =10", "FROM:"),
        ("FROM:<a@b.example> -X=1", "FROM:"),
        ("FROM:<a@b.example> X_Y=1", "FROM:"),
        ("FROM:<a@b.example> SIZE=1=2", "FROM:"),
        ("FROM:<a@b.example> SIZE=1\x01", "FROM:"),
        ("FROM:<a@b.example> SIZE=1 size=2", "FROM:"),
    ]

    def test_good_arguments(self) -> None:
        """Well-formed arguments split into the path text and upper-cased parameter keys."""
        for arg, prefix, path, params in self.GOOD:
            self.assertEqual(split_argument(arg, prefix), (path, params), arg)

    def test_bad_arguments(self) -> None:
        """Arguments outside the grammar raise AddressError."""
        for arg, prefix in self.BAD:
            with self.assertRaises(AddressError, msg=arg):
                split_argument(arg, prefix)


class ParsePathTests(SynchronousTestCase):
    """``parse_path``: RFC 5321 4.1.2 Path / Mailbox."""

    GOOD = [
        # path, text, local, domain
        ("<user@example.com>", "user@example.com", "user", "example.com"),
        ("user@example.com", "user@example.com", "user", "example.com"),
        ("<first.last+tag@sub.example.com>", "first.last+tag@sub.example.com", "first.last+tag",
         "sub.example.com"),
        ("<user@example.com.>", "user@example.com.", "user", "example.com."),
        ("<a!#$%&'*+/=?^_`{|}~-b@example.com>", "a!#$%&'*+/=?^_`{|}~-b@example.com",
         "a!#$%&'*+/=?^_`{|}~-b", "example.com"),
        # Source routes are dropped (RFC 5321 4.1.1.3, appendix C).
        ("<@relay.example:user@example.com>", "user@example.com", "user", "example.com"),
        ("<@one.example,@two.example:user@example.com>", "user@example.com", "user", "example.com"),
        # Quoted local parts.
        ('<"john doe"@example.com>', '"john doe"@example.com', '"john doe"', "example.com"),
        ('<"a@b"@example.com>', '"a@b"@example.com', '"a@b"', "example.com"),
        ('<"a\\"b"@example.com>', '"a\\"b"@example.com', '"a\\"b"', "example.com"),
        ('<"">', '""', '""', ""),
        # Address literals (RFC 5321 4.1.3).
        ("<user@[192.0.2.1]>", "user@[192.0.2.1]", "user", "[192.0.2.1]"),
        ("<user@[IPv6:2001:db8::1]>", "user@[IPv6:2001:db8::1]", "user", "[IPv6:2001:db8::1]"),
        ("<user@[ipv6:::1]>", "user@[ipv6:::1]", "user", "[ipv6:::1]"),
        # RFC 5321 4.1.1.3: Postmaster without a domain.
        ("<Postmaster>", "Postmaster", "Postmaster", ""),
        # RFC 6531: UTF-8 local parts and domains.
        ("<jürgen@bücher.example>", "jürgen@bücher.example", "jürgen", "bücher.example"),
    ]

    BAD = [
        "<>",  # not allowed here (allow_null=False)
        "<",
        "<user@example.com",
        "<user@@example.com>",
        "<user@example..com>",
        "<user@-example.com>",
        "<user@example-.com>",
        "<.user@example.com>",
        "<user.@example.com>",
        "<us..er@example.com>",
        "<us er@example.com>",
        "<user@exa mple.com>",
        "<user\x00@example.com>",
        "<user@example.com\r>",
        "<user\x7f@example.com>",
        "<@relay.example user@example.com>",
        "<@:user@example.com>",
        "<relay.example:user@example.com>",
        "<@relay..example:user@example.com>",
        '<"unterminated@example.com>',
        '<"quoted"x@example.com>',
        "<user@[192.0.2.256]>",
        "<user@[2001:db8::1]>",
        "<user@[IPv6:192.0.2.1]>",
        "<user@[example.com]>",
        "<user@[]>",
        "<user@example.com@evil.example>",
        "<user@evil.example@example.com>",
    ]

    def test_good_paths(self) -> None:
        """Valid paths parse into text (without source route), local part and domain."""
        for path, text, local, domain in self.GOOD:
            addr = parse_path(path, allow_null=False)
            self.assertEqual((addr.text, addr.local, addr.domain), (text, local, domain), path)

    def test_bad_paths(self) -> None:
        """Paths outside the grammar raise AddressError."""
        for path in self.BAD:
            with self.assertRaises(AddressError, msg=repr(path)):
                parse_path(path, allow_null=False)

    def test_at_sign_without_domain(self) -> None:
        """A mailbox with an ``@`` but no domain after it (``user@``) is a syntax error, not a domainless address."""
        for path in ("<user@>", '<"user"@>', "<postmaster@>", "<@relay.example:user@>"):
            with self.assertRaises(AddressError, msg=path):
                parse_path(path, allow_null=False)

    def test_null_path(self) -> None:
        """``<>`` is the null path where allowed (MAIL) and an error where not (RCPT)."""
        self.assertIs(parse_path("<>", allow_null=True), NULL_PATH)
        self.assertTrue(parse_path("<>", allow_null=True).is_null)
        with self.assertRaises(AddressError):
            parse_path("<>", allow_null=False)

    def test_ascii_only(self) -> None:
        """``ascii_only`` tells whether the address needs SMTPUTF8."""
        self.assertTrue(parse_path("<a@b.example>", False).ascii_only)
        self.assertFalse(parse_path("<ä@b.example>", False).ascii_only)
        self.assertFalse(parse_path("<a@bä.example>", False).ascii_only)

    @settings(max_examples=200, deadline=None)
    @given(st.from_regex(r"\A[A-Za-z0-9+_-]{1,20}(\.[A-Za-z0-9+_-]{1,10}){0,2}\Z"),
           st.from_regex(r"\A([a-z0-9]{1,10}\.){1,3}[a-z]{2,6}\Z"))
    def test_dot_atom_roundtrip(self, local: str, domain: str) -> None:
        """Any dot-atom local part at any hostname parses back to its parts."""
        addr = parse_path(f"<{local}@{domain}>", allow_null=False)
        self.assertEqual((addr.text, addr.local, addr.domain), (f"{local}@{domain}", local, domain))

    @settings(max_examples=500, deadline=None)
    @given(st.text(alphabet="aZ09-._!#\"\\<>@ \u00e9\u4e2d\n", max_size=30))
    def test_whole_string_matches_agree_with_per_part_rules(self, text: str) -> None:
        """The one-regex domain and local-part checks accept exactly what the
        per-label / per-atom rules of RFC 5321 4.1.2 accept, and the quick
        closing-bracket search finds the bracket the quote-aware scan finds."""
        import re

        from mppproxy.smtp import address

        label = re.compile(r"[A-Za-z0-9\x80-\U0010ffff]([A-Za-z0-9\x80-\U0010ffff-]*[A-Za-z0-9\x80-\U0010ffff])?")
        atom = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+")
        d = text[:-1] if text.endswith(".") else text
        per_label = bool(d) and len(d) <= 255 and all(label.fullmatch(x) for x in d.split("."))
        self.assertEqual(address._valid_domain(text), per_label)
        if not text.startswith('"'):
            per_atom = bool(text) and all(atom.fullmatch(x) for x in text.split("."))
            self.assertEqual(address._valid_local(text), per_atom)
        path = "<" + text
        if '"' not in path:
            try:
                quick: object = address._find_closing_bracket(path)
            except AddressError:
                quick = None
            self.assertEqual(quick, path.find(">", 1) if ">" in path[1:] else None)

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=40))
    def test_never_crashes(self, text: str) -> None:
        """Any text either parses or raises AddressError, never another exception."""
        for candidate in (text, f"<{text}>"):
            try:
                split_argument("TO:" + candidate, "TO:")
                parse_path(candidate, allow_null=True)
            except AddressError:
                pass


class RelayDomainsTests(SynchronousTestCase):
    """``RelayDomains``: exact names and Postfix-style ``.parent`` entries."""

    def test_exact_case_insensitive(self) -> None:
        """Domain matching ignores case on both sides."""
        domains = RelayDomains(["Example.COM"])
        for d in ("example.com", "EXAMPLE.com", "Example.Com"):
            self.assertIn(d, domains)

    def test_trailing_dot(self) -> None:
        """A trailing dot on either side does not matter."""
        self.assertIn("example.com.", RelayDomains(["example.com"]))
        self.assertIn("example.com", RelayDomains(["example.com."]))

    def test_exact_does_not_match_subdomains(self) -> None:
        """``example.com`` matches that domain only."""
        domains = RelayDomains(["example.com"])
        for d in ("sub.example.com", "example.com.evil.example", "evilexample.com", "com", ""):
            self.assertNotIn(d, domains)

    def test_parent_form(self) -> None:
        """``.example.com`` matches every subdomain but not example.com itself nor look-alikes."""
        domains = RelayDomains([".example.com"])
        for d in ("a.example.com", "A.B.Example.Com.", "x-y.example.com"):
            self.assertIn(d, domains)
        for d in ("example.com", "evilexample.com", "example.com.evil.example", "a.example.co"):
            self.assertNotIn(d, domains)

    def test_both_forms(self) -> None:
        """Listing both ``example.com`` and ``.example.com`` covers the domain and its subdomains."""
        domains = RelayDomains(["example.com", ".example.com"])
        self.assertIn("example.com", domains)
        self.assertIn("mail.example.com", domains)

    def test_idna(self) -> None:
        """A U-label and its A-label are the same domain, whichever form is configured."""
        self.assertIn("xn--bcher-kva.example", RelayDomains(["bücher.example"]))
        self.assertIn("bücher.example", RelayDomains(["xn--bcher-kva.example"]))
        self.assertIn("BÜCHER.example", RelayDomains(["bücher.example"]))
        self.assertIn("mail.bücher.example", RelayDomains([".xn--bcher-kva.example"]))

    def test_idna2008_deviation_characters(self) -> None:
        """IDNA 2008 (RFC 5891) keeps ß as its own letter: straße.de is xn--strae-oqa.de, a different domain from strasse.de."""
        domains = RelayDomains(["straße.de"])
        self.assertIn("xn--strae-oqa.de", domains)
        self.assertIn("straße.de", domains)
        self.assertNotIn("strasse.de", domains)
        self.assertIn("straße.de", RelayDomains(["xn--strae-oqa.de"]))

    def test_empty(self) -> None:
        """No relay domains: nothing matches."""
        self.assertNotIn("example.com", RelayDomains([]))

    def test_normalise_domain(self) -> None:
        """normalise_domain lower-cases, strips the trailing dot and turns U-labels into A-labels."""
        self.assertEqual(normalise_domain(" Example.COM. "), "example.com")
        self.assertEqual(normalise_domain("Bücher.Example"), "xn--bcher-kva.example")


class RelayRefusalTests(SynchronousTestCase):
    """``relay_refusal_reason``: docs/design.md promise 3, whatever the address holds."""

    domains = RelayDomains(["example.com", ".example.org"])

    ALLOWED = [
        "<user@example.com>",
        "<USER@EXAMPLE.COM>",
        "<user@example.com.>",
        "<user@mail.example.org>",
        "<@evil.example:user@example.com>",  # the route is dropped; example.com is what relays
        '<"john doe"@example.com>',
        "<Postmaster>",
        "<postmaster>",
        "<POSTMASTER>",
    ]

    REFUSED = [
        ("<user@evil.example>", "domain not relayed"),
        ("<user@example.com.evil.example>", "domain not relayed"),
        ("<user@example.org>", "domain not relayed"),
        ("<user@sub.example.com>", "domain not relayed"),
        ("<@example.com:user@evil.example>", "domain not relayed"),
        ("<user%evil.example@example.com>", "routing characters in the local part"),
        ("<evil.example!user@example.com>", "routing characters in the local part"),
        ('<"user@evil.example"@example.com>', "routing characters in the local part"),
        ('<"user%evil.example"@example.com>', "routing characters in the local part"),
        ('<"evil.example!user"@example.com>', "routing characters in the local part"),
        ("<user@[192.0.2.1]>", "address literal"),
        ("<user@[IPv6:2001:db8::1]>", "address literal"),
        ("<user>", "no domain"),
        ('<"postmaster@evil.example">', "no domain"),
    ]

    def test_allowed(self) -> None:
        """Recipients in the relay domains, and bare Postmaster, need no trust."""
        for path in self.ALLOWED:
            self.assertIsNone(relay_refusal_reason(parse_path(path, False), self.domains), path)

    def test_refused(self) -> None:
        """Every address trick outside the relay domains is refused with its reason."""
        for path, reason in self.REFUSED:
            self.assertEqual(relay_refusal_reason(parse_path(path, False), self.domains), reason, path)

    def test_empty_domain_refused_when_constructed(self) -> None:
        """An Address with an empty domain is refused unless its local part is postmaster."""
        self.assertEqual(relay_refusal_reason(Address("user", "user", ""), self.domains), "no domain")
        self.assertIsNone(relay_refusal_reason(Address("Postmaster", "Postmaster", ""), self.domains))

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet="ab.%!@\"[]:-x1 \\", max_size=30))
    def test_no_path_relays_outside(self, local: str) -> None:
        """Whatever parses with a domain outside the relay domains is refused."""
        for path in (f"<{local}@evil.example>", f"<{local}>", f"<{local}@[192.0.2.1]>"):
            try:
                addr = parse_path(path, False)
            except AddressError:
                continue
            if addr.local.lower() == "postmaster" and not addr.domain:
                continue
            self.assertIsNotNone(relay_refusal_reason(addr, self.domains), path)
