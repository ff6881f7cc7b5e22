"""Tests against real services (Postfix backend, ...): must fail, not skip, in CI."""
