"""mppproxy: a transparent, lockstep SMTP filtering proxy on Twisted."""

__version__ = "0.1.0"
