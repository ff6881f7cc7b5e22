#!/usr/bin/env python3
"""DKIM/DMARC on vs off, in one run (issue 14): the cost of authenticating
every message after DATA.

``relay_bench.py``'s servers are fed by ``smtp-source -l SIZE``, whose
generated message carries no signature; so this bench uses the same harness
(its ``Server``, ``smtp-sink`` backend with a message counter, process groups,
bounded runs) and feeds ``smtp-source -F FILE`` a DKIM-signed message made
here (RSA 2048, relaxed/simple, From: and the signature's d= in bench.test),
the same file for every server.  Three proxies, each relaying in lockstep to
the backend sink, 127.0.0.1 not trusted (so the checks and the scanning run):

* ``mppproxy-scan``  ``[policies.default.scan] enabled = true`` (MIME parse,
                     attachment rules), DKIM and DMARC off: the baseline;
* ``mppproxy-dkim``  the same plus ``scan.dkim`` and ``scan.dmarc`` on: every
                     message has its key fetched (answered from the resolver's
                     cache after the first: "a cached key"), its signature
                     verified and the DMARC policy of bench.test (p=reject)
                     evaluated, and gets an Authentication-Results field;
* ``mppproxy``       the proxy without scanning, for scale.

The key, the DMARC record and an SPF record are served by a Twisted Names
server on 127.0.0.1:2654 started here.  Output: msgs/s per server (median of
``--reps``, servers alternating within each rep) and the ratio dkim/scan.

usage: python3 benchmarks/auth_bench.py [--reps 3] [--count 3000] [--sessions 20]
       (benchmarks/auth.sh runs it with --quick's sizes: 1 KiB body, 20 sessions)
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import relay_bench as rb  # noqa: E402  (the harness: servers, sink, timing)

DNS_PORT = 2654
PORTS = {"mppproxy": 2627, "mppproxy-scan": 2637, "mppproxy-dkim": 2638}
PROXY_CMD = (
    "{twistd} -n --pidfile= mppproxy --config {config} --listen tcp:{port}:interface=127.0.0.1"
    " --backend 127.0.0.1:{backend_port} --relay-domain example.net"
    " --trusted-network 10.255.255.0/24 --data-dir {data_dir}")
SCAN = "[policies.default.scan]\nenabled = true\n"
CONFIGS = {
    "mppproxy": "",
    "mppproxy-scan": SCAN,
    "mppproxy-dkim": SCAN + "[policies.default.scan.dkim]\nenabled = true\n"
                            "[policies.default.scan.dmarc]\nenabled = true\n",
}

DNS_SCRIPT = r'''
import sys
from twisted.internet import reactor
from twisted.names import authority, common, dns, server

class Zone(authority.FileAuthority):
    def __init__(self, records):
        common.ResolverBase.__init__(self)
        self._cache = {}
        self.soa = (b"bench.test", dns.Record_SOA(mname=b"ns.bench.test", rname=b"h.bench.test",
                                                   serial=1, minimum=300, ttl=300))
        self.records = {b"bench.test": [self.soa[1]]}
        for name, text in records:
            raw = text.encode()
            self.records.setdefault(name.encode(), []).append(
                dns.Record_TXT(*[raw[i:i + 255] for i in range(0, len(raw), 255)], ttl=3600))

port, key = int(sys.argv[1]), sys.argv[2]
records = [("sel._domainkey.bench.test", "v=DKIM1; k=rsa; p=" + key),
           ("_dmarc.bench.test", "v=DMARC1; p=reject"),
           ("bench.test", "v=spf1 ip4:127.0.0.1 -all")]
factory = server.DNSServerFactory(authorities=[Zone(records)])
reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
reactor.listenTCP(port, factory, interface="127.0.0.1")
print("ready", flush=True)
reactor.run()
'''


def signed_message(size, key=None):
    """A message of a ``size``-octet body From bench.test, DKIM-signed with
    ``key`` (an RSA 2048 key made here by default), and the public key for
    the DNS record; LF line ends (for smtp-source -F, which sends each line
    with CRLF)."""
    import base64
    import dkim
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = key or rsa.generate_private_key(65537, 2048)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    pub = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    body = line * max(1, size // len(line))
    msg = (b"From: Bench <a@bench.test>\r\nTo: b@example.net\r\nSubject: bench\r\n"
           b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <bench@bench.test>\r\n\r\n" + body)
    sig = dkim.sign(msg, b"sel", b"bench.test", pem,
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return (sig + msg).replace(b"\r\n", b"\n"), pub


def config_text(name):
    """The TOML of proxy ``name`` (relay_bench.py's mppproxy-scan and
    mppproxy-dkim use it too)."""
    return (f'[dns]\nnameservers = ["127.0.0.1:{DNS_PORT}"]\ntimeout = 2.0\n'
            + CONFIGS[name])


def start_dns(pub):
    """The Twisted Names server for the key and records: (process, stop)."""
    dns = subprocess.Popen([sys.executable, "-c", DNS_SCRIPT, str(DNS_PORT), pub],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           start_new_session=True)

    def stop():
        os.killpg(dns.pid, 15)
        dns.wait(10)

    if dns.stdout.readline().strip() != b"ready":
        stop()
        raise SystemExit("the DNS server did not start")
    return stop


def proxy(name, config_dir, backend_port):
    config = os.path.join(config_dir, f"{name}.toml")
    with open(config, "w") as f:
        f.write(config_text(name))
    rb.PORTS[name] = PORTS[name]
    return rb.proxy_server(name, PROXY_CMD.replace("{config}", config), backend_port)


def run(port, path, sessions, count):
    argv = ["smtp-source", "-s", str(sessions), "-m", str(count), "-F", path,
            "-f", "a@bench.test", "-t", "b@example.net", "-M", "loadgen.test",
            f"{rb.HOST}:{port}"]
    t0 = time.perf_counter()
    p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=rb.RUN_TIMEOUT)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"smtp-source rc={p.returncode}: {p.stderr.decode()[-200:]}")
    return wall, p.stderr.decode(errors="replace").strip()[:160]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    a = ap.parse_args()
    if not shutil.which("smtp-source"):
        os.environ["PATH"] += os.pathsep + "/usr/sbin"
    os.makedirs(rb.RUN_DIR, exist_ok=True)
    work = tempfile.mkdtemp(prefix="auth-bench-", dir=rb.RUN_DIR)
    message, pub = signed_message(a.size)
    path = os.path.join(work, "signed.eml")
    with open(path, "wb") as f:
        f.write(message)
    stop_dns = start_dns(pub)
    servers = []
    try:
        counter = os.path.join(rb.RUN_DIR, "auth-backend.count")
        backend = rb.Server("auth-backend", rb.BACKEND_PORT, rb.sink_argv(rb.BACKEND_PORT),
                            False, counter_path=counter)
        backend.start()
        servers.append(backend)
        proxies = [proxy(n, work, rb.BACKEND_PORT) for n in CONFIGS]
        for s in proxies:
            s.start()
            servers.append(s)
        for s in [backend] + proxies:
            why = rb.wait_220(s)
            if why:
                raise SystemExit(f"{s.name}: {why}")
        # Warm-up: the key and the policy reach the resolver's cache.
        for s in proxies:
            run(s.port, path, 1, 5)
        rates = {s.name: [] for s in proxies}
        cpu = {s.name: [] for s in proxies}
        for rep in range(a.reps):
            order = proxies[rep % len(proxies):] + proxies[:rep % len(proxies)]
            for s in order:
                before, c0 = backend.messages(), s.cpu()
                wall, warn = run(s.port, path, a.sessions, a.count)
                time.sleep(0.2)
                got = backend.messages() - before
                if got != a.count:
                    raise SystemExit(f"{s.name}: the backend got {got} of {a.count} ({warn})")
                rates[s.name].append(a.count / wall)
                cpu[s.name].append((s.cpu() - c0) / a.count * 1e6)
                print(f"rep {rep + 1} {s.name}: {a.count / wall:.0f} msgs/s", file=sys.stderr,
                      flush=True)
        med = {n: statistics.median(r) for n, r in rates.items()}
        print(f"| server | msgs/s (median of {a.reps}) | proxy CPU us/msg |")
        print("| --- | --- | --- |")
        for n in rates:
            print(f"| {n} | {med[n]:.0f} | {statistics.median(cpu[n]):.0f} |")
        print(f"\nDKIM/DMARC on vs off: mppproxy-dkim / mppproxy-scan = "
              f"{med['mppproxy-dkim'] / med['mppproxy-scan']:.2f} (target >= 0.9); "
              f"vs no scanning: {med['mppproxy-dkim'] / med['mppproxy']:.2f}")
        print(f"({a.count} messages of {len(message)} octets, {a.sessions} sessions, "
              f"one signature RSA 2048, cached key)")
    finally:
        for s in reversed(servers):
            s.stop()
        stop_dns()


if __name__ == "__main__":
    main()
