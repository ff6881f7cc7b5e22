"""The web console (issue 13): quarantine review and release for
superadmins and per-domain administrators, served by the archive node and
in all-in-one mode.

Composition (docs/design.md floor 3, beside ``release``): thin
``twisted.web`` resources over the archive store (``mppproxy/store/``) and
the same release/forward code the CLI calls (``mppproxy/release.py``).
Modules, one job each:

    service.py   the twisted Service: the store, the listeners, first start
    app.py       the resource: routing, security headers, the handlers
    sessions.py  signed session cookies (HMAC-SHA256, idle and absolute expiry)
    csrf.py      CSRF tokens derived from the session (or the login form)
    throttle.py  login throttling per account name and per client address
    secret.py    the cookie-signing key file, made once per node
    mailview.py  a safe text rendering of a stored message (nothing rendered)
    pages.py     the Jinja2 environment (autoescape on), templates/web/

The rule above all (issue 13): an administrator of some domains never
sees, searches, changes or learns the existence of another domain's
message.  Every store query carries ``Search.domains`` (the SQL WHERE),
and an item outside the scope answers exactly as one that does not exist.
"""
