#!/usr/bin/env python3
"""What benchmarks/scan.sh adds to the shared scan anchors' table.

  scan_extra.py mem --root PID --run DIR --out FILE
      Samples, every --interval s until PID exits, the memory of the
      proxies scanbench.py started below PID (each in its own session:
      mppproxy's twistd, amavisd master + children, spampd master +
      children) and of the engines (clamd, spamd: pid files in DIR).
      Per group: peak of the summed RSS and PSS over a sample, the peak
      process count, and the largest VmHWM (kernel's exact per-process
      peak RSS).  Writes FILE (JSON).

  scan_extra.py report --json RUN.json --mem MEM.json [--log MPP.log]
                       [--quarantine DIR]
      Prints the memory table and the issue #5 criteria for mppproxy
      (ratio to the engines, own CPU per message, msgs/s against amavis,
      peak RSS against amavis), and what mppproxy's log says it did.

Stdlib only; reads /proc, never signals anything.
"""
import argparse
import json
import os
import re
import statistics
import sys
import time


def _stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    rest = s[s.rindex(")") + 2:].split()
    return int(rest[1]), int(rest[3])          # ppid, session id


def _cmd(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _mem(pid):
    """(rss kB, pss kB, hwm kB) of one process, 0s if it is gone."""
    rss = hwm = pss = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                    break
    except (OSError, ValueError):
        pass
    return rss, pss, hwm


def _group_of(cmd):
    if "mppproxy" in cmd and ("twistd" in cmd or "--listen" in cmd):
        return "mppproxy"
    if "amavisd" in cmd:
        return "amavis"
    if "spampd" in cmd:
        return "spampd"
    return None


def _read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def mem(a):
    peak = {}
    while os.path.exists(f"/proc/{a.root}"):
        procs = {}
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    procs[int(p)] = _stat(p)
                except (OSError, ValueError):
                    pass
        # descendants of the root (scanbench.py keeps its children as such)
        kids = {}
        for pid, (ppid, _) in procs.items():
            kids.setdefault(ppid, []).append(pid)
        desc, todo = set(), [a.root]
        while todo:
            for c in kids.get(todo.pop(), ()):
                if c not in desc:
                    desc.add(c)
                    todo.append(c)
        leaders = {}
        for pid in desc:
            if procs[pid][1] == pid:              # a session leader
                g = _group_of(_cmd(pid))
                if g:
                    leaders[pid] = g
        for eng in ("clamd", "spamd"):
            pid = _read_pid(os.path.join(a.run, eng, f"{eng}.pid"))
            if pid and pid in procs:
                leaders[procs[pid][1]] = eng
        for sid, g in leaders.items():
            members = [pid for pid, (_, s) in procs.items() if s == sid]
            rss = pss = hwm = 0
            for pid in members:
                r, p, h = _mem(pid)
                rss, pss, hwm = rss + r, pss + p, max(hwm, h)
            pk = peak.setdefault(g, dict(rss_kb=0, pss_kb=0, hwm_kb=0,
                                         procs=0, samples=0))
            pk["rss_kb"] = max(pk["rss_kb"], rss)
            pk["pss_kb"] = max(pk["pss_kb"], pss)
            pk["hwm_kb"] = max(pk["hwm_kb"], hwm)
            pk["procs"] = max(pk["procs"], len(members))
            pk["samples"] += 1
        with open(a.out + ".tmp", "w") as f:
            json.dump(peak, f, indent=1)
        os.replace(a.out + ".tmp", a.out)
        time.sleep(a.interval)


def _med(rows, anchor, conc):
    rs = [r for r in rows if r["anchor"] == anchor and r["conc"] == conc]
    if not rs:
        return None, None
    m = statistics.median(r["rate"] for r in rs)
    return m, min(rs, key=lambda r: abs(r["rate"] - m))


def report(a):
    with open(a.json) as f:
        run = json.load(f)
    try:
        with open(a.mem) as f:
            peak = json.load(f)
    except (OSError, ValueError):
        peak = {}
    prof = run["profile"]
    rows = run["rows"]
    concs = sorted({r["conc"] for r in rows})
    ref = {"clamd+spamd": "eng-both", "clamd-only": "eng-clamd",
           "relay-only": "sink"}[prof]

    print("\n### Peak memory (whole run: warm-up and every concurrency; "
          "sampled every 1 s)\n")
    print("| process group | processes | peak RSS MiB (sum) | peak PSS MiB "
          "(sum) | largest VmHWM MiB |")
    print("|---|---:|---:|---:|---:|")
    for g in ("mppproxy", "amavis", "spampd", "clamd", "spamd"):
        if g in peak:
            p = peak[g]
            print(f"| {g} | {p['procs']} | {p['rss_kb'] / 1024:.1f} | "
                  f"{p['pss_kb'] / 1024:.1f} | {p['hwm_kb'] / 1024:.1f} |")

    if not any(r["anchor"] == "mppproxy" for r in rows):
        print("\n(mppproxy did not run)")
        return
    print(f"\n### mppproxy against the issue #5 bars (profile {prof})\n")
    print(f"| conc | mppproxy msgs/s | ratio to {ref} | amavis msgs/s | "
          "mppproxy / amavis | mppproxy own CPU ms/msg | amavis own CPU "
          "ms/msg | mppproxy 2xx/4xx/5xx/err | received (spam, virus) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for c in concs:
        m, r = _med(rows, "mppproxy", c)
        b, _ = _med(rows, ref, c)
        am, ar = _med(rows, "amavis", c)
        if m is None:
            continue
        n = max(r["c2"], 1)
        cpu = r["proxy_cpu"] / n * 1000
        acpu = (f"{ar['proxy_cpu'] / max(ar['c2'], 1) * 1000:.1f}"
                if ar else "")
        ratio = f"{m / b:.2f}" if b else ""
        vs = f"{m / am:.2f}" if am else ""
        g = r["sink"]
        print(f"| {c} | {m:.2f} | {ratio} | {am or 0:.2f} | {vs} | "
              f"{cpu:.1f} | {acpu} | {r['c2']}/{r['c4']}/{r['c5']}/"
              f"{r['err']} | {g['n']}/{r['count']} ({g['spam_tag']}, "
              f"{g['virus_tag']}) |")
    bars = []
    if prof == "clamd+spamd":
        bars.append("bar: ratio to eng-both >= 0.95 at 1, 5 and 20 sessions")
    elif prof == "clamd-only":
        bars.append("bars: own CPU <= 5 ms/msg; >= 3x amavis' msgs/s at 20 "
                    "sessions")
    if "mppproxy" in peak and "amavis" in peak:
        bars.append(f"peak RSS mppproxy {peak['mppproxy']['rss_kb'] / 1024:.1f}"
                    f" MiB vs amavis {peak['amavis']['rss_kb'] / 1024:.1f} MiB"
                    f" (PSS {peak['mppproxy']['pss_kb'] / 1024:.1f} vs "
                    f"{peak['amavis']['pss_kb'] / 1024:.1f})")
    for b in bars:
        print(f"\n{b}")

    if a.config:
        _config_note(a.config)

    # what the proxy did, from its own log
    if a.log and os.path.exists(a.log):
        with open(a.log, errors="replace") as f:
            text = f.read()
        print("\n### mppproxy's log (whole run, warm-up included)\n")
        for label, pat in a.count:
            print(f"- {label}: {len(re.findall(pat, text))}")
    if a.quarantine:
        n = 0
        for root, dirs, files in os.walk(a.quarantine):
            n += len(files)
        print(f"- messages in the local quarantine (viruses, "
              f"virus_action = \"quarantine\"): {n}")


def _config_note(path):
    """What mppproxy's configuration of this run turns on (read with the
    product's own loader, so defaults are what the product really uses)."""
    try:
        import tomllib
        from mppproxy.config.load import from_mapping
        with open(path, "rb") as f:
            c = from_mapping(tomllib.load(f), path)
    except Exception as e:     # the table stands without this note
        print(f"\n(configuration not read: {e})")
        return
    s = c.policies["default"].scan
    rules = ", ".join(f"{r.name} ({r.action})" for r in s.attachments.rules)
    print(f"\n### mppproxy's checks in this run ({path})\n")
    print(f"- scanning: {'on' if s.enabled else 'OFF'}; trusted_networks "
          f"{list(c.trusted_networks)} (the load generator, 127.0.0.1, is "
          f"{'NOT ' if any(n.startswith('127.') for n in c.trusted_networks) else ''}"
          f"untrusted); workers {c.workers}")
    print(f"- MIME checks: {'on' if s.mime.enabled else 'off'} (defaults)")
    print(f"- attachment rules: {'on' if s.attachments.enabled else 'off'}: "
          f"{rules}")
    print(f"- header rules: {'on' if s.headers.enabled else 'off'} "
          f"({len(s.headers.rules)} rules)")
    print(f"- engines: {', '.join(s.engines) or 'none'}; virus_action "
          f"{s.virus_action}; scoring.tag "
          f"{c.policies['default'].scoring.tag:g}, scoring.reject "
          f"{c.policies['default'].scoring.reject:g}")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mem")
    m.add_argument("--root", type=int, required=True)
    m.add_argument("--run", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--interval", type=float, default=1.0)
    r = sub.add_parser("report")
    r.add_argument("--json", required=True)
    r.add_argument("--mem", required=True)
    r.add_argument("--log")
    r.add_argument("--quarantine")
    r.add_argument("--config", help="mppproxy's config of the run")
    r.add_argument("--count", nargs=2, action="append", default=[],
                   metavar=("LABEL", "REGEX"),
                   help="count REGEX matches in --log")
    a = ap.parse_args()
    (mem if a.cmd == "mem" else report)(a)


if __name__ == "__main__":
    sys.exit(main())
