"""Prometheus metrics of a node (issue 16): ``[metrics]``, served by the
main process on loopback.

Composition floor (docs/design.md, "Floors").  ``service.py`` is the
entry (``NodeMetrics``, ``for_proxy``); ``registry.py`` the metric objects
and the shared files of the multiprocess mode; ``hooks.py`` what the hot
path adds; ``state.py`` the gauges each process writes periodically;
``node.py`` the node-wide figures of the main process.  The names and
labels are listed in docs/operations.md.
"""
