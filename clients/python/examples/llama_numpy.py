"""Float32 numpy forward pass of a Hugging Face Llama checkpoint, with explicit attention.

Used by the frontend example (llama_frontend.py, next to this file) and by the
quality-evaluation harness (tests/eval/ imports it through tests/eval/llama_numpy.py) to run
the two test models in /work/shared/models (docs-byte-10m, stories260k) without torch or transformers, to capture
the post-RoPE q/k/v of every layer, and to evaluate KV-cache pruning the way the models'
READMEs do ("Pruning quality": when the model processes position t, cache positions s with
t - s >= window are read pruned; the `window` most recent positions, t included, stay dense).

API
    model = load(model_dir)                       # config.json + *.safetensors (F16/F32)
    logits = forward(model, ids)                  # [T, vocab] float32, causal, one stream
    logits = forward(model, ids, attention_hook=hook, capture=caps)

    hook(layer, q, k, v) is called once per layer with the post-RoPE
        q [T, q_heads, D], k [T, kv_heads, D], v [T, kv_heads, D] (float32) and returns
        None (dense attention) or a dict with any of
          "k", "v":   pruned versions of k / v (same shape, None = dense). Query position t
                      reads row s from the pruned array when t - s >= window and from the
                      dense one otherwise. This is exact for any pruning in which the pruned
                      form of a row depends only on that row (per-token pruning);
          "window":   dense window (default 32);
          "out":      a full attention output [T, q_heads, D] replacing the computed one.
    capture: a list; when given, one dict {"q", "k", "v"} (post-RoPE, float32, shapes as
        above) is appended per layer.

Numerics: weights are converted to float32 and every operation runs in float32 (softmax in
float32 with max subtraction). Attention is computed in blocks of query positions so memory
stays at O(block * T) per KV head.

Only the Python standard library and numpy are needed (run with /usr/bin/python3).
"""

import json
import math
import os
import struct

import numpy as np

# ../shared next to the repository root (this file is clients/python/examples/llama_numpy.py;
# tests/eval/llama_numpy.py re-exports it); SPARSEKV_SHARED overrides.
SHARED = os.environ.get("SPARSEKV_SHARED") or os.path.abspath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "..", "shared"))
MODELS = os.path.join(SHARED, "models")
DATA = os.path.join(SHARED, "data")

_DTYPES = {"F16": np.float16, "F32": np.float32, "BF16": None}


# ---------------------------------------------------------------------------------------------
# safetensors

def read_safetensors(path):
    """Returns {name: float32 ndarray} for one .safetensors file (F16 or F32 tensors)."""
    with open(path, "rb") as f:
        raw = f.read()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen].decode("utf-8"))
    base = 8 + hlen
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = info["dtype"]
        b, e = info["data_offsets"]
        buf = raw[base + b:base + e]
        if dt == "BF16":
            u = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            arr = u.view(np.float32)
        elif dt in _DTYPES:
            arr = np.frombuffer(buf, dtype=np.dtype(_DTYPES[dt]).newbyteorder("<"))
        else:
            raise ValueError("%s: unsupported dtype %s for %s" % (path, dt, name))
        out[name] = arr.astype(np.float32).reshape(info["shape"])
    return out


def read_checkpoint(model_dir):
    """All tensors of a model directory: sharded (model.safetensors.index.json) or single."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(os.path.join(model_dir, shard)))
        missing = set(weight_map) - set(tensors)
        if missing:
            raise ValueError("tensors missing from shards: %s" % sorted(missing)[:5])
        return tensors
    return read_safetensors(os.path.join(model_dir, "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# model

class Model:
    """Config fields and float32 weights of a Llama checkpoint."""

    def __init__(self, model_dir):
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        self.dir = model_dir
        self.name = os.path.basename(os.path.normpath(model_dir))
        self.config = cfg
        self.n_layers = cfg["num_hidden_layers"]
        self.hidden = cfg["hidden_size"]
        self.n_heads = cfg["num_attention_heads"]
        self.n_kv_heads = cfg.get("num_key_value_heads", self.n_heads)
        self.head_dim = cfg.get("head_dim") or self.hidden // self.n_heads
        self.vocab = cfg["vocab_size"]
        self.eps = cfg.get("rms_norm_eps", 1e-5)
        rope = cfg.get("rope_parameters") or {}
        self.theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default":
            raise ValueError("only default RoPE is supported")
        self.max_pos = cfg.get("max_position_embeddings", 2048)
        w = read_checkpoint(model_dir)
        self.embed = w["model.embed_tokens.weight"]
        if "lm_head.weight" in w:
            self.lm_head = w["lm_head.weight"]
        elif cfg.get("tie_word_embeddings", False):
            self.lm_head = self.embed
        else:
            raise ValueError("no lm_head.weight and embeddings are not tied")
        self.norm = w["model.norm.weight"]
        self.layers = []
        for i in range(self.n_layers):
            p = "model.layers.%d." % i
            lw = {
                "in": w[p + "input_layernorm.weight"],
                "post": w[p + "post_attention_layernorm.weight"],
                # stored transposed once so that y = x @ W
                "q": np.ascontiguousarray(w[p + "self_attn.q_proj.weight"].T),
                "k": np.ascontiguousarray(w[p + "self_attn.k_proj.weight"].T),
                "v": np.ascontiguousarray(w[p + "self_attn.v_proj.weight"].T),
                "o": np.ascontiguousarray(w[p + "self_attn.o_proj.weight"].T),
                "gate": np.ascontiguousarray(w[p + "mlp.gate_proj.weight"].T),
                "up": np.ascontiguousarray(w[p + "mlp.up_proj.weight"].T),
                "down": np.ascontiguousarray(w[p + "mlp.down_proj.weight"].T),
            }
            self.layers.append(lw)
        self.lm_head_t = np.ascontiguousarray(self.lm_head.T)
        assert self.n_heads % self.n_kv_heads == 0
        assert self.layers[0]["q"].shape[1] == self.n_heads * self.head_dim
        assert self.layers[0]["k"].shape[1] == self.n_kv_heads * self.head_dim

    def __repr__(self):
        return ("Model(%s: layers=%d hidden=%d q_heads=%d kv_heads=%d head_dim=%d vocab=%d)"
                % (self.name, self.n_layers, self.hidden, self.n_heads, self.n_kv_heads,
                   self.head_dim, self.vocab))


def load(model_dir):
    """Loads config.json and the safetensors weights of `model_dir` into a Model."""
    return Model(model_dir)


# ---------------------------------------------------------------------------------------------
# building blocks

def rmsnorm(x, w, eps):
    x = x.astype(np.float32, copy=False)
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))
    return (x * r.astype(np.float32)) * w


def rope_tables(T, D, theta, offset=0):
    """cos, sin [T, D/2] float32 for positions offset..offset+T-1 (rotate-half layout)."""
    half = D // 2
    inv = 1.0 / (theta ** (np.arange(0, half, dtype=np.float64) * 2.0 / D))
    pos = np.arange(offset, offset + T, dtype=np.float64)
    # HF computes the angles in float32 (inv_freq float32 times float32 positions).
    ang = pos.astype(np.float32)[:, None] * inv.astype(np.float32)[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def apply_rope(x, cos, sin):
    """x [T, H, D]; rotate-half: out[i] = x[i] c - x[i+D/2] s; out[i+D/2] = x[i+D/2] c + x[i] s."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def attention(q, k, v, kp=None, vp=None, window=32, block=256):
    """Causal GQA attention with optional pruned K/V outside the dense window.

    q [T, Hq, D], k/v [T, Hkv, D] (dense), kp/vp [T, Hkv, D] or None (pruned forms).
    Query t reads key/value s (s <= t) from kp/vp when t - s >= window, else from k/v.
    Returns out [T, Hq, D] float32. Scale 1/sqrt(D)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    scale = np.float32(1.0 / math.sqrt(D))
    kd = np.ascontiguousarray(k.transpose(1, 0, 2))  # [Hkv, T, D]
    vd = np.ascontiguousarray(v.transpose(1, 0, 2))
    kf = kd if kp is None else np.ascontiguousarray(kp.transpose(1, 0, 2))  # far keys
    vf = vd if vp is None else np.ascontiguousarray(vp.transpose(1, 0, 2))
    vdiff = None if vp is None else vd - vf
    mixed = kp is not None or vp is not None
    out = np.empty((T, Hq, D), dtype=np.float32)
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        n = t1 - t0
        qb = q[t0:t1].reshape(n, Hkv, g, D).transpose(1, 2, 0, 3).reshape(Hkv, g * n, D)
        qb = qb * scale
        s = np.matmul(qb, kf[:, :t1].transpose(0, 2, 1)).reshape(Hkv, g, n, t1)
        tpos = np.arange(t0, t1)[:, None]
        if mixed:
            b0 = max(0, t0 - window + 1)
            dmask = (tpos - np.arange(b0, t1)[None, :]) < window  # [n, t1-b0]
            if kp is not None:
                sd = np.matmul(qb, kd[:, b0:t1].transpose(0, 2, 1)).reshape(Hkv, g, n, t1 - b0)
                s[..., b0:t1] = np.where(dmask, sd, s[..., b0:t1])
        causal = np.arange(t1)[None, :] > tpos  # [n, t1]
        s[..., causal] = -np.inf
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        ob = np.matmul(s.reshape(Hkv, g * n, t1), vf[:, :t1])
        if vdiff is not None:
            pb = (s[..., b0:t1] * dmask).reshape(Hkv, g * n, t1 - b0)
            ob += np.matmul(pb, vdiff[:, b0:t1])
        out[t0:t1] = ob.reshape(Hkv, g, n, D).transpose(2, 0, 1, 3).reshape(n, Hq, D)
    return out


def silu(x):
    return x / (1.0 + np.exp(-x))


def forward(model, ids, attention_hook=None, capture=None, block=256):
    """Logits [T, vocab] float32 for one token stream `ids` (positions 0..T-1)."""
    ids = np.asarray(ids, dtype=np.int64)
    T = ids.shape[0]
    rope = rope_tables(T, model.head_dim, model.theta)
    x = model.embed[ids].astype(np.float32)
    for li in range(len(model.layers)):
        x = layer_forward(model, li, x, rope, attention_hook, capture, block)
    return final_logits(model, x)


def layer_forward(model, li, x, rope, attention_hook=None, capture=None, block=256):
    """One decoder layer: residual stream x [T, hidden] in, out. rope = rope_tables(T, ...).
    Lets callers rerun the model from one layer on (calibrate_llama.py does)."""
    T = x.shape[0]
    Hq, Hkv, D = model.n_heads, model.n_kv_heads, model.head_dim
    cos, sin = rope
    lw = model.layers[li]
    h = rmsnorm(x, lw["in"], model.eps)
    q = apply_rope((h @ lw["q"]).reshape(T, Hq, D), cos, sin)
    k = apply_rope((h @ lw["k"]).reshape(T, Hkv, D), cos, sin)
    v = (h @ lw["v"]).reshape(T, Hkv, D)
    if capture is not None:
        capture.append({"q": q, "k": k, "v": v})
    r = attention_hook(li, q, k, v) if attention_hook is not None else None
    if r is not None and r.get("out") is not None:
        o = np.asarray(r["out"], dtype=np.float32)
    elif r is not None:
        o = attention(q, k, v, r.get("k"), r.get("v"), r.get("window", 32), block)
    else:
        o = attention(q, k, v, block=block)
    x = x + o.reshape(T, Hq * D) @ lw["o"]
    h2 = rmsnorm(x, lw["post"], model.eps)
    return x + (silu(h2 @ lw["gate"]) * (h2 @ lw["up"])) @ lw["down"]


def final_logits(model, x):
    return rmsnorm(x, model.norm, model.eps) @ model.lm_head_t


def capture_qkv(model, ids):
    """Dense forward; returns (logits, [per layer {"q","k","v"}])."""
    caps = []
    logits = forward(model, ids, capture=caps)
    return logits, caps


# ---------------------------------------------------------------------------------------------
# metrics

def log_softmax(logits):
    m = logits.max(axis=-1, keepdims=True)
    z = logits - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def nll(logits, targets):
    """Per-position negative log-likelihood (nats, float64) of `targets` under `logits`."""
    lp = log_softmax(logits.astype(np.float64))
    return -lp[np.arange(len(targets)), np.asarray(targets)]


def kl_dense_to_pruned(logits_dense, logits_pruned):
    """Per-position KL(dense || pruned) in nats (float64)."""
    a = log_softmax(logits_dense.astype(np.float64))
    b = log_softmax(logits_pruned.astype(np.float64))
    return (np.exp(a) * (a - b)).sum(axis=-1)


# ---------------------------------------------------------------------------------------------
# data

def tinystories_ids(path=None):
    """The 16 stories of data/tinystories-valid-16.ids: list of int lists (BOS first)."""
    path = path or os.path.join(DATA, "tinystories-valid-16.ids")
    with open(path) as f:
        return [[int(t) for t in line.split()] for line in f if line.strip()]


def docs_valid_stream(path=None):
    """data/docs-valid.txt as the docs-byte-10m token stream: per document [256]+bytes+[257]."""
    path = path or os.path.join(DATA, "docs-valid.txt")
    with open(path, "rb") as f:
        raw = f.read()
    parts = []
    for doc in raw.split(b"\x1e"):
        parts.append(np.array([256], dtype=np.int64))
        parts.append(np.frombuffer(doc, dtype=np.uint8).astype(np.int64))
        parts.append(np.array([257], dtype=np.int64))
    return np.concatenate(parts)


def docs_window(stream, i, size=2048):
    """(inputs, targets) of window i as in the README: stream[size*i : size*i + size + 1]."""
    w = stream[size * i:size * i + size + 1]
    return w[:-1], w[1:]


def docs_num_windows(stream, size=2048):
    return (len(stream) - 1) // size


class Tok512:
    """llama2.c tokenizer file (tok512.bin): BPE by merge scores, byte fallback (ids 3..258)."""

    def __init__(self, path):
        with open(path, "rb") as f:
            data = f.read()
        (self.max_len,) = struct.unpack_from("<i", data, 0)
        off = 4
        self.pieces, self.scores = [], []
        while off < len(data):
            score, n = struct.unpack_from("<fi", data, off)
            off += 8
            self.pieces.append(data[off:off + n])
            self.scores.append(score)
            off += n
        self.lookup = {p: i for i, p in enumerate(self.pieces)}

    def encode(self, text, bos=True):
        """Same algorithm as llama2.c's encode(): dummy leading space, per-character lookup
        with byte fallback (+3), then repeatedly merge the adjacent pair of best score."""
        toks = [1] if bos else []
        if not text:
            return toks
        seq = [self.lookup[b" "]]
        for ch in text:
            b = ch.encode("utf-8")
            if b in self.lookup:
                seq.append(self.lookup[b])
            else:
                seq.extend(x + 3 for x in b)
        while True:
            best, best_i, best_id = -1e10, -1, -1
            for i in range(len(seq) - 1):
                m = self.pieces[seq[i]] + self.pieces[seq[i + 1]]
                j = self.lookup.get(m)
                if j is not None and self.scores[j] > best:
                    best, best_i, best_id = self.scores[j], i, j
            if best_i < 0:
                break
            seq[best_i:best_i + 2] = [best_id]
        return toks + seq

    def decode(self, ids):
        out = b""
        prev = None
        for t in ids:
            if t in (0, 1, 2):
                prev = t
                continue
            p = self.pieces[t]
            if prev == 1 and p.startswith(b" "):
                p = p[1:]
            out += p
            prev = t
        return out.decode("utf-8", errors="replace")


def greedy(model, ids, n_new, max_ctx=None):
    """Greedy continuation (full re-forward per token; fine for the small test models)."""
    ids = list(ids)
    for _ in range(n_new):
        ctx = ids if max_ctx is None else ids[-max_ctx:]
        ids.append(int(np.argmax(forward(model, ctx)[-1])))
    return ids
