"""Log observers: the optional JSON-lines file beside twistd's own log."""
from __future__ import annotations

import io
from typing import Any

from twisted.logger import globalLogPublisher, jsonFileLogObserver

_started: list[Any] = []


def start_json_log(config: Any) -> None:
    path = config.logging.json_file
    if not path or _started:
        return
    f = io.open(path, "a", encoding="utf-8")
    # One JSON object per line, without Twisted's default RFC 7464 record
    # separator, so `json.loads(line)` and common log shippers read it.
    observer = jsonFileLogObserver(f, recordSeparator="")
    globalLogPublisher.addObserver(observer)
    _started.append(observer)
