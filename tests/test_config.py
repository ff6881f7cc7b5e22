"""Configuration: TOML into frozen dataclasses, every error named with its key."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from mppproxy.cli import main as cli_main
from mppproxy.config.errors import ConfigError
from mppproxy.config.load import from_mapping, load
from mppproxy.config.schema import ProxyConfig
from mppproxy.tap import Options, parse_host_port

ROOT = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def _errors(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_mapping(data, "test.toml")
    return info.value.errors


def test_defaults_need_no_file():
    """With no file the all-in-one default listens on 127.0.0.1:2525 and trusts loopback."""
    config = load()
    assert config.mode == "all-in-one"
    assert config.listen == ("tcp:2525:interface=127.0.0.1",)
    assert config.backend is None
    assert config.trusted_networks == ("127.0.0.0/8", "::1/128")


def test_every_error_names_file_and_key():
    """All problems are reported at once, each as 'file: key.path: what is wrong'."""
    errors = _errors({
        "mode": "edgy", "listen": ["tcp:abc"], "relay_domain": ["x"],
        "backend": {"port": 99999, "tls": "maybe"},
        "limits": {"max_recipients": "many"},
    })
    text = "\n".join(errors)
    for key in ("mode", "listen", "relay_domain", "backend.host", "backend.port", "backend.tls",
                "limits.max_recipients"):
        assert f"test.toml: {key}:" in text, key
    assert len(errors) == 7


def test_unknown_key_suggests_the_right_one():
    """A misspelt key is an error that suggests the key that exists."""
    (error,) = _errors({"relay_domain": ["example.com"]})
    assert "unknown key" in error and "relay_domains" in error


@pytest.mark.parametrize("data, key", [
    ({"trusted_networks": ["10.0.0.0/33"]}, "trusted_networks"),
    ({"workers": 0}, "workers"),
    ({"limits": {"max_recipients": 0}}, "limits.max_recipients"),
    ({"limits": {"max_command_line": 100}}, "limits.max_command_line"),
    ({"smtp": {"bare_newline": "fix"}}, "smtp.bare_newline"),
    ({"tls": {"enabled": "yes"}}, "tls.enabled"),
    ({"timeouts": {"command": -1}}, "timeouts.command"),
    ({"listen": []}, "listen"),
    ({"mode": "archive"}, "archive_node.key_file"),
    ({"policyd": {"default_action": "OK"}}, "policyd.default_action"),
    ({"policyd": {"listen": ["tcp:notaport"]}}, "policyd.listen"),
    ({"policyd": {"max_line": 80}}, "policyd.max_line"),
    ({"smtp": "x"}, "smtp"),
    ({"relay_domains": ["a@b"]}, "relay_domains"),
])
def test_bad_values_are_refused(data, key):
    """Each bad value is refused with its key named."""
    errors = _errors(data)
    assert any(e.startswith(f"test.toml: {key}:") for e in errors), errors


def test_overrides_win_over_the_file(tmp_path):
    """Command-line overrides replace the file's values, table by table."""
    f = tmp_path / "c.toml"
    f.write_text('relay_domains = ["a.example"]\n[backend]\nhost = "10.0.0.1"\nport = 25\nxforward = true\n')
    config = load(str(f), overrides={"relay_domains": ["b.example"], "backend": {"port": 10025}})
    assert config.relay_domains == ("b.example",)
    assert config.backend is not None
    assert (config.backend.host, config.backend.port, config.backend.xforward) == ("10.0.0.1", 10025, True)


def test_bad_toml_is_one_clear_error(tmp_path):
    """A file that is not TOML gives one error naming the file."""
    f = tmp_path / "c.toml"
    f.write_text("mode = \n")
    with pytest.raises(ConfigError) as info:
        load(str(f))
    assert info.value.errors[0].startswith(f"{f}: not valid TOML")


def test_config_command_output_is_the_config():
    """--config-command runs a command and parses its standard output."""
    config = load(command="printf 'relay_domains = [\"cmd.example\"]'")
    assert config.relay_domains == ("cmd.example",)


def test_failing_config_command_is_an_error():
    """A command that fails is a config error with its status, not a crash."""
    with pytest.raises(ConfigError) as info:
        load(command="sh -c 'echo broken >&2; exit 3'")
    assert "exited with status 3" in info.value.errors[0] and "broken" in info.value.errors[0]


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:10025", {"host": "127.0.0.1", "port": 10025}),
    ("[::1]:2525", {"host": "::1", "port": 2525}),
    ("mx.example.com", {"host": "mx.example.com"}),
])
def test_backend_option(value, expected):
    """--backend takes HOST:PORT, [v6]:PORT or a bare host."""
    assert parse_host_port(value) == expected


def test_options_build_the_config(tmp_path):
    """twistd options in the style of `twistd web` need no config file."""
    opts = Options()
    opts.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--listen", "tcp6:0:interface=\\:\\:1",
                       "--backend", "127.0.0.1:10025", "--relay-domain", "example.com",
                       "--trusted-network", "192.0.2.0/24", "--data-dir", str(tmp_path)])
    c = opts.config
    assert len(c.listen) == 2 and c.backend.port == 10025
    assert c.relay_domains == ("example.com",) and c.trusted_networks == ("192.0.2.0/24",)
    assert c.data_dir == str(tmp_path)


def test_mpp_home_sets_the_data_dir(monkeypatch, tmp_path):
    """$MPP_HOME replaces the default data directory."""
    monkeypatch.setenv("MPP_HOME", str(tmp_path))
    opts = Options()
    opts.parseOptions([])
    assert opts.config.data_dir == str(tmp_path)


def test_check_config_cli(tmp_path, capsys):
    """`mppproxy check-config` exits 0 for a good file and 1 with each error for a bad one."""
    good = tmp_path / "good.toml"
    good.write_text('[backend]\nhost = "127.0.0.1"\nport = 10025\n')
    assert cli_main(["check-config", str(good)]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text('[limits]\nmax_errors = "x"\n')
    assert cli_main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: limits.max_errors: must be a whole number" in err


def test_twistd_refuses_a_bad_config_without_traceback(tmp_path):
    """twistd exits non-zero with the key and the file named, and no traceback."""
    bad = tmp_path / "bad.toml"
    bad.write_text('listen = ["nonsense:1"]\n')
    proc = subprocess.run(TWISTD + ["-n", "--pidfile=", "mppproxy", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode != 0
    assert f"{bad}: listen:" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def _keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            # named tables such as [policies.NAME]
            out += _keys(typing.get_args(tp)[1], prefix + f.name + ".<name>.")
            continue
        if typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            # arrays of tables such as [[policies.NAME.dnsbl.lists]]: the
            # array and each key of its tables
            out.append(prefix + f.name)
            out += _keys(typing.get_args(tp)[0], prefix + f.name + "[].")
            continue
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp) or inner:
            out += _keys(inner[0] if inner else tp, prefix + f.name + ".")
        else:
            out.append(prefix + f.name)
    return out


def test_every_key_is_documented():
    """docs/configuration.md lists every configuration key in the schema."""
    doc = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_.<>\[\]]+)` \|", doc, re.M))
    keys = set(_keys(ProxyConfig))
    assert keys - documented == set(), "undocumented keys"
    assert documented - keys - set(_containers(ProxyConfig)) == set(), \
        "documented keys that do not exist"


def _containers(cls: type, prefix: str = "") -> list[str]:
    """Tables that may be documented as a whole too: optional tables
    ([scanners.clamd]) and named tables ([policies.NAME.scan.engines.X])."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = typing.get_args(tp)
        if typing.get_origin(tp) is dict:
            out.append(prefix + f.name)
            if dataclasses.is_dataclass(args[1]):
                out += _containers(args[1], prefix + f.name + ".<name>.")
        elif dataclasses.is_dataclass(tp):
            out += _containers(tp, prefix + f.name + ".")
        elif any(dataclasses.is_dataclass(a) for a in args):
            inner = next(a for a in args if dataclasses.is_dataclass(a))
            if typing.get_origin(tp) is not tuple:
                out.append(prefix + f.name)
                out += _containers(inner, prefix + f.name + ".")
    return out


@pytest.mark.parametrize("data, key", [
    ({"backend": {"host": ""}}, "backend.host"),
    ({"mode": "edge"}, "backend"),
    ({"relay_domains": ["*.example.com"]}, "relay_domains"),
    ({"tls": {"key_file": "/x.key"}}, "tls.key_file"),
])
def test_rules_across_keys(data, key):
    """Settings that only make sense together are checked together."""
    errors = _errors(data)
    assert any(e.startswith(f"test.toml: {key}:") for e in errors), errors


def test_backend_option_without_host_is_an_error():
    """--backend :2850 names no host and is refused."""
    with pytest.raises(ConfigError) as info:
        parse_host_port(":2850")
    assert "--backend" in info.value.errors[0]


@pytest.mark.parametrize("table, key", [
    ('[tls]\ncert_file = "{missing}"\n', "tls.cert_file"),
    ('[tls]\ncert_file = "/etc/hostname"\n', "tls.cert_file"),
    ('[backend]\nhost = "127.0.0.1"\ntls = "opportunistic"\ntls_verify = true\ntls_ca_file = "{missing}"\n',
     "backend.tls_ca_file"),
    ('[logging]\njson_file = "{missing}/events.json"\n', "logging.json_file"),
    ('data_dir = "/etc/hostname/mpp"\n', "data_dir"),
])
def test_files_named_by_the_config_are_checked(tmp_path, capsys, table, key):
    """check-config and twistd both refuse unusable files, naming the key, without a traceback."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(table.format(missing=tmp_path / "nope"))
    assert cli_main(["check-config", str(cfg)]) == 1
    assert f"{key}:" in capsys.readouterr().err
    proc = subprocess.run(TWISTD + ["-n", "--pidfile=", "mppproxy", "--config", str(cfg),
                                    "--listen", "tcp:0:interface=127.0.0.1"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode != 0
    assert f"{key}:" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_examples_in_the_docs_are_valid():
    """Every TOML example in docs/configuration.md loads without errors."""
    import tomllib

    doc = (ROOT / "docs" / "configuration.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", doc, re.S)
    assert len(blocks) >= 2
    for block in blocks:
        from_mapping(tomllib.loads(block), "docs example")
