"""twistd plugin: ``twistd -n mppproxy``.  No __init__.py in twisted/ or
twisted/plugins/ on purpose (Twisted docs/core/howto/tap.rst)."""
from twisted.application.service import ServiceMaker

mppproxy = ServiceMaker(
    "mppproxy", "mppproxy.tap", "Transparent SMTP filtering proxy (lockstep relay)", "mppproxy")
