"""Pre-DATA policy: the checks run on connect, HELO, MAIL and RCPT."""
