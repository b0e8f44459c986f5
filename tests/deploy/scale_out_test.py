#!/usr/bin/env python3
"""Local scale-out (deploy/local) against real replicas and a real nginx.

deploy/local/up.sh starts 3 sparsekv-server replicas and nginx hashing x-session-id
consistently over them. Through the router, 50 sessions with random ids are created, filled
with K/V and flushed (so they hold compressed chunks). Then:
  - spread: every replica holds some sessions and each session lives on exactly one replica
    (asked of each replica directly);
  - routing: every decode through the router answers bit for bit what the replica holding the
    session answers directly, and nginx's access log shows each call went to that replica;
  - drain safety: `sparsekv drain` of a replica the router still routes to stops with
    FAILED_PRECONDITION and changes nothing; naming the draining replica in --peers is a
    usage error;
  - drain under load: while two clients decode every session through the router in a loop
    (retrying NOT_FOUND and UNAVAILABLE with a short backoff, every answer compared bit for
    bit with the answer before the drain), deploy/local/drain.sh takes one replica out.
    Afterwards the drained replica holds no session, every session is on exactly one of the
    remaining replicas, sessions of the other replicas did not move, moved sessions answer
    bit for bit as before (through the router and directly), the drain's report names where
    each went, and no request failed. Retries are counted and printed.
Usage: scale_out_test.py SERVER_BIN CLI_BIN REPO_ROOT
Prints PASS/FAIL lines and "N passed, M failed"; exits 1 on any failure, 77 (skipped) without
nginx.
"""
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

SERVER, CLI, REPO = sys.argv[1:4]
sys.path.insert(0, os.path.join(REPO, "clients", "python"))
import numpy as np  # noqa: E402
import sparsekv_client as sk  # noqa: E402
from checks import Checks  # noqa: E402

# SPARSEKV_NGINX_BIN as for deploy/local's scripts (a path that does not exist shows the skip).
NGINX = os.environ.get("SPARSEKV_NGINX_BIN") or shutil.which("nginx") or "/usr/sbin/nginx"
if not os.access(NGINX, os.X_OK):
    print("SKIP: nginx is not installed (Debian package nginx; deploy/dev/setup.sh installs it)")
    sys.exit(77)

SESSIONS = 50
LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM, TOKENS = 2, 2, 8, 64, 200
RETRYABLE = ("NOT_FOUND", "UNAVAILABLE")
# How long nginx's old workers keep open calls after the drain's reload (a DecodeStream).
SHUTDOWN_S = 3

CHECKS = Checks()
ok, bad, check = CHECKS.ok, CHECKS.bad, CHECKS.check


def read_replicas(state):
    """{name: (addr, state)} from the state directory's replicas file."""
    out = {}
    with open(os.path.join(state, "replicas")) as f:
        for line in f:
            name, addr, _pid, _metrics, st = line.split()
            out[name] = (addr, st)
    return out


def holdings(clients):
    """{replica name: set of session ids it holds}, asked of each replica directly."""
    return {name: {s.id for s in c.list_sessions()} for name, c in clients.items()}


def decode_bytes(client, sid, layer, q):
    out, lse = client.decode(sid, layer, q, want_lse=True, out_dtype="float32")
    return out.tobytes() + lse.tobytes()


def routed_upstreams(access_log, since_line):
    """{session id: set of upstream addresses} of the Decode calls logged after line
    `since_line` of nginx's access log."""
    seen = {}
    with open(access_log) as f:
        lines = f.readlines()[since_line:]
    for line in lines:
        m = re.search(r"/Decode session=(\S+) upstream=(\S+)", line)
        if m:
            seen.setdefault(m.group(1), set()).add(m.group(2))
    return seen


def line_count(path):
    with open(path) as f:
        return sum(1 for _ in f)


class Worker:
    """Background threads running self.run(index) until finish()."""

    def __init__(self, threads=1):
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(threads)]

    def start(self):
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join()


class Load(Worker):
    """Clients that decode every session through the router in a loop until stopped, each
    answer compared with the answer before the drain. NOT_FOUND and UNAVAILABLE are retried
    after a short backoff (10 ms, doubling to 160 ms) for up to 20 s; anything else, an
    exhausted retry budget or a different answer is a failed request."""

    def __init__(self, target, sids, queries, expected, threads=2):
        super().__init__(threads)
        self.target, self.sids, self.queries, self.expected = target, sids, queries, expected
        self.lock = threading.Lock()
        self.requests = self.retries = 0
        self.retried_requests = 0
        self.retries_by_code = {}
        self.longest_retry_s = 0.0
        self.failures = []
        self.by_session = {}  # successful decodes per session id

    def run(self, index):
        client = sk.Client(self.target, timeout=10.0)
        i = index
        while not self.stop.is_set():
            sid = self.sids[i % len(self.sids)]
            layer = (i // len(self.sids)) % LAYERS
            i += 1
            self.one(client, sid, layer)
        client.close()

    def one(self, client, sid, layer):
        t0 = time.monotonic()
        retries, backoff = 0, 0.01
        while True:
            try:
                got = decode_bytes(client, sid, layer, self.queries[sid])
                break
            except sk.SparsekvError as e:
                if e.code not in RETRYABLE or time.monotonic() - t0 > 20:
                    with self.lock:
                        self.requests += 1
                        self.retries += retries
                        self.failures.append("%s layer %d: %s after %d retries"
                                             % (sid, layer, e, retries))
                    return
                retries += 1
                with self.lock:
                    self.retries_by_code[e.code] = self.retries_by_code.get(e.code, 0) + 1
                time.sleep(backoff)
                backoff = min(backoff * 2, 0.16)
        with self.lock:
            self.requests += 1
            self.retries += retries
            self.retried_requests += retries > 0
            if retries:
                self.longest_retry_s = max(self.longest_retry_s, time.monotonic() - t0)
            self.by_session[sid] = self.by_session.get(sid, 0) + 1
            if got != self.expected[(sid, layer)]:
                self.failures.append("%s layer %d: answer differs from before the drain"
                                     % (sid, layer))


class Writer(Worker):
    """A client that appends one token to every layer of a few sessions per step through the
    router (Decode with new_k/new_v), until stopped: the writes that must not be lost while
    their sessions move. Only NOT_FOUND is retried (nothing was applied then); any other error
    is a failed request."""

    def __init__(self, target, sids, seed):
        super().__init__()
        self.target, self.sids = target, sids
        self.rng = np.random.default_rng(seed)
        self.appended = {sid: 0 for sid in sids}  # tokens per layer acknowledged
        self.requests = self.retries = 0
        self.failures = []

    def run(self, index):
        client = sk.Client(self.target, timeout=10.0)
        while not self.stop.is_set():
            for sid in self.sids:
                for layer in range(LAYERS):
                    if not self.one(client, sid, layer):
                        client.close()
                        return
                self.appended[sid] += 1
        client.close()

    def one(self, client, sid, layer):
        nk = self.rng.standard_normal((KV_HEADS, HEAD_DIM), dtype=np.float32)
        nv = self.rng.standard_normal((KV_HEADS, HEAD_DIM), dtype=np.float32)
        q = self.rng.standard_normal((Q_HEADS, HEAD_DIM), dtype=np.float32)
        t0 = time.monotonic()
        self.requests += 1
        while True:
            try:
                client.decode(sid, layer, q, new_k=nk.astype(np.float16),
                              new_v=nv.astype(np.float16))
                return True
            except sk.SparsekvError as e:
                if e.code != "NOT_FOUND" or time.monotonic() - t0 > 20:
                    self.failures.append("append to %s layer %d: %s" % (sid, layer, e))
                    return False
                self.retries += 1
                time.sleep(0.01)


class StreamLoad(Worker):
    """One DecodeStream through the router, opened before the drain for a session that moves,
    stepping until stopped, each answer compared with the answer before the drain. The router
    keeps an open stream on the replica it started on until nginx's old worker closes it
    (worker_shutdown_timeout); the client then opens a new stream and repeats the step
    (counted as a reopen). NOT_FOUND answers on a stream are retried on that stream."""

    def __init__(self, target, sid, q, expected):
        super().__init__()
        self.target, self.sid, self.q, self.expected = target, sid, q, expected
        self.steps = self.reopens = self.retries = 0
        self.failures = []

    def run(self, index):
        client = sk.Client(self.target, timeout=10.0)
        stream = client.decode_stream(out_dtype="float32", session_id=self.sid)
        t_fail = None
        while not self.stop.is_set() and len(self.failures) < 5:
            try:
                out, lse = stream.decode(self.sid, 0, self.q, want_lse=True)
            except sk.SparsekvError as e:
                t_fail = t_fail or time.monotonic()
                if e.code not in RETRYABLE or time.monotonic() - t_fail > 20:
                    self.failures.append("stream step: %s" % e)
                    return
                if e.request_id is None:  # the whole stream ended: open another
                    stream.cancel()
                    stream = client.decode_stream(out_dtype="float32", session_id=self.sid)
                    self.reopens += 1
                else:
                    self.retries += 1
                time.sleep(0.01)
                continue
            t_fail = None
            self.steps += 1
            if out.tobytes() + lse.tobytes() != self.expected:
                self.failures.append("stream step: answer differs from before the drain")
            time.sleep(0.02)
        stream.cancel()
        client.close()


def run(cmd, env, timeout=120):
    return subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


def main():
    t_start = time.monotonic()
    state = tempfile.mkdtemp(prefix="sparsekv-scale-out-test.")
    env = dict(os.environ,
               SPARSEKV_LOCAL_DIR=state, SPARSEKV_PROXY_PORT="0",
               SPARSEKV_SERVER_BIN=SERVER, SPARSEKV_CLI_BIN=CLI, SPARSEKV_NGINX_BIN=NGINX,
               SPARSEKV_ROUTER_SHUTDOWN_S=str(SHUTDOWN_S),
               # 2 shared cores: no spinning decode workers, small fixed budgets.
               SPARSEKV_SERVER_FLAGS="--decode_spin_us=0 --decode_threads=0 "
                                     "--host_budget_bytes=1073741824")
    local = os.path.join(REPO, "deploy", "local")
    try:
        r = run(["bash", os.path.join(local, "up.sh"), "3"], env)
        if not check(r.returncode == 0, "up.sh 3 starts 3 replicas and nginx", r.stdout):
            return
        print(r.stdout, end="")
        with open(os.path.join(state, "proxy")) as f:
            proxy = f.read().strip()
        replicas = read_replicas(state)
        direct = {n: sk.Client(a, timeout=10.0) for n, (a, _) in replicas.items()}
        router = sk.Client(proxy, timeout=10.0)
        router.wait_ready()

        # -- 50 sessions through the router, random ids
        seed = int(time.time())
        print("seed %d" % seed)
        rnd = random.Random(seed)
        rng = np.random.default_rng(seed)
        sids = ["sess-%016x" % rnd.getrandbits(64) for _ in range(SESSIONS)]
        queries = {}
        policy = sk.Policy.uniform(0.5)
        for sid in sids:
            router.create_session(LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM, policy=policy,
                                  session_id=sid)
            k = rng.standard_normal((LAYERS, TOKENS, KV_HEADS, HEAD_DIM), dtype=np.float32)
            v = rng.standard_normal((LAYERS, TOKENS, KV_HEADS, HEAD_DIM), dtype=np.float32)
            router.append_kv(sid, k.astype(np.float16), v.astype(np.float16))
            router.flush(sid)
            queries[sid] = rng.standard_normal((Q_HEADS, HEAD_DIM), dtype=np.float32)

        # -- spread: each session on exactly one replica, every replica holds some
        held = holdings(direct)
        counts = {n: len(s) for n, s in held.items()}
        owner = {}
        dup = []
        for n, ids in held.items():
            for sid in ids:
                if sid in owner:
                    dup.append(sid)
                owner[sid] = n
        check(all(c > 0 for c in counts.values()), "every replica holds sessions", counts)
        check(not dup and set(owner) == set(sids) and sum(counts.values()) == SESSIONS,
              "each of the %d sessions lives on exactly one replica %s" % (SESSIONS, counts),
              "duplicated %s, missing %s" % (dup, set(sids) - set(owner)))

        # -- routing: through the router == directly on the holder, bit for bit
        log = os.path.join(state, "logs", "access.log")
        log_mark = line_count(log)
        expected, mismatched = {}, []
        for sid in sids:
            for layer in range(LAYERS):
                got = decode_bytes(router, sid, layer, queries[sid])
                want = decode_bytes(direct[owner[sid]], sid, layer, queries[sid])
                if got != want:
                    mismatched.append((sid, layer))
                expected[(sid, layer)] = got
        check(not mismatched, "%d decodes through the router equal the holding replica's "
              "answer bit for bit" % (SESSIONS * LAYERS), mismatched[:5])
        time.sleep(0.2)  # nginx writes the log line when the call ends
        upstreams = routed_upstreams(log, log_mark)
        addr_of = {n: a for n, (a, _) in replicas.items()}
        wrong = {sid: u for sid, u in upstreams.items()
                 if sid in owner and u != {addr_of[owner[sid]]}}
        check(len(upstreams) == SESSIONS and not wrong,
              "nginx's access log: every session's decodes went to the replica holding it",
              "%d sessions logged, wrong: %s" % (len(upstreams), list(wrong.items())[:3]))

        # -- the CLI routes by session too: a session it creates and appends to through the
        # router lives on the replica the router sends that id to (where the Python client,
        # which sends the header, finds it)
        cli_sids = ["cli-%08x" % rnd.getrandbits(32) for _ in range(12)]
        cli_failed = []
        for sid in cli_sids:
            r = run([CLI, "--server=" + proxy, "create", "--id", sid, "--layers", "1",
                     "--kv_heads", "1", "--q_heads", "1", "--head_dim", "8"], env)
            if r.returncode != 0:
                cli_failed.append((sid, r.stdout))
        held_now = holdings(direct)
        where = {sid: [n for n, ids in held_now.items() if sid in ids] for sid in cli_sids}
        spread = {tuple(w) for w in where.values()}
        found = []
        for sid in cli_sids:
            try:
                router.get_session(sid)
                found.append(sid)
            except sk.SparsekvError:
                pass
        check(not cli_failed and all(len(w) == 1 for w in where.values())
              and len(found) == len(cli_sids) and len(spread) > 1,
              "sessions created with the CLI through the router: each on one replica, spread "
              "over %d, found by a client that routes by id" % len(spread),
              "failed %s, placement %s, found %s" % (cli_failed[:2], where, found))
        for sid in cli_sids:
            for c in direct.values():
                try:
                    c.delete_session(sid)
                except sk.SparsekvError:
                    pass

        # -- drain refuses a replica the router still routes to, and changes nothing
        names = sorted(replicas)
        victim = max(names, key=lambda n: counts[n])  # the most sessions to move
        rest = [n for n in names if n != victim]
        peers = ",".join(addr_of[n] for n in rest)
        r = run([CLI, "--server=" + addr_of[victim], "drain", "--via=" + proxy,
                 "--peers=" + peers], env)
        check(r.returncode == 1 and "FAILED_PRECONDITION" in r.stdout
              and "still routes" in r.stdout and holdings(direct) == held,
              "drain of %s while the router still routes to it: FAILED_PRECONDITION, "
              "nothing moved" % victim, "exit %d: %s" % (r.returncode, r.stdout.strip()))
        r = run([CLI, "--server=" + addr_of[victim], "drain", "--via=" + proxy,
                 "--peers=" + peers + "," + addr_of[victim]], env)
        check(r.returncode == 2 and "draining replica" in r.stdout,
              "--peers naming the draining replica: usage error (exit 2)",
              "exit %d: %s" % (r.returncode, r.stdout.strip()))

        tokens_before = {sid: direct[owner[sid]].get_session(sid).stats.tokens_total
                         for sid in sids}

        # -- drain under load
        # Three of the drained replica's sessions get appends during the drain; the rest
        # only reads, whose answers must not change.
        writes = sorted(held[victim])[:3]
        reads = [sid for sid in sids if sid not in writes]
        streamed = sorted(held[victim])[3] if len(held[victim]) > 3 else None
        rows_before = {sid: direct[victim].get_session(sid).stats.tokens_per_layer
                       for sid in writes}
        load = Load(proxy, reads, queries, expected)
        writer = Writer(proxy, writes, seed + 1)
        streams = (StreamLoad(proxy, streamed, queries[streamed], expected[(streamed, 0)])
                   if streamed else None)
        load.start()
        writer.start()
        if streams:
            streams.start()
        time.sleep(1.0)  # traffic flowing before the reload
        before_drain = load.requests
        t0 = time.monotonic()
        r = run(["bash", os.path.join(local, "drain.sh"), "--keep", victim], env)
        drain_s = time.monotonic() - t0
        during_drain = load.requests - before_drain
        time.sleep(1.0)  # and after it: the moved sessions answered by their new owners
        load.finish()
        writer.finish()
        if streams:
            streams.finish()
        print(r.stdout, end="")
        check(r.returncode == 0, "drain.sh --keep %s exits 0 (%.1f s)" % (victim, drain_s),
              r.stdout[-2000:])

        after = holdings(direct)
        check(after[victim] == set(), "the drained replica %s holds no session" % victim,
              sorted(after[victim])[:5])
        new_owner, dup = {}, []
        for n in rest:
            for sid in after[n]:
                if sid in new_owner:
                    dup.append(sid)
                new_owner[sid] = n
        check(not dup and set(new_owner) == set(sids),
              "each session is on exactly one of the remaining replicas %s"
              % {n: len(after[n]) for n in rest},
              "duplicated %s, missing %s" % (dup, set(sids) - set(new_owner)))
        stayed_moved = [s for s in sids if owner[s] != victim and new_owner.get(s) != owner[s]]
        check(not stayed_moved, "the drain moved only the drained replica's sessions",
              stayed_moved[:5])
        moved = [s for s in sids if owner[s] == victim]
        reported = dict(re.findall(r"moved (\S+) -> (\S+) ", r.stdout))
        check(set(reported) == set(moved)
              and all(reported[s] == addr_of.get(new_owner.get(s), "?") for s in moved),
              "the drain's report names all %d moved sessions and where each went" % len(moved),
              "reported %d, e.g. %s" % (len(reported), list(reported.items())[:2]))
        check("%d moved" % len(moved) in r.stdout and "0 remaining" in r.stdout,
              "the drain's summary counts them", r.stdout[-300:])

        differs = []
        log_mark = line_count(log)
        for sid in sids:
            for layer in range(LAYERS):
                try:
                    via_router = decode_bytes(router, sid, layer, queries[sid])
                    at_owner = decode_bytes(direct[new_owner[sid]], sid, layer, queries[sid])
                except sk.SparsekvError as e:
                    differs.append((sid, layer, e.code))
                    continue
                # The written sessions changed: through the router they must still answer
                # what their replica answers.
                want = at_owner if sid in writes else expected[(sid, layer)]
                if via_router != want or at_owner != want:
                    differs.append((sid, layer, "different answer"))
        check(not differs, "after the drain all %d sessions (%d moved) answer bit for bit as "
              "before (the %d written ones as their replica does), through the router and on "
              "their replica" % (SESSIONS, len(moved), len(writes)), differs[:5])
        rows_after = {sid: direct[new_owner[sid]].get_session(sid).stats.tokens_per_layer
                      for sid in writes}
        lost = {sid: (rows_before[sid], writer.appended[sid], rows_after[sid]) for sid in writes
                if rows_after[sid] != [n + writer.appended[sid] for n in rows_before[sid]]}
        check(not lost and not writer.failures and min(writer.appended.values()) > 0,
              "appends during the drain: all %d acknowledged tokens per layer are on the moved "
              "sessions (%d requests, %d NOT_FOUND retries), none failed"
              % (sum(writer.appended.values()), writer.requests, writer.retries),
              "tokens per layer before, appended, after: %s; failures %s"
              % (lost, writer.failures[:3]))
        # The consistent hash: the ids of the replicas that stay still route to them, and the
        # moved ids to where the drain put them.
        time.sleep(0.2)
        upstreams = routed_upstreams(log, log_mark)
        wrong = {sid: u for sid, u in upstreams.items()
                 if sid in new_owner and u != {addr_of[new_owner[sid]]}}
        check(len(upstreams) == SESSIONS and not wrong,
              "nginx's access log after the drain: every session's decodes went to the replica "
              "holding it", "%d sessions logged, wrong: %s" % (len(upstreams),
                                                                list(wrong.items())[:3]))
        moved_reads = [s for s in moved if s not in writes]
        stats_differ = [s for s in moved_reads
                        if direct[new_owner[s]].get_session(s).stats.tokens_total
                        != tokens_before[s]]
        check(not stats_differ and all(tokens_before[s] > 0 for s in moved_reads),
              "moved read-only sessions keep their token counts", stats_differ[:5])

        print("load: %d requests (%d during the %.1f s drain), %d retries %s over %d requests, "
              "longest retried request %.3f s, %d failed"
              % (load.requests, during_drain, drain_s, load.retries, load.retries_by_code,
                 load.retried_requests, load.longest_retry_s, len(load.failures)))
        check(during_drain > 0 and all(load.by_session.get(s, 0) > 0 for s in moved_reads),
              "the load ran during the drain and decoded every moved session",
              "%d during the drain; moved sessions never decoded: %s"
              % (during_drain, [s for s in moved_reads if not load.by_session.get(s)][:5]))
        if streams:
            check(not streams.failures and streams.reopens >= 1 and streams.steps > 0
                  and drain_s >= SHUTDOWN_S - 0.5,
                  "a DecodeStream open across the drain: kept by the old router worker, the "
                  "drain waited %.1f s for it (shutdown timeout %d s), cut, reopened %d times, "
                  "%d steps bit for bit as before, %d NOT_FOUND retries"
                  % (drain_s, SHUTDOWN_S, streams.reopens, streams.steps, streams.retries),
                  streams.failures[:3])
        check(not load.failures, "no request failed under load (%d requests, %d retried)"
              % (load.requests, load.retried_requests), load.failures[:5])

        for c in list(direct.values()) + [router]:
            c.close()
    finally:
        r = run(["bash", os.path.join(local, "down.sh")], env, timeout=60)
        check(r.returncode == 0, "down.sh stops everything", r.stdout)
        shutil.rmtree(state, ignore_errors=True)
        print("%.1f s" % (time.monotonic() - t_start))


try:
    main()
except Exception as e:  # noqa: BLE001 -- a crash is one more failure, and the summary still prints
    bad("unexpected %s: %s" % (type(e).__name__, e))
CHECKS.finish()
