"""Independent numpy implementation of sparsekv's pruning (DESIGN.md sections 2-4).

It is the cross-check oracle for the C++ service: given the same inputs it must select the
same kept set, so the keep count and the tie rule are implemented exactly as specified:

- keep count of a vector of n elements at sparsity s:
      k = clamp(floor((1 - s) * n + 0.5), 1, n)
  `s` travels as a float32 on the wire (TensorPolicy.sparsity), so by default it is rounded
  to float32 first and the formula is then evaluated in float64 (`keep_count(..., arith=)`
  also offers "float32"; the two differ only where (1 - s) * n lands within float32 rounding
  of a .5 boundary, e.g. s = 0.3, n = 5: float64 gives 3, float32 arithmetic gives 4).
- the k elements of highest score are kept; ties go to the lower index (stable descending
  sort). Pruned elements become 0.
- per-token vector: one token row of one KV head, n = head_dim.
- per-channel vector: one channel of one KV head over a group of G consecutive tokens,
  n = G. Groups are counted from the start of the compressed region (token 0 of the layer),
  so group i is tokens [i*G, (i+1)*G).
- scoring (score = what is ranked inside one vector):
      magnitude            |x[t, j]|
      output-aware K       w_t * u_j * |K[t, j]|; per-token ranking drops w_t -> u_j |K|,
                           per-channel ranking drops u_j -> w_t |K|
      output-aware V       w_t * |V[t, j]|; per-token ranking drops w_t -> |V| (identical to
                           magnitude), per-channel -> w_t |V|
  w_t: attention probability mass token t received, summed over the query heads of its GQA
  group and over the decode queries it saw while it was in the dense tail (the softmax is
  the decode step's, over the whole cache: compressed and dense). u_j: sqrt of the sum of
  q_j^2 over the same queries and the query heads of the group. By default (u_mode="window")
  u is per token, accumulated over exactly the queries token t saw in the dense tail;
  u_mode="cumulative" uses one running sum per (layer, KV head) over every decode query seen
  so far (the value at compression time). When a layer has seen no query at all when a
  range is compressed (prefill without observation window), output-aware falls back to
  magnitude for that range.
  Statistics and scores are computed in float64 here; a float32 implementation can rank
  near-ties differently, so compare output-aware kept sets allowing a small mismatch rate
  (magnitude kept sets must agree exactly).

Schedule (SessionSim below; DESIGN.md section 4), per layer:
- appended tokens (AppendKV, or a Decode step's new token) go to the dense tail; the newest
  W (dense_window, 32) are never pruned;
- background: whenever the dense tail holds >= W + C tokens (C = chunk_tokens, a multiple
  of G), the oldest C of them are compressed (SessionSim(eager=True) does this immediately
  after every append/decode; the real service runs it asynchronously, so with output-aware
  scoring its w/u may include a few more queries: use Flush for exact expectations);
- Flush compresses everything eligible: all but the newest W tokens; when K or V is pruned
  per-channel, only whole groups of G (the boundary is shared by K and V of a layer: it is
  floored to a multiple of G when either tensor is per-channel with sparsity > 0);
- a Decode step appends its new token first, attends over [compressed, dense tail] and then
  accumulates w (for the dense-tail tokens, new token included) and u.
With magnitude scoring the final kept set is independent of the schedule: after Flush the
first floor_G(n - W) tokens (floor_1 for per-token-only policies) are pruned, each vector
on its own.

Compressed format helper: pack_vectors() returns the DESIGN.md section 2 form of each vector
(bitmap of n bits, bit i of uint64 word i // 64, least significant bit first, then the k kept
values in increasing index order).

Run with /usr/bin/python3 (needs numpy only).
"""

import math

import numpy as np

PER_TOKEN = "token"
PER_CHANNEL = "channel"
MAGNITUDE = "magnitude"
OUTPUT_AWARE = "output_aware"

_STORE = {"fp32": np.float32, "fp16": np.float16, "float32": np.float32, "float16": np.float16}


def keep_count(n, sparsity, arith="float64", wire_float32=True):
    """k = clamp(floor((1 - s) * n + 0.5), 1, n). See the module docstring for `arith`."""
    s = float(np.float32(sparsity)) if wire_float32 else float(sparsity)
    if arith == "float64":
        k = math.floor((1.0 - s) * n + 0.5)
    elif arith == "float32":
        f = np.float32
        k = int(np.floor((f(1.0) - f(s)) * f(n) + f(0.5)))
    else:
        raise ValueError(arith)
    return int(min(max(k, 1), n))


def topk_mask(scores, k):
    """Boolean mask [..., n] keeping the k highest scores of each vector along the last
    axis; ties go to the lower index."""
    n = scores.shape[-1]
    if k >= n:
        return np.ones(scores.shape, dtype=bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), axis=-1, kind="stable")
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, order[..., :k], True, axis=-1)
    return mask


def round_to_storage(x, store="fp32"):
    """Values as the service stores them (fp16 rounding for fp16 sessions), as float32."""
    return np.asarray(x).astype(_STORE[store]).astype(np.float32)


def prune(x, sparsity, direction=PER_TOKEN, scores=None, group=32, arith="float64"):
    """Prunes x [T, H, D] (T tokens of H KV heads). Per-channel needs T % group == 0
    (tokens [i*group, (i+1)*group) form group i). scores: same shape as x, default |x|.
    Returns (pruned x, kept mask), both [T, H, D]."""
    x = np.asarray(x)
    T, H, D = x.shape
    sc = np.abs(x.astype(np.float64)) if scores is None else np.asarray(scores, np.float64)
    if sparsity <= 0:
        mask = np.ones(x.shape, dtype=bool)
    elif direction == PER_TOKEN:
        mask = topk_mask(sc, keep_count(D, sparsity, arith))
    elif direction == PER_CHANNEL:
        if T % group:
            raise ValueError("per-channel pruning needs whole groups: T=%d, G=%d" % (T, group))
        s4 = sc.reshape(T // group, group, H, D).transpose(0, 2, 3, 1)  # [groups, H, D, G]
        m4 = topk_mask(s4, keep_count(group, sparsity, arith))
        mask = m4.transpose(0, 3, 1, 2).reshape(T, H, D)
    else:
        raise ValueError(direction)
    return np.where(mask, x, 0).astype(x.dtype), mask


def scores_for(x, tensor, direction, scoring, w=None, u=None):
    """Ranking scores for x [T, H, D] (`tensor` "k" or "v").
    w [T, H]: accumulated attention mass; u [T, H, D] or [H, D]: sqrt of summed q^2.
    Constant factors within a vector are dropped (see module docstring)."""
    a = np.abs(np.asarray(x, dtype=np.float64))
    if scoring == MAGNITUDE:
        return a
    if scoring != OUTPUT_AWARE:
        raise ValueError(scoring)
    if direction == PER_TOKEN:
        if tensor == "v":
            return a
        u = np.asarray(u, dtype=np.float64)
        return (u if u.ndim == 3 else u[None]) * a
    return np.asarray(w, dtype=np.float64)[:, :, None] * a


def pack_vectors(x, mask):
    """DESIGN.md section 2 form of vectors along the last axis of x [..., n]:
    returns (bitmaps uint64 [..., ceil(n/64)], values [..., k]) where bit i of word i // 64
    (LSB first) is set when element i is kept and values are the kept ones in index order.
    REQUIRES: every vector keeps the same count."""
    n = x.shape[-1]
    words = (n + 63) // 64
    bits = np.zeros(x.shape[:-1] + (words,), dtype=np.uint64)
    for i in range(n):
        bits[..., i // 64] |= mask[..., i].astype(np.uint64) << np.uint64(i % 64)
    k = int(mask.reshape(-1, n).sum(axis=1)[0]) if mask.size else 0
    vals = x[mask].reshape(x.shape[:-1] + (k,))
    return bits, vals


def per_channel_vectors(x, group):
    """x [T, H, D] -> [T // group, H, D, group] (per-channel vectors in token order)."""
    T, H, D = x.shape
    return np.asarray(x).reshape(T // group, group, H, D).transpose(0, 2, 3, 1)


class TensorPolicy:
    def __init__(self, sparsity=0.0, direction=PER_TOKEN, scoring=MAGNITUDE):
        self.sparsity = float(sparsity)
        self.direction = direction
        self.scoring = scoring

    def __repr__(self):
        return "TensorPolicy(%g, %s, %s)" % (self.sparsity, self.direction, self.scoring)


class Policy:
    def __init__(self, k=None, v=None, window=32, chunk=256, group=32):
        self.k = k or TensorPolicy()
        self.v = v or TensorPolicy()
        self.window = window
        self.chunk = chunk
        self.group = group
        if chunk % group:
            raise ValueError("chunk must be a multiple of group")

    def granularity(self):
        """Compression boundary unit of a layer: G when K or V is pruned per-channel."""
        for tp in (self.k, self.v):
            if tp.sparsity > 0 and tp.direction == PER_CHANNEL:
                return self.group
        return 1


class SessionSim:
    """Reference model of one service session (float64 attention, per-layer state).

    append(layer, k [T, Hkv, D], v)            AppendKV of one layer
    decode(layer, q [Hq, D], new_k, new_v)   -> (out [Hq, D] float32, lse [Hq])
    flush()                                  -> tokens compressed (summed over layers)
    read_kv(layer)                           -> (K, V) [T, Hkv, D] as stored (pruned = 0)
    eager=True runs the background rule (compress the oldest C while the tail >= W + C)
    right after every append/decode; eager=False compresses only in flush()."""

    def __init__(self, n_layers, n_kv, n_q, head_dim, policy, store="fp32", eager=False,
                 u_mode="window", arith="float64"):
        self.L, self.Hkv, self.Hq, self.D = n_layers, n_kv, n_q, head_dim
        self.g = n_q // n_kv
        self.policy = policy
        self.store = store
        self.eager = eager
        self.u_mode = u_mode
        self.arith = arith
        z = lambda: np.zeros((0, n_kv, head_dim), dtype=np.float32)
        self.K = [z() for _ in range(n_layers)]
        self.V = [z() for _ in range(n_layers)]
        self.kmask = [np.zeros((0, n_kv, head_dim), bool) for _ in range(n_layers)]
        self.vmask = [np.zeros((0, n_kv, head_dim), bool) for _ in range(n_layers)]
        self.ncomp = [0] * n_layers
        self.w = [np.zeros((0, n_kv)) for _ in range(n_layers)]
        self.u2 = [np.zeros((0, n_kv, head_dim)) for _ in range(n_layers)]
        self.u2cum = [np.zeros((n_kv, head_dim)) for _ in range(n_layers)]
        self.queries = [0] * n_layers
        self.fallback_ranges = 0  # compressions that used magnitude for lack of queries

    # -- data path -----------------------------------------------------------------------
    def append(self, layer, k, v):
        k = round_to_storage(k, self.store)
        v = round_to_storage(v, self.store)
        T = k.shape[0]
        self.K[layer] = np.concatenate([self.K[layer], k])
        self.V[layer] = np.concatenate([self.V[layer], v])
        ones = np.ones((T, self.Hkv, self.D), bool)
        self.kmask[layer] = np.concatenate([self.kmask[layer], ones])
        self.vmask[layer] = np.concatenate([self.vmask[layer], ones])
        self.w[layer] = np.concatenate([self.w[layer], np.zeros((T, self.Hkv))])
        self.u2[layer] = np.concatenate([self.u2[layer], np.zeros((T, self.Hkv, self.D))])
        if self.eager:
            self._background(layer)

    def decode(self, layer, q, new_k=None, new_v=None, scale=None):
        if new_k is not None:
            self._append_no_bg(layer, new_k, new_v)  # background runs after attending
        q = np.asarray(q, dtype=np.float64)
        K = self.K[layer].astype(np.float64)
        V = self.V[layer].astype(np.float64)
        n = K.shape[0]
        scale = 1.0 / math.sqrt(self.D) if not scale else scale
        qg = q.reshape(self.Hkv, self.g, self.D)
        if n == 0:
            return np.zeros((self.Hq, self.D), np.float32), np.full(self.Hq, -np.inf)
        s = np.einsum("hgd,thd->hgt", qg, K) * scale
        m = s.max(axis=-1, keepdims=True)
        e = np.exp(s - m)
        z = e.sum(axis=-1, keepdims=True)
        p = e / z
        out = np.einsum("hgt,thd->hgd", p, V).reshape(self.Hq, self.D)
        lse = (m + np.log(z)).reshape(self.Hq)
        c = self.ncomp[layer]
        self.w[layer][c:] += p[:, :, c:].sum(axis=1).T
        q2 = (qg * qg).sum(axis=1)  # [Hkv, D]
        self.u2[layer][c:] += q2[None]
        self.u2cum[layer] += q2
        self.queries[layer] += 1
        if self.eager:
            self._background(layer)
        return out.astype(np.float32), lse

    def _append_no_bg(self, layer, k, v):
        eager, self.eager = self.eager, False
        try:
            self.append(layer, np.asarray(k)[None], np.asarray(v)[None])
        finally:
            self.eager = eager

    def flush(self):
        total = 0
        for layer in range(self.L):
            n = self.K[layer].shape[0]
            gran = self.policy.granularity()
            end = max(0, n - self.policy.window) // gran * gran
            if end > self.ncomp[layer]:
                total += end - self.ncomp[layer]
                self._compress(layer, self.ncomp[layer], end)
        return total

    def _background(self, layer):
        W, C = self.policy.window, self.policy.chunk
        while self.K[layer].shape[0] - self.ncomp[layer] >= W + C:
            a = self.ncomp[layer]
            self._compress(layer, a, a + C)

    def _compress(self, layer, a, b):
        pol = self.policy
        oa = self.queries[layer] > 0
        if not oa and (pol.k.scoring == OUTPUT_AWARE or pol.v.scoring == OUTPUT_AWARE):
            self.fallback_ranges += 1
        w = self.w[layer][a:b]
        u = np.sqrt(self.u2[layer][a:b] if self.u_mode == "window" else self.u2cum[layer])
        for name, tp, X, M in (("k", pol.k, self.K, self.kmask), ("v", pol.v, self.V, self.vmask)):
            if tp.sparsity <= 0:
                continue
            x = X[layer][a:b]
            scoring = tp.scoring if oa else MAGNITUDE
            sc = scores_for(x, name, tp.direction, scoring, w, u)
            xp, mk = prune(x, tp.sparsity, tp.direction, sc, pol.group, self.arith)
            X[layer][a:b] = xp
            M[layer][a:b] = mk
        self.ncomp[layer] = b

    # -- inspection ------------------------------------------------------------------------
    def read_kv(self, layer):
        return self.K[layer].copy(), self.V[layer].copy()

    def compressed_tokens(self, layer):
        return self.ncomp[layer]

    def achieved_sparsity(self):
        """(K, V) fraction of elements removed over compressed tokens (all layers)."""
        res = []
        for M in (self.kmask, self.vmask):
            kept = sum(int(M[l][:self.ncomp[l]].sum()) for l in range(self.L))
            tot = sum(self.ncomp[l] for l in range(self.L)) * self.Hkv * self.D
            res.append(1.0 - kept / tot if tot else 0.0)
        return tuple(res)


def replay_decode(q, k, v, policy, sample_positions, start=0, store="fp32", u_mode="window",
                  arith="float64", scale=None, return_cache=False):
    """Vectorised (over layers and heads) equivalent of driving SessionSim as a decoder:
    AppendKV of tokens [0, start) of every layer, flush(); then for t = start .. T-1 one
    decode step per layer with q[:, t] and new_k/new_v = k[:, t], v[:, t], followed by
    flush() (so the dense tail is back to W tokens, W + 1 while attending).

    q [L, T, Hq, D], k/v [L, T, Hkv, D] float32. Returns {t: out [L, Hq, D] float32} for t in
    sample_positions (t >= start); with return_cache=True, (outs, K, V, ncomp) where K/V
    [L, T, Hkv, D] float32 are the final stored caches (pruned elements 0, as ReadKV returns
    them) and ncomp the number of compressed tokens per layer."""
    L, T, Hq, D = q.shape
    Hkv = k.shape[2]
    g = Hq // Hkv
    W, G = policy.window, policy.group
    gran = policy.granularity()
    scale = 1.0 / math.sqrt(D) if not scale else scale
    K = round_to_storage(k, store).transpose(0, 2, 1, 3).astype(np.float64)  # [L, Hkv, T, D]
    V = round_to_storage(v, store).transpose(0, 2, 1, 3).astype(np.float64)
    Kd, Vd = K.copy(), V.copy()
    Q = np.asarray(q, np.float64).transpose(0, 2, 1, 3).reshape(L, Hkv, g, T, D)
    w = np.zeros((L, Hkv, T))
    u2 = np.zeros((L, Hkv, T, D))
    u2cum = np.zeros((L, Hkv, D))
    nq = 0
    want = set(int(t) for t in sample_positions)
    res = {}

    def compress(a, b):
        if b <= a:
            return
        oa = nq > 0
        uu = np.sqrt(u2[:, :, a:b] if u_mode == "window" else u2cum[:, :, None, :])
        for name, tp, X, Xd in (("k", policy.k, K, Kd), ("v", policy.v, V, Vd)):
            if tp.sparsity <= 0:
                continue
            x = Xd[:, :, a:b].transpose(0, 2, 1, 3).reshape(L * (b - a), Hkv, D)
            scoring = tp.scoring if oa else MAGNITUDE
            if scoring == OUTPUT_AWARE:
                ww = w[:, :, a:b].transpose(0, 2, 1).reshape(L * (b - a), Hkv)
                if u_mode == "window":
                    u = uu.transpose(0, 2, 1, 3).reshape(L * (b - a), Hkv, D)
                else:
                    u = np.repeat(uu.transpose(0, 2, 1, 3), b - a, axis=1).reshape(
                        L * (b - a), Hkv, D)
                sc = scores_for(x, name, tp.direction, scoring, ww, u)
            else:
                sc = None
            if tp.direction == PER_CHANNEL:
                # groups must not straddle layers: prune each layer's [a, b) separately
                xs = x.reshape(L, b - a, Hkv, D)
                scs = None if sc is None else sc.reshape(L, b - a, Hkv, D)
                xp = np.stack([prune(xs[l], tp.sparsity, tp.direction,
                                     None if scs is None else scs[l], G, arith)[0]
                               for l in range(L)])
            else:
                xp = prune(x, tp.sparsity, tp.direction, sc, G, arith)[0].reshape(
                    L, b - a, Hkv, D)
            X[:, :, a:b] = xp.transpose(0, 2, 1, 3)

    ncomp = 0
    end = max(0, start - W) // gran * gran
    compress(ncomp, end)
    ncomp = max(ncomp, end)
    for t in range(start, T):
        n = t + 1
        qt = Q[:, :, :, t, :]  # [L, Hkv, g, D]
        s = np.matmul(qt, K[:, :, :n].transpose(0, 1, 3, 2)) * scale  # [L, Hkv, g, n]
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        if t in want:
            res[t] = np.matmul(s, V[:, :, :n]).reshape(L, Hq, D).astype(np.float32)
        w[:, :, ncomp:n] += s[:, :, :, ncomp:n].sum(axis=2)
        q2 = (qt * qt).sum(axis=2)  # [L, Hkv, D]
        if u_mode == "window":
            u2[:, :, ncomp:n] += q2[:, :, None, :]
        u2cum += q2
        nq += 1
        end = max(0, n - W) // gran * gran
        if end > ncomp:
            compress(ncomp, end)
            ncomp = end
    if return_cache:
        return (res, K.transpose(0, 2, 1, 3).astype(np.float32),
                V.transpose(0, 2, 1, 3).astype(np.float32), ncomp)
    return res


def dense_decode(q, k, v, positions, scale=None):
    """Dense reference outputs {t: [L, Hq, D]} (float64 math) for query t over tokens 0..t."""
    L, T, Hq, D = q.shape
    Hkv = k.shape[2]
    g = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if not scale else scale
    K = np.asarray(k, np.float64).transpose(0, 2, 1, 3)
    V = np.asarray(v, np.float64).transpose(0, 2, 1, 3)
    Q = np.asarray(q, np.float64).transpose(0, 2, 1, 3).reshape(L, Hkv, g, T, D)
    res = {}
    for t in positions:
        n = t + 1
        s = np.matmul(Q[:, :, :, t, :], K[:, :, :n].transpose(0, 1, 3, 2)) * scale
        s -= s.max(axis=-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        res[t] = np.matmul(p, V[:, :, :n]).reshape(L, Hq, D).astype(np.float32)
    return res


def prune_per_token_magnitude(x, sparsity):
    """README "Pruning quality" pruning of x [T, H, D]: each row keeps its top-k |x|."""
    return prune(x, sparsity, PER_TOKEN)[0]
