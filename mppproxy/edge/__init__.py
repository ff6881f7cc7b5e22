"""The edge: what the session state machine asks at each SMTP phase
(docs/design.md, "The stages of one session").

``context.py`` builds what every session of one configuration shares;
``handler.py`` is the session handler: relay control, the pre-DATA policy,
then, after DATA, the verdict and the action (``mppproxy/actions/``).
"""
