"""Release and forward held messages from the archive store (issue 12,
"Release done right").

Composition (docs/design.md floor 3): the store (``mppproxy/store/``), the
scan runtime of scan mode (a re-scan with today's engines), and the
project's SMTP client (the re-injection).  ``mppproxy quarantine release``
and ``forward`` call it; the web console will too.

What users of other gateways suffered, and what is done here instead:

* **Two administrators release the same message at once** (Proxmox MG
  bug #6126: delivered twice).  A release first *claims* the row:
  ``held -> releasing`` in one conditional UPDATE (``store.claim_release``),
  which one caller wins; the other hears "already being released".  Only
  the winner sends, and it sets ``released`` (or back to ``held`` when the
  route refused) when the route has answered.
* **A plain resubmit** (MPP): the message went back through the filters
  that held it and was held again, or skipped them all.  Here the message
  is scanned again with the current engines (``[release] rescan``, per
  policy in ``rescan_policies``): a message now refused (a virus whose
  signature arrived after it was held) is not released; a scan that
  cannot run (an engine down) defers the release.  Then it goes to the
  original recipients of its domain through the configured route
  (``[release] routes``, else ``default_route``, else ``[backend]``, else
  the proxy's own listener in all-in-one mode), carrying an
  ``X-MPP-Released`` mark (``archive/released.py``) that an edge on the
  route honours, so it is not held again.
* Every action leaves an audit row: who, from where, what, and the
  route's answer.

The outcome of a release that lost its connection after the message was
sent and before the route answered is unknown: the row goes back to
``held`` with that said in the audit row, and a second release may deliver
a second copy (an SMTP client cannot know; RFC 5321 6.1 accepts duplicates
over losses).
"""
from __future__ import annotations

import enum
import socket
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from twisted.internet.threads import deferToThreadPool

from mppproxy.archive.keys import KeyRing
from mppproxy.archive.released import mark, split_message
from mppproxy.archive.state import BodyDigest
from mppproxy.config.archive import split_host_port
from mppproxy.config.schema import BackendConfig, ProxyConfig
from mppproxy.logsetup import Logger
from mppproxy.results import Disposition
from mppproxy.scanservice.core import ScanRequest, ScanRuntime
from mppproxy.smtp.client import BackendError, BackendProtocol, connect_backend
from mppproxy.smtp.replies import Reply
from mppproxy.store.store import ArchiveStore, ClaimedRow, NotReleasing, StoredRow
from mppproxy.tlsconfig import backend_context

log = Logger()

# Seconds for each step of a re-injection: a release is interactive, so the
# RFC 5321 4.5.3.2 minutes would leave an administrator waiting far too long.
ROUTE_TIMEOUT = 60.0


class Outcome(str, enum.Enum):
    """What a release (or forward) of one row came to."""

    RELEASED = "released"      # the route took it (250)
    FORWARDED = "forwarded"    # a copy went to other recipients
    REFUSED = "refused"        # the re-scan refuses it now; still held
    DEFERRED = "deferred"      # the re-scan or the route failed for now; still held
    FAILED = "failed"          # the route refused it for good (5xx); still held
    BUSY = "busy"              # not held: released, being released, or deleted

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Result:
    row_id: int
    ref: str
    domain: str
    outcome: Outcome
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.row_id, "ref": self.ref, "domain": self.domain,
                "outcome": str(self.outcome), "detail": self.detail}


def route_for(config: ProxyConfig, domain: str) -> tuple[str, int]:
    """Where mail for ``domain`` is re-injected (see the module docstring)."""
    release = config.release
    target = release.routes.get(domain.lower()) or release.routes.get(domain) or release.default_route
    if target:
        host, port = split_host_port(target, 25)
        assert port is not None  # the loader checked it
        return host, port
    if config.backend is not None:
        return config.backend.host, config.backend.port
    return _own_listener(config)


def _own_listener(config: ProxyConfig) -> tuple[str, int]:
    """The proxy's first TCP listener (all-in-one mode): its local delivery
    takes the release, and the mark keeps its verdict from holding it."""
    for desc in config.listen:
        parts = desc.split(":")
        if parts[0] in ("tcp", "tcp6") and len(parts) > 1 and parts[1].isdigit():
            host = "127.0.0.1" if parts[0] == "tcp" else "::1"
            for option in parts[2:]:
                name, _, value = option.partition("=")
                if name == "interface" and value not in ("", "0.0.0.0", "::"):
                    host = value
            return host, int(parts[1])
    raise ValueError("no release route: set [release] default_route (or [backend]); "
                     "the proxy listens on no TCP port to deliver to")


def rescan_wanted(config: ProxyConfig, policy: Optional[str]) -> bool:
    name = policy if policy in config.policies else "default"
    assert name is not None
    if not config.policies[name].scan.enabled:
        return False  # its policy scans nothing: nothing to scan again with
    return config.release.rescan_policies.get(name, config.release.rescan)


class Releaser:
    """Releases and forwards rows of one store, with one configuration.

    ``keys``: the archive keys that sign the ``X-MPP-Released`` mark (None:
    no mark; an edge on the route judges the message as any other)."""

    def __init__(self, config: ProxyConfig, store: ArchiveStore, reactor: Any,
                 keys: Optional[KeyRing], actor: str, origin: str,
                 rescan: Optional[bool] = None, helo_name: Optional[str] = None):
        self.config = config
        self.store = store
        self.reactor = reactor
        self.keys = keys
        self.actor = actor
        self.origin = origin
        self.rescan = rescan
        self.helo_name = helo_name or config.smtp.hostname or socket.getfqdn()
        self._runtime: Optional[ScanRuntime] = None

    def _in_thread(self, f: Any, *args: Any) -> Any:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def close(self) -> None:
        if self._runtime is not None:
            self._runtime.stop()
            self._runtime = None

    # -- release ---------------------------------------------------------------

    async def release(self, row: StoredRow) -> Result:
        """Release ``row`` to its recipients, exactly once (see the module
        docstring)."""
        if row.disposition != str(Disposition.QUARANTINE):
            # An archive copy of mail that was delivered: releasing it would
            # deliver it a second time.  forward sends a copy on purpose.
            return self._result(row, Outcome.BUSY, "not held mail: an archive copy of a "
                                                   f"message whose disposition was "
                                                   f"{row.disposition} (use forward)")
        claimed: Optional[ClaimedRow] = await self._in_thread(
            self.store.claim_release, row.id, self.actor, self.origin)
        if claimed is None:
            current = await self._in_thread(self.store.get, row.id)
            status = current.status if current is not None else "gone"
            return self._result(row, Outcome.BUSY, f"not held (status {status})")
        ok, outcome, detail = False, Outcome.DEFERRED, "release interrupted"
        try:
            outcome, detail = await self._release_claimed(claimed)
            ok = outcome is Outcome.RELEASED
        finally:
            try:
                await self._in_thread(self.store.finish_release, claimed.id, self.actor,
                                      self.origin, ok, f"{outcome}: {detail}",
                                      claimed.claim_id)
            except NotReleasing as e:
                # A stuck-release reset took the claim back while this ran
                # (reset_stuck_releases): the row's state is the newer
                # claim's now, and this outcome must not overwrite it.
                log.error("release of {ref} ({domain}) by {actor} ended ({outcome}: {detail}) "
                          "after its claim was reset: {error}; the row was left as the "
                          "newer claim has it", ref=row.queue_id, domain=row.rcpt_domain,
                          actor=self.actor, outcome=str(outcome), detail=detail,
                          error=str(e), queue_id=row.queue_id)
                detail = f"{detail} (its claim was reset meanwhile: not recorded)"
        log.info("release of {ref} ({domain}) by {actor}: {outcome}: {detail}",
                 ref=row.queue_id, domain=row.rcpt_domain, actor=self.actor,
                 outcome=str(outcome), detail=detail, queue_id=row.queue_id)
        return self._result(row, outcome, detail)

    async def _release_claimed(self, row: StoredRow) -> tuple[Outcome, str]:
        raw: bytes = await self._in_thread(self.store.raw, row)
        state: dict[str, Any] = await self._in_thread(self.store.state, row)
        refusal = await self._rescan(row, raw, state)
        if refusal is not None:
            return refusal
        header, body = split_message(raw)
        if self.keys is not None:
            header = mark(row.queue_id, time.time(), BodyDigest.of((body,)), self.keys) + header
        return await self._send(row.sender, row.recipients, header + body, row.rcpt_domain,
                                bool(state.get("smtputf8")), Outcome.RELEASED)

    async def _rescan(self, row: StoredRow, raw: bytes,
                      state: dict[str, Any]) -> Optional[tuple[Outcome, str]]:
        policy = state.get("policy")
        wanted = self.rescan if self.rescan is not None else rescan_wanted(
            self.config, policy if isinstance(policy, str) else None)
        if not wanted:
            return None
        if self._runtime is None:
            self._runtime = ScanRuntime(self.config, self.reactor)
        name = policy if isinstance(policy, str) and policy in self.config.policies else ""
        request = ScanRequest.of_bytes(
            raw, client_ip=str(state.get("client") or ""), helo=str(state.get("helo") or ""),
            sender=row.sender, recipients=tuple(row.recipients), policy=name,
            queue_id=row.queue_id, smtputf8=bool(state.get("smtputf8")))
        outcome = await self._runtime.scan(request)
        action = outcome.action
        why = "; ".join(outcome.verdict.reasons) or f"score {outcome.verdict.score:g}"
        if action is Disposition.REJECT or action is Disposition.DELETE:
            # DELETE: a virus under virus_action "delete" -- never released.
            return Outcome.REFUSED, f"the re-scan refuses it now: {why}"
        if action is Disposition.TEMPFAIL:
            return Outcome.DEFERRED, f"the re-scan could not run: {why}"
        return None

    # -- forward ---------------------------------------------------------------

    async def forward(self, row: StoredRow, recipients: Sequence[str]) -> Result:
        """A copy of ``row`` to ``recipients`` (an administrator, a help
        desk), without the mark: the copy is judged on its way as any
        message; the row stays as it is."""
        raw: bytes = await self._in_thread(self.store.raw, row)
        state: dict[str, Any] = await self._in_thread(self.store.state, row)
        domain = recipients[0].rpartition("@")[2] if recipients else row.rcpt_domain
        outcome, detail = await self._send(row.sender, tuple(recipients), raw, domain,
                                           bool(state.get("smtputf8")), Outcome.FORWARDED)
        await self._in_thread(self.store.audit, self.actor, self.origin, "forward", row,
                              f"to {', '.join(recipients)}: {outcome}: {detail}")
        return self._result(row, outcome, detail)

    # -- the route -------------------------------------------------------------

    async def _send(self, sender: str, recipients: Sequence[str], data: bytes, domain: str,
                    smtputf8: bool, success: Outcome) -> tuple[Outcome, str]:
        try:
            host, port = route_for(self.config, domain)
        except ValueError as e:
            return Outcome.DEFERRED, str(e)
        backend = BackendConfig(
            host=host, port=port, tls="opportunistic", connect_timeout=ROUTE_TIMEOUT,
            greeting_timeout=ROUTE_TIMEOUT, mail_timeout=ROUTE_TIMEOUT,
            rcpt_timeout=ROUTE_TIMEOUT, data_init_timeout=ROUTE_TIMEOUT,
            data_block_timeout=ROUTE_TIMEOUT, data_done_timeout=ROUTE_TIMEOUT)
        where = f"{host}:{port}"
        try:
            proto = await connect_backend(self.reactor, backend, self.helo_name,
                                          backend_context(backend))
        except BackendError as e:
            return Outcome.DEFERRED, f"route {where}: {e.detail}"
        try:
            return await self._transaction(proto, backend, sender, recipients, data, smtputf8,
                                           where, success)
        except BackendError as e:
            return Outcome.DEFERRED, f"route {where}: {e.detail} (the outcome is unknown " \
                                     "if the message was already sent)"
        finally:
            proto.close()

    async def _transaction(self, proto: BackendProtocol, backend: BackendConfig, sender: str,
                           recipients: Sequence[str], data: bytes, smtputf8: bool, where: str,
                           success: Outcome) -> tuple[Outcome, str]:
        params = ""
        if smtputf8 and "SMTPUTF8" in proto.extensions:
            params += " SMTPUTF8"  # RFC 6531 3.4
        if "8BITMIME" in proto.extensions and any(b > 127 for b in data):
            params += " BODY=8BITMIME"  # RFC 6152 2
        reply = await proto.command(f"MAIL FROM:<{sender}>{params}".encode("utf-8"),
                                    backend.mail_timeout)
        if reply.code != 250:
            return _refused(reply, where, "MAIL")
        accepted: list[tuple[str, Reply]] = []
        refused: list[tuple[str, Reply]] = []
        for rcpt in recipients:
            reply = await proto.command(f"RCPT TO:<{rcpt}>".encode("utf-8"), backend.rcpt_timeout)
            (accepted if reply.code in (250, 251) else refused).append((rcpt, reply))
        if not accepted:
            return _refused(refused[-1][1], where, "every RCPT") if refused else (
                Outcome.FAILED, "no recipients")
        # Lines end in CRLF in the store (the edge's copy); send as they are.
        reply, sent = await proto.send_message(iter((data,)), backend)
        if reply.code != 250:
            return _refused(reply, where, "DATA" if not sent else "the message")
        detail = f"route {where} said {reply.code} {reply.text.splitlines()[0] if reply.text else ''}"
        if refused:
            detail += "; refused: " + ", ".join(f"{r} ({rep.code})" for r, rep in refused)
        return success, detail.strip()

    def _result(self, row: StoredRow, outcome: Outcome, detail: str) -> Result:
        return Result(row.id, row.queue_id, row.rcpt_domain, outcome, detail)


def _refused(reply: Reply, where: str, what: str) -> tuple[Outcome, str]:
    first = reply.text.splitlines()[0] if reply.text else ""
    outcome = Outcome.DEFERRED if reply.is_transient else Outcome.FAILED
    return outcome, f"route {where} refused {what}: {reply.code} {first}".strip()
