"""The score ladder's impossible settings (docs/design.md, "Configuration":
the loader validates everything up front).

The verdict (``verdict.py``, ``_score_action``) acts on each threshold of
``scoring`` (0: off) at and above itself, tag < quarantine < reject, with
``scan.discard_score`` above tag and quarantine, below or above reject.  A
combination in which one threshold could never act is a configuration
error, named here for the loader; a change to the ladder changes this too.
"""
from __future__ import annotations

from mppproxy.config.policy import PolicyConfig, ScoringConfig
from mppproxy.config.schema import ProxyConfig


def ladder_problems(name: str, scoring: ScoringConfig, discard_score: float,
                    scans: bool) -> list[str]:
    """The threshold combinations of policy ``name`` in which one can never
    act (``verdict._score_action``), each as "key: why" for the config loader.
    ``scans``: the policy's messages are scanned (only they are discarded)."""
    where = f"policies.{name}"
    on = {key: value for key, value in (("tag", scoring.tag), ("quarantine", scoring.quarantine),
                                        ("reject", scoring.reject)) if value > 0}
    problems = []
    # Lower rungs must sit below higher ones: at the higher threshold the
    # higher action wins, so a lower rung at or above it is never reached.
    for low, high in (("tag", "quarantine"), ("tag", "reject"), ("quarantine", "reject")):
        if low in on and high in on and on[low] >= on[high]:
            problems.append(f"{where}.scoring.{low}: {on[low]:g} is not below scoring.{high} "
                            f"({on[high]:g}), so {low} can never act; raise {high} or lower {low}")
    if discard_score <= 0:
        return problems
    key = f"{where}.scan.discard_score"
    if not scans:
        problems.append(f"{key}: {discard_score:g} is set but {where}.scan.enabled is false; "
                        "only scanned messages are discarded, so discard can never act")
    for low in ("tag", "quarantine"):
        if low in on and discard_score <= on[low]:
            problems.append(f"{key}: {discard_score:g} is not above scoring.{low} "
                            f"({on[low]:g}), so {low} can never act")
    if "reject" in on and discard_score == on["reject"]:
        problems.append(f"{key}: {discard_score:g} equals scoring.reject, so discard can never "
                        "act; put it above reject to drop the worst silently, or below to drop "
                        "instead of quarantining")
    return problems


def config_ladder_problems(config: ProxyConfig) -> list[str]:
    """``ladder_problems`` of every policy of a ``ProxyConfig``.  A named
    policy that inherits the default's thresholds unchanged is not named
    again.  Scanning happens in mode "scan" always (it forces it on), in
    the proxy's modes where the policy scans (whether or not the pre-DATA
    engine runs: the two are separate stages), and never in mode "policy"."""
    def inputs(policy: PolicyConfig) -> tuple[ScoringConfig, float, bool]:
        scans = config.mode == "scan" or (config.mode != "policy" and policy.scan.enabled)
        return policy.scoring, policy.scan.discard_score, scans

    default = inputs(config.policies["default"])
    problems = []
    for name, policy in config.policies.items():
        mine = inputs(policy)
        if name == "default" or mine != default:
            problems.extend(ladder_problems(name, *mine))
    return problems
