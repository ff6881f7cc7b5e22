"""``--mode archive``: the central archive node (issue 12, "Archive node").

Composition (docs/design.md, "Floors"): ``service.py`` puts the receiver
(``archive/receiver.py``), the node's durable queue (``spool/queue.py``),
the writer (``archive/writer.py``) and the store (``store/``) together.
"""
