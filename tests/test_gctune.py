"""gctune: the collector settings a running server takes."""
from __future__ import annotations

import gc
import weakref

import pytest

from mppproxy import gctune


@pytest.fixture
def restore_gc():
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_tune_for_server_freezes_start_up_and_spaces_collections(restore_gc):
    """tune_for_server sets the collector's thresholds and freezes the objects that exist at
    start-up out of its scans."""
    gctune.tune_for_server()
    assert gc.get_threshold() == (gctune.YOUNG_THRESHOLD, gctune.OLDER_THRESHOLD,
                                  gctune.OLDER_THRESHOLD)
    # What existed before is in the permanent generation, not scanned.
    assert gc.get_freeze_count() > 1000


def test_cycles_are_still_collected(restore_gc):
    """After tuning, a reference cycle is still freed by a collection."""
    gctune.tune_for_server()

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None

