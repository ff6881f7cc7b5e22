"""The DNS client shared by the DNS lists and SPF (docs/design.md, "Floors": a leaf).

``resolver.py`` asks and caches, ``names.py`` builds query names,
``nameservers.py`` finds whom to ask.  Nothing here knows a policy.
"""
