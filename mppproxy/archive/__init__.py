"""The archive wing (issue 12): what travels with a held or archived copy.

Built so far: ``state.py`` (the transaction's authenticated state in
``X-MPP-*`` header fields) and ``keys.py`` (the key file that signs and
verifies it).  The forwarder at the edge and the archive node that receives,
queues and stores copies are not built yet.
"""
