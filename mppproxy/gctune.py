"""The cyclic garbage collector, set for a long-running server.

CPython's defaults (a young collection every 700 net container
allocations, an older one every 10 of those) suit short scripts.  Every
request of ours that waits (a database or DNS answer) leaves reference
cycles behind: Deferreds, coroutines, Failures.  Meanwhile the process
holds large long-lived structures: the modules, the compiled templates,
the policy engine, and caches of tens of thousands of entries (greylist
triplets, the auto-blacklist mirror, DNS answers).  With the defaults the
collector ran every few requests, and its older generations walked those
structures again and again.  The policy server spent about a third of its
reactor-thread time per database-bound request there
(``benchmarks/policyd_inproc.py``: 128 µs per request before, 67 after).

Two settings, applied once the reactor runs (start-up is over):

* ``gc.freeze()``: everything start-up built moves to the permanent
  generation and is never scanned again.  Reference counting still frees
  it when it is dropped; only a cycle among frozen objects would outlive
  its use (a reload builds a new engine, and the old one is freed by
  reference counting);
* a young generation of ``YOUNG_THRESHOLD`` allocations: collections are
  rarer, and each still looks only at recent objects.  The memory held
  meanwhile is at most that many small objects (a few MB).

Reference cycles are still collected: later, in fewer passes.
"""
from __future__ import annotations

import gc

# Net container allocations between two young collections (default 700).
YOUNG_THRESHOLD = 10_000
# Young collections per middle one, middle per old one (defaults 10, 10):
# the old generation (every cache entry) is walked about 10x less often.
OLDER_THRESHOLD = 20


def tune_for_server() -> None:
    """Freeze what start-up built and space the collections out."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, OLDER_THRESHOLD, OLDER_THRESHOLD)
