"""``mppproxy --version`` and ``mppproxy show-config`` (issue 16, the
administrator's CLI): the effective configuration, secrets masked, in lines
that read back as the same configuration."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import mppproxy
from mppproxy.cli import main
from mppproxy.config.load import from_mapping, load
from mppproxy.config.show import MASK, config_tree, is_secret_key, mask_url_password, toml_lines

ROOT = Path(__file__).resolve().parent.parent

RICH = """
mode = "edge"
listen = ["tcp:2525:interface=127.0.0.1", "tcp6:2526:interface=\\\\:\\\\:1"]
relay_domains = ["example.com", "example.org"]
[backend]
host = "mx.internal"
port = 2525
xforward = true
[limits]
max_connections = 200
[database]
url = "mysql+pymysql://mpp:S3cret!pw@db.internal:3306/mpp"
cache_seconds = 12.5
[scanners.clamd]
[scanners.rspamd]
url = "http://127.0.0.1:11333"
password = "rspamd-controller-pw"
[[scanners.command]]
name = "avscan"
command = ["/usr/bin/avscan", "{file}"]
infected_exit_codes = [1, 3]
[store]
url = "mysql+pymysql://archive:Arch1ve@db.internal/archive"
retention_domains = { "example.com" = 30 }
[release]
routes = { "example.org" = "mx2.internal:25" }
[policies.default.greylisting]
enabled = true
delay = 60.0
[policies.default.scan.engines.clamd]
[policies.default.scan.engines.rspamd]
weight = 2.0
[policies.strict]
domains = ["example.org"]
[policies.strict.greylisting]
delay = 600.0
[[policies.strict.dnsbl.lists]]
zone = "zen.spamhaus.example"
score = 5.0
[policies.copy]
domains = ["copy.example.com"]
"""


def _config(tmp_path: Path, text: str = RICH) -> Path:
    path = tmp_path / "mpp.toml"
    path.write_text(f'data_dir = "{tmp_path / "data"}"\n' + text)
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version_names_package_python_and_twisted(capsys):
    """``mppproxy --version`` prints the package version with Python's and Twisted's and exits 0."""
    import platform

    import twisted

    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == (f"mppproxy {mppproxy.__version__} (Python {platform.python_version()}, "
                   f"Twisted {twisted.__version__})")


def test_version_agrees_with_pyproject():
    """The version the package reports is the one pyproject.toml builds."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == mppproxy.__version__


def test_twistd_plugin_version():
    """``twistd mppproxy --version`` prints mppproxy's version line (not Twisted's alone) and exits 0."""
    proc = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "mppproxy",
         "--version"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"mppproxy {mppproxy.__version__} (Python ")


def test_defaults_show_nothing(capsys, monkeypatch):
    """With no configuration, show-config prints only its header: nothing differs from the defaults."""
    monkeypatch.delenv("MPP_HOME", raising=False)
    code, out, _ = _run(capsys, "show-config")
    assert code == 0
    assert out.splitlines() == ["# <defaults>: keys that differ from their defaults; secrets masked"]


def test_only_changed_keys_are_shown(tmp_path, capsys):
    """Keys set to their default value are left out; changed ones appear as dotted TOML keys."""
    path = _config(tmp_path, "[limits]\nmax_connections = 1000\nmax_recipients = 10\n")
    code, out, _ = _run(capsys, "show-config", str(path))
    assert code == 0
    lines = out.splitlines()[1:]
    assert "limits.max_recipients = 10" in lines
    assert not any(line.startswith("limits.max_connections") for line in lines)
    assert f'data_dir = "{tmp_path / "data"}"' in lines


def test_all_fills_in_defaults(tmp_path, capsys):
    """--all shows every key, defaults included, and unset optional sections as comments."""
    path = _config(tmp_path, "")
    code, out, _ = _run(capsys, "show-config", "--all", str(path))
    assert code == 0
    lines = out.splitlines()
    assert "limits.max_connections = 1000" in lines
    assert "database.cache_seconds = 30.0" in lines
    assert "# backend: not set" in lines
    assert "policies.default.greylisting.enabled = false" in lines


def test_secrets_masked(tmp_path, capsys):
    """URL passwords and secret-named keys are masked in text and JSON; file paths are shown."""
    path = _config(tmp_path, RICH + '[tls]\ncert_file = "/etc/mpp/cert.pem"\nkey_file = "/etc/mpp/key.pem"\n')
    for argv in (["show-config", str(path)], ["show-config", "--all", str(path)],
                 ["show-config", "--json", str(path)], ["show-config", "--all", "--json", str(path)]):
        code, out, _ = _run(capsys, *argv)
        assert code == 0
        for secret in ("S3cret!pw", "rspamd-controller-pw", "Arch1ve"):
            assert secret not in out, (argv, secret)
        assert "/etc/mpp/key.pem" in out
    code, out, _ = _run(capsys, "show-config", str(path))
    assert f'database.url = "mysql+pymysql://mpp:{MASK}@db.internal:3306/mpp"' in out
    assert f'scanners.rspamd.password = "{MASK}"' in out


def test_masking_rule():
    """The rule: secret-named keys and URL passwords; paths and ordinary keys are not secrets."""
    for name in ("password", "db_password", "api_token", "shared_secret", "key", "hmac_key"):
        assert is_secret_key(name), name
    for name in ("key_file", "tls_key_file", "keys_dir", "url", "max_size", "monkey_count"):
        assert not is_secret_key(name), name
    assert mask_url_password("mysql://u:p@h/db") == f"mysql://u:{MASK}@h/db"
    assert mask_url_password("redis://:p@h") == f"redis://:{MASK}@h"
    assert mask_url_password("mysql://u@h/db") == "mysql://u@h/db"
    assert mask_url_password("http://127.0.0.1:11333") == "http://127.0.0.1:11333"


@pytest.mark.parametrize("all_keys", [False, True])
def test_lines_read_back_as_the_same_configuration(tmp_path, all_keys):
    """The TOML lines, read back by the loader, give the configuration they came from (no secrets set)."""
    text = RICH.replace("S3cret!pw", "").replace(":@", "@").replace("Arch1ve", "") \
        .replace('password = "rspamd-controller-pw"\n', "").replace("archive:@", "archive@")
    config = load(str(_config(tmp_path, text)))
    lines = toml_lines(config_tree(config, all_keys=all_keys))
    again = from_mapping(tomllib.loads("\n".join(lines)), "<show-config>")
    assert again == config


def test_named_policy_shows_domains_and_its_own_changes(tmp_path):
    """A named policy shows its domains and what differs from the default policy, not what it inherits."""
    config = load(str(_config(tmp_path)))
    lines = toml_lines(config_tree(config))
    assert "policies.default.greylisting.delay = 60.0" in lines
    assert "policies.strict.greylisting.delay = 600.0" in lines
    assert not any(line.startswith("policies.strict.greylisting.enabled") for line in lines)
    assert 'policies.copy.domains = ["copy.example.com"]' in lines
    assert [line for line in lines if line.startswith("policies.copy.")] == \
        ['policies.copy.domains = ["copy.example.com"]']
    assert "scanners.clamd = {}" in lines
    assert "policies.default.scan.engines.clamd = {}" in lines
    assert 'store.retention_domains."example.com" = 30' in lines
    assert any(line.startswith("scanners.command = [{") for line in lines)


def test_json_is_nested_and_masked(tmp_path, capsys):
    """--json prints one JSON object of the same keys, nested by section."""
    path = _config(tmp_path)
    code, out, _ = _run(capsys, "show-config", "--json", str(path))
    assert code == 0
    data = json.loads(out)
    assert data["limits"] == {"max_connections": 200}
    assert data["backend"]["host"] == "mx.internal"
    assert data["scanners"]["rspamd"]["password"] == MASK
    full = json.loads(_run(capsys, "show-config", "--all", "--json", str(path))[1])
    assert full["limits"]["max_recipients"] == 100
    assert full["scanners"]["spamd"] is None


def test_config_command(tmp_path, capsys):
    """--config-command reads the configuration from a command's output, as check-config does."""
    path = _config(tmp_path, "workers = 2\n")
    code, out, _ = _run(capsys, "show-config", "--config-command", f"cat {path}")
    assert code == 0
    assert "workers = 2" in out.splitlines()
    assert out.startswith(f"# config command 'cat {path}'")


def test_bad_config_names_the_key_and_exits_1(tmp_path, capsys):
    """A configuration with errors prints check-config's messages, each naming the key, and exits 1."""
    path = _config(tmp_path, "[limits]\nmax_conections = 5\nmax_recipients = 0\n")
    code, out, err = _run(capsys, "show-config", str(path))
    assert code == 1
    assert out == ""
    assert f"{path}: limits.max_conections: unknown key (did you mean limits.max_connections?)" in err
    assert f"{path}: limits.max_recipients: must be at least 1, not 0" in err
    code_check, _, err_check = _run(capsys, "check-config", str(path))
    assert code_check == 1 and err_check == err


def test_file_and_command_together_is_a_usage_error(tmp_path, capsys):
    """A FILE and --config-command together are refused with exit 2."""
    path = _config(tmp_path, "")
    code, _, err = _run(capsys, "show-config", str(path), "--config-command", "true")
    assert code == 2
    assert "not both" in err
