"""The actions: what is done with a message once the verdict is in
(docs/design.md, "The stages of one session": relay, refuse, hold, tag,
discard, deliver locally).

One small module each: ``refuse``, ``quarantine`` (hold), ``deliver``
(local Maildir), ``rewrite`` (Subject prefix of tagged mail, disclaimer),
``discard``, ``delete`` (a virus accepted and dropped, with ``notice``'s
notices to recipients and administrators).  The edge (``mppproxy/edge/``) picks the action from the
``Disposition`` of the verdict (``mppproxy/results.py``); each action
carries it out and gives the reply the client hears.  The actions that end
a transaction write its one log event (``txlog.py``; promise 5).

Relaying has no module here: it is ``relay/lockstep.py``'s
``LockstepRelay.data``, awaited by the edge directly -- a wrapper would cost
a coroutine per message on the hottest path and add nothing.
"""
