"""Whitelists and blacklists of clients, HELO names, senders, recipients:
the policy's own lists (``policies.NAME.access``) and each recipient
domain's own allow and block lists in the state database
(``db/allowlist.py``), which its administrators edit in the web console."""
from __future__ import annotations

from typing import Any, Optional

from mppproxy.db.allowlist import BLOCK, is_network
from mppproxy.db.state import StateDatabaseError
from mppproxy.logsetup import Logger
from mppproxy.policy.base import Check, Facts, Scope
from mppproxy.results import MISS, CheckResult, HardAction
from mppproxy.match import AddressSet, HeloSet, NetworkSet

log = Logger()


class AccessCheck(Check):
    """Blacklists are looked at first: a client on both lists is refused
    (an explicit "no" wins over a broad "yes").  A whitelisted client, HELO
    or sender skips the later checks for the whole transaction (the engine
    remembers it); a whitelisted recipient only for that recipient.

    The order, each "no" before the "yes" it overrides:

    1. the policy's blacklists (site-wide): refused, ``access`` template;
    2. the recipient domain's block list (``services.allowlist``, a
       sender or client network its administrator blocked): that recipient
       is refused, 550 5.7.1 from the ``domain_block`` template;
    3. the policy's whitelists;
    4. the recipient domain's allow list: ``WHITELIST_RECIPIENT`` marked
       ``sender_allowed`` (that recipient skips the later checks; when
       every recipient is allowed so, the verdict relays the message
       whatever its score).  Not for a client on the auto-blacklist: that
       "no" wins too, and the ``blacklist`` check then refuses it if the
       policy enforces it;
    5. the policy's whitelisted recipients.

    The domain lists are answered from memory (a dict probe for a domain
    without entries), once per recipient."""

    name = "access"
    # Runs for every recipient (recipient lists); the lookups are set probes.
    scope = Scope.RECIPIENT
    exemptible = False

    def __init__(self, settings: Any, services: Any):
        super().__init__(settings, services)
        s = settings
        self._black = (("client", NetworkSet(s.blacklist_clients), "client_ip"),
                       ("helo", HeloSet(s.blacklist_helos), "helo"),
                       ("sender", AddressSet(s.blacklist_senders), "sender"),
                       ("recipient", AddressSet(s.blacklist_recipients), "recipient"))
        self._white_txn = (("client", NetworkSet(s.whitelist_clients), "client_ip"),
                           ("helo", HeloSet(s.whitelist_helos), "helo"),
                           ("sender", AddressSet(s.whitelist_senders), "sender"))
        self._white_rcpt = AddressSet(s.whitelist_recipients)
        # The stores outlive a reload; the runtime sets them before it
        # builds the engine (policy/runtime.py).
        self._allow = getattr(services, "allowlist", None)

    async def check(self, facts: Facts) -> CheckResult:
        for what, entries, attr in self._black:
            value = getattr(facts, attr)
            # The null sender is matched only by "<>" (AddressSet handles "").
            if entries and (value or what == "sender") and value in entries:
                return CheckResult(reasons=(f"{what} blacklisted",), action=HardAction.REJECT,
                                   template="access", template_vars=(("what", _shown(what, value)),))
        decision = None
        if self._allow is not None:
            # From memory: a dict probe for most domains (db/allowlist.py).
            decision = await self._allow.decide(facts.recipient_domain, facts.sender,
                                                facts.client_ip)
            if decision is not None and decision.kind == BLOCK:
                what = ("client" if is_network(decision.entry) else "sender")
                return CheckResult(
                    reasons=(f"{what} blocked by {facts.recipient_domain} ({decision.entry})",),
                    action=HardAction.REJECT, template="domain_block",
                    template_vars=(("what", _shown(what, facts.client_ip if what == "client"
                                                   else facts.sender)),))
        for what, entries, attr in self._white_txn:
            value = getattr(facts, attr)
            if entries and (value or what == "sender") and value in entries:
                return CheckResult(reasons=(f"{what} whitelisted",), action=HardAction.WHITELIST)
        if decision is not None and not await self._auto_blacklisted(facts):
            what = "client" if is_network(decision.entry) else "sender"
            return CheckResult(
                reasons=(f"{what} allowed for {facts.recipient_domain} ({decision.entry})",),
                action=HardAction.WHITELIST_RECIPIENT, sender_allowed=True)
        if self._white_rcpt and facts.recipient in self._white_rcpt:
            # Whitelisting a recipient must not whitelist the transaction.
            return CheckResult(reasons=("recipient whitelisted",), action=HardAction.WHITELIST_RECIPIENT)
        return MISS

    async def _auto_blacklisted(self, facts: Facts) -> bool:
        """The client is on the shared auto-blacklist (a spam trap or a
        threshold listed it).  Asked only for an allowed sender.  The
        blacklist answers a listing from memory first; when it then has to
        ask a database that fails, the client is taken as not listed (logged):
        the allow list keeps serving while the database is down, as its own
        mirror does (db/allowlist.py), and a listing still in memory wins."""
        store: Optional[Any] = getattr(self.services, "blacklist", None)
        if store is None:
            return False
        try:
            return await store.lookup(facts.client_ip) is not None
        except StateDatabaseError as e:
            log.warn("allow list: auto-blacklist not consulted for {client}: {error}; the "
                     "allowed sender passes", client=facts.client_ip, error=str(e),
                     recipient=facts.recipient, session_id=facts.session_id,
                     queue_id=facts.queue_id)
            return False

def _shown(what: str, value: str) -> str:
    # What the refusal may name: the client's own facts, nothing internal.
    if what == "sender":
        return f"sender <{value}>"
    if what == "recipient":
        return f"recipient <{value}>"
    if what == "helo":
        return f"HELO {value}"
    return f"client {value}"
