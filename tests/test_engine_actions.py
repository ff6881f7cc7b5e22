"""Per-engine actions (issue 14): ``scan.engine_actions`` rules in the verdict
(``verdict.py``), their precedence against hard hits, failures, whitelists and
the score ladder, and their validation in the loader (keys named)."""
from __future__ import annotations

from typing import Any, Optional

import pytest

from mppproxy.config.errors import ConfigError
from mppproxy.config.load import from_mapping
from mppproxy.config.policy import ScoringConfig
from mppproxy.config.scan import EngineActionRule
from mppproxy.results import CheckResult, Disposition, HardAction, TransactionRecord
from mppproxy.scan.engine import ScanReport, _add
from mppproxy.verdict import decide

SCORING = ScoringConfig(tag=5.0, quarantine=0.0, reject=15.0)
VIRUS = CheckResult(reasons=("virus Eicar-Test-Signature",), action=HardAction.REJECT,
                    template="virus", template_vars=(("virus", "Eicar-Test-Signature"),))
SPAM = CheckResult(score=8.0, reasons=("spam CM_BULK",), facts=(("verdict", "spam"),))
CLEAN = CheckResult()


def report(*answers: tuple[str, CheckResult], weight: float = 1.0,
           failures: tuple[str, ...] = ()) -> tuple[TransactionRecord, ScanReport]:
    """A record and report as the scan engine makes them from these answers."""
    record = TransactionRecord(policy="default")
    out = ScanReport()
    for name, result in answers:
        _add(record, out, name, result, weight)
    for name in failures:
        out.failures.append((name, "timeout"))
        out.skipped.append((name, "timeout: no answer"))
    return record, out


def rule(engine: str, action: str, verdict: str = "any", min_score: Optional[float] = None,
         max_score: Optional[float] = None) -> EngineActionRule:
    return EngineActionRule(engine=engine, action=action, verdict=verdict, min_score=min_score,
                            max_score=max_score)


def test_first_matching_rule_wins_in_the_order_configured() -> None:
    """Two rules match; the first one written decides, and the reasons name it."""
    record, rep = report(("cloudmark", SPAM))
    rules = [rule("cloudmark", "quarantine", "spam"), rule("cloudmark", "reject", "spam")]
    verdict = decide(record, SCORING, rep, rules=rules)
    assert verdict.action is Disposition.QUARANTINE
    assert verdict.reasons[0] == "engine_actions: cloudmark said spam (8): quarantine"
    verdict = decide(record, SCORING, rep, rules=rules[::-1])
    assert (verdict.action, verdict.template) == (Disposition.REJECT, "score")


def test_score_ranges_use_the_engines_own_score_before_the_weight() -> None:
    """min_score/max_score ([min, max)) see the engine's score, not the weighted one: weight 0 keeps it out of the sum."""
    record, rep = report(("cloudmark", SPAM), weight=0.0)
    assert record.score == 0.0
    rules = [rule("cloudmark", "reject", "spam", min_score=9),
             rule("cloudmark", "quarantine", "spam", min_score=5, max_score=9)]
    assert decide(record, SCORING, rep, rules=rules).action is Disposition.QUARANTINE
    record, rep = report(("cloudmark", CheckResult(score=9.0, facts=(("verdict", "spam"),))),
                         weight=0.0)
    assert decide(record, SCORING, rep, rules=rules).action is Disposition.REJECT


def test_no_rule_matches_the_ladder_decides() -> None:
    """Without a matching rule the summed score ladder decides as before (tag at 5)."""
    record, rep = report(("cloudmark", SPAM))
    verdict = decide(record, SCORING, rep, rules=[rule("other", "reject")])
    assert verdict.action is Disposition.TAG


def test_tag_rule_tags_whatever_the_sum() -> None:
    """A tag rule adds the X-Spam fields though the sum is below the tag threshold."""
    record, rep = report(("cloudmark", CheckResult(score=1.0, facts=(("verdict", "spam"),))))
    verdict = decide(record, SCORING, rep, rules=[rule("cloudmark", "tag", "spam")])
    assert verdict.action is Disposition.TAG
    assert ("X-Spam-Flag", "YES") in verdict.headers


def test_virus_stays_a_refusal_unless_a_rule_names_that_engine() -> None:
    """clamd's virus refuses even when a spam rule of another engine matches; a rule about clamd itself replaces the refusal (delete), and a tag rule never does."""
    record, rep = report(("clamd", VIRUS), ("cloudmark", SPAM))
    verdict = decide(record, SCORING, rep, rules=[rule("cloudmark", "quarantine", "spam")])
    assert (verdict.action, verdict.template) == (Disposition.REJECT, "virus")
    verdict = decide(record, SCORING, rep, rules=[rule("clamd", "delete", "virus")])
    assert verdict.action is Disposition.DELETE
    assert dict(verdict.template_vars)["virus"] == "Eicar-Test-Signature"
    verdict = decide(record, SCORING, rep, rules=[rule("clamd", "tag")])
    assert verdict.action is Disposition.REJECT


def test_virus_action_delete_and_quarantine() -> None:
    """virus_action 'delete' deletes a virus (a refusal of another kind is still refused); 'quarantine' holds it."""
    record, rep = report(("clamd", VIRUS))
    assert decide(record, SCORING, rep, "delete").action is Disposition.DELETE
    assert decide(record, SCORING, rep, "quarantine").action is Disposition.QUARANTINE
    malformed = CheckResult(reasons=("boundary",), action=HardAction.REJECT, template="malformed")
    record, rep = report(("mime", malformed))
    assert decide(record, SCORING, rep, "delete").action is Disposition.REJECT


def test_clean_message_is_never_deleted_by_virus_action() -> None:
    """virus_action 'delete' leaves clean and spam mail to the ladder: relayed or tagged, never deleted."""
    record, rep = report(("clamd", CLEAN))
    assert decide(record, SCORING, rep, "delete").action is Disposition.RELAY
    record, rep = report(("clamd", CLEAN), ("cloudmark", SPAM))
    assert decide(record, SCORING, rep, "delete").action is Disposition.TAG


def test_failures_tempfail_unless_the_rule_never_delivers() -> None:
    """With an engine down, a quarantine or tag rule gives way to the tempfail; a reject or delete rule does not."""
    record, rep = report(("cloudmark", SPAM), failures=("clamd",))
    assert decide(record, SCORING, rep, rules=[rule("cloudmark", "quarantine", "spam")]
                  ).action is Disposition.TEMPFAIL
    assert decide(record, SCORING, rep, rules=[rule("cloudmark", "reject", "spam")]
                  ).action is Disposition.REJECT


def test_whitelisted_sender_is_not_met_by_spam_rules() -> None:
    """A whitelisted transaction is relayed whatever a spam rule says (as the ladder is skipped)."""
    record, rep = report(("cloudmark", SPAM))
    record.whitelisted = True
    assert decide(record, SCORING, rep, rules=[rule("cloudmark", "reject", "spam")]
                  ).action is Disposition.RELAY


def test_unscanned_is_not_clean() -> None:
    """A message over an engine's own max_size ('not scanned') matches no 'clean' rule."""
    record, rep = report(("cloudmark", CheckResult(reasons=("not scanned",),
                                                   facts=(("verdict", "unscanned"),))))
    assert decide(record, SCORING, rep, rules=[rule("cloudmark", "quarantine", "clean")]
                  ).action is Disposition.RELAY


def _load(scan: dict[str, Any]) -> list[str]:
    data = {"scanners": {"clamd": {}, "command": [{"name": "cm", "command": ["cm"],
                                                   "persistent": True}]},
            "policies": {"default": {"scan": {"enabled": True, "engines": {"clamd": {}},
                                              **scan}}}}
    try:
        from_mapping(data, "t.toml")
    except ConfigError as e:
        return e.errors
    return []


@pytest.mark.parametrize("scan, expected", [
    ({"engine_actions": [{"engine": "nope", "action": "reject"}]},
     "t.toml: policies.default.scan.engine_actions[0].engine: no such scanner"),
    ({"engine_actions": [{"engine": "cm", "action": "reject"}]},
     "t.toml: policies.default.scan.engine_actions[0].engine: 'cm' is not asked by this policy"),
    ({"engine_actions": [{"engine": "clamd", "action": "relay"}]},
     "t.toml: policies.default.scan.engine_actions[0].action: must be one of"),
    ({"engine_actions": [{"engine": "clamd", "action": "reject", "verdict": "ham"}]},
     "t.toml: policies.default.scan.engine_actions[0].verdict: must be one of"),
    ({"engine_actions": [{"engine": "clamd", "action": "delete", "verdict": "clean"}]},
     "t.toml: policies.default.scan.engine_actions[0].action: 'delete' for verdict 'clean'"),
    ({"engine_actions": [{"engine": "clamd", "action": "discard"}]},
     "t.toml: policies.default.scan.engine_actions[0].action: 'discard' with verdict 'any' needs"),
    ({"engine_actions": [{"engine": "clamd", "action": "tag", "verdict": "virus"}]},
     "t.toml: policies.default.scan.engine_actions[0].action: 'tag' would relay a virus"),
    ({"engine_actions": [{"engine": "clamd", "action": "reject", "min_score": 5,
                          "max_score": 2}]},
     "t.toml: policies.default.scan.engine_actions[0].max_score: must be above min_score"),
    ({"engine_actions": [{"action": "reject"}]},
     "t.toml: policies.default.scan.engine_actions[0].engine: is required"),
    ({"virus_action": "drop"}, "t.toml: policies.default.scan.virus_action: must be 'reject', "),
    ({"delete_notice": {"recipients": True}},
     "t.toml: policies.default.scan.delete_notice: set, but nothing in this policy deletes"),
    ({"virus_action": "delete", "delete_notice": {"admins": ["root"]}},
     "t.toml: policies.default.scan.delete_notice.admins: 'root' is not a mail address"),
    ({"virus_action": "delete", "delete_notice": {"template": "../x"}},
     "t.toml: policies.default.scan.delete_notice.template: '../x' is not a template name"),
])
def test_bad_rules_are_named_by_their_key(scan: dict[str, Any], expected: str) -> None:
    """check-config refuses each bad per-engine action or delete setting, naming its key."""
    errors = _load(scan)
    assert any(e.startswith(expected) for e in errors), errors


def test_good_rules_load() -> None:
    """Rules over clamd with a delete, a notice and a score range load cleanly."""
    assert _load({"virus_action": "delete",
                  "delete_notice": {"recipients": True, "admins": ["postmaster@example.com"]},
                  "engine_actions": [{"engine": "clamd", "verdict": "virus", "action": "delete"},
                                     {"engine": "clamd", "action": "quarantine",
                                      "min_score": 1, "max_score": 3}]}) == []


def test_check_config_finds_the_notice_template(tmp_path: Any) -> None:
    """check-config names delete_notice.template when the site's notice template is missing or does not parse."""
    from mppproxy.config.load import check_files
    site = tmp_path / "site"
    (site / "notices").mkdir(parents=True)
    (site / "notices" / "broken.txt").write_text("Subject: {% if %}\n\ntext\n")
    base = {"data_dir": str(tmp_path), "policy": {"templates_dir": str(site)},
            "scanners": {"clamd": {}}}
    for template, expected in (("missing", "no notices/missing.txt"), ("broken", "line 1")):
        config = from_mapping({**base, "policies": {"default": {"scan": {
            "enabled": True, "engines": {"clamd": {}}, "virus_action": "delete",
            "delete_notice": {"recipients": True, "template": template}}}}}, "t.toml")
        with pytest.raises(ConfigError) as info:
            check_files(config, "t.toml")
        assert any(e.startswith("t.toml: policies.default.scan.delete_notice.template: ")
                   and expected in e for e in info.value.errors), info.value.errors
    config = from_mapping({**base, "policies": {"default": {"scan": {
        "enabled": True, "engines": {"clamd": {}}, "virus_action": "delete",
        "delete_notice": {"admins": ["a@example.com"]}}}}}, "t.toml")
    check_files(config, "t.toml")  # the built-in virus_deleted template
