"""Message authentication after DATA: DKIM (RFC 6376, RFC 8463), DMARC
(RFC 7489) and the organisational domain from the Public Suffix List; the
scanner that joins them is ``scan/scanners/authentication.py``."""
