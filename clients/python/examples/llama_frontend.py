#!/usr/bin/python3
"""Frontend integration example: a numpy Llama inference loop whose decode attention runs in
sparsekv.

The model (safetensors + config.json, e.g. ../shared/models/docs-byte-10m) runs locally in
numpy (llama_numpy.py, next to this file). The frontend
  1. runs prefill locally (dense causal attention over the prompt),
  2. uploads every layer's post-RoPE K and V of the prompt with AppendKV (plus the prompt's
     queries as obs_q, which seeds output-aware scoring),
  3. decodes one token at a time: for every layer it computes q, k, v of the new token
     locally, sends them in one DecodeStream message (the service appends k, v, then attends
     over [compressed chunks + dense tail]) and continues the forward with the returned
     attention output.
Several independent streams (different prompts and/or pruning policies) are decoded in
lock-step: each layer's step for all of them is one DecodeStream request with one item per
session, which is how a batching frontend would use the API.

Schedules:
  strict      dense_window 32 and Flush after every decode step: every token is pruned as
              soon as it leaves the 32-token window (how the MUSTAFAR paper and the models'
              READMEs measure accuracy). Per-channel policies compress whole groups of
              group_tokens only, so up to group_tokens - 1 more tokens stay dense there.
  group-flush Flush after every group_tokens-th step only: per-token policies then compress
              on the same whole-group boundaries as per-channel ones (and as a mixed policy
              with any per-channel side, whose Flush compresses whole groups for K and V), so
              tokens stay dense for 32..63 steps.
  background  no Flush; the server's background pruner compresses the oldest chunk_tokens
              once the dense tail holds dense_window + chunk_tokens (asynchronous: whether a
              chunk is published before the next step depends on timing).

Run (generates text greedily, or teacher-forces a prompt and reports perplexity):
  /usr/bin/python3 clients/python/examples/llama_frontend.py --server-bin build/bin/sparsekv-server \
      --model ../shared/models/stories260k --prompt "Once upon a time" --generate 60 --sparsity 0.5
  /usr/bin/python3 clients/python/examples/llama_frontend.py --server localhost:50051 \
      --model ../shared/models/docs-byte-10m --eval-tokens 512 --sparsity 0.7
"""

import argparse
import dataclasses
import math
import os
import sys
import time
from typing import List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # the sparsekv_client package
import llama_numpy as L  # noqa: E402
from sparsekv_client import Client, DecodeItem, Policy, TensorPolicy  # noqa: E402
from sparsekv_client.testing import server_target  # noqa: E402


@dataclasses.dataclass
class StreamConfig:
    """One decoded stream: its prompt/teacher tokens, the session policy and schedule.

    service_heads: None = every layer and query head takes its attention output from the
    service; else a bool array [layers, q_heads]: True heads use the service's (pruned)
    output, False heads a local dense attention (used to find which layers/heads drive a
    pruning loss; needs a local dense cache)."""
    name: str
    ids: np.ndarray
    policy: Policy
    schedule: str = "strict"  # "strict" | "group-flush" | "background"
    dtype: str = "float32"    # session storage dtype
    service_heads: Optional[np.ndarray] = None


class ServiceLlama:
    """Runs numpy Llama forwards with decode attention served by sparsekv."""

    def __init__(self, model, client: Client, prefill_obs_q=True):
        self.m = model
        self.c = client
        self.prefill_obs_q = prefill_obs_q
        self.stats = {"decode_requests": 0, "decode_items": 0, "flushes": 0,
                      "decode_s": 0.0, "flush_s": 0.0, "local_s": 0.0}

    # -- one batch of streams (equal lengths), teacher-forced ------------------------------
    def run(self, streams: List[StreamConfig], prefill=32, keep_sessions=False,
            on_step=None):
        """Teacher-forced logits [B, T, vocab] of every stream (positions 0..T-1).

        Positions < prefill come from the local dense prefill; positions >= prefill from the
        service-backed decode loop. Returns (logits, session_infos)."""
        m = self.m
        B = len(streams)
        T = len(streams[0].ids)
        if any(len(s.ids) != T for s in streams):
            raise ValueError("streams of one batch must have equal lengths")
        P = min(prefill, T)
        Hq, Hkv, D = m.n_heads, m.n_kv_heads, m.head_dim
        logits = np.empty((B, T, m.vocab), dtype=np.float32)
        sids = []
        local = any(s.service_heads is not None for s in streams)
        kc = vc = None
        if local:
            kc = np.zeros((B, m.n_layers, T, Hkv, D), np.float32)
            vc = np.zeros((B, m.n_layers, T, Hkv, D), np.float32)
        try:
            # 1-2. local prefill (shared by streams with the same prompt), upload
            pre_cache = {}
            for b, s in enumerate(streams):
                key = s.ids[:P].tobytes()
                if key not in pre_cache:
                    pre_cache[key] = L.capture_qkv(m, s.ids[:P])
                lg, caps = pre_cache[key]
                logits[b, :P] = lg
                pol = dataclasses.replace(s.policy)
                info = self.c.create_session(m.n_layers, Hkv, Hq, D, dtype=s.dtype, policy=pol,
                                             labels={"example": "llama_frontend"})
                sids.append(info.id)
                k = np.stack([c["k"] for c in caps])
                v = np.stack([c["v"] for c in caps])
                obs = np.stack([c["q"] for c in caps]) if self.prefill_obs_q else None
                self.c.append_kv(info.id, k, v, obs_q=obs)
                if local:
                    kc[b, :, :P] = k
                    vc[b, :, :P] = v
            strict = [sid for sid, s in zip(sids, streams) if s.schedule == "strict"]
            if strict:
                self.c.flush_many(strict)
            # 3. decode loop
            ids = np.stack([s.ids for s in streams])  # [B, T]
            masks = None
            if local:
                masks = np.stack([np.ones((m.n_layers, Hq), bool) if s.service_heads is None
                                  else np.asarray(s.service_heads, bool) for s in streams])
            with self.c.decode_stream() as st:
                for t in range(P, T):
                    logits[:, t] = self._step(st, sids, ids[:, t], t, kc, vc, masks)
                    due = strict + [sid for sid, s in zip(sids, streams)
                                    if s.schedule == "group-flush"
                                    and (t + 1) % (s.policy.group_tokens or 32) == 0]
                    if due:
                        t0 = time.perf_counter()
                        self.c.flush_many(due)
                        self.stats["flush_s"] += time.perf_counter() - t0
                        self.stats["flushes"] += len(due)
                    if on_step is not None:
                        on_step(t)
            infos = [self.c.get_session(sid) for sid in sids]
        finally:
            if not keep_sessions:
                for sid in sids:
                    try:
                        self.c.delete_session(sid)
                    except Exception:  # noqa: BLE001 (best effort clean-up)
                        pass
        return logits, infos

    def _step(self, st, sids, tok, t, kc, vc, masks):
        """One decode position for all streams: returns logits [B, vocab]."""
        m = self.m
        B = len(sids)
        Hq, Hkv, D = m.n_heads, m.n_kv_heads, m.head_dim
        cos, sin = L.rope_tables(1, D, m.theta, offset=t)
        x = m.embed[tok].astype(np.float32)  # [B, hidden]
        for li, lw in enumerate(m.layers):
            t0 = time.perf_counter()
            h = L.rmsnorm(x, lw["in"], m.eps)
            q = L.apply_rope((h @ lw["q"]).reshape(B, Hq, D), cos, sin)  # RoPE per row: pos t
            k = L.apply_rope((h @ lw["k"]).reshape(B, Hkv, D), cos, sin)
            v = (h @ lw["v"]).reshape(B, Hkv, D)
            items = [DecodeItem(sids[b], li, q[b], k[b], v[b]) for b in range(B)]
            t1 = time.perf_counter()
            res = st.step(items)
            t2 = time.perf_counter()
            o = np.stack([r.out for r in res]).astype(np.float32)  # [B, Hq, D]
            if kc is not None:
                kc[:, li, t] = k
                vc[:, li, t] = v
                dense = _local_decode_attention(q, kc[:, li, :t + 1], vc[:, li, :t + 1])
                o = np.where(masks[:, li, :, None], o, dense)
            x = x + o.reshape(B, Hq * D) @ lw["o"]
            h2 = L.rmsnorm(x, lw["post"], m.eps)
            x = x + (L.silu(h2 @ lw["gate"]) * (h2 @ lw["up"])) @ lw["down"]
            self.stats["decode_s"] += t2 - t1
            self.stats["local_s"] += (t1 - t0) + (time.perf_counter() - t2)
            self.stats["decode_requests"] += 1
            self.stats["decode_items"] += B
        return L.rmsnorm(x, m.norm, m.eps) @ m.lm_head_t

    # -- greedy generation of one stream -----------------------------------------------------
    def generate(self, prompt_ids, n_new, policy: Policy, dtype="float16"):
        """Greedy continuation; the prompt is prefilled locally, every new token decoded
        through the service. Returns (ids, session_info)."""
        m = self.m
        ids = list(prompt_ids)
        lg, caps = L.capture_qkv(m, np.asarray(ids))
        info = self.c.create_session(m.n_layers, m.n_kv_heads, m.n_heads, m.head_dim,
                                     dtype=dtype, policy=policy)
        try:
            self.c.append_kv(info.id, np.stack([c["k"] for c in caps]),
                             np.stack([c["v"] for c in caps]),
                             obs_q=np.stack([c["q"] for c in caps]))
            nxt = int(np.argmax(lg[-1]))
            with self.c.decode_stream(session_id=info.id) as st:
                for _ in range(n_new):
                    ids.append(nxt)
                    if len(ids) >= m.max_pos:
                        break
                    out = self._step(st, [info.id], np.array([nxt]), len(ids) - 1, None, None,
                                     None)
                    nxt = int(np.argmax(out[0]))
            final = self.c.get_session(info.id)
        finally:
            self.c.delete_session(info.id)
        return ids, final


def _local_decode_attention(q, k, v):
    """q [B, Hq, D], k/v [B, t, Hkv, D] -> dense attention output [B, Hq, D] (float32)."""
    B, Hq, D = q.shape
    Hkv = k.shape[2]
    g = Hq // Hkv
    qg = q.reshape(B, Hkv, g, D)
    s = np.einsum("bhgd,bthd->bhgt", qg, k) * np.float32(1.0 / math.sqrt(D))
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("bhgt,bthd->bhgd", p, v).reshape(B, Hq, D).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# metrics

def perplexity(logits, targets):
    return float(np.exp(L.nll(logits, targets).mean()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--server", help="HOST:PORT of a running sparsekv-server")
    g.add_argument("--server-bin", help="start this sparsekv-server binary on a free port")
    ap.add_argument("--model", default=os.path.join(L.MODELS, "stories260k"))
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--generate", type=int, default=0, help="greedy tokens to generate")
    ap.add_argument("--eval-tokens", type=int, default=0,
                    help="teacher-force this many tokens of the model's validation data and "
                         "compare with the local dense forward")
    ap.add_argument("--sparsity", type=float, default=0.5,
                    help="K and V sparsity (per-token, the server's default scoring); with "
                    "--allocation the mean over layers")
    ap.add_argument("--allocation",
                    help="calibration file from calibrate_llama.py: per-(layer, K/V) "
                    "sparsities with mean --sparsity and the scoring they were measured with")
    ap.add_argument("--dtype", default="float16")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.model):
        print("SKIP: model %s not found" % args.model)
        return 77  # ctest's SKIP_RETURN_CODE
    model = L.load(args.model)
    with server_target(args.server, args.server_bin) as target:
        with Client(target) as c:
            c.wait_ready()
            fe = ServiceLlama(model, c)
            if args.allocation:
                policy = Policy.calibrated(args.allocation, args.sparsity)
            else:
                policy = Policy(k=TensorPolicy(args.sparsity), v=TensorPolicy(args.sparsity))
            print(model, "server", target, "policy", policy)
            if args.generate:
                if model.vocab == 258:
                    prompt = [256] + list(args.prompt.encode("utf-8"))
                    dec = lambda ids: bytes(i for i in ids if i < 256).decode("utf-8", "replace")
                else:
                    tok = L.Tok512(os.path.join(args.model, "tok512.bin"))
                    prompt, dec = tok.encode(args.prompt), tok.decode
                ids, info = fe.generate(prompt, args.generate, policy, dtype=args.dtype)
                print(repr(dec(ids)))
                st = info.stats
                print("tokens %s, compressed %d chunks, %.3f of dense bytes"
                      % (st.tokens_per_layer, st.chunks, st.compression_ratio))
            if args.eval_tokens:
                if model.vocab == 258:
                    ids = L.docs_window(L.docs_valid_stream(), 0)[0][:args.eval_tokens + 1]
                else:
                    ids = np.array(L.tinystories_ids()[0][:args.eval_tokens + 1])
                x, y = ids[:-1], ids[1:]
                dense = L.forward(model, x)
                cfgs = [StreamConfig("dense", x, Policy(), dtype=args.dtype),
                        StreamConfig("pruned", x, policy, dtype=args.dtype)]
                lg, _ = fe.run(cfgs)
                diff = float(np.abs(lg[0] - dense).max())
                # float32 storage: only summation order differs (~1e-5); float16 storage
                # rounds K/V to 11 bits (2^-12 relative), ~1e-2 on logits of ~20
                tol = 2e-3 if args.dtype == "float32" else 0.1
                print("max |logit - local dense| at sparsity 0: %.2e (tolerance %.0e)"
                      % (diff, tol))
                for name, l_ in (("local dense", dense), ("service dense", lg[0]),
                                 ("service pruned", lg[1])):
                    agree = float((l_.argmax(-1) == dense.argmax(-1)).mean())
                    print("%-15s ppl %.4f  top-1 agreement %.4f" % (name, perplexity(l_, y),
                                                                      agree))
                if not diff <= tol or not np.isfinite(lg[1]).all():
                    print("FAIL: service logits do not match the local dense forward")
                    return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
