"""``python -m mppproxy check-config FILE`` / ``scan FILE``: the same as the ``mppproxy`` command."""
import sys

from mppproxy.cli import main

sys.exit(main())
