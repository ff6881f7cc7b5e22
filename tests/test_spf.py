"""SPF (RFC 7208) evaluation against a real authoritative DNS server on loopback.

The server is Twisted Names on 127.0.0.1 (UDP and TCP on one port) serving the
in-memory zones below; it records every question, so the limit tests can
prove how many queries a hostile record costs.  Names in DROP get no answer
at all (the resolver times out: "temperror"), names in SERVFAIL get SERVFAIL,
and names in a zone that do not exist get NXDOMAIN with the zone's SOA.

The record-level cases follow the sections of the openspf/pyspf RFC 7208 test
suite (release 2014.04), rewritten here with our own names: ``CASES`` maps
each case to (client IP, MAIL FROM, HELO, expected result[, explanation]);
each becomes one test method.  Macro expansion is also tested directly with
the examples of RFC 7208 Appendix D.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Optional

from twisted.internet import defer, reactor as _reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.names import dns as tdns
from twisted.trial import unittest

from mppproxy.policy.base import Facts
from mppproxy.results import HardAction
from mppproxy.policy.checks.spf import SpfCheck, authentication_results
from mppproxy.config.policy import SpfConfig
from mppproxy.dns.resolver import Resolver
from mppproxy.policy.services import PolicyServices
from mppproxy.policy.spf import (SpfEvaluator, SpfResult, _Evaluation, _PermError, is_spf_record,
                                 parse_macro_string, parse_record, spf_domain)
from mppproxy.templates import ReplyRenderer

from dnszone import MemoryAuthority, ZoneServer, serve

reactor: Any = _reactor

TTL = 60


def A(addr: str) -> tuple[str, Any]:
    return ("A", addr)


def AAAA(addr: str) -> tuple[str, Any]:
    return ("AAAA", addr)


def TXT(*strings: Any) -> tuple[str, Any]:
    return ("TXT", tuple(s if isinstance(s, bytes) else s.encode() for s in strings))


def MX(pref: int, name: str) -> tuple[str, Any]:
    return ("MX", (pref, name))


def PTR(name: str) -> tuple[str, Any]:
    return ("PTR", name)


LONG63 = "a12345678901234567890123456789012345678901234567890123456789012"
LONG64 = LONG63 + "3"
SLE = "somewhat.long.exp.example.com"

ZONE: dict[str, list[tuple[str, Any]]] = {
    "mail.example.com": [A("1.2.3.4"), AAAA("2001:db8::1"), MX(0, ""), TXT("v=spf1 mx")],
    # -- initial processing (4.3) and record selection (4.5)
    "example.net": [TXT("v=spf1 -all exp=exp.example.net")],
    "exp.example.net": [TXT("%{l}")],
    f"{LONG63}.example.com": [TXT("v=spf1 -all")],
    "hosed.example.com": [TXT(b"v=spf1 a:\xef\xbb\xbfgarbage.example.net -all")],
    "hosed2.example.com": [TXT(b"v=spf1 \x80a:example.net -all")],
    "hosed3.example.com": [TXT(b"v=spf1 a:example.net \x96all")],
    "nothosed.example.com": [TXT("v=spf1 a:example.net -all"), TXT(b"\x96")],
    "ctrl.example.com": [TXT("v=spf1 a:ctrl.example.com\rptr -all"), A("192.0.2.3")],
    "fine.example.com": [TXT("v=spf1 a  -all")],
    "txttimeout.example.com": [A("1.2.3.4")],
    "nospace1.example.com": [TXT("v=spf1", "mx")],
    "joined.example.com": [TXT("v=spf1 ", "ip4:1.2.3.4", " -all")],
    "empty.example.com": [TXT("v=spf1")],
    "nospace2.example.com": [TXT("v=spf10"), TXT("v=spf1 mx"), MX(0, "mail.example.com")],
    "multi.example.com": [TXT("v=spf1 -all"), TXT("v=spf1 +all")],
    "multicase.example.com": [TXT("v=spf1 -all"), TXT("V=sPf1 +all")],
    "case.example.com": [TXT("v=SpF1 ~all")],
    "other-txt.example.com": [TXT("google-site-verification=xyz"), TXT("v=spf1 -all")],
    # -- record evaluation (4.6, 4.7)
    "t1.eval.example.com": [TXT("v=spf1 ip4:1.2.3.4 -all moo")],
    "t2.eval.example.com": [TXT("v=spf1 moo.cow-far_out=man:dog/cat ip4:1.2.3.4 -all")],
    "t3.eval.example.com": [TXT("v=spf1 moo.cow/far_out=man:dog/cat ip4:1.2.3.4 -all")],
    "t4.eval.example.com": [TXT("v=spf1 moo.cow:far_out=man:dog/cat ip4:1.2.3.4 -all")],
    "t5.eval.example.com": [TXT("v=spf1 redirect=t5.eval.example.com ~all")],
    "t6.eval.example.com": [TXT("v=spf1 ip4:1.2.3.4 redirect=t2.eval.example.com")],
    "t7.eval.example.com": [TXT("v=spf1 ip4:1.2.3.4")],
    "t8.eval.example.com": [TXT("v=spf1 ip4:1.2.3.4 redirect:t2.eval.example.com")],
    "t9.eval.example.com": [TXT("v=spf1 a:foo-bar -all")],
    "t10.eval.example.com": [TXT("v=spf1 a:mail.example...com -all")],
    "t11.eval.example.com": [TXT(f"v=spf1 a:{LONG63}4.example.com -all")],
    "t12.eval.example.com": [TXT("v=spf1 a:%{H}.bar -all")],
    # -- all (5.1)
    "e1.all.example.com": [TXT("v=spf1 -all.")],
    "e2.all.example.com": [TXT("v=spf1 -all:foobar")],
    "e3.all.example.com": [TXT("v=spf1 -all/8")],
    "e4.all.example.com": [TXT("v=spf1 ?all")],
    "e5.all.example.com": [TXT("v=spf1 all -all")],
    "e6.all.example.com": [TXT("v=spf1 ~all")],
    "e7.all.example.com": [TXT("v=spf1 +all")],
    # -- ptr (5.5)
    "e1.ptr.example.com": [TXT("v=spf1 ptr/0 -all")],
    "e2.ptr.example.com": [TXT("v=spf1 ptr:example.com -all")],
    "e3.ptr.example.com": [TXT("v=spf1 ptr -all"), A("1.2.3.4"), AAAA("2001:db8::cafe")],
    "e4.ptr.example.com": [TXT("v=spf1 ptr -all")],
    "e5.ptr.example.com": [TXT("v=spf1 ptr:")],
    "e6.ptr.example.com": [TXT("v=spf1 ptr:example.Com -all")],
    "e7.ptr.example.com": [TXT("v=spf1 ptr:ptr.example.com ?all")],
    "9.3.2.1.in-addr.arpa": [PTR("servfail.example.com"), PTR("ok9.ptr.example.com")],
    "ok9.ptr.example.com": [A("1.2.3.9")],
    "4.3.2.1.in-addr.arpa": [PTR("e3.ptr.example.com"), PTR("e4.ptr.example.com"),
                             PTR("mail.example.com")],
    "e.f.a.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa":
        [PTR("e3.ptr.example.com")],
    "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa":
        [PTR("mail.Example.com")],
    # -- a (5.3)
    "e1.a.example.com": [TXT("v=spf1 a/0 -all")],
    "e2.a.example.com": [A("1.1.1.1"), AAAA("1234::2"), TXT("v=spf1 a/0 -all")],
    "e2a.a.example.com": [AAAA("1234::1"), TXT("v=spf1 a//0 -all")],
    "e2b.a.example.com": [A("1.1.1.1"), TXT("v=spf1 a//0 -all")],
    "ipv6.a.example.com": [AAAA("1234::1"), A("1.1.1.1"), TXT("v=spf1 a -all")],
    "e3.a.example.com": [TXT(b"v=spf1 a:foo.example.com\x00")],
    "e4.a.example.com": [TXT("v=spf1 a:111.222.33.44")],
    "e5.a.example.com": [TXT("v=spf1 a:abc.123")],
    "e5a.a.example.com": [TXT("v=spf1 a:museum")],
    "e5b.a.example.com": [TXT("v=spf1 a:museum.")],
    "e6.a.example.com": [TXT("v=spf1 a//33 -all")],
    "e6a.a.example.com": [TXT("v=spf1 a/33 -all")],
    "e7.a.example.com": [TXT("v=spf1 a//129 -all")],
    "e8.a.example.com": [A("1.2.3.5"), AAAA("2001:db8:1234::dead:beef"),
                         TXT("v=spf1 a/24//64 -all")],
    "e8e.a.example.com": [A("1.2.3.5"), AAAA("2001:db8:1234::dead:beef"),
                          TXT("v=spf1 a/24/64 -all")],
    "e8a.a.example.com": [A("1.2.3.5"), AAAA("2001:db8:1234::dead:beef"),
                          TXT("v=spf1 a/24 -all")],
    "e8b.a.example.com": [A("1.2.3.5"), AAAA("2001:db8:1234::dead:beef"),
                          TXT("v=spf1 a//64 -all")],
    "e9.a.example.com": [TXT("v=spf1 a:example.com:8080")],
    "e10.a.example.com": [TXT("v=spf1 a:foo.example.com/24")],
    "foo.example.com": [A("1.1.1.1"), A("1.2.3.5"), MX(0, "foo1.example.com")],
    "foo1.example.com": [A("1.1.1.1"), A("1.2.3.5")],
    "e11.a.example.com": [TXT("v=spf1 a:foo:bar/baz.example.com")],
    "foo:bar/baz.example.com": [A("1.2.3.4"), MX(0, "foo:bar/baz.example.com")],
    "e12.a.example.com": [TXT("v=spf1 a:example.-com")],
    "e13.a.example.com": [TXT("v=spf1 a:")],
    "e14.a.example.com": [TXT("v=spf1 a:foo.example.xn--zckzah -all")],
    "foo.example.xn--zckzah": [A("1.2.3.4")],
    "e15.a.example.com": [TXT("v=spf1 a:servfail.example.com -all")],
    "cname.a.example.com": [TXT("v=spf1 a:alias.example.com -all")],
    # -- include (5.2)
    "ip5.inc.example.com": [TXT("v=spf1 ip4:1.2.3.5 -all")],
    "ip6.inc.example.com": [TXT("v=spf1 ip4:1.2.3.6 ~all")],
    "ip7.inc.example.com": [TXT("v=spf1 ip4:1.2.3.7 ?all")],
    "erehwon.example.com": [TXT("v=spfl am not an SPF record")],
    "e1.inc.example.com": [TXT("v=spf1 include:ip5.inc.example.com ~all")],
    "e2.inc.example.com": [TXT("v=spf1 include:ip6.inc.example.com all")],
    "e3.inc.example.com": [TXT("v=spf1 include:ip7.inc.example.com -all")],
    "e4.inc.example.com": [TXT("v=spf1 include:drop.example.com -all")],
    "e5.inc.example.com": [TXT("v=spf1 include:e6.inc.example.com -all")],
    "e6.inc.example.com": [TXT("v=spf1 include +all")],
    "e7.inc.example.com": [TXT("v=spf1 include:erehwon.example.com -all")],
    "e8.inc.example.com": [TXT("v=spf1 include: -all")],
    "e9.inc.example.com": [TXT("v=spf1 include:ip5.inc.example.com/24 -all")],
    "e10.inc.example.com": [TXT("v=spf1 include:nowhere.example.com -all")],
    "e11.inc.example.com": [TXT("v=spf1 -include:pass.inc.example.com +all")],
    "pass.inc.example.com": [TXT("v=spf1 ip4:1.2.3.4")],
    # -- mx (5.4)
    "e1.mx.example.com": [TXT("v=spf1 mx/0 -all"), MX(0, "e1.mx.example.com")],
    "e2.mx.example.com": [A("1.1.1.1"), AAAA("1234::2"), MX(0, "e2.mx.example.com"),
                          TXT("v=spf1 mx/0 -all")],
    "e2a.mx.example.com": [AAAA("1234::1"), MX(0, "e2a.mx.example.com"),
                           TXT("v=spf1 mx//0 -all")],
    "e2b.mx.example.com": [A("1.1.1.1"), MX(0, "e2b.mx.example.com"), TXT("v=spf1 mx//0 -all")],
    "e3.mx.example.com": [TXT(b"v=spf1 mx:foo.example.com\x00")],
    "e4.mx.example.com": [TXT("v=spf1 mx"), A("1.2.3.4")],
    "e5.mx.example.com": [TXT("v=spf1 mx:abc.123")],
    "e6.mx.example.com": [TXT("v=spf1 mx//33 -all")],
    "e6a.mx.example.com": [TXT("v=spf1 mx/33 -all")],
    "e7.mx.example.com": [TXT("v=spf1 mx//129 -all")],
    "e9.mx.example.com": [TXT("v=spf1 mx:example.com:8080")],
    "e10.mx.example.com": [TXT("v=spf1 mx:foo.example.com/24")],
    "e11.mx.example.com": [TXT("v=spf1 mx:foo:bar/baz.example.com")],
    "e12.mx.example.com": [TXT("v=spf1 mx:example.-com")],
    "e13.mx.example.com": [TXT("v=spf1 mx: -all")],
    "e14.mx.example.com": [TXT("v=spf1 mx:e14mx.mx.example.com -all"),
                           ],
    "e14mx.mx.example.com": [MX(10, "servfail.example.com")],
    # -- exists (5.7)
    "mail6.example.com": [AAAA("cafe:babe::4")],
    "e1.ex.example.com": [TXT("v=spf1 exists:")],
    "e2.ex.example.com": [TXT("v=spf1 exists")],
    "e3.ex.example.com": [TXT("v=spf1 exists:mail.example.com/24")],
    "e4.ex.example.com": [TXT("v=spf1 exists:mail.example.com")],
    "e5.ex.example.com": [TXT("v=spf1 exists:mail6.example.com -all")],
    "e6.ex.example.com": [TXT("v=spf1 exists:drop.example.com -all")],
    # -- ip4, ip6 (5.6)
    "e1.ip4.example.com": [TXT("v=spf1 ip4:1.1.1.1/0 -all")],
    "e2.ip4.example.com": [TXT("v=spf1 ip4:1.2.3.4/32 -all")],
    "e3.ip4.example.com": [TXT("v=spf1 ip4:1.2.3.4/33 -all")],
    "e4.ip4.example.com": [TXT("v=spf1 ip4:1.2.3.4/032 -all")],
    "e5.ip4.example.com": [TXT("v=spf1 ip4")],
    "e6.ip4.example.com": [TXT("v=spf1 ip4:1.2.3.4//32")],
    "e7.ip4.example.com": [TXT("v=spf1 -ip4:1.2.3.4 ip6:::FFFF:1.2.3.4")],
    "e8.ip4.example.com": [TXT("v=spf1 ip4:1.2.3.4:8080")],
    "e9.ip4.example.com": [TXT("v=spf1 ip4:1.2.3")],
    "e10.ip4.example.com": [TXT("v=spf1 ip4:01.2.3.4 -all")],
    "e11.ip4.example.com": [TXT("v=spf1 ip4:192.0.2.0/24 -all")],
    "e1.ip6.example.com": [TXT("v=spf1 -all ip6")],
    "e2.ip6.example.com": [TXT("v=spf1 ip6:::1.1.1.1/0")],
    "e3.ip6.example.com": [TXT("v=spf1 ip6:::1.1.1.1/129")],
    "e4.ip6.example.com": [TXT("v=spf1 ip6:::1.1.1.1//33")],
    "e5.ip6.example.com": [TXT("v=spf1 ip6:Cafe:Babe:8000::/33")],
    "e6.ip6.example.com": [TXT("v=spf1 ip6::CAFE::BABE")],
    "e7.ip6.example.com": [TXT("v=spf1 ip6:fe80::1%eth0 -all")],
    # -- modifiers and exp (6)
    "e1.mod.example.com": [TXT("v=spf1 exp=exp1.mod.example.com redirect=e2.mod.example.com")],
    "e2.mod.example.com": [TXT("v=spf1 -all")],
    "e3.mod.example.com": [TXT("v=spf1 exp=exp1.mod.example.com redirect=e4.mod.example.com")],
    "e4.mod.example.com": [TXT("v=spf1 -all exp=exp2.mod.example.com")],
    "exp1.mod.example.com": [TXT("No-see-um")],
    "exp2.mod.example.com": [TXT("See me.")],
    "exp3.mod.example.com": [TXT("Correct!")],
    "exp4.mod.example.com": [TXT("%{l} in implementation")],
    "e5.mod.example.com": [TXT("v=spf1 1up=foo")],
    "e6.mod.example.com": [TXT("v=spf1 =all")],
    "e7.mod.example.com": [TXT("v=spf1 include:e3.mod.example.com -all exp=exp3.mod.example.com")],
    "e8.mod.example.com": [TXT("v=spf1 -all exp=exp4.mod.example.com")],
    "e9.mod.example.com": [TXT("v=spf1 -all foo=%abc")],
    "e10.mod.example.com": [TXT("v=spf1 redirect=erehwon.example.com")],
    "e11.mod.example.com": [TXT("v=spf1 -all exp=e11msg.mod.example.com")],
    "e11msg.mod.example.com": [TXT("Answer a fool according to his folly."),
                               TXT("Do not answer a fool according to his folly.")],
    "e12.mod.example.com": [TXT("v=spf1 exp= -all")],
    "e13.mod.example.com": [TXT("v=spf1 exp=e13msg.mod.example.com -all")],
    "e13msg.mod.example.com": [TXT("The %{x}-files.")],
    "e14.mod.example.com": [TXT("v=spf1 exp=e13msg.mod.example.com -all "
                                "exp=e11msg.mod.example.com")],
    "e15.mod.example.com": [TXT("v=spf1 redirect=e12.mod.example.com -all "
                                "redirect=e12.mod.example.com")],
    "e16.mod.example.com": [TXT("v=spf1 exp=-all")],
    "e17.mod.example.com": [TXT("v=spf1 redirect=-all ?all")],
    "e18.mod.example.com": [TXT("v=spf1 ?all redirect=")],
    "e19.mod.example.com": [TXT("v=spf1 default=pass")],
    "e20.mod.example.com": [TXT("v=spf1 default=+")],
    "e21.mod.example.com": [TXT("v=spf1 exp=drop.example.com -all")],
    "e22.mod.example.com": [TXT("v=spf1 exp=mail6.example.com -all")],
    "e23.mod.example.com": [TXT("v=spf1 a:erehwon.example.com a:foobar.example.com "
                                "exp=nxdomain.example.com -all")],
    "e24.mod.example.com": [TXT("v=spf1 redirect=testimplicit.mod.example.com"), A("192.0.2.1")],
    "testimplicit.mod.example.com": [TXT("v=spf1 a -all"), A("192.0.2.2")],
    "e25.mod.example.com": [TXT("v=spf1 exp=badexp.mod.example.com -all")],
    "badexp.mod.example.com": [TXT(b"\xef\xbb\xbfExplanation")],
    "e26.mod.example.com": [TXT("v=spf1 exp=ctlexp.mod.example.com -all")],
    "ctlexp.mod.example.com": [TXT("sender %{s} from %{c}")],
    # -- macros (7)
    "example.com.d.spf.example.com": [TXT("v=spf1 redirect=a.spf.example.com")],
    "a.spf.example.com": [TXT("v=spf1 include:o.spf.example.com. ~all")],
    "o.spf.example.com": [TXT("v=spf1 ip4:192.168.218.40")],
    "msgbas2x.cos.example.com": [A("192.168.218.40")],
    "example.com": [A("192.168.90.76"), TXT("v=spf1 redirect=%{d}.d.spf.example.com.")],
    "exp.example.com": [TXT("v=spf1 exp=msg.example.com. -all")],
    "msg.example.com": [TXT("This is a test.")],
    "e1.mac.example.com": [TXT("v=spf1 -exists:%(ir).sbl.example.com ?all")],
    "e1e.mac.example.com": [TXT("v=spf1 exists:foo%(ir).sbl.example.com ?all")],
    "e1t.mac.example.com": [TXT("v=spf1 exists:foo%.sbl.example.com ?all")],
    "e1a.mac.example.com": [TXT("v=spf1 a:macro%%percent%_%_space%-url-space.example.com -all")],
    "macro%percent  space%20url-space.example.com": [A("1.2.3.4")],
    "e2.mac.example.com": [TXT("v=spf1 -all exp=%{r}.example.com")],
    "e3.mac.example.com": [TXT("v=spf1 -all exp=%{ir}.example.com")],
    "40.218.168.192.example.com": [TXT("Connections from %{c} not authorized.")],
    SLE: [TXT("v=spf1 -all exp=foobar.%{o}.%{o}.%{o}.%{o}.%{o}.%{o}.%{o}.%{o}.example.com")],
    ".".join([SLE] * 8) + ".example.com": [TXT("Congratulations!  That was tricky.")],
    "e4.mac.example.com": [TXT("v=spf1 -all exp=e4msg.mac.example.com")],
    "e4msg.mac.example.com": [TXT("%{c} is queried as %{ir}.%{v}.arpa")],
    "e5.mac.example.com": [TXT("v=spf1 a:%{a}.example.com -all")],
    "e6.mac.example.com": [TXT("v=spf1 -all exp=e6msg.mac.example.com")],
    "e6msg.mac.example.com": [TXT("connect from %{p}")],
    "mx.example.com": [A("192.168.218.41"), A("192.168.218.42"), AAAA("cafe:babe::2"),
                       AAAA("cafe:babe::3")],
    "40.218.168.192.in-addr.arpa": [PTR("mx.example.com")],
    "41.218.168.192.in-addr.arpa": [PTR("mx.example.com")],
    "42.218.168.192.in-addr.arpa": [PTR("mx.example.com"), PTR("mx.e7.mac.example.com")],
    "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.e.b.a.b.e.f.a.c.ip6.arpa":
        [PTR("mx.example.com")],
    "3.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.e.b.a.b.e.f.a.c.ip6.arpa":
        [PTR("mx.example.com")],
    "mx.e7.mac.example.com": [A("192.168.218.42")],
    "mx.e7.mac.example.com.should.example.com": [A("127.0.0.2")],
    "mx.example.com.ok.example.com": [A("127.0.0.2")],
    "e7.mac.example.com": [TXT("v=spf1 exists:%{p}.should.example.com "
                               "~exists:%{p}.ok.example.com")],
    "e8.mac.example.com": [TXT("v=spf1 -all exp=msg8.%{D2}")],
    "msg8.example.com": [TXT("http://example.com/why.html?l=%{L}")],
    "e9.mac.example.com": [TXT("v=spf1 a:%{H} -all")],
    "e10.mac.example.com": [TXT("v=spf1 -include:_spfh.%{d2} ip4:1.2.3.0/24 -all")],
    "_spfh.example.com": [TXT("v=spf1 -a:%{h} +all")],
    "e11.mac.example.com": [TXT("v=spf1 exists:%{i}.%{l2r-}.user.%{d2}")],
    "1.2.3.4.gladstone.philip.user.example.com": [A("127.0.0.2")],
    "e12.mac.example.com": [TXT("v=spf1 exists:%{l2r+-}.user.%{d2}")],
    "bar.foo.user.example.com": [A("127.0.0.2")],
    "e13.mac.example.com": [TXT("v=spf1 exists:%{d0}.example.com")],
    "e14.mac.example.com": [TXT("v=spf1 exists:%{ir}.%{v}._spf.%{d2} -all")],
    "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com":
        [A("127.0.0.2")],
    # -- limits (4.6.4)
    "e1.lim.example.com": [TXT("v=spf1 ip4:1.1.1.1 redirect=e1.lim.example.com"), A("1.2.3.6")],
    "e2.lim.example.com": [TXT("v=spf1 include:e3.lim.example.com"), A("1.2.3.7")],
    "e3.lim.example.com": [TXT("v=spf1 include:e2.lim.example.com"), A("1.2.3.8")],
    "e4.lim.example.com": [TXT("v=spf1 mx"), A("1.2.3.5")]
    + [MX(i, "mail.example.com") for i in range(10)] + [MX(10, "e4.lim.example.com")],
    "e4b.lim.example.com": [TXT("v=spf1 mx"), A("1.2.3.5")]
    + [MX(i, f"m{i}.lim.example.com") for i in range(9)] + [MX(10, "e4b.lim.example.com")],
    "e5.lim.example.com": [TXT("v=spf1 ptr"), A("1.2.3.5")],
    "5.3.2.1.in-addr.arpa": [PTR(f"e{i}.lim.example.com") for i in (1, 2, 3, 4)]
    + [PTR("example.com")] + [PTR(f"e{i}.lim.example.com") for i in (6, 7, 8, 9, 10, 5)],
    "e6.lim.example.com": [TXT("v=spf1 a mx a mx a mx a mx a ptr ip4:1.2.3.4 -all"),
                           A("1.2.3.8"), MX(10, "e6.lim.example.com")],
    "e7.lim.example.com": [TXT("v=spf1 a mx a mx a mx a mx a ptr a ip4:1.2.3.4 -all"),
                           A("1.2.3.20")],
    "e8.lim.example.com": [TXT("v=spf1 a include:inc.lim.example.com ip4:1.2.3.4 mx -all"),
                           A("1.2.3.4")],
    "inc.lim.example.com": [TXT("v=spf1 a a a a a a a a"), A("1.2.3.10")],
    "e9.lim.example.com": [TXT("v=spf1 a include:inc.lim.example.com a ip4:1.2.3.4 -all"),
                           A("1.2.3.21")],
    "e10.lim.example.com": [TXT("v=spf1 a -all")] + [A(f"1.2.3.{i}") for i in range(1, 13)],
    "e11.lim.example.com": [TXT("v=spf1 a:err.example.com a:err1.example.com "
                                "a:err2.example.com ?all")],
    "e12.lim.example.com": [TXT("v=spf1 a:err.example.com a:err1.example.com ?all")],
    # An include loop that fans out: every level includes itself twice.
    "fan.lim.example.com": [TXT("v=spf1 include:fan.lim.example.com "
                                "include:fan.lim.example.com -all")],
    # A record of about 800 octets in several strings: over UDP it comes
    # truncated and is asked again over TCP.
    "big.example.com": [TXT("v=spf1", *(" " + " ".join(f"ip4:198.51.{n}.{i}" for i in range(1, 11))
                                        for n in range(4)), " ip4:1.2.3.4 -all")],
    # A ptr term on a client without PTR records, and %{p} before it.
    "ptrvoid.lim.example.com": [TXT("v=spf1 exists:%{p}.nowhere.example.com ptr ptr ptr ?all")],
    # -- the check
    "pass.example.org": [TXT("v=spf1 ip4:192.0.2.0/24 -all")],
    "helo.example.org": [TXT("v=spf1 a -all"), A("192.0.2.25")],
}
# CNAME chains are followed by the resolver.
CNAMES = {"alias.example.com": "mail.example.com"}
DROP = {"drop.example.com", "txttimeout.example.com", "e21msg.mod.example.com"}
SERVFAIL = {"servfail.example.com", "66.3.2.1.in-addr.arpa"}
ZONES = ("example.com", "example.net", "example.org", "in-addr.arpa", "ip6.arpa",
         "xn--zckzah")


def _records(records: dict[str, list[tuple[str, Any]]]) -> dict[str, list[Any]]:
    """The zone notation above as Twisted Names records."""
    out: dict[str, list[Any]] = {}
    for name, recs in records.items():
        for rtype, value in recs:
            if rtype == "A":
                rec = tdns.Record_A(value, ttl=TTL)
            elif rtype == "AAAA":
                rec = tdns.Record_AAAA(value, ttl=TTL)
            elif rtype == "TXT":
                rec = tdns.Record_TXT(*value, ttl=TTL)
            elif rtype == "MX":
                rec = tdns.Record_MX(value[0], value[1].encode(), ttl=TTL)
            elif rtype == "PTR":
                rec = tdns.Record_PTR(value.encode(), ttl=TTL)
            else:
                rec = tdns.Record_CNAME(value.encode(), ttl=TTL)
            out.setdefault(name, []).append(rec)
    return out


class _Server(ZoneServer):
    """The test zones' server, recording each question (name, type) and
    the number asked over TCP."""

    def __init__(self, authorities: list[MemoryAuthority]):
        super().__init__(authorities, servfail=SERVFAIL, drop=DROP)
        self.asked: list[tuple[str, int]] = []
        self.tcp = 0

    def record(self, name: str, qtype: int, address: Any) -> None:
        self.asked.append((name, qtype))
        if address is None:
            self.tcp += 1


def _zone_of(name: str) -> str:
    return next(z for z in ZONES if name == z or name.endswith("." + z))


def start_server(case: unittest.TestCase) -> tuple[_Server, int]:
    """The test zones on UDP and TCP 127.0.0.1:<port>; stopped at cleanup."""
    by_zone: dict[str, dict[str, list[tuple[str, Any]]]] = {z: {} for z in ZONES}
    for name, recs in ZONE.items():
        by_zone[_zone_of(name.lower())][name] = recs
    for name, target in CNAMES.items():
        by_zone[_zone_of(name)][name] = [("CNAME", target)]
    factory = _Server([MemoryAuthority(z, _records(r), TTL, 30) for z, r in by_zone.items()])
    return factory, serve(case, factory)


class SpfCase(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.server, self.port = start_server(self)

    def resolver(self, port: Optional[int] = None, timeout: float = 0.5) -> Resolver:
        r = Resolver(reactor, [("127.0.0.1", port or self.port)], timeout=timeout)
        self.addCleanup(r.close)
        return r

    def evaluator(self, **kw: Any) -> SpfEvaluator:
        kw.setdefault("hostname", "mx.test.invalid")
        return SpfEvaluator(kw.pop("resolver", None) or self.resolver(), **kw)

    async def spf(self, host: str, mailfrom: str, helo: str = "mail.example.com",
                  **kw: Any) -> SpfResult:
        domain = mailfrom.rpartition("@")[2] if mailfrom else helo
        sender = mailfrom or f"postmaster@{helo}"
        return await self.evaluator(**kw).check_host(host, domain, sender, helo)


# name -> (host, mailfrom, helo, result, explanation or None, what it shows)
M = "mail.example.com"
CASES: dict[str, tuple[str, str, str, str, Optional[str], str]] = {
    # 4.3 initial processing
    "toolonglabel": ("1.2.3.5", f"lyme.eater@{LONG64}.example.com", "mail.example.net", "none",
                     None, "A label over 63 octets in the domain gives none, not temperror."),
    "longlabel": ("1.2.3.5", f"lyme.eater@{LONG63}.example.com", "mail.example.net", "fail",
                  None, "A label of 63 octets is fine."),
    "emptylabel": ("1.2.3.5", "lyme.eater@A...example.com", "mail.example.net", "none", None,
                   "An empty label in the domain gives none."),
    "helo-not-fqdn": ("1.2.3.5", "", "A2345678", "none", None,
                      "A one-label HELO of a null sender gives none."),
    "helo-domain-literal": ("1.2.3.5", "", "[1.2.3.5]", "none", None,
                            "An address-literal HELO gives none."),
    "nolocalpart": ("1.2.3.4", "@example.net", "mail.example.net", "fail", "postmaster",
                    "A sender without a local part is postmaster (%{l})."),
    "domain-literal": ("1.2.3.5", "foo@[1.2.3.5]", "OEMCOMPUTER", "none", None,
                       "An address-literal sender domain gives none."),
    "non-ascii-policy": ("1.2.3.4", "foobar@hosed.example.com", "hosed", "permerror", None,
                         "A record with non-ASCII octets is a permerror."),
    "non-ascii-mech": ("1.2.3.4", "foobar@hosed2.example.com", "hosed", "permerror", None,
                       "Non-ASCII before a mechanism is a permerror."),
    "non-ascii-result": ("1.2.3.4", "foobar@hosed3.example.com", "hosed", "permerror", None,
                         "Non-ASCII in a qualifier is a permerror."),
    "non-ascii-non-spf": ("1.2.3.4", "foobar@nothosed.example.com", "hosed", "fail", "",
                          "Non-ASCII TXT records that are not SPF are ignored."),
    "control-char-policy": ("192.0.2.3", "foobar@ctrl.example.com", "hosed", "permerror", None,
                            "Terms are separated by spaces only, not control characters."),
    "two-spaces": ("1.2.3.4", "actually@fine.example.com", "hosed", "fail", None,
                   "Several spaces between terms are fine."),
    # 4.4, 4.5 record lookup and selection
    "txttimeout": ("1.2.3.4", "foo@txttimeout.example.com", M, "temperror", None,
                   "A TXT lookup that times out is a temperror."),
    "nospace1": ("1.2.3.4", "foo@nospace1.example.com", M, "none", None,
                 "TXT strings are joined without spaces: 'v=spf1' 'mx' is no SPF record."),
    "joined-strings": ("1.2.3.4", "foo@joined.example.com", M, "pass", None,
                       "A record split in several strings is joined before parsing (3.3)."),
    "empty": ("1.2.3.4", "foo@empty.example.com", M, "neutral", None,
              "An empty record gives neutral."),
    "nospace2": ("1.2.3.4", "foo@nospace2.example.com", M, "pass", None,
                 "'v=spf10' is not a v=spf1 record; the other one is used."),
    "multitxt": ("1.2.3.4", "foo@multi.example.com", M, "permerror", None,
                 "Two v=spf1 records are a permerror."),
    "multitxt-case": ("1.2.3.4", "foo@multicase.example.com", M, "permerror", None,
                      "v=spf1 is matched in any case when counting records."),
    "case-insensitive": ("1.2.3.4", "foo@case.example.com", M, "softfail", None,
                         "v=SpF1 is a version section."),
    "other-txt": ("1.2.3.4", "foo@other-txt.example.com", M, "fail", None,
                  "Other TXT records beside the SPF record are ignored."),
    "nospf": ("1.2.3.4", "foo@mail6.example.com", M, "none", None,
              "A domain with no SPF record gives none."),
    "nxdomain": ("1.2.3.4", "foo@nowhere.example.com", M, "none", None,
                 "A domain that does not exist gives none."),
    # 4.6, 4.7 record evaluation
    "detect-errors-anywhere": ("1.2.3.4", "foo@t1.eval.example.com", M, "permerror", None,
                               "A syntax error after the matching term is still a permerror."),
    "modifier-charset-good": ("1.2.3.4", "foo@t2.eval.example.com", M, "pass", None,
                              "Unknown modifiers with a valid name are ignored."),
    "modifier-charset-bad1": ("1.2.3.4", "foo@t3.eval.example.com", M, "permerror", None,
                              "A '/' in a modifier name is a permerror."),
    "modifier-charset-bad2": ("1.2.3.4", "foo@t4.eval.example.com", M, "permerror", None,
                              "A ':' in a modifier name is a permerror."),
    "redirect-after-mechanisms1": ("1.2.3.4", "foo@t5.eval.example.com", M, "softfail", None,
                                   "redirect is not used when a mechanism (all) matches."),
    "redirect-after-mechanisms2": ("1.2.3.5", "foo@t6.eval.example.com", M, "fail", None,
                                   "redirect applies after the mechanisms, wherever it stands."),
    "default-result": ("1.2.3.5", "foo@t7.eval.example.com", M, "neutral", None,
                       "No match and no redirect gives neutral."),
    "redirect-is-modifier": ("1.2.3.4", "foo@t8.eval.example.com", M, "permerror", None,
                             "'redirect:' is no mechanism."),
    "invalid-domain": ("1.2.3.4", "foo@t9.eval.example.com", M, "permerror", None,
                       "A domain-spec must end in a macro or '.' and a top label."),
    "invalid-domain-empty-label": ("1.2.3.4", "foo@t10.eval.example.com", M, "fail", None,
                                   "A target name with an empty label matches nothing."),
    "invalid-domain-long": ("1.2.3.4", "foo@t11.eval.example.com", M, "fail", None,
                            "A target name with a label over 63 octets matches nothing."),
    "invalid-domain-long-via-macro": ("1.2.3.4", "foo@t12.eval.example.com",
                                      "%%%%%%%%%%%%%%%%%%%%%%", "fail", None,
                                      "A label made too long by macro expansion matches nothing."),
    # 5.1 all
    "all-dot": ("1.2.3.4", "foo@e1.all.example.com", M, "permerror", None, "'-all.' is a permerror."),
    "all-arg": ("1.2.3.4", "foo@e2.all.example.com", M, "permerror", None,
                "'all' takes no domain."),
    "all-cidr": ("1.2.3.4", "foo@e3.all.example.com", M, "permerror", None,
                 "'all' takes no CIDR length."),
    "all-neutral": ("1.2.3.4", "foo@e4.all.example.com", M, "neutral", None, "?all is neutral."),
    "all-double": ("1.2.3.4", "foo@e5.all.example.com", M, "pass", None,
                   "The first matching 'all' wins."),
    "all-softfail": ("1.2.3.4", "foo@e6.all.example.com", M, "softfail", None, "~all is softfail."),
    "all-pass": ("1.2.3.4", "foo@e7.all.example.com", M, "pass", None, "+all is pass."),
    # 5.5 ptr
    "ptr-cidr": ("1.2.3.4", "foo@e1.ptr.example.com", M, "permerror", None,
                 "ptr takes no CIDR length."),
    "ptr-match-target": ("1.2.3.4", "foo@e2.ptr.example.com", M, "pass", None,
                         "A validated PTR name under the target matches."),
    "ptr-match-implicit": ("1.2.3.4", "foo@e3.ptr.example.com", M, "pass", None,
                           "Without a domain, ptr matches names under the current domain."),
    "ptr-nomatch-invalid": ("1.2.3.4", "foo@e4.ptr.example.com", M, "fail", None,
                            "A PTR name whose A records miss the client does not validate."),
    "ptr-match-ip6": ("2001:db8::cafe", "foo@e3.ptr.example.com", M, "pass", None,
                      "ptr works for IPv6 clients (ip6.arpa, AAAA)."),
    "ptr-empty-domain": ("1.2.3.4", "foo@e5.ptr.example.com", M, "permerror", None,
                         "'ptr:' with an empty domain is a permerror."),
    "ptr-case-change": ("2001:db8::1", "bar@e6.ptr.example.com", M, "pass", None,
                        "PTR names compare without regard to case."),
    "ptr-dns-error-address": ("1.2.3.9", "foo@e7.ptr.example.com", M, "pass", None,
                              "A DNS error on a PTR name's address lookup skips that name."),
    "ptr-dns-error-ptr": ("1.2.3.66", "foo@e7.ptr.example.com", M, "neutral", None,
                          "A DNS error on the PTR lookup makes ptr not match (no temperror)."),
    # 5.3 a
    "a-cidr6": ("1.2.3.4", "foo@e6.a.example.com", M, "fail", None,
                "An IPv6 CIDR length does not apply to IPv4 clients."),
    "a-bad-cidr4": ("1.2.3.4", "foo@e6a.a.example.com", M, "permerror", None, "a/33 is a permerror."),
    "a-bad-cidr6": ("1.2.3.4", "foo@e7.a.example.com", M, "permerror", None, "a//129 is a permerror."),
    "a-dual-cidr-ip4-match": ("1.2.3.4", "foo@e8.a.example.com", M, "pass", None,
                              "a/24//64 uses /24 for IPv4."),
    "a-dual-cidr-ip4-err": ("1.2.3.4", "foo@e8e.a.example.com", M, "permerror", None,
                            "a/24/64 is a permerror."),
    "a-dual-cidr-ip6-match": ("2001:db8:1234::cafe:babe", "foo@e8.a.example.com", M, "pass", None,
                              "a/24//64 uses /64 for IPv6."),
    "a-dual-cidr-ip4-default": ("1.2.3.4", "foo@e8b.a.example.com", M, "fail", None,
                                "a//64 keeps /32 for IPv4."),
    "a-dual-cidr-ip6-default": ("2001:db8:1234::cafe:babe", "foo@e8a.a.example.com", M, "fail",
                                None, "a/24 keeps /128 for IPv6."),
    "a-multi-ip": ("1.2.3.4", "foo@e10.a.example.com", M, "pass", None,
                   "a matches any of the addresses."),
    "a-bad-domain": ("1.2.3.4", "foo@e9.a.example.com", M, "permerror", None,
                     "A ':' may not be in the top label."),
    "a-nxdomain": ("1.2.3.4", "foo@e1.a.example.com", M, "fail", None,
                   "No addresses: no match, even with /0."),
    "a-cidr4-0": ("1.2.3.4", "foo@e2.a.example.com", M, "pass", None,
                  "a/0 matches any IPv4 client when there is an A record."),
    "a-cidr4-0-ip6": ("1234::1", "foo@e2.a.example.com", M, "fail", None,
                      "a/0 does not widen the IPv6 match."),
    "a-cidr6-0-ip4": ("1.2.3.4", "foo@e2a.a.example.com", M, "fail", None,
                      "a//0 does not match an IPv4 client."),
    "a-cidr6-0-ip4mapped": ("::FFFF:1.2.3.4", "foo@e2a.a.example.com", M, "fail", None,
                            "An IPv4-mapped client is IPv4."),
    "a-cidr6-0-ip6": ("1234::1", "foo@e2a.a.example.com", M, "pass", None,
                      "a//0 matches any IPv6 client when there is an AAAA record."),
    "a-ip6-dualstack": ("1234::1", "foo@ipv6.a.example.com", M, "pass", None,
                        "An IPv6 client is matched against AAAA records."),
    "a-cidr6-0-nxdomain": ("1234::1", "foo@e2b.a.example.com", M, "fail", None,
                           "No AAAA records: no match for IPv6."),
    "a-null": ("1.2.3.5", "foo@e3.a.example.com", M, "permerror", None,
               "A NUL octet is a permerror."),
    "a-numeric": ("1.2.3.4", "foo@e4.a.example.com", M, "permerror", None,
                  "An IP address in 'a:' is a permerror (all-numeric top label)."),
    "a-numeric-toplabel": ("1.2.3.4", "foo@e5.a.example.com", M, "permerror", None,
                           "An all-numeric top label is a permerror."),
    "a-dash-in-toplabel": ("1.2.3.4", "foo@e14.a.example.com", M, "pass", None,
                           "A top label may hold dashes (xn--)."),
    "a-bad-toplabel": ("1.2.3.4", "foo@e12.a.example.com", M, "permerror", None,
                       "A top label may not begin with a dash."),
    "a-only-toplabel": ("1.2.3.4", "foo@e5a.a.example.com", M, "permerror", None,
                        "A domain-spec of one label is a permerror."),
    "a-only-toplabel-trailing-dot": ("1.2.3.4", "foo@e5b.a.example.com", M, "permerror", None,
                                     "A trailing dot does not help."),
    "a-colon-domain": ("1.2.3.4", "foo@e11.a.example.com", M, "pass", None,
                       "A domain-spec may hold any visible character but '%'."),
    "a-colon-domain-ip4mapped": ("::FFFF:1.2.3.4", "foo@e11.a.example.com", M, "pass", None,
                                 "The same for an IPv4-mapped client."),
    "a-empty-domain": ("1.2.3.4", "foo@e13.a.example.com", M, "permerror", None,
                       "'a:' with an empty domain is a permerror."),
    "a-servfail": ("1.2.3.4", "foo@e15.a.example.com", M, "temperror", None,
                   "SERVFAIL on an a lookup is a temperror."),
    "a-cname": ("1.2.3.4", "foo@cname.a.example.com", M, "pass", None,
                "CNAMEs are followed."),
    # 5.2 include
    "include-fail": ("1.2.3.4", "foo@e1.inc.example.com", M, "softfail", None,
                     "An included fail does not match."),
    "include-softfail": ("1.2.3.4", "foo@e2.inc.example.com", M, "pass", None,
                         "An included softfail does not match."),
    "include-neutral": ("1.2.3.4", "foo@e3.inc.example.com", M, "fail", None,
                        "An included neutral does not match."),
    "include-temperror": ("1.2.3.4", "foo@e4.inc.example.com", M, "temperror", None,
                          "An included temperror is a temperror."),
    "include-permerror": ("1.2.3.4", "foo@e5.inc.example.com", M, "permerror", None,
                          "An included permerror is a permerror."),
    "include-syntax-error": ("1.2.3.4", "foo@e6.inc.example.com", M, "permerror", None,
                             "'include' needs a domain."),
    "include-cidr": ("1.2.3.4", "foo@e9.inc.example.com", M, "permerror", None,
                     "'include' takes no CIDR length."),
    "include-none": ("1.2.3.4", "foo@e7.inc.example.com", M, "permerror", None,
                     "Including a domain without an SPF record is a permerror."),
    "include-nxdomain": ("1.2.3.4", "foo@e10.inc.example.com", M, "permerror", None,
                         "Including a domain that does not exist is a permerror."),
    "include-empty-domain": ("1.2.3.4", "foo@e8.inc.example.com", M, "permerror", None,
                             "'include:' with an empty domain is a permerror."),
    "include-pass-qualified": ("1.2.3.4", "foo@e11.inc.example.com", M, "fail", None,
                               "An included pass matches with the include's qualifier."),
    # 5.4 mx
    "mx-cidr6": ("1.2.3.4", "foo@e6.mx.example.com", M, "fail", None,
                 "mx//33 does not apply to IPv4."),
    "mx-bad-cidr4": ("1.2.3.4", "foo@e6a.mx.example.com", M, "permerror", None,
                     "mx/33 is a permerror."),
    "mx-bad-cidr6": ("1.2.3.4", "foo@e7.mx.example.com", M, "permerror", None,
                     "mx//129 is a permerror."),
    "mx-multi-ip": ("1.2.3.4", "foo@e10.mx.example.com", M, "pass", None,
                    "mx matches any address of any MX name."),
    "mx-bad-domain": ("1.2.3.4", "foo@e9.mx.example.com", M, "permerror", None,
                      "A ':' may not be in the top label."),
    "mx-nxdomain": ("1.2.3.4", "foo@e1.mx.example.com", M, "fail", None,
                    "MX names without addresses do not match, even with /0."),
    "mx-cidr4-0": ("1.2.3.4", "foo@e2.mx.example.com", M, "pass", None,
                   "mx/0 matches when an MX name has an A record."),
    "mx-cidr4-0-ip6": ("1234::1", "foo@e2.mx.example.com", M, "fail", None,
                       "mx/0 does not widen the IPv6 match."),
    "mx-cidr6-0-ip4": ("1.2.3.4", "foo@e2a.mx.example.com", M, "fail", None,
                       "mx//0 does not match IPv4."),
    "mx-cidr6-0-ip4mapped": ("::FFFF:1.2.3.4", "foo@e2a.mx.example.com", M, "fail", None,
                             "An IPv4-mapped client is IPv4."),
    "mx-cidr6-0-ip6": ("1234::1", "foo@e2a.mx.example.com", M, "pass", None,
                       "mx//0 matches an IPv6 client when an MX name has AAAA."),
    "mx-cidr6-0-nxdomain": ("1234::1", "foo@e2b.mx.example.com", M, "fail", None,
                            "No AAAA records: no match for IPv6."),
    "mx-null": ("1.2.3.5", "foo@e3.mx.example.com", M, "permerror", None,
                "A NUL octet is a permerror."),
    "mx-numeric-top-label": ("1.2.3.4", "foo@e5.mx.example.com", M, "permerror", None,
                             "An all-numeric top label is a permerror."),
    "mx-colon-domain": ("1.2.3.4", "foo@e11.mx.example.com", M, "pass", None,
                        "Odd characters in MX names are looked up."),
    "mx-colon-domain-ip4mapped": ("::FFFF:1.2.3.4", "foo@e11.mx.example.com", M, "pass", None,
                                  "The same for an IPv4-mapped client."),
    "mx-bad-toplab": ("1.2.3.4", "foo@e12.mx.example.com", M, "permerror", None,
                      "A top label may not begin with a dash."),
    "mx-empty": ("1.2.3.4", "", M, "neutral", None, "A null MX (RFC 7505) matches nothing."),
    "mx-implicit": ("1.2.3.4", "foo@e4.mx.example.com", M, "neutral", None,
                    "No MX records: mx does not fall back to the A record."),
    "mx-empty-domain": ("1.2.3.4", "foo@e13.mx.example.com", M, "permerror", None,
                        "'mx:' with an empty domain is a permerror."),
    "mx-servfail": ("1.2.3.4", "foo@e14.mx.example.com", M, "temperror", None,
                    "SERVFAIL on an MX name's address lookup is a temperror."),
    # 5.7 exists
    "exists-empty-domain": ("1.2.3.4", "foo@e1.ex.example.com", M, "permerror", None,
                            "'exists:' needs a domain."),
    "exists-implicit": ("1.2.3.4", "foo@e2.ex.example.com", M, "permerror", None,
                        "'exists' needs a domain."),
    "exists-cidr": ("1.2.3.4", "foo@e3.ex.example.com", M, "permerror", None,
                    "'exists' takes no CIDR length."),
    "exists-ip4": ("1.2.3.4", "foo@e4.ex.example.com", M, "pass", None,
                   "exists matches any A record."),
    "exists-ip6": ("cafe:babe::3", "foo@e4.ex.example.com", M, "pass", None,
                   "exists asks for A even for IPv6 clients."),
    "exists-ip6only": ("cafe:babe::3", "foo@e5.ex.example.com", M, "fail", None,
                       "AAAA records do not make exists match."),
    "exists-dnserr": ("cafe:babe::3", "foo@e6.ex.example.com", M, "temperror", None,
                      "A DNS timeout in exists is a temperror."),
    # 5.6 ip4, ip6
    "cidr4-0": ("1.2.3.4", "foo@e1.ip4.example.com", M, "pass", None, "ip4:.../0 matches all IPv4."),
    "cidr4-32": ("1.2.3.4", "foo@e2.ip4.example.com", M, "pass", None, "ip4:.../32 matches one."),
    "cidr4-33": ("1.2.3.4", "foo@e3.ip4.example.com", M, "permerror", None, "/33 is a permerror."),
    "cidr4-032": ("1.2.3.4", "foo@e4.ip4.example.com", M, "permerror", None,
                  "A leading zero in a CIDR length is a permerror."),
    "bare-ip4": ("1.2.3.4", "foo@e5.ip4.example.com", M, "permerror", None,
                 "'ip4' needs an address."),
    "ip4-dual-cidr": ("1.2.3.4", "foo@e6.ip4.example.com", M, "permerror", None,
                      "ip4 takes no IPv6 CIDR length."),
    "ip4-mapped-ip6": ("::FFFF:1.2.3.4", "foo@e7.ip4.example.com", M, "fail", None,
                       "An IPv4-mapped client is matched by ip4, not ip6."),
    "bad-ip4-port": ("1.2.3.4", "foo@e8.ip4.example.com", M, "permerror", None,
                     "A port after the address is a permerror."),
    "bad-ip4-short": ("1.2.3.4", "foo@e9.ip4.example.com", M, "permerror", None,
                      "A short address is a permerror."),
    "bad-ip4-leading-zero": ("1.2.3.4", "foo@e10.ip4.example.com", M, "permerror", None,
                             "A leading zero in an address octet is a permerror."),
    "ip4-net": ("192.0.2.77", "foo@e11.ip4.example.com", M, "pass", None,
                "ip4 with a network matches an address in it."),
    "ip4-net-outside": ("192.0.3.1", "foo@e11.ip4.example.com", M, "fail", None,
                        "ip4 with a network does not match outside it."),
    "bare-ip6": ("1.2.3.4", "foo@e1.ip6.example.com", M, "permerror", None,
                 "'ip6' needs an address, even after the matching term."),
    "cidr6-0-ip4": ("1.2.3.4", "foo@e2.ip6.example.com", M, "neutral", None,
                    "ip6 never matches an IPv4 client."),
    "cidr6-ip4": ("::FFFF:1.2.3.4", "foo@e2.ip6.example.com", M, "neutral", None,
                  "ip6 never matches an IPv4-mapped client."),
    "cidr6-0": ("DEAF:BABE::CAB:FEE", "foo@e2.ip6.example.com", M, "pass", None,
                "ip6:.../0 matches all IPv6."),
    "cidr6-129": ("1.2.3.4", "foo@e3.ip6.example.com", M, "permerror", None, "/129 is a permerror."),
    "cidr6-bad": ("1.2.3.4", "foo@e4.ip6.example.com", M, "permerror", None,
                  "ip6 takes no dual CIDR length."),
    "cidr6-33": ("CAFE:BABE:8000::", "foo@e5.ip6.example.com", M, "pass", None,
                 "An IPv6 /33 is an IPv6 prefix."),
    "cidr6-33-ip4": ("1.2.3.4", "foo@e5.ip6.example.com", M, "neutral", None,
                     "And does not match IPv4."),
    "ip6-bad1": ("1.2.3.4", "foo@e6.ip6.example.com", M, "permerror", None,
                 "A malformed IPv6 address is a permerror."),
    "ip6-scope": ("1.2.3.4", "foo@e7.ip6.example.com", M, "permerror", None,
                  "A zone index (%eth0) is no part of an SPF IPv6 address."),
    # 6 modifiers, exp
    "redirect-none": ("1.2.3.4", "foo@e10.mod.example.com", M, "permerror", None,
                      "A redirect to a domain without a record is a permerror."),
    "redirect-cancels-exp": ("1.2.3.4", "foo@e1.mod.example.com", M, "fail", "",
                             "After redirect, the original domain's exp is not used."),
    "redirect-syntax-error": ("1.2.3.4", "foo@e17.mod.example.com", M, "permerror", None,
                              "redirect=-all is a permerror."),
    "include-ignores-exp": ("1.2.3.4", "foo@e7.mod.example.com", M, "fail", "Correct!",
                            "An included record's exp is not used."),
    "redirect-cancels-prior-exp": ("1.2.3.4", "foo@e3.mod.example.com", M, "fail", "See me.",
                                   "The redirect target's exp explains its fail."),
    "invalid-modifier": ("1.2.3.4", "foo@e5.mod.example.com", M, "permerror", None,
                         "A modifier name must begin with a letter."),
    "empty-modifier-name": ("1.2.3.4", "foo@e6.mod.example.com", M, "permerror", None,
                            "A modifier name must not be empty."),
    "dorky-sentinel": ("1.2.3.4", "Macro Error@e8.mod.example.com", M, "fail",
                       "Macro Error in implementation",
                       "A local part with a space expands as it is."),
    "exp-multiple-txt": ("1.2.3.4", "foo@e11.mod.example.com", M, "fail", "",
                         "Two TXT records at the exp name: no explanation."),
    "exp-no-txt": ("1.2.3.4", "foo@e22.mod.example.com", M, "fail", "",
                   "No TXT record at the exp name: no explanation."),
    "exp-dns-error": ("1.2.3.4", "foo@e21.mod.example.com", M, "fail", "",
                      "A DNS timeout fetching the exp: no explanation, still fail."),
    "exp-empty-domain": ("1.2.3.4", "foo@e12.mod.example.com", M, "permerror", None,
                         "exp= with an empty domain is a permerror."),
    "explanation-syntax-error": ("1.2.3.4", "foo@e13.mod.example.com", M, "fail", "",
                                 "A bad macro in the explanation text: no explanation."),
    "exp-syntax-error": ("1.2.3.4", "foo@e16.mod.example.com", M, "permerror", None,
                         "exp=-all is a permerror."),
    "exp-twice": ("1.2.3.4", "foo@e14.mod.example.com", M, "permerror", None,
                  "Two exp modifiers are a permerror."),
    "redirect-empty-domain": ("1.2.3.4", "foo@e18.mod.example.com", M, "permerror", None,
                              "redirect= with an empty domain is a permerror."),
    "redirect-twice": ("1.2.3.4", "foo@e15.mod.example.com", M, "permerror", None,
                       "Two redirect modifiers are a permerror."),
    "unknown-modifier-syntax": ("1.2.3.4", "foo@e9.mod.example.com", M, "permerror", None,
                                "An unknown modifier's value must be a valid macro-string."),
    "default-modifier-obsolete": ("1.2.3.4", "foo@e19.mod.example.com", M, "neutral", None,
                                  "default=pass is an unknown modifier and changes nothing."),
    "default-modifier-obsolete2": ("1.2.3.4", "foo@e20.mod.example.com", M, "neutral", None,
                                   "default=+ is an unknown modifier and changes nothing."),
    "non-ascii-exp": ("1.2.3.4", "foobar@e25.mod.example.com", "hosed", "fail", "",
                      "A non-ASCII explanation is not used."),
    "exp-void": ("1.2.3.4", "foo@e23.mod.example.com", M, "fail", "",
                 "The exp lookup does not count as a void lookup."),
    "redirect-implicit": ("192.0.2.2", "bar@e24.mod.example.com", "e24.mod.example.com", "pass",
                          None, "redirect changes the domain that 'a' looks up."),
    "exp-c-s-macros": ("1.2.3.4", "foo@e26.mod.example.com", M, "fail",
                       "sender foo@e26.mod.example.com from 1.2.3.4",
                       "%{s} and %{c} expand in explanations."),
    # 7 macros
    "trailing-dot-domain": ("192.168.218.40", "test@example.com", "msgbas2x.cos.example.com",
                            "pass", None, "A trailing dot on a domain is ignored."),
    "trailing-dot-exp": ("192.168.218.40", "test@exp.example.com", "msgbas2x.cos.example.com",
                         "fail", "This is a test.",
                         "A trailing dot in an explanation stays."),
    "exp-only-macro-char": ("192.168.218.40", "test@e2.mac.example.com",
                            "msgbas2x.cos.example.com", "permerror", None,
                            "%{r} is allowed only in explanation text."),
    "invalid-macro-char": ("192.168.218.40", "test@e1.mac.example.com",
                           "msgbas2x.cos.example.com", "permerror", None,
                           "'%(' is a permerror."),
    "invalid-embedded-macro-char": ("192.168.218.40", "test@e1e.mac.example.com",
                                    "msgbas2x.cos.example.com", "permerror", None,
                                    "'%(' inside a label is a permerror."),
    "invalid-trailing-macro-char": ("192.168.218.40", "test@e1t.mac.example.com",
                                    "msgbas2x.cos.example.com", "permerror", None,
                                    "A '%' followed by '.' is a permerror."),
    "macro-mania-in-domain": ("1.2.3.4", "test@e1a.mac.example.com", M, "pass", None,
                              "%%, %_ and %- expand to '%', ' ' and '%20'."),
    "exp-txt-macro-char": ("192.168.218.40", "test@e3.mac.example.com",
                           "msgbas2x.cos.example.com", "fail",
                           "Connections from 192.168.218.40 not authorized.",
                           "%{c} of an IPv4 client is its dotted quad."),
    "domain-name-truncation": ("192.168.218.40", f"test@{SLE}", "msgbas2x.cos.example.com",
                               "fail", "Congratulations!  That was tricky.",
                               "Expanded names over 253 characters lose labels on the left."),
    "v-macro-ip4": ("192.168.218.40", "test@e4.mac.example.com", "msgbas2x.cos.example.com",
                    "fail", "192.168.218.40 is queried as 40.218.168.192.in-addr.arpa",
                    "%{v} is in-addr for IPv4."),
    "v-macro-ip6": ("CAFE:BABE::1", "test@e4.mac.example.com", "msgbas2x.cos.example.com",
                    "fail", "cafe:babe::1 is queried as 1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0"
                    ".0.0.0.0.e.b.a.b.e.f.a.c.ip6.arpa",
                    "%{v} is ip6 and %{i} nibbles for IPv6."),
    "undef-macro": ("CAFE:BABE::192.168.218.40", "test@e5.mac.example.com",
                    "msgbas2x.cos.example.com", "permerror", None, "%{a} is no macro."),
    "p-macro-ip4-novalid": ("192.168.218.40", "test@e6.mac.example.com",
                            "msgbas2x.cos.example.com", "fail", "connect from unknown",
                            "%{p} is 'unknown' when no PTR name validates."),
    "p-macro-ip4-valid": ("192.168.218.41", "test@e6.mac.example.com",
                          "msgbas2x.cos.example.com", "fail", "connect from mx.example.com",
                          "%{p} is the validated PTR name."),
    "p-macro-ip6-novalid": ("CAFE:BABE::1", "test@e6.mac.example.com",
                            "msgbas2x.cos.example.com", "fail", "connect from unknown",
                            "%{p} for IPv6 that does not validate."),
    "p-macro-ip6-valid": ("CAFE:BABE::3", "test@e6.mac.example.com",
                          "msgbas2x.cos.example.com", "fail", "connect from mx.example.com",
                          "%{p} for IPv6 that validates."),
    "p-macro-multiple": ("192.168.218.42", "test@e7.mac.example.com", "msgbas2x.cos.example.com",
                         "pass", None, "%{p} prefers a name under the domain."),
    "upper-macro": ("192.168.218.42", "~jack&jill=up-a_b3.c@e8.mac.example.com",
                    "msgbas2x.cos.example.com", "fail",
                    "http://example.com/why.html?l=~jack%26jill%3Dup-a_b3.c",
                    "Upper-case macros are URL-escaped outside RFC 3986 unreserved."),
    "hello-macro": ("192.168.218.40", "test@e9.mac.example.com", "msgbas2x.cos.example.com",
                    "pass", None, "%{h} is the HELO name."),
    "invalid-hello-macro": ("192.168.218.40", "test@e9.mac.example.com", "JUMPIN' JUPITER",
                            "fail", None, "An odd HELO is expanded, not checked."),
    "hello-domain-literal": ("192.168.218.40", "test@e9.mac.example.com", "[192.168.218.40]",
                             "fail", None, "An address-literal HELO is expanded, not checked."),
    "require-valid-helo": ("1.2.3.4", "test@e10.mac.example.com", "OEMCOMPUTER", "fail", None,
                           "A -include of a helo check works as a policy."),
    "macro-reverse-split-on-dash": ("1.2.3.4", "philip-gladstone-test@e11.mac.example.com", M,
                                    "pass", None, "%{l2r-} splits on '-', reverses, keeps 2."),
    "macro-multiple-delimiters": ("1.2.3.4", "foo-bar+zip+quux@e12.mac.example.com", M, "pass",
                                  None, "%{l2r+-} splits on '+' and '-'."),
    "macro-zero-digits": ("1.2.3.4", "foo@e13.mac.example.com", M, "permerror", None,
                          "A part count of zero is a permerror."),
    "macro-ip6-nibbles": ("2001:db8::cb01", "strong-bad@e14.mac.example.com", M, "pass", None,
                          "%{ir}.%{v} names an IPv6 client by nibbles (Appendix D)."),
    # 4.6.4 limits
    "redirect-loop": ("1.2.3.4", "foo@e1.lim.example.com", M, "permerror", None,
                      "A redirect to itself ends at the lookup limit."),
    "include-loop": ("1.2.3.4", "foo@e2.lim.example.com", M, "permerror", None,
                     "Two records including each other end at the lookup limit."),
    "mx-limit": ("1.2.3.5", "foo@e4.lim.example.com", M, "permerror", None,
                 "More than 10 MX names is a permerror."),
    "ptr-limit": ("1.2.3.5", "foo@e5.lim.example.com", M, "neutral", None,
                  "Only the first 10 PTR names are checked."),
    "false-a-limit": ("1.2.3.12", "foo@e10.lim.example.com", M, "pass", None,
                      "There is no limit on the A records of a name."),
    "mech-at-limit": ("1.2.3.4", "foo@e6.lim.example.com", M, "pass", None,
                      "Ten DNS-querying terms are allowed."),
    "mech-over-limit": ("1.2.3.4", "foo@e7.lim.example.com", M, "permerror", None,
                        "The eleventh DNS-querying term is a permerror."),
    "include-at-limit": ("1.2.3.4", "foo@e8.lim.example.com", M, "pass", None,
                         "Terms inside includes count; ten in all is fine."),
    "include-over-limit": ("1.2.3.4", "foo@e9.lim.example.com", M, "permerror", None,
                           "Eleven counting includes' terms is a permerror."),
    "void-at-limit": ("1.2.3.4", "foo@e12.lim.example.com", M, "neutral", None,
                      "Two void lookups are allowed."),
    "void-over-limit": ("1.2.3.4", "foo@e11.lim.example.com", M, "permerror", None,
                        "The third void lookup is a permerror."),
    "big-record-over-tcp": ("1.2.3.4", "foo@big.example.com", M, "pass", None,
                            "A record too big for a UDP reply is fetched over TCP."),
    "ptr-void-after-p-macro": ("192.0.2.99", "foo@ptrvoid.lim.example.com", M, "permerror", None,
                               "Each ptr term without PTR records is a void lookup, "
                               "even after %{p} looked them up."),
    "include-fan-loop": ("1.2.3.4", "foo@fan.lim.example.com", M, "permerror", None,
                         "A record including itself twice ends at the lookup limit."),
}


def _make_case(name: str, case: tuple[str, str, str, str, Optional[str], str]) -> Any:
    host, mailfrom, helo, result, explanation, doc = case

    async def test(self: SpfCase) -> None:
        got = await self.spf(host, mailfrom, helo)
        self.assertEqual(got.result, result, f"{name}: {got}")
        if explanation is not None:
            self.assertEqual(got.explanation, explanation, name)

    test.__name__ = "test_" + name.replace("-", "_")
    test.__doc__ = doc
    return test


class SuiteTests(SpfCase):
    """The RFC 7208 test-suite cases, one method each (added below)."""


for _name, _case in CASES.items():
    setattr(SuiteTests, "test_" + _name.replace("-", "_"), _make_case(_name, _case))


# -- macro expansion: RFC 7208 Appendix D ----------------------------------------

APPENDIX_D = [
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
]


class MacroTests(unittest.TestCase):

    def evaluation(self, ip: str = "192.0.2.3") -> _Evaluation:
        evaluator = SpfEvaluator(None, reactor=Clock(), hostname="mx.test.invalid")
        return _Evaluation(evaluator, ipaddress.ip_address(ip), "strong-bad@email.example.com",
                           "strong-bad", "email.example.com", "mx.example.org")

    async def test_appendix_d_ipv4(self) -> None:
        """The RFC 7208 Appendix D macro examples expand as printed there."""
        e = self.evaluation()
        for spec, expected in APPENDIX_D:
            got = await e._expand(parse_macro_string(spec), "email.example.com")
            self.assertEqual(got, expected, spec)

    async def test_appendix_d_ipv6(self) -> None:
        """The Appendix D IPv6 example: %{ir} is the reversed nibbles."""
        e = self.evaluation("2001:db8::cb01")
        got = await e._expand(parse_macro_string("%{ir}.%{v}._spf.%{d2}"), "email.example.com")
        self.assertEqual(got, "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
                              ".ip6._spf.example.com")

    async def test_escapes_and_exp_letters(self) -> None:
        """%% %_ %- are literal; c, r and t only in explanations; upper case URL-escapes."""
        e = self.evaluation()
        got = await e._expand(parse_macro_string("%%%_%-%{S}", explanation=True), "x.example")
        self.assertEqual(got, "% %20strong-bad%40email.example.com")
        got = await e._expand(parse_macro_string("%{c} %{r} %{t}", explanation=True), "x.example")
        self.assertEqual(got, "192.0.2.3 mx.test.invalid 0")
        for bad in ("%{c}", "%{r}", "%{t}", "%{x}", "%{d0}", "%", "%a", "%{d", "a b"):
            with self.assertRaises(_PermError, msg=bad):
                parse_macro_string(bad)

    def test_record_syntax(self) -> None:
        """Records parse into directives and modifiers; errors anywhere are permerrors."""
        record = parse_record("v=spf1 +a mx/24 -ip4:192.0.2.0/24 ~all exp=e.%{d} foo=bar")
        self.assertEqual([d.text for d in record.directives], ["+a", "mx/24", "-ip4:192.0.2.0/24",
                                                                "~all"])
        self.assertEqual(record.directives[1].cidr4, 24)
        self.assertIsNotNone(record.explanation)
        for bad in ("v=spf1 a:b.c//", "v=spf1 ip4:1.2.3.4/", "v=spf1 include:", "v=spf2 -all",
                    "v=spf1 exists:%{l}x", "v=spf1 ip6:::1//64", "v=spf1 \tall"):
            with self.assertRaises(_PermError, msg=bad):
                parse_record(bad)

    def test_record_selection_and_domains(self) -> None:
        """Only 'v=spf1' followed by a space or the end starts an SPF record; domains
        that cannot be checked give None."""
        self.assertTrue(is_spf_record("v=spf1"))
        self.assertTrue(is_spf_record("V=SPF1 -all"))
        self.assertFalse(is_spf_record("v=spf10"))
        self.assertFalse(is_spf_record("v=spf1-all"))
        self.assertEqual(spf_domain("Example.COM."), "Example.COM")
        self.assertEqual(spf_domain("bücher.example"), "xn--bcher-kva.example")
        for bad in ("", "localhost", "[192.0.2.1]", "192.0.2.1", "a..b", "a b.example",
                    "x" * 64 + ".example"):
            self.assertIsNone(spf_domain(bad), bad)


# -- limits, time bounds, errors -------------------------------------------------

class BoundsTests(SpfCase):

    async def test_include_loop_costs_bounded_queries(self) -> None:
        """A hostile include loop ends in permerror after at most 11 TXT queries."""
        res = await self.spf("1.2.3.4", "foo@fan.lim.example.com")
        self.assertEqual(res.result, "permerror")
        self.assertIn("4.6.4", res.problem)
        self.assertLessEqual(len(self.server.asked), 11)

    async def test_lookup_limit_is_configurable(self) -> None:
        """lookup_limit=3 makes a record that passes at ten counting terms a permerror."""
        res = await self.spf("1.2.3.4", "foo@e6.lim.example.com", lookup_limit=3)
        self.assertEqual(res.result, "permerror")

    async def test_void_limit_is_configurable(self) -> None:
        """void_limit=1 makes two void lookups a permerror."""
        res = await self.spf("1.2.3.4", "foo@e12.lim.example.com", void_limit=1)
        self.assertEqual(res.result, "permerror")

    async def test_mx_limit_stops_before_address_lookups(self) -> None:
        """An mx with 11 names is refused without asking for any of their addresses."""
        res = await self.spf("1.2.3.5", "foo@e4.lim.example.com")
        self.assertEqual(res.result, "permerror")
        self.assertFalse([n for n, t in self.server.asked if t == tdns.A])

    async def test_big_record_goes_over_tcp(self) -> None:
        """An SPF record too big for 512 octets is asked again over TCP and used."""
        res = await self.spf("1.2.3.4", "foo@big.example.com")
        self.assertEqual((res.result, res.mechanism), ("pass", "ip4:1.2.3.4"))
        self.assertEqual(self.server.tcp, 1)

    async def test_answers_are_cached(self) -> None:
        """A second evaluation of the same domain is answered from the resolver's cache."""
        evaluator = self.evaluator()
        first = await evaluator.check_host("1.2.3.4", "e8.lim.example.com", "a@e8.lim.example.com",
                                           "mail.example.com")
        asked = len(self.server.asked)
        second = await evaluator.check_host("1.2.3.4", "e8.lim.example.com",
                                            "a@e8.lim.example.com", "mail.example.com")
        self.assertEqual((first.result, second.result), ("pass", "pass"))
        self.assertEqual(len(self.server.asked), asked)
        self.assertEqual(first.mechanism, "a")

    async def test_silent_server_is_temperror(self) -> None:
        """A nameserver that never answers gives temperror, not none."""
        port = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        res = await self.spf("1.2.3.4", "foo@e7.all.example.com",
                             resolver=self.resolver(port.getHost().port, timeout=0.2))
        self.assertEqual(res.result, "temperror")
        self.assertIn("timeout", res.problem)

    async def test_overall_time_bound(self) -> None:
        """The whole evaluation is bounded by ``timeout`` on the evaluator's clock:
        past it the result is temperror and the query in flight is cancelled."""
        port = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        clock = Clock()
        evaluator = SpfEvaluator(self.resolver(port.getHost().port, timeout=30), reactor=clock,
                                 timeout=5)
        d = defer.Deferred.fromCoroutine(
            evaluator.check_host("1.2.3.4", "example.org", "a@example.org", "h.example"))
        self.assertNoResult(d)
        clock.advance(5)
        res = self.successResultOf(d)
        self.assertEqual(res.result, "temperror")
        self.assertIn("5s", res.problem)

    async def test_cancel_propagates(self) -> None:
        """Cancelling check_host (the engine's check timeout) cancels the evaluation."""
        port = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        evaluator = SpfEvaluator(self.resolver(port.getHost().port, timeout=30), timeout=30)
        d = defer.Deferred.fromCoroutine(
            evaluator.check_host("1.2.3.4", "example.org", "a@example.org", "h.example"))
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)

    async def test_bad_client_address(self) -> None:
        """A client address that is not one gives none, without DNS."""
        res = await self.spf("unknown", "foo@e7.all.example.com")
        self.assertEqual(res.result, "none")
        self.assertEqual(self.server.asked, [])

    def test_bad_limits_refused(self) -> None:
        """Limits and timeouts must be positive."""
        with self.assertRaises(ValueError):
            SpfEvaluator(None, reactor=Clock(), timeout=0)
        with self.assertRaises(ValueError):
            SpfEvaluator(None, reactor=Clock(), lookup_limit=0)


# -- the check -------------------------------------------------------------------

class CheckTests(SpfCase):

    def check(self, **settings: Any) -> SpfCheck:
        services = PolicyServices(reactor, hostname="mx.example.net", spf=self.evaluator())
        return SpfCheck(SpfConfig(enabled=True, **settings), services)

    async def test_pass_scores_and_adds_header(self) -> None:
        """A pass scores score_pass and adds an RFC 8601 Authentication-Results header."""
        facts = Facts(client_ip="192.0.2.9", helo="mail.example.org",
                      sender="alice@pass.example.org", sender_domain="pass.example.org")
        res = await self.check(score_pass=-1.0).check(facts)
        self.assertEqual(res.score, -1.0)
        self.assertIsNone(res.action)
        self.assertEqual(res.headers, (("Authentication-Results",
                                        "mx.example.net; spf=pass (client 192.0.2.9) "
                                        "smtp.mailfrom=alice@pass.example.org"),))

    async def test_each_result_scores_as_configured(self) -> None:
        """fail, softfail, neutral, none and permerror score their own configured amounts."""
        scores = dict(score_fail=5.5, score_softfail=2.5, score_neutral=0.25, score_none=0.75,
                      score_permerror=1.5, score_temperror=0.125)
        check = self.check(**scores)
        cases = [("e2.mod.example.com", "fail"), ("e6.all.example.com", "softfail"),
                 ("e4.all.example.com", "neutral"), ("mail6.example.com", "none"),
                 ("t1.eval.example.com", "permerror"), ("txttimeout.example.com", "temperror")]
        for domain, result in cases:
            facts = Facts(client_ip="1.2.3.4", helo="mail.example.com", sender=f"a@{domain}",
                          sender_domain=domain)
            res = await check.check(facts)
            self.assertEqual(res.score, scores[f"score_{result}"], domain)
            self.assertEqual(res.reasons, (f"SPF {result}",))
            self.assertIsNone(res.action)
            self.assertIn(f"spf={result} ", res.headers[0][1])

    async def test_errors_are_logged_with_their_reason(self) -> None:
        """A permerror is logged with why, as a field (client text never in the format)."""
        facts = Facts(client_ip="1.2.3.4", helo="mail.example.com",
                      sender="a@e2.lim.example.com", sender_domain="e2.lim.example.com")
        with capturedLogs() as events:
            res = await self.check().check(facts)
        self.assertEqual(res.reasons, ("SPF permerror",))
        [event] = [e for e in events if e.get("result") == "permerror"]
        self.assertEqual(event["domain"], "e2.lim.example.com")
        self.assertIn("4.6.4", event["problem"])

    async def test_reject_fail(self) -> None:
        """reject_fail turns a fail into a REJECT with the 'spf' template."""
        facts = Facts(client_ip="1.2.3.4", helo="mail.example.com", sender="a@e2.mod.example.com",
                      sender_domain="e2.mod.example.com")
        res = await self.check(reject_fail=True).check(facts)
        self.assertEqual((res.action, res.template), (HardAction.REJECT, "spf"))

    async def test_reject_reply_carries_explanation(self) -> None:
        """The 550 5.7.23 reply for a rejected fail names the domain and its explanation."""
        facts = Facts(client_ip="1.2.3.4", helo="mail.example.com", sender="a@e4.mod.example.com",
                      sender_domain="e4.mod.example.com")
        res = await self.check(reject_fail=True).check(facts)
        self.assertEqual(dict(res.template_vars)["explanation"], "See me.")
        context = {"client_ip": facts.client_ip, "sender_domain": facts.sender_domain}
        context.update(res.template_vars)
        reply = ReplyRenderer().reply(res.template, context)
        self.assertEqual((reply.code, reply.enhanced), (550, "5.7.23"))
        self.assertEqual(reply.text, "SPF check failed: e4.mod.example.com does not designate "
                                     "1.2.3.4 as permitted sender: See me.")

    async def test_tempfail_on_temperror(self) -> None:
        """tempfail_on_temperror turns a temperror into a TEMPFAIL with 'spf_temperror'."""
        facts = Facts(client_ip="1.2.3.4", helo="mail.example.com",
                      sender="a@txttimeout.example.com", sender_domain="txttimeout.example.com")
        res = await self.check(tempfail_on_temperror=True).check(facts)
        self.assertEqual((res.action, res.template), (HardAction.TEMPFAIL, "spf_temperror"))

    async def test_null_sender_checks_helo(self) -> None:
        """For the null sender the HELO name is checked and named smtp.helo."""
        facts = Facts(client_ip="192.0.2.25", helo="helo.example.org")
        res = await self.check(add_header=True).check(facts)
        self.assertEqual(res.reasons, ("SPF pass",))
        self.assertEqual(res.headers[0][1], "mx.example.net; spf=pass (client 192.0.2.25) "
                                            "smtp.helo=helo.example.org")

    async def test_no_header_when_off(self) -> None:
        """add_header = false adds no header."""
        facts = Facts(client_ip="192.0.2.9", helo="mail.example.org",
                      sender="alice@pass.example.org", sender_domain="pass.example.org")
        res = await self.check(add_header=False).check(facts)
        self.assertEqual(res.headers, ())

    def test_header_quotes_odd_addresses(self) -> None:
        """A sender with specials is a quoted-string in the header."""
        header = authentication_results("mx.example.net", "fail", "mailfrom",
                                        'a "b"@example.org', "192.0.2.1", "h")
        self.assertEqual(header, 'mx.example.net; spf=fail (client 192.0.2.1) '
                                 'smtp.mailfrom="a \\"b\\"@example.org"')


class RuntimeTests(unittest.TestCase):

    def test_runtime_attaches_a_bounded_evaluator(self) -> None:
        """The policy runtime gives checks an SpfEvaluator on its resolver whose time
        bound stays under the engine's check timeout, and a new one on reload."""
        from dataclasses import replace

        from mppproxy.config.schema import ProxyConfig
        from mppproxy.policy.runtime import PolicyRuntime

        config = ProxyConfig()
        config = replace(config, dns=replace(config.dns, nameservers=("127.0.0.1:53",)))
        runtime = PolicyRuntime(config, Clock(), "mx.example.net")
        self.addCleanup(runtime.stop)
        spf = runtime.services.spf
        self.assertIsInstance(spf, SpfEvaluator)
        self.assertIs(spf.resolver, runtime.services.resolver)
        self.assertEqual(spf.hostname, "mx.example.net")
        self.assertLess(spf.timeout, config.policy.check_timeout)
        runtime.reconfigure(replace(config, policy=replace(config.policy, check_timeout=4.0)))
        self.assertLess(runtime.services.spf.timeout, 4.0)
        self.assertIs(runtime.services.spf.resolver, runtime.services.resolver)
