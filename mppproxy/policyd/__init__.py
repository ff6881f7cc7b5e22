"""The Postfix policy-delegation server (``--mode policy``): Postfix asks
``check_policy_service`` questions over a socket and the pre-DATA policy
engine answers them (SMTPD_POLICY_README, access(5))."""
