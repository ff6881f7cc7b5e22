"""The archive wing (issue 12): what travels with a held or archived copy.

``state.py`` (the transaction's authenticated state in ``X-MPP-*`` header
fields) and ``keys.py`` (the key file that signs and verifies it); at the
edge ``copies.py`` (held messages and archive copies into the durable
queue), ``forwarder.py`` (the queue to the archive node over ESMTP) and
``released.py`` (the mark of a released message); on the archive node
``receiver.py`` (verified copies into its queue) and ``writer.py`` (a queue
into the store, also the edge's own in all-in-one mode).  Releasing is
``mppproxy/release.py``; the store, its writer and purge together are
``mppproxy/archivenode/keeper.py``.
"""
