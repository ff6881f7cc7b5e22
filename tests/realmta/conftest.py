"""Fixtures for tests against real services and a real ``twistd mppproxy`` process.

* ``postfix_backend`` (session): a throw-away Postfix on 127.0.0.1:10025 started by
  ``scripts/services/start-postfix-backend.sh``; accepts example.com and example.net
  into per-domain Maildirs, offers STARTTLS, honours XFORWARD/XCLIENT from loopback.
* ``postfix`` (function): the same object, running and with empty Maildirs.
* ``proxy_process`` (session): a factory that runs ``twistd -n mppproxy ARGS`` as a
  subprocess and waits for its 220 banner.

A service that cannot be started skips the tests that need it, or fails them when
``MPP_REQUIRE_SERVICES=1`` (CI sets it: real-service tests must fail, not skip, there).
Override the backend's place with ``MPP_PFX_ROOT`` and ``MPP_PFX_PORT``.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest

from helpers import wait_for

REPO = Path(__file__).resolve().parents[2]
PFX_SCRIPT = REPO / "scripts" / "services" / "start-postfix-backend.sh"
#: Bound on one run of the start script; a first run may apt-install packages.
SCRIPT_TIMEOUT = float(os.environ.get("MPP_SERVICE_START_TIMEOUT", "300"))


def _services_required() -> bool:
    return os.environ.get("MPP_REQUIRE_SERVICES") == "1"


def service_unavailable(reason: str) -> None:
    """Fail (``MPP_REQUIRE_SERVICES=1``) or skip the test because a service is missing."""
    if _services_required():
        pytest.fail(f"required service unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- Postfix


@dataclass
class PostfixBackend:
    """Handle on the Postfix backend started by ``start-postfix-backend.sh``."""

    host: str
    port: int
    root: Path
    domains: tuple[str, ...] = ("example.com", "example.net")
    script: Path = PFX_SCRIPT
    # More settings for the script (PFX_FILTER..., PFX_NAME) of a second instance.
    env_extra: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """``host:port``, as ``--backend`` takes it."""
        return f"{self.host}:{self.port}"

    @property
    def tls_cert(self) -> Path:
        """The backend's self-signed certificate (CN/SAN localhost, 127.0.0.1)."""
        return self.root / "tls" / "cert.pem"

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"

    def maildir(self, domain: str) -> Path:
        return self.root / "mail" / domain

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(PFX_ROOT=str(self.root), PFX_PORT=str(self.port),
                   PFX_DOMAINS=" ".join(self.domains))
        env.update(self.env_extra)
        return env

    def run_script(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the start script (``start``, ``stop``, ``abort``, ``status``); bounded."""
        return subprocess.run(
            ["bash", str(self.script), *args], env=self._env(), capture_output=True,
            text=True, timeout=SCRIPT_TIMEOUT, check=False,
        )

    def _files(self, domain: str) -> list[Path]:
        found: list[Path] = []
        for sub in ("new", "cur"):
            d = self.maildir(domain) / sub
            if d.is_dir():
                found.extend(p for p in d.iterdir() if p.is_file())
        return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def messages(self, domain: str) -> list[bytes]:
        """Raw bytes of every message delivered for ``domain`` (new/ and cur/), oldest first.

        Postfix delivers a moment after its 250; use ``wait_messages`` to wait for it.
        """
        return [p.read_bytes() for p in self._files(domain)]

    def wait_messages(self, domain: str, count: int = 1, timeout: float = 15.0) -> list[bytes]:
        """Wait (bounded) until at least ``count`` messages are in ``domain``'s Maildir."""
        wait_for(lambda: len(self._files(domain)) >= count, timeout,
                 what=f"{count} message(s) for {domain} in {self.maildir(domain)}")
        return self.messages(domain)

    def clear(self) -> None:
        """Delete delivered messages of every domain, and anything still queued."""
        for domain in self.domains:
            for p in self._files(domain):
                p.unlink(missing_ok=True)
        postsuper = shutil.which("postsuper") or "/usr/sbin/postsuper"
        if os.path.exists(postsuper) and (self.root / "spool" / "maildrop").is_dir():
            subprocess.run([postsuper, "-c", str(self.root / "etc"), "-d", "ALL"],
                           capture_output=True, timeout=30, check=False)

    def is_running(self) -> bool:
        return self.run_script("status").returncode == 0

    def stop(self, abort: bool = False) -> None:
        """Stop Postfix and wait until master exits; open sessions are dropped.

        ``abort=True`` uses ``postfix abort`` (no orderly shutdown).
        """
        r = self.run_script("abort" if abort else "stop")
        if r.returncode != 0:
            raise RuntimeError(f"stopping postfix failed: {r.stderr}")

    def start(self) -> None:
        """(Re)start Postfix and wait until the port answers."""
        r = self.run_script()
        if r.returncode != 0:
            raise RuntimeError(f"starting postfix failed (exit {r.returncode}):\n"
                               f"{_tail(r.stdout + r.stderr)}")


@pytest.fixture(scope="session")
def postfix_backend() -> Iterator[PostfixBackend]:
    """A running Postfix backend for the whole session (see the module docstring).

    The script is idempotent: a running instance (e.g. one started by .ci/run) is
    reloaded. At the end the instance is left as it was found: stopped again if this
    fixture started it, restarted if it was running before and a test stopped it.
    """
    backend = PostfixBackend(
        host="127.0.0.1",
        port=int(os.environ.get("MPP_PFX_PORT", "10025")),
        root=Path(os.environ.get("MPP_PFX_ROOT", "/tmp/pfx-backend")),
    )
    if not sys.platform.startswith("linux"):
        service_unavailable("the Postfix backend needs Linux")
    if os.geteuid() != 0:
        service_unavailable("the Postfix backend script must run as root")
    if shutil.which("bash") is None or not PFX_SCRIPT.is_file():
        service_unavailable(f"bash or {PFX_SCRIPT} missing")
    was_running = backend.is_running()
    try:
        r = backend.run_script()
    except subprocess.TimeoutExpired:
        service_unavailable(f"{PFX_SCRIPT.name} did not finish in {SCRIPT_TIMEOUT:.0f} s")
    if r.returncode != 0:
        service_unavailable(f"{PFX_SCRIPT.name} exited {r.returncode}:\n"
                            f"{_tail(r.stdout + r.stderr)}")
    if not _port_open(backend.host, backend.port):
        service_unavailable(f"postfix does not answer on {backend.address}")
    yield backend
    running = backend.is_running()
    if was_running and not running:
        backend.start()
    elif not was_running and running:
        backend.stop()


@pytest.fixture
def postfix(postfix_backend: PostfixBackend) -> PostfixBackend:
    """The session's Postfix backend, running, with empty Maildirs and queue."""
    if not postfix_backend.is_running():
        postfix_backend.start()
    postfix_backend.clear()
    return postfix_backend


# --------------------------------------------------------------------------- proxy


class ProxyStartError(AssertionError):
    """The proxy process exited or did not greet within the time allowed."""


#: twistd's own entry point. ``python -m twisted`` runs ``twist``, which has no
#: ``-n``/``--pidfile``; this runs ``twistd`` with the same interpreter instead.
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def _subprocess_env(extra: dict[str, str] | None) -> dict[str, str]:
    """Environment in which the child imports the same mppproxy as this process.

    If mppproxy is installed (tox), its site-packages also holds the twisted/plugins
    dropin; otherwise the repository root goes first on PYTHONPATH, so that both
    ``mppproxy`` and ``twisted/plugins/mppproxy_plugin.py`` are found from source.
    """
    env = dict(os.environ)
    spec = importlib.util.find_spec("mppproxy")
    if spec is not None and spec.origin:
        root = str(Path(spec.origin).resolve().parents[1])
    else:
        root = str(REPO)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # log_text() sees lines as they are written
    env.update(extra or {})
    return env


def _read_banner(host: str, port: int, timeout: float) -> bytes | None:
    """Connect and read the first reply line; None if nothing listens yet."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            data = b""
            while b"\n" not in data and len(data) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            if data.startswith(b"220"):
                try:
                    s.sendall(b"QUIT\r\n")
                    s.recv(512)
                except OSError:
                    pass
            return data
    except (ConnectionRefusedError, socket.timeout):
        return None
    except OSError:
        return None


@dataclass
class ProxyProcess:
    """A running ``twistd -n mppproxy`` subprocess."""

    popen: subprocess.Popen[bytes]
    port: int
    host: str
    args: tuple[str, ...]
    dir: Path
    log_path: Path
    _log_file: object = field(repr=False, default=None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        """Send ``sig`` (e.g. ``signal.SIGHUP``) to the process if it still runs."""
        if self.alive():
            self.popen.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; return the exit code.

        A clean shutdown on SIGTERM returns ``-signal.SIGTERM``: twistd re-raises the
        signal that stopped it. ``-signal.SIGKILL`` means the fallback was needed.
        """
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        close = getattr(self._log_file, "close", None)
        if close is not None:
            close()
        return self.popen.returncode

    def __enter__(self) -> "ProxyProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


StartProxy = Callable[..., ProxyProcess]


@pytest.fixture(scope="session")
def proxy_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartProxy]:
    """Factory: ``proxy_process(args, port, timeout=20.0, env=None, name="proxy")``.

    Runs ``twistd -n --pidfile= mppproxy *args`` (same interpreter as pytest) in a
    fresh temp directory, stdout+stderr to ``<dir>/proxy.log``, and waits (at most
    ``timeout`` s) until 127.0.0.1:``port`` answers with a 220 banner. If it exits or
    does not greet in time, the test fails with the log's tail. Call ``.stop()`` (or
    use ``with``) in the test; anything left running is stopped at session end.
    """
    started: list[ProxyProcess] = []

    def start(
        args: Sequence[str], port: int, *, timeout: float = 20.0,
        env: dict[str, str] | None = None, name: str = "proxy", host: str = "127.0.0.1",
    ) -> ProxyProcess:
        workdir = tmp_path_factory.mktemp(name)
        log_path = workdir / "proxy.log"
        log_file = open(log_path, "wb")
        popen = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "mppproxy", *args],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            cwd=workdir, env=_subprocess_env(env),
        )
        proc = ProxyProcess(popen, port, host, tuple(args), workdir, log_path, log_file)
        started.append(proc)

        deadline = time.monotonic() + timeout
        last: bytes | None = None
        while time.monotonic() < deadline:
            if not proc.alive():
                proc.stop()
                raise ProxyStartError(
                    f"mppproxy exited with code {proc.returncode} before greeting on "
                    f"port {port}; args {list(args)}\n--- {log_path} ---\n"
                    f"{_tail(proc.log_text(), 60)}")
            last = _read_banner(host, port, timeout=min(2.0, timeout))
            if last is not None and last.startswith(b"220"):
                return proc
            time.sleep(0.1)
        proc.stop()
        raise ProxyStartError(
            f"mppproxy did not answer with a 220 banner on {host}:{port} within "
            f"{timeout:.0f} s (last: {last!r}); args {list(args)}\n--- {log_path} ---\n"
            f"{_tail(proc.log_text(), 60)}")

    yield start
    for proc in started:
        proc.stop()
