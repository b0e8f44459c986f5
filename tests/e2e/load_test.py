#!/usr/bin/python3
"""End-to-end load test (issue #11): concurrent clients against the real sparsekv-server binary
for a bounded time, every decode checked against a float64 reference over the session's
read-back contents, budget accounting and RSS checked afterwards.

Usage: /usr/bin/python3 load_test.py SERVER_BIN PROTO_DIR

Environment (all optional):
  SPARSEKV_LOAD_SECONDS      seconds of load (default 60; CI runs the default)
  SPARSEKV_LOAD_THREADS      client threads (default 6: the CI machine has 2 cores)
  SPARSEKV_LOAD_SEED         seed of the random mix (default: from the clock; printed)
  SPARSEKV_LOAD_BUDGET       --host_budget_bytes (default 4 MiB: tight, so requests that add
                             bytes regularly get RESOURCE_EXHAUSTED)
  SPARSEKV_LOAD_MIN_CHECKED  decodes that must be verified (default 100 per 60 s of load)
  SPARSEKV_RSS_SLACK_MIB     allowed RSS growth after deleting everything (default 64)

What runs. One server: tight --host_budget_bytes, --pruner_threads=1, --shutdown_grace=2s,
--decode_spin_us=0 (no busy polling on a shared 2-core machine). THREADS client threads (one
gRPC channel each) run a random mix for SPARSEKV_LOAD_SECONDS: CreateSession (layers 1-3,
kv_heads 1-4, GQA group 1-4, head_dim 16/32/64/128, fp16/bf16/fp32; K and V policies each of
sparsity 0/0.5/0.7, per-token or per-channel, magnitude or output-aware; chunk_tokens 32/64,
dense_window 8..32, so background pruning runs all the time), AppendKV streams (1-3 messages,
random layer ranges and token counts, input dtypes, sometimes obs_q), unary Decode (1-3 items
across sessions, sometimes new_k/new_v, random q dtype, scale, want_lse and out_dtype),
DecodeStream (2-5 requests), Flush, ReadKV, GetSession, ListSessions (paged), DeleteSession
(own sessions and, sometimes, another thread's), GetServerInfo. A monitor thread samples the
server's VmRSS and GetServerInfo (host_bytes_used <= host_budget_bytes at every sample).

Ownership. Each session has one owner thread, the only one that appends to it (AppendKV or a
decode's new token). The owner mirrors the session's contents (values rounded exactly as the
server stores them), so for its own sessions it knows every layer's token count exactly and
checks AppendKV/Decode/Flush/GetSession answers and every read-back row against the mirror: a
stored element reads back either as its value or as 0 (pruned); the newest dense_window rows
are never pruned; a pruned vector (per-token: a row of one head; per-channel: a channel of
one head over a group) lost exactly n - k elements, k = clamp(floor((1-s)n + 0.5), 1, n); after
Flush every eligible vector is pruned. Other threads decode (without new tokens), read,
flush, list and delete foreign sessions.

Decode check. Before a decode, each item's layer is read back (ReadKV); after it, the same
layer is read again for the tokens the step attended (tokens_attended). The result is
compared with the reference only when the read before equals the read after on the old
tokens (bit for bit) and the new token (if any) reads back exactly: background pruning only
ever turns values into zeros (never back), so two equal reads mean the decode saw exactly
those values. Otherwise the decode is counted as skipped (reason recorded). A layer with no
tokens must give zeros and lse = -inf. At least SPARSEKV_LOAD_MIN_CHECKED decodes must be
compared (non-empty context).

Tolerance (float64 reference on the read-back values; out_dtype FLOAT32). The inputs of the
server's arithmetic are exact: K and V are the stored values (read back bit for bit, then
widened to fp32 exactly), q is rounded to the session's storage dtype and to its send dtype
before sending, so only fp32 arithmetic error is left. Bound per query head h (u = 2^-24,
D = head_dim, T = tokens, L = scale * max_t sum_j |q_hj k_tj|):
  - logit error: a D-term fp32 dot product, times scale: <= (D + 4) u L (recursive summation
    bound gamma_D plus the products and the scaling; tree/SIMD orders are no worse);
  - softmax weights: relative error <= delta = 2 * logit error + 8u (exp is ~1 ulp, the
    online-softmax rescale factors exp(m_old - m_new) add a few ulp per block);
  - output: sum_t p_t v_t / sum_t p_t: weight errors give <= 2 delta max|V_g|, the T-term
    fp32 sums give <= (T + 4) u max|V_g|;
  - times 2 for the split-KV merge (partial results over threads and chunks are rescaled by
    exp(lse_i - lse) and summed once more).
  So tol_h = 2 (2 delta + (T + 4) u) max|V_g|: about 1e-3 max|V| for D = 128, L ~ 15,
  T = 600, 3e-4 max|V| for D = 64, L ~ 8. It is a worst-case bound: measured errors stay
  under ~2% of it (the summary prints the worst error as a fraction of its tolerance, per
  out_dtype). Mutating the reference showed what it catches: a 0.1% scale error (in most
  steps), dropping the first token, a wrong GQA head mapping.
  LSE: logit error + (T + 8) u (the sum) + 4u|lse| (rounding), times 2.
  out_dtype FLOAT16 / BFLOAT16 add one rounding of the fp32 result: 2^-11 |ref| + 2^-24
  (fp16 subnormals) / 2^-8 |ref|.

Allowed errors: RESOURCE_EXHAUSTED on requests that add bytes (CreateSession, AppendKV, a
decode with a new token, hence also a batch or stream message carrying one); NOT_FOUND only
for a session whose deletion some thread issued before the error came back. Everything else is
an unexpected error. A rejected request must change nothing: after a RESOURCE_EXHAUSTED decode
the owner's token counts are unchanged (no item of a batch applied), and an AppendKV stream
that fails leaves exactly a prefix of its messages applied.

After the load: the server is alive; ListSessions lists exactly the sessions the clients
think are live; once the background pruner is idle (two identical stat snapshots),
GetServerInfo.host_bytes_used == sum over live sessions of GetSession's
SessionStats.bytes_accounted, each at least that session's bytes_dense + bytes_compressed
(where the proto has no bytes_accounted: host_bytes_used == sum of bytes_dense +
bytes_compressed), and .sessions matches; every live session's contents match its mirror.
(Both sums are printed.)
Then every session is deleted: host_bytes_used and sessions return to 0, and the server's
VmRSS returns to within SPARSEKV_RSS_SLACK_MIB of its figure right after start-up (the server
should return idle slab and heap memory to the system; under AddressSanitizer the figure is
reported, not asserted: ASan's quarantine and shadow memory keep freed memory resident).
Finally SIGTERM: exit code 0 within the 2 s grace (+3 s margin).
"""

import collections
import math
import os
import sys
import tempfile
import threading
import time
import traceback
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import server_fixture as fx  # noqa: E402
from server_fixture import DT  # noqa: E402

SERVER_BIN = None
PROTO_DIR = None
pb2 = None
grpc = None

MiB = 1 << 20
LOAD_SECONDS = float(os.environ.get("SPARSEKV_LOAD_SECONDS", "60"))
THREADS = int(os.environ.get("SPARSEKV_LOAD_THREADS", "6"))
SEED = int(os.environ.get("SPARSEKV_LOAD_SEED", "0")) or (int(time.time() * 1000) % 1000000007)
BUDGET = int(os.environ.get("SPARSEKV_LOAD_BUDGET", str(4 * MiB)))
MIN_CHECKED = (int(os.environ.get("SPARSEKV_LOAD_MIN_CHECKED", "0"))
               or max(10, int(math.ceil(100 * LOAD_SECONDS / 60.0))))
RSS_SLACK = int(os.environ.get("SPARSEKV_RSS_SLACK_MIB", "64")) * MiB
GRACE_S = 2.0
SHUTDOWN_MARGIN_S = 3.0
MAX_LAYER_TOKENS = 640  # per layer; keeps reads and references cheap
RPC_TIMEOUT = 60.0
U = 2.0 ** -24

RESULT = None  # filled by setUpModule


# -- helpers ------------------------------------------------------------------------------





def keep_count(sparsity, n):
    # kernels/compressed_format.h: k = clamp(floor((1 - s) * n + 0.5), 1, n); s is a float32.
    s = float(np.float32(sparsity))
    return int(min(max(math.floor((1.0 - s) * n + 0.5), 1), n))


def normal(rng, shape):
    """N(0, 1) without values near 0, so a stored element never rounds to 0 (a read-back 0 is
    then always a pruned element)."""
    x = rng.standard_normal(shape)
    return np.where(np.abs(x) < 0.05, 0.5, x).astype(np.float32)


def fmt_policy(p):
    def tp(t):
        return "s=%g %s %s" % (t["sparsity"], "tok" if t["direction"] == 1 else "chan",
                               "mag" if t["scoring"] == 1 else "oa")
    return "K[%s] V[%s] dw=%d chunk=%d group=%d" % (tp(p["k"]), tp(p["v"]), p["dense_window"],
                                                    p["chunk_tokens"], p["group_tokens"])


class Sess:
    """A session and (for its owner) the mirror of its contents as stored (float64)."""

    def __init__(self, sid, owner, tenant, layers, kv, hq, d, dtype, policy):
        self.sid, self.owner, self.tenant = sid, owner, tenant
        self.layers, self.kv, self.hq, self.d, self.dtype = layers, kv, hq, d, dtype
        self.group = hq // kv
        self.policy = policy
        self.k = [np.zeros((0, kv, d)) for _ in range(layers)]
        self.v = [np.zeros((0, kv, d)) for _ in range(layers)]
        self.token_bytes = 2 * kv * d * fx.DTYPE_SIZE[dtype]

    def n(self, layer):
        return int(self.k[layer].shape[0])

    def counts(self):
        return [self.n(l) for l in range(self.layers)]

    def add(self, layer, k, v):
        k = np.reshape(k, (-1, self.kv, self.d))
        v = np.reshape(v, (-1, self.kv, self.d))
        self.k[layer] = np.concatenate([self.k[layer], k], axis=0)
        self.v[layer] = np.concatenate([self.v[layer], v], axis=0)

    def describe(self):
        return ("session %s (owner t%d): layers=%d kv_heads=%d q_heads=%d head_dim=%d dtype=%s "
                "policy %s tokens=%s" % (self.sid, self.owner, self.layers, self.kv, self.hq,
                                         self.d, fx.DTYPE_NAME[self.dtype], fmt_policy(self.policy),
                                         self.counts()))


class Registry:
    """Live sessions and deletions, shared by all threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.live = {}        # sid -> Sess, no deletion issued
        self.intent = set()   # sids whose DeleteSession was (about to be) sent

    def add(self, s):
        with self.lock:
            self.live[s.sid] = s

    def claim_delete(self, sid):
        """Marks sid as being deleted (before the RPC is sent); False if someone else did."""
        with self.lock:
            if sid in self.intent or sid not in self.live:
                return False
            self.intent.add(sid)
            del self.live[sid]
            return True

    def deleted(self, sid):
        with self.lock:
            return sid in self.intent

    def pick_foreign(self, rng, owner):
        with self.lock:
            c = [s for s in self.live.values() if s.owner != owner]
        return c[rng.integers(len(c))] if c else None

    def live_list(self):
        with self.lock:
            return list(self.live.values())


class Report:
    """Failures (thread-safe), by category, with a reproduction for each."""

    CATEGORIES = ("wrong-result", "wrong-state", "partial-apply", "unexpected-error",
                  "harness")

    def __init__(self):
        self.lock = threading.Lock()
        self.items = collections.defaultdict(list)
        self.counts = collections.Counter()
        self.fail_dir = None
        self.saved = 0

    def fail(self, category, msg, arrays=None):
        with self.lock:
            self.counts[category] += 1
            if arrays is not None and self.saved < 10:
                if self.fail_dir is None:
                    self.fail_dir = tempfile.mkdtemp(prefix="sparsekv-load-fail-")
                path = os.path.join(self.fail_dir, "case%d.npz" % self.saved)
                np.savez(path, **arrays)
                self.saved += 1
                msg += " [arrays: %s]" % path
            if len(self.items[category]) < 25:
                self.items[category].append(msg)

    def text(self, categories):
        out = []
        for c in categories:
            if self.counts[c]:
                out.append("%s: %d" % (c, self.counts[c]))
                out += ["  - " + m for m in self.items[c]]
                if self.counts[c] > len(self.items[c]):
                    out.append("  ... %d more" % (self.counts[c] - len(self.items[c])))
        return "\n".join(out)


# -- reference ----------------------------------------------------------------------------

def tolerances(q, k, v, scale, group):
    """Per query head: (out tolerance, lse tolerance excluding the |lse| term). See docstring."""
    t, hkv, d = k.shape
    hq = q.shape[0]
    tol = np.zeros(hq)
    lse_tol = np.zeros(hq)
    absk = np.abs(k)
    for h in range(hq):
        g = h // group
        big_l = scale * float((absk[:, g, :] @ np.abs(q[h])).max())
        logit = (d + 4) * U * big_l
        delta = 2 * logit + 8 * U
        vmax = float(np.abs(v[:, g, :]).max())
        tol[h] = 2.0 * (2 * delta + (t + 4) * U) * vmax
        lse_tol[h] = 2.0 * (logit + (t + 8) * U)
    return tol, lse_tol


# -- the client threads -------------------------------------------------------------------

class Worker(threading.Thread):
    def __init__(self, idx, port, reg, report, deadline, stop_event):
        super().__init__(name="load-%d" % idx, daemon=True)
        self.idx = idx
        self.rng = np.random.default_rng([SEED, idx])
        self.channel = grpc.insecure_channel(
            "127.0.0.1:%d" % port, options=[("grpc.max_send_message_length", -1),
                                            ("grpc.max_receive_message_length", -1)])
        self.stub = fx.load_stubs(PROTO_DIR)[1].KvCacheServiceStub(self.channel)
        self.reg, self.report, self.deadline, self.stop_event = reg, report, deadline, stop_event
        self.own = []
        self.ops = collections.Counter()
        self.checked = 0
        self.checked_empty = 0
        self.skipped = collections.Counter()
        self.worst = {}          # "f32"/"f16"/"bf16" out -> (err / tol, description)
        self.max_abs_err = 0.0
        self.n_created = 0

    # -- rpc plumbing --------------------------------------------------------------------
    def count(self, kind, code):
        self.ops[(kind, code)] += 1

    def allowed(self, code, sids, grows):
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and grows:
            return True
        if code == grpc.StatusCode.NOT_FOUND and any(self.reg.deleted(s) for s in sids):
            return True
        return False

    def rpc(self, kind, fn, sids=(), grows=False, ctx=""):
        try:
            r = fn()
            self.count(kind, "OK")
            return r, None
        except grpc.RpcError as e:
            code = e.code()
            self.count(kind, code.name)
            if not self.allowed(code, sids, grows):
                c = ctx() if callable(ctx) else ctx
                self.report.fail("unexpected-error", "%s -> %s: %r; %s" % (
                    kind, code.name, (e.details() or "")[:300], c))
            return None, code

    def msg_code_ok(self, kind, code_num, msg, sids, grows, ctx):
        """A DecodeStream response's error_code (google.rpc.Code number)."""
        code = next((c for c in grpc.StatusCode if c.value[0] == code_num), None)
        name = code.name if code is not None else str(code_num)
        self.count(kind, name)
        if code_num == 0:
            return True
        if code is None or not self.allowed(code, sids, grows):
            c = ctx() if callable(ctx) else ctx
            self.report.fail("unexpected-error", "%s message -> %s: %r; %s" % (
                kind, name, msg[:300], c))
        return False

    # -- random inputs -------------------------------------------------------------------
    def pick_dtype(self):
        r = self.rng.random()
        return DT.FLOAT32 if r < 0.5 else (DT.FLOAT16 if r < 0.75 else DT.BFLOAT16)

    def make_q(self, s):
        qdt = self.pick_dtype()
        q = fx.round_to(fx.round_to(normal(self.rng, (s.hq, s.d)), qdt), s.dtype)
        return q, qdt

    def drop_own(self, s):
        if s in self.own:
            self.own.remove(s)

    # -- ReadKV --------------------------------------------------------------------------
    def read_layer(self, s, layer, count=0, kind="ReadKV"):
        """Layer `layer` tokens [0, count) (count 0 = all) as float64 arrays, or None when the
        read failed (an allowed NOT_FOUND, or an error already reported)."""
        req = pb2.ReadKVRequest(session_id=s.sid, layer_begin=layer, layer_count=1,
                                token_begin=0, token_count=count)
        msgs, code = self.rpc(kind, lambda: list(self.stub.ReadKV(req, timeout=RPC_TIMEOUT)),
                              sids=[s.sid], ctx=lambda: "ReadKV layer %d count %d of %s" % (
                                  layer, count, s.describe()))
        if msgs is None:
            return None
        ks, vs, pos = [], [], 0
        for m in msgs:
            problem = None
            if m.layer != layer:
                problem = "message for layer %d" % m.layer
            elif m.token_begin != pos:
                problem = "token_begin %d, expected %d" % (m.token_begin, pos)
            elif m.k.dtype != s.dtype or m.v.dtype != s.dtype:
                problem = "dtype %d/%d, session dtype %d" % (m.k.dtype, m.v.dtype, s.dtype)
            elif (len(m.k.shape) != 3 or list(m.k.shape[1:]) != [s.kv, s.d]
                  or list(m.v.shape) != list(m.k.shape)):
                problem = "shapes %s/%s" % (list(m.k.shape), list(m.v.shape))
            if problem is None:
                try:
                    ks.append(fx.decode_tensor(m.k))
                    vs.append(fx.decode_tensor(m.v))
                except AssertionError as e:
                    problem = str(e)
            if problem is not None:
                self.report.fail("wrong-state", "ReadKV layer %d count %d: %s; %s" % (
                    layer, count, problem, s.describe()))
                return None
            pos += int(m.k.shape[0])
        k = np.concatenate(ks) if ks else np.zeros((0, s.kv, s.d))
        v = np.concatenate(vs) if vs else np.zeros((0, s.kv, s.d))
        if count and k.shape[0] != count:
            self.report.fail("wrong-state", "ReadKV layer %d token_count %d returned %d rows; %s"
                             % (layer, count, k.shape[0], s.describe()))
            return None
        return k, v

    def check_mirror(self, s, layer, k, v, after_flush=False, what="ReadKV"):
        """Own session: read-back rows [0, len(k)) against the mirror (see docstring)."""
        n = k.shape[0]
        problems = []
        if n > s.n(layer):
            problems.append("%d rows read, %d stored" % (n, s.n(layer)))
            n = 0
        pol = s.policy
        dw = pol["dense_window"]
        G = pol["group_tokens"]
        per_channel_flush = any(pol[t]["sparsity"] > 0 and pol[t]["direction"] == 2
                                for t in ("k", "v"))
        for name, got, ref in (("K", k[:n], s.k[layer][:n]), ("V", v[:n], s.v[layer][:n])):
            tp = pol[name.lower()]
            bad = (got != ref) & (got != 0)
            if bad.any():
                i = tuple(int(x) for x in np.argwhere(bad)[0])
                problems.append("%s: %d elements neither stored value nor 0, first at %s: %r vs "
                                "%r" % (name, int(bad.sum()), i, got[i], ref[i]))
                continue
            pruned = (got == 0) & (ref != 0)
            if n == s.n(layer) and pruned[max(0, n - dw):].any():
                problems.append("%s: element of the newest dense_window=%d rows pruned"
                                % (name, dw))
            sp = tp["sparsity"]
            if sp == 0:
                if pruned.any():
                    problems.append("%s: sparsity 0 but %d elements read as 0"
                                    % (name, int(pruned.sum())))
                continue
            if tp["direction"] == 1:
                kk = keep_count(sp, s.d)
                cnt = pruned.sum(axis=2)  # [n, kv]
                odd = (cnt != 0) & (cnt != s.d - kk)
                if odd.any():
                    r = tuple(int(x) for x in np.argwhere(odd)[0])
                    problems.append("%s per-token s=%g: row %d head %d has %d of %d pruned, want "
                                    "0 or %d" % (name, sp, r[0], r[1], int(cnt[r]), s.d, s.d - kk))
                if after_flush and n == s.n(layer):
                    end = n - dw
                    if per_channel_flush:
                        end = (max(0, end) // G) * G
                    if end > 0 and (cnt[:end] == 0).any():
                        r = tuple(int(x) for x in np.argwhere(cnt[:end] == 0)[0])
                        problems.append("%s: after Flush row %d head %d (< %d) still dense"
                                        % (name, r[0], r[1], end))
            else:
                kk = keep_count(sp, G)
                full = (n // G) * G
                for g0 in range(0, full, G):
                    cnt = pruned[g0:g0 + G].sum(axis=0)  # [kv, d]
                    odd = (cnt != 0) & (cnt != G - kk)
                    if odd.any():
                        r = tuple(int(x) for x in np.argwhere(odd)[0])
                        problems.append("%s per-channel s=%g: group at %d head %d channel %d has "
                                        "%d of %d pruned, want 0 or %d" % (
                                            name, sp, g0, r[0], r[1], int(cnt[r]), G, G - kk))
                        break
                    if after_flush and n == s.n(layer) and g0 + G <= n - dw and (cnt == 0).any():
                        problems.append("%s: after Flush group at %d (< %d) still dense"
                                        % (name, g0, n - dw))
                        break
                if pruned[full:].any():
                    problems.append("%s per-channel: rows past the last whole group (%d) pruned"
                                    % (name, full))
        if problems:
            self.report.fail("wrong-state", "%s layer %d (%d rows): %s; %s" % (
                what, layer, k.shape[0], "; ".join(problems), s.describe()),
                arrays={"got_k": k, "got_v": v, "mirror_k": s.k[layer], "mirror_v": s.v[layer]})
            return False
        return True

    # -- decode verification -------------------------------------------------------------
    def verify_result(self, res, s, layer, q, scale, want_lse, out_dtype, before, new_rows,
                      expect_tokens, own, what):
        """Checks one DecodeResult. before: (k, v) read before the step (n rows);
        new_rows: list of (k_row, v_row) the step(s) appended after them, in order;
        expect_tokens: tokens the step must have attended."""
        hq, d = s.hq, s.d
        out_dt = out_dtype or DT.FLOAT32
        shape_problem = None
        if res.out.dtype != out_dt or list(res.out.shape) != [hq, d]:
            shape_problem = "out dtype %d shape %s, want %d [%d, %d]" % (
                res.out.dtype, list(res.out.shape), out_dt, hq, d)
        elif want_lse and (res.lse.dtype != DT.FLOAT32 or list(res.lse.shape) != [hq]):
            shape_problem = "lse dtype %d shape %s" % (res.lse.dtype, list(res.lse.shape))
        elif not want_lse and len(res.lse.data):
            shape_problem = "lse returned without want_lse"
        if shape_problem:
            self.report.fail("wrong-result", "%s: %s; %s" % (what, shape_problem, s.describe()))
            return
        if res.tokens_attended != expect_tokens:
            if own:
                self.report.fail("wrong-state", "%s: tokens_attended %d, the owner expects %d; "
                                 "%s" % (what, res.tokens_attended, expect_tokens, s.describe()))
            else:
                self.skipped["context moved (foreign appends)"] += 1
            return
        got = fx.decode_tensor(res.out)
        got_lse = fx.decode_tensor(res.lse) if want_lse else None
        if expect_tokens == 0:
            if np.any(got != 0) or (want_lse and not np.all(np.isneginf(got_lse))):
                self.report.fail("wrong-result", "%s: empty layer gave out max %r lse %r; %s" % (
                    what, float(np.abs(got).max()), got_lse, s.describe()))
            self.checked_empty += 1
            return
        after = self.read_layer(s, layer, count=expect_tokens, kind="ReadKV(verify)")
        if after is None:
            self.skipped["read after failed (deleted)"] += 1
            return
        n0 = before[0].shape[0]
        if not (np.array_equal(after[0][:n0], before[0]) and
                np.array_equal(after[1][:n0], before[1])):
            self.skipped["pruned between the reads"] += 1
            return
        for j, (nk, nv) in enumerate(new_rows):
            row = n0 + j
            if row >= expect_tokens:
                break
            if not (np.array_equal(after[0][row], nk) and np.array_equal(after[1][row], nv)):
                self.report.fail("wrong-state", "%s: appended token (row %d) reads back "
                                 "differently (max diff %r); %s" % (
                                     what, row, float(np.abs(after[0][row] - nk).max()),
                                     s.describe()))
                return
        k, v = after
        sc = float(np.float32(scale)) if scale else 1.0 / math.sqrt(d)
        ref, ref_lse = fx.reference_attention(q, k, v, sc)
        tol_h, lse_tol_h = tolerances(q, k, v, sc, s.group)
        tol = tol_h[:, None] * np.ones((1, d))
        if out_dt == DT.FLOAT16:
            tol = tol * (1 + 2.0 ** -11) + 2.0 ** -11 * np.abs(ref) + 2.0 ** -24
        elif out_dt == DT.BFLOAT16:
            tol = tol * (1 + 2.0 ** -8) + 2.0 ** -8 * np.abs(ref)
        err = np.abs(got - ref)
        ratio = err / tol
        problem = None
        if not np.all(np.isfinite(got)):
            problem = "non-finite output"
        elif (ratio > 1).any():
            i = np.unravel_index(np.argmax(ratio), ratio.shape)
            problem = ("%d of %d outputs off; worst [%d,%d]: got %r ref %r err %.3g tol %.3g" % (
                int((ratio > 1).sum()), ratio.size, i[0], i[1], got[i], ref[i], err[i], tol[i]))
        if problem is None and want_lse:
            lt = lse_tol_h + 2.0 * 4 * U * np.abs(ref_lse)
            lerr = np.abs(got_lse - ref_lse)
            if not (lerr <= lt).all():
                h = int(np.argmax(lerr / lt))
                problem = "lse head %d: got %r ref %r tol %.3g" % (h, got_lse[h], ref_lse[h], lt[h])
        if problem:
            self.report.fail("wrong-result", "%s layer %d (%d tokens, scale %r, out_dtype %d): %s;"
                             " %s" % (what, layer, expect_tokens, scale, out_dt, problem,
                                      s.describe()),
                             arrays={"q": q, "k": k, "v": v, "got": got, "ref": ref,
                                     "scale": np.array(sc), "group": np.array(s.group)})
            return
        self.checked += 1
        m = float(ratio.max())
        self.max_abs_err = max(self.max_abs_err, float(err.max()))
        key = fx.DTYPE_NAME[out_dt]
        if m > self.worst.get(key, (0.0, ""))[0]:
            self.worst[key] = (m, "%s D=%d T=%d cache %s" % (
                what, d, expect_tokens, fx.DTYPE_NAME[s.dtype]))

    # -- operations ----------------------------------------------------------------------
    def random_policy(self):
        chunk = int(self.rng.choice([32, 64]))
        group = 64 if (chunk == 64 and self.rng.random() < 0.5) else 32

        def tp():
            return {"sparsity": float(self.rng.choice([0.0, 0.5, 0.7])),
                    "direction": 1 if self.rng.random() < 0.7 else 2,
                    "scoring": 1 if self.rng.random() < 0.5 else 2}
        return {"k": tp(), "v": tp(), "dense_window": int(self.rng.integers(8, 33)),
                "chunk_tokens": chunk, "group_tokens": group}

    def op_create(self):
        self.n_created += 1
        sid = "lt%d-t%d-%d" % (SEED % 1000, self.idx, self.n_created)
        layers = int(self.rng.integers(1, 4))
        kv = int(self.rng.integers(1, 5))
        hq = kv * int(self.rng.integers(1, 5))
        d = int(self.rng.choice([16, 32, 64, 128]))
        dtype = int(self.rng.choice([DT.FLOAT16, DT.BFLOAT16, DT.FLOAT32]))
        pol = self.random_policy()
        tenant = str(self.rng.choice(["", "ta", "tb"]))

        def tpp(t):
            return pb2.TensorPolicy(sparsity=t["sparsity"], direction=t["direction"],
                                    scoring=t["scoring"])
        req = pb2.CreateSessionRequest(
            session_id=sid, tenant=tenant,
            layout=pb2.Layout(num_layers=layers, num_kv_heads=kv, num_q_heads=hq, head_dim=d,
                              dtype=dtype),
            policy=pb2.Policy(k=tpp(pol["k"]), v=tpp(pol["v"]), dense_window=pol["dense_window"],
                              chunk_tokens=pol["chunk_tokens"], group_tokens=pol["group_tokens"]))
        req.labels["thread"] = str(self.idx)
        s = Sess(sid, self.idx, tenant or "default", layers, kv, hq, d, dtype, pol)
        r, code = self.rpc("CreateSession", lambda: self.stub.CreateSession(req,
                                                                            timeout=RPC_TIMEOUT),
                           grows=True, ctx=lambda: "create " + s.describe())
        if r is None:
            return code
        if (r.id != sid or r.tenant != s.tenant or r.layout.num_layers != layers or
                r.layout.num_kv_heads != kv or r.layout.num_q_heads != hq or
                r.layout.head_dim != d or r.layout.dtype != dtype or
                list(r.stats.tokens_per_layer) != [0] * layers):
            self.report.fail("wrong-state", "CreateSession echo: %s" % str(r)[:400])
        self.reg.add(s)
        self.own.append(s)
        return None

    def op_append(self, s):
        reqs, expect, rows = [], [], []
        counts = s.counts()
        for _ in range(int(self.rng.integers(1, 4))):
            lb = int(self.rng.integers(0, s.layers))
            nl = int(self.rng.integers(1, s.layers - lb + 1))
            r = self.rng.random()
            t = int(self.rng.integers(1, 25) if r < 0.7 else
                    self.rng.integers(25, 97) if r < 0.95 else self.rng.integers(97, 201))
            t = min(t, MAX_LAYER_TOKENS - max(counts[lb:lb + nl]))
            if t <= 0:
                continue
            in_dt = self.pick_dtype()
            k = normal(self.rng, (nl, t, s.kv, s.d))
            v = normal(self.rng, (nl, t, s.kv, s.d))
            m = pb2.AppendKVRequest(session_id=s.sid, layer_begin=lb,
                                    k=fx.make_tensor(pb2, k, in_dt),
                                    v=fx.make_tensor(pb2, v, in_dt))
            if self.rng.random() < 0.25:
                obs = normal(self.rng, (nl, int(self.rng.integers(1, 4)), s.hq, s.d))
                m.obs_q.CopyFrom(fx.make_tensor(pb2, obs, DT.FLOAT32))
            reqs.append(m)
            rows.append((lb, nl, fx.round_to(fx.round_to(k, in_dt), s.dtype),
                         fx.round_to(fx.round_to(v, in_dt), s.dtype)))
            for l in range(lb, lb + nl):
                counts[l] += t
            expect.append(list(counts))
        if not reqs:
            return None

        def ctx():
            return "AppendKV of %d messages %s on %s" % (
                len(reqs), [(m.layer_begin, list(m.k.shape), m.k.dtype, list(m.obs_q.shape))
                            for m in reqs], s.describe())
        resp, code = self.rpc("AppendKV", lambda: self.stub.AppendKV(iter(reqs),
                                                                     timeout=RPC_TIMEOUT),
                              sids=[s.sid], grows=True, ctx=ctx)
        applied = len(reqs)
        if resp is not None:
            total = sum(r[1] * r[2].shape[1] for r in rows)
            if (resp.messages != len(reqs) or resp.tokens_appended != total or
                    list(resp.tokens_per_layer) != expect[-1]):
                self.report.fail("wrong-state", "AppendKV answered messages=%d tokens_appended=%d"
                                 " tokens_per_layer=%s, want %d %d %s; %s" % (
                                     resp.messages, resp.tokens_appended,
                                     list(resp.tokens_per_layer), len(reqs), total, expect[-1],
                                     ctx()))
                self.drop_own(s)
                return None
        elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # The messages before the failing one stay applied, nothing of the failing one.
            g, _ = self.rpc("GetSession", lambda: self.stub.GetSession(
                pb2.GetSessionRequest(session_id=s.sid), timeout=RPC_TIMEOUT), sids=[s.sid])
            if g is None:
                self.drop_own(s)
                return code
            now = list(g.stats.tokens_per_layer)
            prefixes = [s.counts()] + expect
            if now not in prefixes[:-1]:
                self.report.fail("partial-apply", "AppendKV failed RESOURCE_EXHAUSTED but the "
                                 "session holds tokens_per_layer=%s, not one of the prefixes %s "
                                 "(all but the last); %s" % (now, prefixes[:-1], ctx()))
                self.drop_own(s)
                return code
            applied = prefixes.index(now)
        else:
            self.drop_own(s)
            return code
        for lb, nl, k, v in rows[:applied]:
            for i in range(nl):
                s.add(lb + i, k[i], v[i])
        return code

    def pick_item_session(self, own_first):
        if own_first and self.own:
            return self.own[self.rng.integers(len(self.own))], True
        if self.rng.random() < 0.5 and self.own:
            return self.own[self.rng.integers(len(self.own))], True
        f = self.reg.pick_foreign(self.rng, self.idx)
        if f is not None:
            return f, False
        if self.own:
            return self.own[self.rng.integers(len(self.own))], True
        return None, False

    def op_decode(self):
        n_items = 1 if self.rng.random() < 0.7 else int(self.rng.integers(2, 4))
        items, seen = [], set()
        for i in range(n_items):
            s, own = self.pick_item_session(i == 0)
            if s is None:
                break
            layer = int(self.rng.integers(s.layers))
            if (s.sid, layer) in seen:
                continue
            seen.add((s.sid, layer))
            new = own and self.rng.random() < 0.35 and s.n(layer) < MAX_LAYER_TOKENS
            items.append({"s": s, "layer": layer, "own": own, "new": new})
        if not items:
            return None
        out_dtype = int(self.rng.choice([DT.UNSPECIFIED, DT.FLOAT32, DT.FLOAT16, DT.BFLOAT16]))
        pitems = []
        for it in items:
            s = it["s"]
            before = self.read_layer(s, it["layer"])
            if before is None:
                return None
            if it["own"]:
                if before[0].shape[0] != s.n(it["layer"]):
                    self.report.fail("wrong-state", "ReadKV of layer %d: %d rows, the owner "
                                     "appended %d; %s" % (it["layer"], before[0].shape[0],
                                                          s.n(it["layer"]), s.describe()))
                    self.drop_own(s)
                    return None
                self.check_mirror(s, it["layer"], *before)
            it["before"] = before
            q, qdt = self.make_q(s)
            it["q"] = q
            it["scale"] = 0.0 if self.rng.random() < 0.7 else float(
                np.float32(self.rng.uniform(0.02, 0.3)))
            it["want_lse"] = bool(self.rng.random() < 0.5)
            di = pb2.DecodeItem(session_id=s.sid, layer=it["layer"],
                                q=fx.make_tensor(pb2, q, qdt), want_lse=it["want_lse"],
                                scale=it["scale"])
            it["rows"] = []
            if it["new"]:
                in_dt = self.pick_dtype()
                nk = normal(self.rng, (s.kv, s.d))
                nv = normal(self.rng, (s.kv, s.d))
                di.new_k.CopyFrom(fx.make_tensor(pb2, nk, in_dt))
                di.new_v.CopyFrom(fx.make_tensor(pb2, nv, in_dt))
                it["rows"] = [(fx.round_to(fx.round_to(nk, in_dt), s.dtype),
                               fx.round_to(fx.round_to(nv, in_dt), s.dtype))]
            pitems.append(di)
        req = pb2.DecodeRequest(items=pitems, out_dtype=out_dtype,
                                request_id=int(self.rng.integers(1, 1 << 62)))
        grows = any(it["new"] for it in items)

        def ctx():
            return "Decode of %d items %s out_dtype %d; %s" % (
                len(items), [(it["s"].sid, it["layer"], "new" if it["new"] else "-")
                             for it in items], out_dtype,
                " | ".join(it["s"].describe() for it in items))
        resp, code = self.rpc("Decode", lambda: self.stub.Decode(req, timeout=RPC_TIMEOUT),
                              sids=[it["s"].sid for it in items], grows=grows, ctx=ctx)
        if resp is None:
            # a failed request applies nothing: no item's new token may have been appended
            self.check_nothing_appended(items, "Decode failed %s" % code.name, ctx)
            return code
        if resp.request_id != req.request_id or len(resp.results) != len(items):
            self.report.fail("wrong-result", "Decode answered request_id %d with %d results, "
                             "want %d and %d; %s" % (resp.request_id, len(resp.results),
                                                     req.request_id, len(items), ctx()))
            return None
        for it in items:
            for nk, nv in it["rows"]:
                it["s"].add(it["layer"], nk, nv)
        for i, (it, res) in enumerate(zip(items, resp.results)):
            n0 = it["before"][0].shape[0]
            self.verify_result(res, it["s"], it["layer"], it["q"], it["scale"], it["want_lse"],
                               out_dtype, it["before"], it["rows"], n0 + len(it["rows"]),
                               it["own"], "Decode item %d/%d" % (i, len(items)))
        return None

    def check_nothing_appended(self, items, what, ctx):
        for it in items:
            if not (it["own"] and it["new"]):
                continue
            s = it["s"]
            g, _ = self.rpc("GetSession", lambda: self.stub.GetSession(
                pb2.GetSessionRequest(session_id=s.sid), timeout=RPC_TIMEOUT), sids=[s.sid])
            if g is None:
                continue
            if list(g.stats.tokens_per_layer) != s.counts():
                self.report.fail("partial-apply", "%s, yet session %s now holds "
                                 "tokens_per_layer=%s, the owner expects %s (a new token was "
                                 "appended); %s" % (what, s.sid, list(g.stats.tokens_per_layer),
                                                    s.counts(), ctx()))
                self.drop_own(s)

    def op_decode_stream(self):
        if not self.own:
            return None
        s = self.own[self.rng.integers(len(self.own))]
        layer = int(self.rng.integers(s.layers))
        before = self.read_layer(s, layer)
        if before is None:
            return None
        if before[0].shape[0] != s.n(layer):
            self.report.fail("wrong-state", "ReadKV layer %d: %d rows, the owner appended %d; %s"
                             % (layer, before[0].shape[0], s.n(layer), s.describe()))
            self.drop_own(s)
            return None
        self.check_mirror(s, layer, *before)
        out_dtype = int(self.rng.choice([DT.UNSPECIFIED, DT.FLOAT32, DT.FLOAT16, DT.BFLOAT16]))
        steps = []
        reqs = []
        room = MAX_LAYER_TOKENS - s.n(layer)
        for i in range(int(self.rng.integers(2, 6))):
            q, qdt = self.make_q(s)
            st = {"q": q, "scale": 0.0 if self.rng.random() < 0.7 else float(
                np.float32(self.rng.uniform(0.02, 0.3))), "want_lse": bool(self.rng.random() < 0.5),
                "row": None}
            di = pb2.DecodeItem(session_id=s.sid, layer=layer, q=fx.make_tensor(pb2, q, qdt),
                                want_lse=st["want_lse"], scale=st["scale"])
            if room > 0 and self.rng.random() < 0.5:
                room -= 1
                in_dt = self.pick_dtype()
                nk = normal(self.rng, (s.kv, s.d))
                nv = normal(self.rng, (s.kv, s.d))
                di.new_k.CopyFrom(fx.make_tensor(pb2, nk, in_dt))
                di.new_v.CopyFrom(fx.make_tensor(pb2, nv, in_dt))
                st["row"] = (fx.round_to(fx.round_to(nk, in_dt), s.dtype),
                             fx.round_to(fx.round_to(nv, in_dt), s.dtype))
            steps.append(st)
            reqs.append(pb2.DecodeRequest(items=[di], out_dtype=out_dtype, request_id=1000 + i))

        def ctx():
            return "DecodeStream of %d requests on layer %d (new tokens at %s) out_dtype %d; %s" % (
                len(reqs), layer, [i for i, st in enumerate(steps) if st["row"] is not None],
                out_dtype, s.describe())
        resps, code = self.rpc("DecodeStream", lambda: list(self.stub.DecodeStream(
            iter(reqs), timeout=RPC_TIMEOUT)), sids=[s.sid], ctx=ctx)
        if resps is None:
            # the stream itself failed: what was applied is unknown; stop tracking it
            self.drop_own(s)
            return code
        if [r.request_id for r in resps] != [r.request_id for r in reqs]:
            self.report.fail("wrong-result", "DecodeStream answered request ids %s to %s; %s" % (
                [r.request_id for r in resps], [r.request_id for r in reqs], ctx()))
            self.drop_own(s)
            return None
        n0 = before[0].shape[0]
        cur = n0
        applied_rows = []
        checks = []
        rejected = False
        for st, r in zip(steps, resps):
            ok = self.msg_code_ok("DecodeStream.msg", r.error_code, r.error_message, [s.sid],
                                  st["row"] is not None, ctx)
            if not ok:
                if r.results:
                    self.report.fail("wrong-result", "DecodeStream error response carries results;"
                                     " %s" % ctx())
                if r.error_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]:
                    rejected = True
                    continue
                if r.error_code == grpc.StatusCode.NOT_FOUND.value[0]:
                    self.drop_own(s)
                    return None
                self.drop_own(s)
                return None
            if st["row"] is not None:
                cur += 1
                applied_rows.append(st["row"])
            if len(r.results) != 1:
                self.report.fail("wrong-result", "DecodeStream response with %d results; %s" % (
                    len(r.results), ctx()))
                continue
            checks.append((st, r.results[0], cur))
        for row in applied_rows:
            s.add(layer, *row)
        if rejected or applied_rows:
            # own session: its token count must be exactly what the answered messages say
            self.check_nothing_appended([{"s": s, "own": True, "new": True}],
                                        "DecodeStream (some messages rejected RESOURCE_EXHAUSTED)"
                                        if rejected else "DecodeStream", ctx)
        for j, (st, res, tokens) in enumerate(checks):
            self.verify_result(res, s, layer, st["q"], st["scale"], st["want_lse"], out_dtype,
                               before, applied_rows, tokens, True,
                               "DecodeStream msg %d/%d" % (j, len(checks)))
        return None

    def op_flush(self):
        own = bool(self.own) and self.rng.random() < 0.8
        s = self.own[self.rng.integers(len(self.own))] if own else self.reg.pick_foreign(
            self.rng, self.idx)
        if s is None:
            return None
        r, code = self.rpc("Flush", lambda: self.stub.Flush(pb2.FlushRequest(session_id=s.sid),
                                                            timeout=RPC_TIMEOUT),
                           sids=[s.sid], ctx=lambda: "Flush of " + s.describe())
        if r is None or not own:
            return code
        if list(r.stats.tokens_per_layer) != s.counts() or r.stats.pruning_backlog_tokens != 0:
            self.report.fail("wrong-state", "Flush stats tokens_per_layer=%s backlog=%d, the owner"
                             " expects %s and 0; %s" % (list(r.stats.tokens_per_layer),
                                                        r.stats.pruning_backlog_tokens,
                                                        s.counts(), s.describe()))
            return None
        layer = int(self.rng.integers(s.layers))
        kv = self.read_layer(s, layer)
        if kv is not None:
            # A remainder whose chunk did not fit the full budget stays dense, and Flush says so.
            self.check_mirror(s, layer, *kv, after_flush=r.tokens_left_dense == 0,
                              what="ReadKV after Flush")
        return None

    def op_read(self):
        own = bool(self.own) and self.rng.random() < 0.7
        s = self.own[self.rng.integers(len(self.own))] if own else self.reg.pick_foreign(
            self.rng, self.idx)
        if s is None:
            return None
        layer = int(self.rng.integers(s.layers))
        kv = self.read_layer(s, layer)
        if kv is not None and own:
            if kv[0].shape[0] != s.n(layer):
                self.report.fail("wrong-state", "ReadKV layer %d: %d rows, owner appended %d; %s"
                                 % (layer, kv[0].shape[0], s.n(layer), s.describe()))
                self.drop_own(s)
            else:
                self.check_mirror(s, layer, *kv)
        return None

    def op_get(self):
        own = bool(self.own) and self.rng.random() < 0.7
        s = self.own[self.rng.integers(len(self.own))] if own else self.reg.pick_foreign(
            self.rng, self.idx)
        if s is None:
            return None
        g, code = self.rpc("GetSession", lambda: self.stub.GetSession(
            pb2.GetSessionRequest(session_id=s.sid), timeout=RPC_TIMEOUT), sids=[s.sid],
            ctx=lambda: "GetSession of " + s.describe())
        if g is None:
            return code
        st = g.stats
        tokens = list(st.tokens_per_layer)
        problems = []
        if g.id != s.sid or g.layout.num_layers != s.layers or g.layout.head_dim != s.d:
            problems.append("id/layout echo %s" % str(g.layout).replace("\n", " "))
        if st.tokens_total != sum(tokens):
            problems.append("tokens_total %d != sum %s" % (st.tokens_total, tokens))
        if st.bytes_dense_equivalent != st.tokens_total * s.token_bytes:
            problems.append("bytes_dense_equivalent %d != tokens_total %d x %d" % (
                st.bytes_dense_equivalent, st.tokens_total, s.token_bytes))
        if st.bytes_dense + st.bytes_compressed > st.bytes_dense_equivalent:
            problems.append("bytes_dense %d + bytes_compressed %d > dense equivalent %d" % (
                st.bytes_dense, st.bytes_compressed, st.bytes_dense_equivalent))
        acc = accounted(st)
        if acc is not None and acc < st.bytes_dense + st.bytes_compressed:
            problems.append("bytes_accounted %d < bytes_dense %d + bytes_compressed %d" % (
                acc, st.bytes_dense, st.bytes_compressed))
        if own and tokens != s.counts():
            problems.append("tokens_per_layer %s, the owner expects %s" % (tokens, s.counts()))
        if problems:
            self.report.fail("wrong-state", "GetSession: %s; %s" % ("; ".join(problems),
                                                                   s.describe()))
        return None

    def op_list(self):
        tenant = str(self.rng.choice(["", "", "ta", "tb", "default"]))
        must = {s.sid for s in self.own if tenant in ("", s.tenant)}
        seen, token, last = [], "", ""
        for _ in range(500):
            req = pb2.ListSessionsRequest(tenant=tenant, page_size=int(self.rng.integers(1, 65)),
                                          page_token=token)
            r, code = self.rpc("ListSessions", lambda: self.stub.ListSessions(
                req, timeout=RPC_TIMEOUT))
            if r is None:
                return code
            for x in r.sessions:
                if x.id <= last:
                    self.report.fail("wrong-state", "ListSessions(tenant=%r): %r after %r (not "
                                     "ordered / duplicate)" % (tenant, x.id, last))
                    return None
                if tenant and x.tenant != tenant:
                    self.report.fail("wrong-state", "ListSessions(tenant=%r) returned %r of "
                                     "tenant %r" % (tenant, x.id, x.tenant))
                last = x.id
                seen.append(x.id)
            token = r.next_page_token
            if not token:
                break
        else:
            self.report.fail("wrong-state", "ListSessions paging did not end in 500 pages")
            return None
        missing = sorted(sid for sid in must - set(seen) if not self.reg.deleted(sid))
        if missing:
            self.report.fail("wrong-state", "ListSessions(tenant=%r) misses live sessions %s"
                             % (tenant, missing[:5]))
        return None

    def op_delete(self, s=None):
        if s is None:
            if self.own and self.rng.random() < 0.85:
                s = self.own[self.rng.integers(len(self.own))]
            else:
                s = self.reg.pick_foreign(self.rng, self.idx)
        if s is None or not self.reg.claim_delete(s.sid):
            return None
        self.drop_own(s)
        r, code = self.rpc("DeleteSession", lambda: self.stub.DeleteSession(
            pb2.DeleteSessionRequest(session_id=s.sid), timeout=RPC_TIMEOUT),
            ctx=lambda: "DeleteSession of " + s.describe())
        if r is None:
            return code
        g, _ = self.rpc("GetSession(deleted)", lambda: self.stub.GetSession(
            pb2.GetSessionRequest(session_id=s.sid), timeout=RPC_TIMEOUT), sids=[s.sid])
        if g is not None:
            self.report.fail("wrong-state", "GetSession finds %s after DeleteSession" % s.sid)
        return None

    def op_info(self):
        r, code = self.rpc("GetServerInfo", lambda: self.stub.GetServerInfo(
            pb2.GetServerInfoRequest(), timeout=RPC_TIMEOUT))
        if r is not None and (r.host_budget_bytes != BUDGET or r.host_bytes_used > BUDGET):
            self.report.fail("wrong-state", "GetServerInfo host_budget_bytes=%d host_bytes_used=%d"
                             " (budget %d)" % (r.host_budget_bytes, r.host_bytes_used, BUDGET))
        return code

    def relieve(self):
        """After a budget rejection, sometimes free this thread's largest session."""
        if self.own and self.rng.random() < 0.3:
            s = max(self.own, key=lambda x: sum(x.counts()) * x.token_bytes)
            self.op_delete(s)

    def step(self):
        self.own = [s for s in self.own if not self.reg.deleted(s.sid)]
        if not self.own or (len(self.own) < 2 and self.rng.random() < 0.3):
            code = self.op_create()
        elif len(self.own) > 4:
            code = self.op_delete(self.own[0])
        else:
            r = self.rng.random()
            if r < 0.04:
                code = self.op_create()
            elif r < 0.30:
                code = self.op_append(self.own[self.rng.integers(len(self.own))])
            elif r < 0.60:
                code = self.op_decode()
            elif r < 0.70:
                code = self.op_decode_stream()
            elif r < 0.75:
                code = self.op_flush()
            elif r < 0.82:
                code = self.op_read()
            elif r < 0.89:
                code = self.op_get()
            elif r < 0.91:
                code = self.op_list()
            elif r < 0.97:
                code = self.op_delete()
            else:
                code = self.op_info()
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            self.relieve()

    def run(self):
        try:
            while time.monotonic() < self.deadline and not self.stop_event.is_set():
                self.step()
        except Exception:  # noqa: BLE001 (a harness bug must not pass silently)
            self.report.fail("harness", "thread %d: %s" % (self.idx, traceback.format_exc()))


# -- the run ------------------------------------------------------------------------------

class Monitor(threading.Thread):
    """Samples the server's RSS and budget use; notices a crash."""

    def __init__(self, server, stub, report, stop_event):
        super().__init__(name="monitor", daemon=True)
        self.server, self.stub, self.report, self.stop_event = server, stub, report, stop_event
        self.pid = server.proc.pid
        self.peak_rss = 0
        self.max_used = 0
        self.samples = 0
        self.done = threading.Event()

    def run(self):
        i = 0
        while not self.done.is_set():
            if not self.server.alive():
                self.report.fail("unexpected-error", "the server process exited during the load "
                                 "(code %s); log tail:\n%s" % (self.server.proc.returncode,
                                                              self.server.log_tail(3000)))
                self.stop_event.set()
                return
            r = fx.rss_bytes(self.pid)
            if r:
                self.peak_rss = max(self.peak_rss, r)
            if i % 3 == 0:
                try:
                    info = self.stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=30)
                    self.samples += 1
                    self.max_used = max(self.max_used, info.host_bytes_used)
                    if info.host_bytes_used > BUDGET:
                        self.report.fail("wrong-state", "host_bytes_used %d over the budget %d"
                                         % (info.host_bytes_used, BUDGET))
                except grpc.RpcError as e:
                    self.report.fail("unexpected-error", "monitor GetServerInfo -> %s %r" % (
                        e.code().name, e.details()))
            i += 1
            self.done.wait(0.2)




def has_accounted():
    return "bytes_accounted" in pb2.SessionStats.DESCRIPTOR.fields_by_name


def accounted(stats):
    """SessionStats.bytes_accounted (what the session holds against the budget: payload plus
    dense-block rounding, statistics, id and labels), or None where the proto lacks it."""
    return stats.bytes_accounted if has_accounted() else None


def all_session_stats(stub, sids):
    out = {}
    for sid in sids:
        g = stub.GetSession(pb2.GetSessionRequest(session_id=sid), timeout=RPC_TIMEOUT)
        out[sid] = (g.stats.bytes_dense, g.stats.bytes_compressed,
                    g.stats.pruning_backlog_tokens, tuple(g.stats.tokens_per_layer),
                    accounted(g.stats))
    return out


def list_all(stub):
    ids, token = [], ""
    while True:
        r = stub.ListSessions(pb2.ListSessionsRequest(page_size=1000, page_token=token),
                              timeout=RPC_TIMEOUT)
        ids += [s.id for s in r.sessions]
        token = r.next_page_token
        if not token:
            return ids


def run_load():
    res = {"report": Report(), "notes": []}
    flags = ["--host_budget_bytes=%d" % BUDGET, "--pruner_threads=1",
             "--shutdown_grace=%ds" % int(GRACE_S), "--decode_spin_us=0"]
    server = fx.ServerProcess(SERVER_BIN, PROTO_DIR, extra_flags=flags)
    server.start()
    res["server"] = server
    try:
        return load_and_check(res, server, flags)
    except BaseException:
        server.stop()  # never leave the server running behind a harness error
        raise


def load_and_check(res, server, flags):
    report = res["report"]
    pid = server.proc.pid
    res["asan"] = fx.binary_is_asan(SERVER_BIN)
    res["rss_start"] = fx.rss_bytes(pid)
    print("load test: seed %d, %d threads, %.0f s, budget %d bytes, server pid %d, flags %s"
          % (SEED, THREADS, LOAD_SECONDS, BUDGET, pid, " ".join(flags)))
    sys.stdout.flush()
    reg = Registry()
    stop_event = threading.Event()
    t0 = time.monotonic()
    deadline = t0 + LOAD_SECONDS
    workers = [Worker(i, server.grpc_port, reg, report, deadline, stop_event)
               for i in range(THREADS)]
    monitor = Monitor(server, server.stub, report, stop_event)
    monitor.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=LOAD_SECONDS + 10 * RPC_TIMEOUT)
        if w.is_alive():
            report.fail("harness", "thread %d still running long after the deadline" % w.idx)
    res["load_s"] = time.monotonic() - t0
    monitor.done.set()
    monitor.join(timeout=60)
    res["peak_rss"] = max(monitor.peak_rss, fx.rss_bytes(pid) or 0)
    res["hwm"] = fx.rss_bytes(pid, "VmHWM")
    res["max_used"] = monitor.max_used
    res["alive_after_load"] = server.alive()
    res["workers"] = workers
    res["pruned_chunks"] = fx.scrape(server, "sparsekv_pruned_chunks_total")
    res["slab_reserved_before_delete"] = fx.scrape(server, "sparsekv_chunk_pool_reserved_bytes")
    if not res["alive_after_load"]:
        res["shutdown"] = (server.stop(), 0.0)
        return res

    try:
        post_load_checks(res, server, reg, workers, report)
    except grpc.RpcError as e:
        report.fail("unexpected-error", "after the load: %s %r\n%s" % (
            e.code().name, e.details(), traceback.format_exc()))
    except Exception:  # noqa: BLE001
        report.fail("harness", "after the load: " + traceback.format_exc())
    for w in workers:
        w.channel.close()
    res["alive_at_end"] = server.alive()
    # 6. shutdown within the grace, exit code 0
    t1 = time.monotonic()
    rc = server.stop()
    res["shutdown"] = (rc, time.monotonic() - t1)
    res["log_tail"] = server.log_tail(3000)
    return res


def post_load_checks(res, server, reg, workers, report):
    pid = server.proc.pid
    stub = server.stub
    live = {s.sid: s for s in reg.live_list()}
    res["live_at_end"] = len(live)
    # 1. the server lists exactly the live sessions
    listed = list_all(stub)
    res["list_mismatch"] = (sorted(set(listed) - set(live)), sorted(set(live) - set(listed)))
    # 2. every live session matches its owner's mirror (owner threads have stopped)
    owners = {w.idx: w for w in workers}
    res["final_mirror_checked"] = 0
    for sid, s in live.items():
        w = owners[s.owner]
        if s not in w.own:
            continue  # tracking dropped after a failure (already reported)
        for layer in range(s.layers):
            kv = w.read_layer(s, layer)
            if kv is None:
                continue
            if kv[0].shape[0] != s.n(layer):
                report.fail("wrong-state", "final ReadKV layer %d: %d rows, owner appended %d; %s"
                            % (layer, kv[0].shape[0], s.n(layer), s.describe()))
            else:
                w.check_mirror(s, layer, *kv, what="final ReadKV")
                res["final_mirror_checked"] += 1
    # 3. budget accounting, once the pruner is idle (two equal snapshots around GetServerInfo)
    acct = None
    for attempt in range(50):
        a = all_session_stats(stub, sorted(live))
        info = stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=RPC_TIMEOUT)
        b = all_session_stats(stub, sorted(live))
        if a == b:
            acct = {"host_bytes_used": info.host_bytes_used, "sessions": info.sessions,
                    "sum_stats": sum(x[0] + x[1] for x in a.values()), "n": len(a),
                    "backlog": sum(x[2] for x in a.values()), "attempts": attempt + 1,
                    "dense": sum(x[0] for x in a.values()),
                    "compressed": sum(x[1] for x in a.values()),
                    "sum_accounted": (sum(x[4] for x in a.values()) if has_accounted()
                                      else None),
                    "under_accounted": sorted(sid for sid, x in a.items()
                                              if x[4] is not None and x[4] < x[0] + x[1])}
            break
        time.sleep(0.2)
    res["acct"] = acct
    res["rss_before_delete"] = fx.rss_bytes(pid)
    # 4. delete everything; budget use returns to 0
    freed = 0
    delete_errors = []
    for sid in listed:
        try:
            freed += stub.DeleteSession(pb2.DeleteSessionRequest(session_id=sid),
                                        timeout=RPC_TIMEOUT).bytes_freed
        except grpc.RpcError as e:
            delete_errors.append("%s: %s %r" % (sid, e.code().name, e.details()))
    res["delete_errors"] = delete_errors
    res["bytes_freed_final"] = freed
    zero = None
    for _ in range(20):
        info = stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=RPC_TIMEOUT)
        zero = (info.host_bytes_used, info.sessions)
        if zero == (0, 0):
            break
        time.sleep(0.1)
    res["after_delete"] = zero
    res["listed_after_delete"] = len(list_all(stub))
    # 5. RSS after deleting everything: the lowest of a few samples over ~3 s
    time.sleep(1.0)
    samples = []
    for _ in range(5):
        samples.append(fx.rss_bytes(pid))
        time.sleep(0.5)
    res["rss_final"] = min(x for x in samples if x) if any(samples) else None
    res["slab_reserved_after_delete"] = fx.scrape(server, "sparsekv_chunk_pool_reserved_bytes")


def summary(res):
    lines = []
    workers = res.get("workers", [])
    ops = collections.Counter()
    skipped = collections.Counter()
    for w in workers:
        ops.update(w.ops)
        skipped.update(w.skipped)
    kinds = sorted({k for k, _ in ops})
    codes = sorted({c for _, c in ops}, key=lambda c: (c != "OK", c))
    lines.append("=== load test summary (seed %d, %d threads, %.1f s of load) ===" % (
        SEED, THREADS, res.get("load_s", 0.0)))
    lines.append("%-22s" % "rpc" + "".join("%20s" % c for c in codes))
    for k in kinds:
        lines.append("%-22s" % k + "".join("%20d" % ops[(k, c)] for c in codes))
    checked = sum(w.checked for w in workers)
    lines.append("decodes checked against float64: %d (+%d on empty layers); skipped: %s" % (
        checked, sum(w.checked_empty for w in workers), dict(skipped)))
    for key in ("float32", "float16", "bfloat16"):
        worst = max((w.worst.get(key, (0.0, "")) for w in workers), default=(0.0, ""))
        lines.append("worst error / tolerance, out_dtype %s: %.3g (%s)" % (key, worst[0],
                                                                           worst[1]))
    lines.append("max abs error %.3g" % max((w.max_abs_err for w in workers), default=0.0))
    lines.append("pruned chunks (metrics): %s; max host_bytes_used seen %d of budget %d" % (
        res.get("pruned_chunks"), res.get("max_used", 0), BUDGET))
    acct = res.get("acct")
    if acct:
        lines.append("accounting at the end: host_bytes_used %d; over the %d live sessions "
                     "(server says %d): sum of bytes_dense + bytes_compressed %d (dense %d, "
                     "compressed %d), sum of bytes_accounted %s; stable after %d snapshot(s)" % (
                         acct["host_bytes_used"], acct["n"], acct["sessions"], acct["sum_stats"],
                         acct["dense"], acct["compressed"], acct["sum_accounted"],
                         acct["attempts"]))
    lines.append("after deleting every session: (host_bytes_used, sessions) = %s; "
                 "slab reserve before/after delete %s / %s bytes" % (
                     res.get("after_delete"), res.get("slab_reserved_before_delete"),
                     res.get("slab_reserved_after_delete")))

    def mib(x):
        return "%.1f MiB" % (x / MiB) if x else "n/a"
    lines.append("server RSS: start %s, peak %s (VmHWM %s), before delete %s, after delete %s "
                 "(bound start + %s)%s" % (
                     mib(res.get("rss_start")), mib(res.get("peak_rss")), mib(res.get("hwm")),
                     mib(res.get("rss_before_delete")), mib(res.get("rss_final")),
                     mib(RSS_SLACK), " [ASan build: not asserted]" if res.get("asan") else ""))
    sd = res.get("shutdown")
    if sd:
        lines.append("shutdown: exit code %s after %.2f s (grace %.0f s)" % (sd[0], sd[1], GRACE_S))
    return "\n".join(lines)


def setUpModule():
    global pb2, grpc, RESULT
    import grpc as _grpc
    grpc = _grpc
    pb2, _ = fx.load_stubs(PROTO_DIR)
    RESULT = run_load()
    print(summary(RESULT))
    text = RESULT["report"].text(Report.CATEGORIES)
    if text:
        print("failures:\n" + text)
    sys.stdout.flush()


def tearDownModule():
    if RESULT is not None and RESULT.get("server") is not None:
        RESULT["server"].stop()
        RESULT["server"].cleanup()


class LoadTest(unittest.TestCase):
    maxDiff = None

    def cat(self, *cats):
        return RESULT["report"].text(cats)

    def test_1_server_stayed_up(self):
        self.assertTrue(RESULT["alive_after_load"], "server died during the load:\n"
                        + RESULT.get("log_tail", RESULT["server"].log_tail(3000)))
        self.assertTrue(RESULT.get("alive_at_end"), "server died after the load")

    def test_2_no_wrong_results(self):
        self.assertEqual(self.cat("wrong-result", "wrong-state", "partial-apply"), "")

    def test_3_no_unexpected_errors(self):
        self.assertEqual(self.cat("unexpected-error", "harness"), "")

    def test_4_enough_decodes_checked(self):
        checked = sum(w.checked for w in RESULT["workers"])
        self.assertGreaterEqual(checked, MIN_CHECKED, "too few decodes verified")

    def test_5_load_was_meaningful(self):
        ops = collections.Counter()
        for w in RESULT["workers"]:
            ops.update(w.ops)
        exhausted = sum(n for (k, c), n in ops.items() if c == "RESOURCE_EXHAUSTED")
        self.assertGreater(exhausted, 0, "the budget never rejected anything: not tight")
        self.assertTrue(RESULT.get("pruned_chunks"), "background pruning never ran")
        self.assertGreater(RESULT.get("final_mirror_checked", 0), 0)

    def test_6_budget_accounting(self):
        self.assertEqual(RESULT["list_mismatch"], ([], []),
                         "ListSessions vs live sessions: (unknown to the clients, missing)")
        acct = RESULT["acct"]
        self.assertIsNotNone(acct, "session stats never stable for two snapshots")
        self.assertEqual(acct["sessions"], acct["n"], "GetServerInfo.sessions")
        if acct["sum_accounted"] is None:
            # proto without SessionStats.bytes_accounted: the budget holds the payload only
            self.assertEqual(acct["host_bytes_used"], acct["sum_stats"],
                             "GetServerInfo.host_bytes_used != sum of GetSession bytes_dense + "
                             "bytes_compressed over the live sessions")
        else:
            # the proto defines host_bytes_used as the sum of bytes_accounted (payload plus
            # dense-block rounding, statistics, id, labels); the payload sum is printed above
            self.assertEqual(acct["host_bytes_used"], acct["sum_accounted"],
                             "GetServerInfo.host_bytes_used != sum of GetSession "
                             "bytes_accounted over the live sessions")
            self.assertEqual(acct["under_accounted"], [],
                             "sessions whose bytes_accounted < bytes_dense + bytes_compressed")

    def test_7_everything_released_after_delete(self):
        self.assertEqual(RESULT["delete_errors"], [])
        self.assertEqual(RESULT["after_delete"], (0, 0),
                         "(host_bytes_used, sessions) after deleting every session")
        self.assertEqual(RESULT["listed_after_delete"], 0)

    def test_8_rss_returns_near_start(self):
        start, final = RESULT["rss_start"], RESULT["rss_final"]
        self.assertTrue(start and final, "could not read /proc/<pid>/status")
        if RESULT["asan"]:
            print("RSS not asserted: AddressSanitizer build (start %d, final %d)" % (start, final))
            return
        self.assertLessEqual(final, start + RSS_SLACK,
                             "RSS after deleting every session %.1f MiB > start %.1f MiB + %.0f "
                             "MiB (peak %.1f MiB)" % (final / MiB, start / MiB, RSS_SLACK / MiB,
                                                      RESULT["peak_rss"] / MiB))

    def test_9_clean_shutdown(self):
        rc, took = RESULT["shutdown"]
        self.assertEqual(rc, 0, "exit code after SIGTERM; log:\n" + RESULT.get("log_tail", ""))
        self.assertLessEqual(took, GRACE_S + SHUTDOWN_MARGIN_S, "shutdown took %.1f s" % took)


if __name__ == "__main__":
    sys.exit(fx.main(sys.modules[__name__]))
