"""Top-level pytest configuration: mark everything under tests/realmta as ``realmta``."""
from __future__ import annotations

from pathlib import Path

import pytest

_REALMTA = Path(__file__).parent / "realmta"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _REALMTA in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.realmta)
