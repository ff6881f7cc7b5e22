"""``mppproxy replay`` with a live clamd (issue 14): an EICAR attachment in
a corpus is found by the real engine and the message rejected, a clean
one relayed; clamd from ``scripts/services/start-clamd.sh`` as in
test_scanners_real.py (fails, not skips, under MPP_REQUIRE_SERVICES=1)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import REPO
from .test_scanners_real import HAM, Engine, clamd_engine, eicar_attachment

__all__ = ["clamd_engine"]  # the session fixture, used here by name

TRACE = (b"Return-Path: <alice@example.org>\r\nDelivered-To: bob@example.com\r\n")


def test_eicar_rejected_by_live_clamd(tmp_path: Path, clamd_engine: Engine) -> None:
    """The replay asks the live clamd: EICAR is rejected by scan:clamd, the ham relayed."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "eicar.eml").write_bytes(TRACE + eicar_attachment())
    (corpus / "ham.eml").write_bytes(TRACE + HAM)
    config = tmp_path / "replay.toml"
    config.write_text(f"""
relay_domains = ["example.com"]
[scanners.clamd]
address = "{clamd_engine.address}"
[policies.default.scan]
enabled = true
[policies.default.scan.attachments]
enabled = false
[policies.default.scan.engines.clamd]
""")
    r = subprocess.run([sys.executable, "-m", "mppproxy", "replay", "--config", str(config),
                        "--no-dns", "--all", "--json", "-", str(corpus)],
                       capture_output=True, text=True, timeout=120, check=False,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr
    rows = {Path(m["path"]).name: m for m in json.loads(r.stdout)["messages"]}
    eicar = rows["eicar.eml"]["new"]
    assert (eicar["disposition"], eicar["decided_by"]) == ("reject", "scan:clamd")
    assert "EICAR" in eicar["reasons"][0].upper()
    assert eicar["engines"] == {"clamd": "live"}
    ham = rows["ham.eml"]["new"]
    assert ham["disposition"] == "relay" and ham["engines"] == {"clamd": "live"}
