"""Scanning as a service (``--mode scan``, ``mppproxy scan FILE``): a
message in over SMTP, HTTP or a file, the verdict out; nothing relayed."""
