"""``mppproxy``: command-line tools beside the twistd plugin.

``mppproxy check-config FILE`` validates a configuration and prints each
problem as ``file: key.path: what is wrong``; the exit status is 0 when it
is valid and 1 when not, so it fits in a deploy script before a reload.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from mppproxy.config.load import ConfigError, check_files, load


def _check_config(args: argparse.Namespace) -> int:
    if not args.file and not args.config_command:
        print("mppproxy check-config: give a FILE or --config-command", file=sys.stderr)
        return 2
    try:
        config = load(args.file, args.config_command)
        check_files(config)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        print(f"{len(e.errors)} error(s); the configuration is not valid", file=sys.stderr)
        return 1
    source = args.file or f"config command {args.config_command!r}"
    target = (f"relay to {config.backend.host}:{config.backend.port}" if config.backend
              else "local Maildir delivery")
    print(f"{source}: OK (mode {config.mode}, listen {', '.join(config.listen)}, {target})")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mppproxy", description="mppproxy tools")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file", nargs="?", help="TOML configuration file")
    check.add_argument("--config-command", help="command whose output is the configuration")
    check.set_defaults(func=_check_config)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
