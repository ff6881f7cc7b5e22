"""The policy engine: policy choice per domain, check order, whitelists,
hard actions, scores and thresholds, exemptions, failures, templates.

The stores here are small in-memory implementations of the store
protocols (policy/services.py) so each rule is tested alone; the SQL stores
have their own tests, and tests/test_policy_loopback.py runs everything
through the proxy.
"""
from __future__ import annotations

from typing import Any, Optional

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mppproxy.config.errors import ConfigError
from mppproxy.config.load import from_mapping
from mppproxy.policy.base import Check, Facts
from mppproxy.results import CheckResult, TransactionRecord
from mppproxy.policy.counters import RateCounters, client_key
from mppproxy.policy.engine import PolicyEngine
from mppproxy.db.blacklist import BlacklistEntry
from mppproxy.policy.services import PolicyServices
from mppproxy.templates import ReplyRenderer, make_renderer


def run(coro: Any) -> Any:
    """Drive a coroutine that completes without the reactor."""
    results: list[Any] = []
    Deferred.fromCoroutine(coro).addBoth(results.append)
    assert results, "the coroutine waited on something"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class MemoryBlacklist:
    def __init__(self, clock: Clock):
        self.clock = clock
        self.entries: dict[str, BlacklistEntry] = {}

    async def lookup(self, client_ip: str) -> Optional[BlacklistEntry]:
        for prefix4, prefix6 in ((32, 128), (24, 64)):
            key = client_key(client_ip, prefix4, prefix6)
            e = self.entries.get(key or "")
            if e is not None and e.expires > self.clock.seconds():
                return e
        return None

    async def add(self, network: str, seconds: float, reason: str) -> None:
        old = self.entries.get(network)
        expires = self.clock.seconds() + seconds
        if old is None or old.expires < expires:
            self.entries[network] = BlacklistEntry(network, reason, expires)


class MemoryGreylist:
    def __init__(self, clock: Clock):
        self.clock = clock
        self.first: dict[tuple[str, str, str], float] = {}

    async def check(self, client_net: str, sender: str, recipient: str, settings: Any) -> Optional[float]:
        key = (client_net, sender, recipient)
        now = self.clock.seconds()
        first = self.first.setdefault(key, now)
        wait = first + settings.delay - now
        return wait if wait > 0 else None


class FailingBlacklist(MemoryBlacklist):
    async def lookup(self, client_ip: str) -> Optional[BlacklistEntry]:
        raise ConnectionError("database unreachable")


def make_engine(data: dict, blacklist: Any = None, clock: Optional[Clock] = None):
    clock = clock or Clock()
    config = from_mapping(data)
    services = PolicyServices(clock, hostname="mx.test",
                              blacklist=blacklist if blacklist is not None else MemoryBlacklist(clock),
                              greylist=MemoryGreylist(clock), counters=RateCounters(clock))
    engine = PolicyEngine(config.policy, config.policies, services, make_renderer(config), clock)
    return engine, services, clock


def facts(rcpt: str = "user@example.com", ip: str = "192.0.2.10", sender: str = "s@sender.example",
          helo: str = "client.example") -> Facts:
    return Facts(client_ip=ip, helo=helo, sender=sender,
                 sender_domain=sender.rpartition("@")[2].lower(),
                 recipient=rcpt, recipient_domain=rcpt.rpartition("@")[2].lower())


def ask(engine: PolicyEngine, f: Facts, record: Optional[TransactionRecord] = None):
    record = record if record is not None else TransactionRecord()
    return run(engine.on_recipient(f, record)), record


# -- policy choice -------------------------------------------------------------

def test_policy_per_domain_and_subdomain():
    """A recipient domain picks its policy by exact name or, for a listed ".suffix", any
    subdomain of it, case-insensitively; others get the default policy."""
    engine, _, _ = make_engine({"policies": {"school": {"domains": ["school.example", ".k12.example"]}}})
    assert engine.policy_for("school.example") == "school"
    assert engine.policy_for("SCHOOL.example") == "school"
    assert engine.policy_for("a.k12.example") == "school"
    assert engine.policy_for("k12.example") == "default"
    assert engine.policy_for("other.example") == "default"


def test_policy_per_recipient_before_the_domains():
    """A named policy's recipients (an address, a local part in any domain) pick it before any
    policy's domains, case-insensitively, first such policy in the configuration's order; other
    recipients of the domain keep the domain's policy."""
    engine, _, _ = make_engine({"policies": {
        "school": {"domains": ["school.example"]},
        "vip": {"recipients": ["Head@School.example", "abuse@"]},
        "later": {"recipients": ["head@school.example"]}}})
    assert ask(engine, facts("head@SCHOOL.example"))[1].policy == "vip"
    assert ask(engine, facts("abuse@other.example"))[1].policy == "vip"
    assert ask(engine, facts("pupil@school.example"))[1].policy == "school"
    assert ask(engine, facts("someone@other.example"))[1].policy == "default"
    assert engine.router.policy_for_recipients(["head@school.example", "x@y.example"]) == "vip"


def test_recipients_are_not_inherited_and_not_for_the_default():
    """recipients, like domains, is not inherited from the default policy, and giving it to the
    default policy is a config error naming the key."""
    with pytest.raises(ConfigError) as info:
        from_mapping({"policies": {"default": {"recipients": ["a@x.example"]}}})
    assert "policies.default.recipients" in str(info.value)
    config = from_mapping({"policies": {"p": {"recipients": ["a@x.example"]}}})
    assert config.policies["p"].recipients == ("a@x.example",)
    with pytest.raises(ConfigError) as info:
        from_mapping({"policies": {"p": {"recipients": ["user@exa mple.com"]}}})
    assert "policies.p.recipients" in str(info.value)


def test_second_policy_group_gets_452_4_5_3():
    """A recipient of another policy than the transaction's first one gets 452 4.5.3, while more
    recipients of the same policy are still taken."""
    engine, _, _ = make_engine({"policies": {"school": {"domains": ["school.example"]}}})
    reply, record = ask(engine, facts("a@school.example"))
    assert reply is None and record.policy == "school"
    reply, record = ask(engine, facts("b@other.example"), record)
    assert (reply.code, reply.enhanced) == (452, "4.5.3")
    # the same group is still fine
    reply, _ = ask(engine, facts("c@school.example"), record)
    assert reply is None


def test_named_policy_inherits_default_sections_and_keys():
    """A named policy inherits the default policy's sections and keys and overrides only the
    keys it sets."""
    config = from_mapping({"policies": {
        "default": {"spamtrap": {"enabled": True, "patterns": ["^trap@"], "blacklist_seconds": 60}},
        "school": {"domains": ["school.example"], "spamtrap": {"blacklist_seconds": 120}}}})
    school = config.policies["school"]
    assert school.spamtrap.enabled and school.spamtrap.patterns == ("^trap@",)
    assert school.spamtrap.blacklist_seconds == 120
    assert config.policies["default"].spamtrap.blacklist_seconds == 60


def test_domain_in_two_policies_is_a_config_error():
    """A domain listed in two policies (case and trailing dot aside) is a config error naming
    the second policy's domains key."""
    with pytest.raises(ConfigError) as info:
        from_mapping({"policies": {"a": {"domains": ["x.example"]}, "b": {"domains": ["X.example."]}}})
    assert "policies.b.domains" in str(info.value)


def test_default_policy_with_domains_is_a_config_error():
    """Domains given to the default policy are a config error naming policies.default.domains."""
    with pytest.raises(ConfigError) as info:
        from_mapping({"policies": {"default": {"domains": ["x.example"]}}})
    assert "policies.default.domains" in str(info.value)


@pytest.mark.parametrize("data, key", [
    ({"policies": {"default": {"access": {"blacklist_clients": ["300.1.1.1"]}}}},
     "policies.default.access.blacklist_clients"),
    ({"policies": {"default": {"access": {"whitelist_senders": ["user@exa mple.com"]}}}},
     "policies.default.access.whitelist_senders"),
    ({"policies": {"default": {"spamtrap": {"patterns": ["(unclosed"]}}}},
     "policies.default.spamtrap.patterns"),
    ({"policies": {"p": {"domains": ["x.example"], "greylisting": {"ipv4_prefix": 33}}}},
     "policies.p.greylisting.ipv4_prefix"),
    ({"policies": {"default": {"dnsbl": {"lists": [{"zone": "nodot"}]}}}},
     "policies.default.dnsbl.lists[0].zone"),
    ({"policies": {"default": {"dnsbl": {"lists": {"zone": "a.b"}}}}},
     "policies.default.dnsbl.lists"),
    ({"policies": {"default": {"scoring": {"rejet": 3}}}}, "policies.default.scoring.rejet"),
    ({"dns": {"nameservers": ["resolver.example"]}}, "dns.nameservers[0]"),
    ({"database": {"url": "postgresql://x/y"}}, "database.url"),
    ({"policy": {"on_error": "ignore"}}, "policy.on_error"),
])
def test_bad_policy_config_names_the_key(data, key):
    """Each bad policy setting is a config error that names its file and key."""
    with pytest.raises(ConfigError) as info:
        from_mapping(data, "p.toml")
    assert any(e.startswith(f"p.toml: {key}") for e in info.value.errors), info.value.errors


# -- access lists ------------------------------------------------------------------

ACCESS = {"policies": {"default": {"access": {
    "blacklist_clients": ["198.51.100.0/24", "2001:db8:bad::/48"],
    "whitelist_clients": ["192.0.2.0/29"],
    "blacklist_helos": [".spammy.example"],
    "blacklist_senders": ["bad@sender.example", ".spam.example", "<>"],
    "whitelist_senders": ["partner.example"],
    "blacklist_recipients": ["nobody@"],
    "whitelist_recipients": ["postmaster@example.com"],
}, "spamtrap": {"enabled": True, "patterns": ["^trap@"]}}}}


@pytest.mark.parametrize("f, what", [
    (facts(ip="198.51.100.77"), "client"),
    (facts(ip="::ffff:198.51.100.77"), "client"),
    (facts(ip="2001:db8:bad:1::5"), "client"),
    (facts(helo="host.spammy.example"), "helo"),
    (facts(sender="BAD@Sender.Example"), "sender"),
    (facts(sender="x@mail.spam.example"), "sender"),
    (facts(sender=""), "sender"),
    (facts(rcpt="nobody@example.com"), "recipient"),
])
def test_blacklists_refuse_with_554_5_7_1(f, what):
    """A blacklisted client (IPv4, IPv4-mapped or IPv6), HELO, sender or recipient is refused
    with 554 5.7.1, recorded by the access check with what was listed."""
    engine, _, _ = make_engine(ACCESS)
    reply, record = ask(engine, f)
    assert (reply.code, reply.enhanced) == (554, "5.7.1")
    assert record.recorded[0].check == "access"
    assert f"{what} blacklisted" in record.recorded[0].result.reasons


def test_blacklist_wins_over_whitelist():
    """A blacklisted sender is refused even when the client is whitelisted."""
    engine, _, _ = make_engine(ACCESS)
    reply, _ = ask(engine, facts(ip="192.0.2.1", sender="bad@sender.example"))
    assert reply is not None and reply.code == 554


def test_client_whitelist_skips_later_checks_for_the_transaction():
    """A whitelisted client skips every later check for the whole transaction, so even a
    spamtrap recipient neither refuses nor blacklists it."""
    engine, services, _ = make_engine(ACCESS)
    reply, record = ask(engine, facts(ip="192.0.2.5", rcpt="trap@example.com"))
    assert reply is None and record.whitelisted
    reply, record = ask(engine, facts(ip="192.0.2.5", rcpt="trap2@example.com"), record)
    assert reply is None
    assert [r.check for r in record.recorded] == ["access"]
    assert not services.blacklist.entries


def test_sender_whitelist_with_domain():
    """A sender whitelisted by domain matches whatever the case and a trailing dot, and
    whitelists the transaction."""
    engine, _, _ = make_engine(ACCESS)
    reply, record = ask(engine, facts(sender="boss@PARTNER.example.", rcpt="trap@example.com"))
    assert reply is None and record.whitelisted


def test_recipient_whitelist_is_per_recipient():
    """A whitelisted recipient does not whitelist the transaction: a spamtrap recipient after it
    is still refused."""
    engine, _, _ = make_engine(ACCESS)
    record = TransactionRecord()
    reply, record = ask(engine, facts(rcpt="postmaster@example.com"), record)
    assert reply is None and not record.whitelisted
    reply, record = ask(engine, facts(rcpt="trap@example.com"), record)
    assert reply is not None and reply.code == 550


# -- spam traps and the blacklist -------------------------------------------------

def test_spamtrap_refuses_and_blacklists_the_client():
    """A spamtrap recipient gets 550 5.7.1 without naming the trap and blacklists the client for
    blacklist_seconds, refusing its other recipients and new transactions until then."""
    engine, services, clock = make_engine({"policies": {"default": {
        "spamtrap": {"enabled": True, "patterns": [r"^trap@example\.com$"], "blacklist_seconds": 600}}}})
    record = TransactionRecord()
    reply, record = ask(engine, facts("good@example.com"), record)
    assert reply is None
    reply, record = ask(engine, facts("TRAP@example.com"), record)
    assert (reply.code, reply.enhanced) == (550, "5.7.1")
    assert "trap" not in reply.text.lower(), "the refusal must not reveal the trap"
    assert record.blacklisted_during
    assert "192.0.2.10/32" in services.blacklist.entries
    # other recipients in the same transaction and in new ones are refused
    reply, record = ask(engine, facts("other@example.com"), record)
    assert reply is not None and reply.code == 554
    reply, _ = ask(engine, facts("fresh@example.com"))
    assert reply is not None and reply.code == 554
    clock.advance(601)
    reply, _ = ask(engine, facts("fresh@example.com"))
    assert reply is None


def test_spamtrap_exempt_client_is_not_blacklisted():
    """A client exempt from the spamtrap check is neither refused nor blacklisted, and the check
    is recorded as skipped for it."""
    engine, services, _ = make_engine({"policies": {"default": {
        "spamtrap": {"enabled": True, "patterns": ["^trap@"], "whitelist_clients": ["192.0.2.0/24"]}}}})
    reply, record = ask(engine, facts("trap@example.com"))
    assert reply is None and not services.blacklist.entries
    assert record.recorded[-1].skipped == "exempt client"


def test_blacklist_exemption_for_a_relay_host():
    """A client exempt from the blacklist check is let through although it is on the blacklist."""
    clock = Clock()
    bl = MemoryBlacklist(clock)
    run(bl.add("192.0.2.10/32", 600, "spamtrap x"))
    engine, _, _ = make_engine({"policies": {"default": {
        "blacklist": {"whitelist_clients": ["192.0.2.10"]}}}}, blacklist=bl, clock=clock)
    reply, _ = ask(engine, facts())
    assert reply is None


# -- thresholds -------------------------------------------------------------------

def test_thresholds_blacklist_past_max_messages_per_network():
    """More than max_messages from one /24 within the period refuses the next message with 554
    5.7.1 and blacklists the network."""
    engine, services, clock = make_engine({"policies": {"default": {"thresholds": {
        "enabled": True, "max_messages": 3, "period": 120, "blacklist_seconds": 3600,
        "ipv4_prefix": 24}}}})
    for i in range(3):
        reply, _ = ask(engine, facts(ip=f"192.0.2.{10 + i}"))
        assert reply is None
    reply, record = ask(engine, facts(ip="192.0.2.99"))
    assert (reply.code, reply.enhanced) == (554, "5.7.1")
    assert "192.0.2.0/24" in services.blacklist.entries
    assert record.blacklisted_during


def test_thresholds_window_slides():
    """Messages older than the period no longer count towards max_messages."""
    engine, _, clock = make_engine({"policies": {"default": {"thresholds": {
        "enabled": True, "max_messages": 2, "period": 60}}}})
    for _ in range(2):
        assert ask(engine, facts())[0] is None
    clock.advance(61)
    assert ask(engine, facts())[0] is None


def test_thresholds_count_once_per_transaction():
    """A transaction with several recipients counts as one message towards max_messages."""
    engine, _, _ = make_engine({"policies": {"default": {"thresholds": {
        "enabled": True, "max_messages": 1}}}})
    record = TransactionRecord()
    for rcpt in ("a@example.com", "b@example.com", "c@example.com"):
        reply, record = ask(engine, facts(rcpt), record)
        assert reply is None


def test_spam_verdicts_count_against_max_spam():
    """Spam verdicts past max_spam within the period refuse the client and blacklist it for
    "threshold spam"."""
    engine, services, _ = make_engine({"policies": {"default": {"thresholds": {
        "enabled": True, "max_spam": 2, "period": 120}}}})
    key = "192.0.2.10/32"
    for _ in range(3):
        services.counters.add_spam(key, "default", 120)
    reply, _ = ask(engine, facts())
    assert reply is not None and reply.code == 554
    assert "threshold spam" in services.blacklist.entries[key].reason


def test_thresholds_exempt_relay_host_never_blacklisted():
    """A client exempt from the thresholds check is never refused nor blacklisted however much
    it sends."""
    engine, services, _ = make_engine({"policies": {"default": {"thresholds": {
        "enabled": True, "max_messages": 1, "whitelist_clients": ["192.0.2.10/32"]}}}})
    for _ in range(5):
        assert ask(engine, facts())[0] is None
    assert not services.blacklist.entries


# -- scoring --------------------------------------------------------------------------

class Scorer(Check):
    name = "dnsbl"

    async def check(self, facts: Facts) -> CheckResult:
        return CheckResult(score=self.settings.score, reasons=("listed in test.example",))


def test_score_at_reject_threshold_refuses_before_greylisting(monkeypatch):
    """A score at the reject threshold refuses with 550 5.7.1 naming the reasons, and
    greylisting never runs for the refused message."""
    from mppproxy.policy import checks

    class Settings:
        enabled = True
        score = 16.0
        whitelist_clients = whitelist_senders = whitelist_recipients = ()

    monkeypatch.setitem(checks.REGISTRY, "dnsbl", Scorer)
    engine, _, _ = make_engine({"policies": {"default": {"greylisting": {"enabled": True}}}})
    # A scoring check the policy turns on (the engine keeps only enabled ones).
    from mppproxy.policy.engine import Exemptions
    engine._policies["default"].scoring.append((Scorer(Settings(), engine.services),
                                                Exemptions(Settings())))
    reply, record = ask(engine, facts())
    assert (reply.code, reply.enhanced) == (550, "5.7.1")
    assert "listed in test.example" in reply.text
    assert record.score == 16.0
    assert "greylisting" not in [r.check for r in record.recorded]


# -- greylisting -------------------------------------------------------------------------

def test_greylisting_defers_with_451_4_7_1_and_retry_seconds():
    """A first delivery attempt is greylisted with 451 4.7.1 naming the delay, and the same
    triplet is let through after the delay."""
    engine, _, clock = make_engine({"policies": {"default": {"greylisting": {"enabled": True, "delay": 300}}}})
    reply, _ = ask(engine, facts())
    assert (reply.code, reply.enhanced) == (451, "4.7.1")
    assert "300 seconds" in reply.text
    clock.advance(301)
    assert ask(engine, facts())[0] is None


def test_greylisting_results_are_shared_per_retry_time(monkeypatch):
    """Each "retry in N s" result is built once and shared (they are
    immutable), the texts stay per N, and the shared set is bounded."""
    from mppproxy.policy.checks import greylisting

    engine, _, clock = make_engine({"policies": {"default": {"greylisting": {"enabled": True, "delay": 300}}}})
    first = [ask(engine, facts(sender=f"s{i}@sender.example"))[1].recorded[-1].result for i in range(3)]
    assert first[0] is first[1] is first[2]
    clock.advance(10)
    _, record = ask(engine, facts(sender="s0@sender.example"))
    later = record.recorded[-1].result
    assert later is not first[0]
    assert (later.reasons, first[0].reasons) == (("greylisted, retry in 290s",),
                                                 ("greylisted, retry in 300s",))
    monkeypatch.setattr(greylisting, "_MAX_SHARED", 2)
    for _ in range(5):
        clock.advance(1)
        ask(engine, facts(sender="s0@sender.example"))
    check = next(c for c, _ in engine._policies["default"].final if c.name == "greylisting")
    assert len(check._waits) <= 2


# -- failures --------------------------------------------------------------------------------

def test_failing_check_tempfails_by_default():
    """A check that fails gives 451 4.3.0 by default and is recorded as skipped for an error."""
    engine, _, _ = make_engine({}, blacklist=FailingBlacklist(Clock()))
    reply, record = ask(engine, facts())
    assert (reply.code, reply.enhanced) == (451, "4.3.0")
    assert record.recorded[-1].skipped == "error"


def test_failing_check_skipped_when_configured():
    """With on_error = "skip" a failing check is left out and the recipient is accepted."""
    engine, _, _ = make_engine({"policy": {"on_error": "skip"}}, blacklist=FailingBlacklist(Clock()))
    reply, _ = ask(engine, facts())
    assert reply is None


def test_slow_check_times_out_and_scores_nothing():
    """A check whose on_timeout is "pass" scores nothing past check_timeout
    and the recipient goes on (tests/test_check_timeouts.py: the defaults)."""
    clock = Clock()

    class SlowBlacklist(MemoryBlacklist):
        async def lookup(self, client_ip: str) -> Optional[BlacklistEntry]:
            await Deferred()  # never fires
            return None

    engine, _, _ = make_engine({"policy": {"check_timeout": 2},
                                "policies": {"default": {"blacklist": {"on_timeout": "pass"}}}},
                               blacklist=SlowBlacklist(clock), clock=clock)
    results: list[Any] = []
    Deferred.fromCoroutine(engine.on_recipient(facts(), TransactionRecord())).addBoth(results.append)
    assert not results
    clock.advance(2.5)
    assert results == [None]


def test_check_cancelled_by_something_else_is_a_failure_not_a_timeout():
    """Only our own deadline makes a CancelledError a timeout (scores nothing);
    any other cancellation is a failure (policy.on_error: tempfail)."""
    clock = Clock()

    class CancelledBlacklist(MemoryBlacklist):
        async def lookup(self, client_ip: str) -> Optional[BlacklistEntry]:
            d: Deferred = Deferred()
            clock.callLater(0.5, d.cancel)
            await d
            return None

    engine, _, _ = make_engine({"policy": {"check_timeout": 2}}, blacklist=CancelledBlacklist(clock),
                               clock=clock)
    results: list[Any] = []
    record = TransactionRecord()
    Deferred.fromCoroutine(engine.on_recipient(facts(), record)).addBoth(results.append)
    clock.advance(0.6)
    [reply] = results
    assert (reply.code, reply.enhanced) == (451, "4.3.0")
    assert record.recorded[-1].skipped == "error"
    clock.advance(3)
    assert not clock.getDelayedCalls()


# -- templates ---------------------------------------------------------------------------------

def test_site_template_overrides_builtin(tmp_path):
    """A site template replaces the built-in text of a reply, keeping the reply's RFC-fixed code
    and enhanced code."""
    (tmp_path / "replies").mkdir()
    (tmp_path / "replies" / "greylist.txt").write_text("Come back in {{ retry_seconds }}s, {{ client_ip }}\n")
    renderer = ReplyRenderer(site_dir=str(tmp_path))
    reply = renderer.reply("greylist", {"retry_seconds": 42, "client_ip": "192.0.2.1"})
    assert (reply.code, reply.enhanced, reply.text) == (451, "4.7.1", "Come back in 42s, 192.0.2.1")


def test_per_policy_template_overrides_site(tmp_path):
    """A policy's own template directory wins over the site's for that policy, and only for it."""
    for name, text in (("site", "site text"), ("school", "school text")):
        (tmp_path / name / "replies").mkdir(parents=True)
        (tmp_path / name / "replies" / "access.txt").write_text(text)
    renderer = ReplyRenderer(site_dir=str(tmp_path / "site"), policy_dirs={"school": str(tmp_path / "school")})
    assert renderer.reply("access", {}, "school").text == "school text"
    assert renderer.reply("access", {}, "default").text == "site text"


def test_broken_template_falls_back_to_builtin(tmp_path):
    """A site template that fails to render falls back to the built-in text."""
    (tmp_path / "replies").mkdir()
    (tmp_path / "replies" / "access.txt").write_text("{{ undefined_variable.attr }}")
    renderer = ReplyRenderer(site_dir=str(tmp_path))
    reply = renderer.reply("access", {"what": "client 192.0.2.1"})
    assert reply.code == 554 and "client 192.0.2.1" in reply.text


def test_template_cannot_inject_reply_lines():
    """Client text with CR LF in a template variable cannot add a line to the SMTP reply."""
    renderer = ReplyRenderer()
    reply = renderer.reply("access", {"what": "sender <a\r\n250 OK@x>"})
    wire = reply.to_bytes()
    assert wire.count(b"\r\n") == 1 and b"\r\n250" not in wire


def test_builtin_templates_all_render():
    """Every built-in reply template passes the check and renders a non-empty text."""
    renderer = ReplyRenderer()
    assert renderer.check_templates() == []
    for name in ("access", "blacklist", "spamtrap", "greylist", "score", "spf", "tempfail", "policy_group"):
        context = {"client_ip": "192.0.2.1", "helo": "h", "sender": "s@x", "sender_domain": "x",
                   "recipient": "r@y", "recipient_domain": "y", "policy": "default", "queue_id": "Q",
                   "reason": "", "what": "", "reasons": ["listed in a.example"], "retry_seconds": 5,
                   "score": 1}
        assert renderer.reply(name, context).text


def test_check_files_reports_a_broken_site_template(tmp_path):
    """check_files reports a site template with a syntax error (file and line) and a missing
    policy template directory (its key)."""
    from mppproxy.config.load import check_files

    (tmp_path / "tpl" / "replies").mkdir(parents=True)
    (tmp_path / "tpl" / "replies" / "greylist.txt").write_text("{% if %}")
    config = from_mapping({"data_dir": str(tmp_path), "policy": {"templates_dir": "tpl"},
                           "policies": {"p": {"domains": ["x.example"], "templates_dir": "missing"}}})
    with pytest.raises(ConfigError) as info:
        check_files(config)
    text = str(info.value)
    assert "greylist.txt: line 1" in text
    assert "policies.p.templates_dir: directory" in text


def test_rendered_texts_are_remembered_by_what_the_template_reads(tmp_path):
    """A template is rendered once per set of values of the variables it
    reads; another value (or a template that includes another) renders anew."""
    (tmp_path / "replies").mkdir()
    (tmp_path / "replies" / "greylist.txt").write_text("Wait {{ retry_seconds }}s, {{ client_ip }}\n")
    (tmp_path / "replies" / "part.txt").write_text("from {{ client_ip }}")
    (tmp_path / "replies" / "access.txt").write_text("No {% include 'replies/part.txt' %}\n")
    renderer = ReplyRenderer(site_dir=str(tmp_path))
    # queue_id: read by the built-in fallback's "(ref ...)"; the engine
    # always passes it.
    base = {"retry_seconds": 300, "client_ip": "192.0.2.1", "sender": "a@x", "queue_id": ""}
    texts = [renderer.reply("greylist", dict(base, sender=f"s{i}@x")).text for i in range(3)]
    assert texts == ["Wait 300s, 192.0.2.1"] * 3
    assert len(renderer._rendered) == 1
    assert renderer.reply("greylist", dict(base, client_ip="192.0.2.2")).text == "Wait 300s, 192.0.2.2"
    assert renderer.reply("greylist", dict(base, client_ip="192.0.2.1\r\n250 ok")).text == \
        "Wait 300s, 192.0.2.1??250 ok"
    assert renderer.reply("access", base).text == "No from 192.0.2.1"
    assert renderer.reply("access", dict(base, client_ip="192.0.2.9")).text == "No from 192.0.2.9"
    assert len(renderer._rendered) == 3  # the including template is never remembered
