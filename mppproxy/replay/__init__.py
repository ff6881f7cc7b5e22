"""``mppproxy replay``: a mail corpus judged offline by a configuration
(issue 14, "Replay a corpus against a configuration").

Composition floor (docs/design.md, "Floors"): it puts together the same
stages the edge chains for a live session -- relay control, the pre-DATA
policy engine, the post-DATA scan step and the verdict -- without a
listener, a backend, a spool queue or the state database, so nothing live
is touched.  docs/replay.md says how to use it to tune rules.

* ``corpus``   reads Maildirs, mboxes, ``.eml`` folders and single files;
* ``envelope`` finds each message's envelope (X-MPP state, then the trace
  fields, then the command line) and the state it was judged with;
* ``scratch``  the in-memory stand-ins for the state database;
* ``judge``    the whole decision for one message and one configuration;
* ``report``   the table, the totals and the JSON report.
"""
