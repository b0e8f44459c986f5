#!/usr/bin/env python3
"""The dashboard and the alert rules against a real Prometheus scraping a loaded server.

Starts sparsekv-server on ephemeral ports with a snapshot directory that holds one good and one
damaged session file (restored and skipped at start) and 1 s checkpoints, a real Prometheus with
deploy/prometheus/prometheus.yml (target, intervals and rule path rewritten for the test)
scraping it every second, drives load with the `sparsekv` CLI (sessions that stay, a mixed
bench that prunes, and calls that fail), then asks Prometheus, through /api/v1:
  - every dashboard panel query, with $__rate_interval, $namespace and $instance expanded, once
    for "All" and once for this instance: it must succeed and return at least one finite value;
  - every template variable (label_values) must list this target's namespace and instance;
  - every alert rule: loaded from the committed file (all of them), evaluated with health "ok",
    its expression accepted by the query API, and the signal under each threshold comparison
    returning data;
  - every metric name the dashboard and the rules use must be one the server exports;
  - the snapshot series hold what happened: 1 file restored, 1 skipped, checkpoint writes with
    no error and a last write duration, and SparsekvSnapshotRestoresSkipped firing.
Usage: live_prometheus_test.py SERVER_BIN CLI_BIN REPO_ROOT
Prints PASS/FAIL lines and "N passed, M failed"; exits 1 on any failure.
"""
import json
import math
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

from checks import Checks

SERVER, CLI, REPO = sys.argv[1:4]
DASHBOARD = os.path.join(REPO, "deploy/grafana/sparsekv-dashboard.json")
PROM_CONFIG = os.path.join(REPO, "deploy/prometheus/prometheus.yml")
RULES = os.path.join(REPO, "deploy/prometheus/sparsekv.rules.yml")
# Grafana makes $__rate_interval at least 4 scrape intervals (1 s here); 30 s spans the whole
# load with room for a slow machine.
RATE_INTERVAL = "30s"

CHECKS = Checks()
ok, bad, check = CHECKS.ok, CHECKS.bad, CHECKS.check


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def save_npy(path, shape, seed):
    """float32 .npy written by hand (format 1.0), so the test needs no numpy."""
    n = 1
    for d in shape:
        n *= d
    x, vals = seed, []
    for _ in range(n):  # a small LCG: deterministic, roughly uniform in [-1, 1)
        x = (1103515245 * x + 12345) % (1 << 31)
        vals.append(x / (1 << 30) - 1.0)
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }" % "".join(
        "%d, " % d for d in shape)
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
        f.write(struct.pack("<%df" % n, *vals))


class Procs:
    def __init__(self):
        self.procs = []

    def start(self, argv, log):
        p = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def wait_for(pred, seconds, step=0.1):
    end = time.time() + seconds
    while time.time() < end:
        try:
            v = pred()
            if v:
                return v
        except Exception:
            pass
        time.sleep(step)
    return None


# ---- alert signals: the expression under its threshold comparisons


def top_level_split(expr, words):
    """Splits expr at the given operators where they are outside (), [], {} and strings."""
    parts, depth, i, start, quote = [], 0, 0, 0, None
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            for w in words:
                if expr.startswith(w, i) and (not w[0].isalpha() or (
                        (i == 0 or not expr[i - 1].isalnum()) and
                        not expr[i + len(w):i + len(w) + 1].isalnum())):
                    parts.append(expr[start:i])
                    i += len(w)
                    start = i
                    break
            else:
                i += 1
                continue
            continue
        i += 1
    parts.append(expr[start:])
    return [p.strip() for p in parts]


def signals(expr):
    """What each alert compares: for `A > x and B > y` the queries A and B; absent(X) -> X;
    X offset 1h -> X (the short-lived test Prometheus holds no data that old: the selector
    must match what the server exports now)."""
    out = []
    for operand in top_level_split(expr, ["and", "unless", "or"]):
        lhs = top_level_split(operand, ["==", "!=", ">=", "<=", ">", "<"])[0]
        m = re.fullmatch(r"absent\((.*)\)", lhs, re.S)
        lhs = m.group(1) if m else lhs
        out.append(re.sub(r"\s+offset\s+\w+$", "", lhs))
    return out


def metric_names(expr):
    """Metric names of selectors: identifiers followed by { or [ or ending a selector."""
    no_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    names = set(re.findall(r"\b(sparsekv_[a-z0-9_]+|up)\b(?!\s*\()", no_strings))
    return names


def main():
    for tool in ("prometheus", "promtool"):
        if not shutil.which(tool):
            bad(f"{tool} not installed (apt-get install prometheus; deploy/dev/setup.sh does)")
            return 1
    tmp = tempfile.mkdtemp(prefix="sparsekv-live-prom.")
    procs = Procs()
    try:
        return run(tmp, procs)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def start_server(procs, tmp, name, flags):
    """Starts sparsekv-server on free ports; returns (process, {grpc_port, metrics_port})."""
    ready = os.path.join(tmp, name + ".ready")
    server = procs.start([SERVER, "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0",
                          "--ready_file=" + ready] + flags, os.path.join(tmp, name + ".log"))
    ports = wait_for(lambda: dict(l.split("=") for l in open(ready).read().split()), 15)
    if not check(ports and server.poll() is None, name + " started"):
        print(open(os.path.join(tmp, name + ".log")).read()[-2000:])
        return server, None
    return server, ports


def seed_snapshots(procs, tmp, snapshots):
    """A snapshot directory with one good session file ("seeded", written by a server's
    shutdown) and a damaged copy of it: the server under test restores one and skips one."""
    server, ports = start_server(procs, tmp, "seeder", ["--snapshot_dir=" + snapshots])
    if not ports:
        return False
    cli = [CLI, "--server=127.0.0.1:" + ports["grpc_port"], "--timeout=20s"]
    r = subprocess.run(cli + ["create", "--id", "seeded", "--layers", "1", "--kv_heads", "1",
                              "--q_heads", "1", "--head_dim", "64"],
                       capture_output=True, text=True, timeout=60)
    server.terminate()
    rc = server.wait(timeout=30)
    files = sorted(f for f in os.listdir(snapshots) if f.endswith(".skv"))
    if not check(r.returncode == 0 and rc == 0 and len(files) == 1,
                 "seeder wrote one session file at shutdown", (r.stderr[-300:], rc, files)):
        return False
    data = bytearray(open(os.path.join(snapshots, files[0]), "rb").read())
    data[len(data) // 2] ^= 0xFF  # fails its record's checksum: DATA_LOSS, skipped
    open(os.path.join(snapshots, "damaged.skv"), "wb").write(bytes(data))
    return True


def run(tmp, procs):
    snapshots = os.path.join(tmp, "snapshots")
    os.mkdir(snapshots)
    if not seed_snapshots(procs, tmp, snapshots):
        return 1
    # -- server: a byte budget so that the budget panels and the capacity alert have data;
    # the seeded snapshot directory and 1 s checkpoints for the snapshot panels and alerts;
    # every pruning session shadowed, so that the quality panels and alert have data
    server, ports = start_server(procs, tmp, "server", [
        "--host_budget_bytes=1073741824", "--decode_spin_us=0", "--snapshot_dir=" + snapshots,
        "--checkpoint_interval=1s", "--quality_shadow_fraction=1"])
    if not ports:
        return 1
    grpc, metrics = ports["grpc_port"], ports["metrics_port"]
    target = "127.0.0.1:" + metrics

    # -- Prometheus with the committed config, rewritten for the test
    cfg = open(PROM_CONFIG).read()
    for old, new in (("scrape_interval: 15s", "scrape_interval: 1s"),
                     ("evaluation_interval: 15s", "evaluation_interval: 1s"),
                     ("- localhost:9464", "- " + target),
                     ("- sparsekv.rules.yml", "- " + RULES)):
        if not check(cfg.count(old) == 1, f"prometheus.yml has '{old}' once (rewritten for the test)"):
            return 1
        cfg = cfg.replace(old, new)
    cfg_path = os.path.join(tmp, "prometheus.yml")
    open(cfg_path, "w").write(cfg)
    pport = free_port()
    prom_url = f"http://127.0.0.1:{pport}"
    prom = procs.start(["prometheus", "--config.file=" + cfg_path,
                        "--storage.tsdb.path=" + os.path.join(tmp, "tsdb"),
                        "--web.listen-address=127.0.0.1:%d" % pport, "--log.level=warn"],
                       os.path.join(tmp, "prometheus.log"))

    def query(expr, at=None):
        args = {"query": expr}
        if at:
            args["time"] = "%.3f" % at
        data = urllib.parse.urlencode(args).encode()
        try:
            with urllib.request.urlopen(prom_url + "/api/v1/query", data=data, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            return json.load(e)

    up = wait_for(lambda: query('up{job="sparsekv"} == 1')["data"]["result"], 20, 0.2)
    if not check(up and prom.poll() is None, "Prometheus scrapes the server (up == 1)"):
        print(open(os.path.join(tmp, "prometheus.log")).read()[-2000:])
        return 1
    ok_labels = up[0]["metric"]
    check(ok_labels.get("namespace") == "local" and ok_labels.get("instance") == target,
          "target labels: namespace=local from the scrape config, instance=" + target, ok_labels)

    # -- load through the CLI
    cli = [CLI, "--server=127.0.0.1:" + grpc, "--timeout=20s"]

    def run_cli(*args, expect=0):
        r = subprocess.run(cli + list(args), capture_output=True, text=True, timeout=60)
        if r.returncode != expect:
            bad(f"sparsekv {' '.join(args[:2])} exited {r.returncode}, expected {expect}: "
                f"{r.stderr.strip()[-300:]}")
        return r

    k, v, q = (os.path.join(tmp, n + ".npy") for n in "kvq")
    save_npy(k, (2, 600, 2, 64), 1)
    save_npy(v, (2, 600, 2, 64), 2)
    save_npy(q, (8, 64), 3)
    for sid in ("live-a", "live-b"):  # sessions that stay: non-zero session and byte gauges
        run_cli("create", "--id", sid, "--layers", "2", "--kv_heads", "2", "--q_heads", "8",
                "--head_dim", "64", "--k_sparsity", "0.7", "--v_sparsity", "0.7")
        run_cli("append", sid, "--k", k, "--v", v)
        run_cli("flush", sid)
        run_cli("attend", sid, "--layer", "1", "--q", q)
    run_cli("create", "--id", "live-a", "--layers", "1", "--kv_heads", "1", "--q_heads", "1",
            "--head_dim", "64", expect=1)  # ALREADY_EXISTS
    for _ in range(3):
        run_cli("get", "no-such-session", expect=1)  # NOT_FOUND
    t0 = time.time()
    r = run_cli("bench", "--workload=mixed", "--context=1024", "--kv_heads=2", "--sessions=2",
                "--concurrency=1", "--duration=5s")
    check(r.returncode == 0, f"load: 2 sessions kept, 4 failing calls, mixed bench "
          f"{time.time() - t0:.1f}s")
    run_cli("list")
    load_end = time.time()
    # two more scrapes after the load, so every rate window holds it
    wait_for(lambda: query("timestamp(sparsekv_sessions)")["data"]["result"][0]["value"][1]
             and float(query("timestamp(sparsekv_sessions)")["data"]["result"][0]["value"][1])
             > load_end + 1, 10, 0.2)
    at = time.time()

    # -- every metric name used must be exported by this server
    exported = set(get_json(prom_url + "/api/v1/label/__name__/values?" + urllib.parse.urlencode(
        {"match[]": '{job="sparsekv"}'}))["data"])
    dash = json.load(open(DASHBOARD))
    panels = [p for p in dash["panels"] if p.get("targets")]
    exprs = [(p["title"], t["refId"], t["expr"]) for p in panels for t in p["targets"]]
    rules_api = get_json(prom_url + "/api/v1/rules")["data"]["groups"]
    rules = [r for g in rules_api for r in g["rules"]]
    used = set()
    for _, _, e in exprs:
        used |= metric_names(e)
    for r in rules:
        used |= metric_names(r["query"])
    missing = sorted(used - exported)
    check(not missing, f"all {len(used)} metric names in the dashboard and the rules are exported "
          f"by the server", "not exported: " + ", ".join(missing))

    # -- dashboard panels: All, then this namespace and instance
    def expand(e, ns, inst):
        return (e.replace("$__rate_interval", RATE_INTERVAL).replace("$namespace", ns)
                .replace("$instance", inst))

    for label, ns, inst in (("All", ".*", ".*"), ("this instance", "local", target)):
        empty = []
        for title, ref, e in exprs:
            x = expand(e, ns, inst)
            res = query(x, at)
            if res.get("status") != "success":
                empty.append(f"{title} {ref}: {res.get('error')}")
                continue
            values = [float(s["value"][1]) for s in res["data"]["result"]]
            if not any(math.isfinite(v) for v in values):
                empty.append(f"{title} {ref}: {len(values)} series, none finite: {x}")
        check(not empty, f"{len(exprs)} panel queries ({label}) return finite data",
              "\n  " + "\n  ".join(empty))

    # -- template variables: label_values(selector, label)
    for v in dash["templating"]["list"]:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", v["query"]["query"])
        sel = expand(m.group(1), ".*", ".*")
        vals = get_json(prom_url + f"/api/v1/label/{m.group(2)}/values?" +
                        urllib.parse.urlencode({"match[]": sel}))["data"]
        want = "local" if v["name"] == "namespace" else target
        check(want in vals, f"variable {v['name']} lists {want}", vals)

    # -- alert rules
    n_file = len(re.findall(r"^\s*- alert:", open(RULES).read(), re.M))
    check(len(rules) == n_file and n_file > 0,
          f"Prometheus loaded all {n_file} alert rules of sparsekv.rules.yml", len(rules))
    evaluated = wait_for(lambda: all(r.get("lastEvaluation", "0001").startswith("20")
                                     for g in get_json(prom_url + "/api/v1/rules")["data"]["groups"]
                                     for r in g["rules"]) and True, 10, 0.2)
    rules = [r for g in get_json(prom_url + "/api/v1/rules")["data"]["groups"] for r in g["rules"]]
    for r in rules:
        name = r["name"]
        check(evaluated and r["health"] == "ok",
              f"{name}: evaluated by Prometheus, health ok", r.get("lastError") or r.get("health"))
        res = query(r["query"], at)
        check(res.get("status") == "success", f"{name}: expression accepted by the query API "
              f"({len(res.get('data', {}).get('result', []))} series at or over threshold)",
              res.get("error"))
        for s in signals(r["query"]):
            res = query(s, at)
            n = len(res.get("data", {}).get("result", [])) if res.get("status") == "success" else 0
            check(n > 0, f"{name}: signal returns data: {' '.join(s.split())[:110]}",
                  res.get("error") or "empty result")
    # the signal split really splits (a broken splitter would pass every rule unchanged)
    check(signals('a > 1 and (b{x=">"} > 2) > 3 unless absent(c) or d offset 1h') ==
          ["a", '(b{x=">"} > 2)', "c", "d"],
          "alert signal extraction splits at top-level comparisons and set operators")

    # -- snapshots: the series say what the server did with its directory
    def value(expr):
        res = query(expr, at)["data"]["result"]
        return float(res[0]["value"][1]) if len(res) == 1 else None

    restored = (value('sparsekv_snapshot_restores_total{result="ok"}'),
                value('sparsekv_snapshot_restores_total{result="skipped"}'))
    check(restored == (1.0, 1.0), "snapshot restores at start: 1 ok, 1 skipped (the damaged file)",
          restored)
    written = (value('sparsekv_snapshot_writes_total{result="ok"}'),
               value('sparsekv_snapshot_writes_total{result="error"}'),
               value("sparsekv_snapshot_last_write_seconds"))
    check(written[0] and written[0] >= 2 and written[1] == 0 and written[2] and written[2] > 0,
          "checkpoints wrote the loaded sessions (ok, error, last write seconds)", written)
    check(os.path.exists(os.path.join(snapshots, "damaged.skv.bad")),
          "the skipped file was renamed damaged.skv.bad")
    firing = wait_for(lambda: [a for a in get_json(prom_url + "/api/v1/alerts")["data"]["alerts"]
                               if a["labels"]["alertname"] == "SparsekvSnapshotRestoresSkipped"
                               and a["state"] == "firing"], 10, 0.2)
    check(firing and firing[0]["labels"].get("instance") == target,
          "SparsekvSnapshotRestoresSkipped fires for the server that skipped a file", firing)

    if CHECKS.failed:
        print("--- server log (tail) ---\n" + open(os.path.join(tmp, "server.log")).read()[-1500:])
        print("--- prometheus log (tail) ---\n" +
              open(os.path.join(tmp, "prometheus.log")).read()[-1500:])
    return 0


if __name__ == "__main__":
    CHECKS.finish(main())
