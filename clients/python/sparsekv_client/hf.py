"""Hugging Face transformers integration: decode attention delegated to sparsekv.

    from sparsekv_client import Client, Policy
    from sparsekv_client.hf import SparsekvGenerator
    gen = SparsekvGenerator(model, Client("localhost:50051"), policy=Policy.uniform(0.5))
    ids = gen.generate(prompt_ids, max_new_tokens=32)      # greedy; logits in gen.last_logits
    # per-layer sparsity calibrated for the model (examples/calibrate_llama.py reads HF Llama
    # checkpoints): policy=Policy.calibrated("model.json", 0.7)

How it works. `register()` adds an attention implementation named "sparsekv" to transformers'
AttentionInterface and the model is switched to it. The model then runs without a
transformers cache (`use_cache=False`): each forward call sees only the tokens it is given,
with explicit `position_ids`, so RoPE and the projections are computed by transformers as
usual, and the attention of every layer is routed here:

- prefill (several tokens): the layer's keys and values are uploaded to the session with
  AppendKV and the causal attention over the prompt is computed locally (the cache is dense
  at that point anyway);
- decode (one token): Decode(session, layer, q, new_k, new_v) appends the token's K/V and
  attends over the session's [compressed chunks, dense tail]; the K/V cache lives only in
  sparsekv, not in the model process.

Needs torch and transformers >= 5 (AttentionInterface); imported lazily so that the rest of
the package works without them. Thread-safety: one generator per thread.
"""

import threading

import numpy as np

from .client import Policy

ATTENTION_NAME = "sparsekv"
_current = threading.local()
_registered = False


def _attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       **kwargs):
    """transformers attention interface: query [B, H, T, D], key/value [B, KVH, T, D]
    (only this call's tokens: the model runs without a transformers cache). Returns
    (output [B, T, H, D], None)."""
    import torch

    ctx = getattr(_current, "ctx", None)
    if ctx is None:
        raise RuntimeError("sparsekv attention called outside SparsekvGenerator")
    layer = module.layer_idx
    b, h, t, d = query.shape
    if b != 1:
        raise ValueError("sparsekv attention: batch size 1 only (one session per sequence)")
    if t > 1:  # prefill: upload, attend locally (causal)
        k = key[0].transpose(0, 1).float().cpu().numpy()[None]  # [1, T, KVH, D]
        v = value[0].transpose(0, 1).float().cpu().numpy()[None]
        ctx.client.append_kv(ctx.session_id, k, v, layer_begin=layer)
        groups = h // key.shape[1]
        kr = key.repeat_interleave(groups, dim=1)
        vr = value.repeat_interleave(groups, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, kr, vr, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    q = query[0, :, 0, :].float().cpu().numpy()                 # [H, D]
    nk = key[0, :, 0, :].float().cpu().numpy()                  # [KVH, D]
    nv = value[0, :, 0, :].float().cpu().numpy()
    out, _ = ctx.client.decode(ctx.session_id, layer, q, new_k=nk, new_v=nv,
                               scale=float(scaling or 0.0))
    o = torch.from_numpy(np.ascontiguousarray(out)).to(device=query.device, dtype=query.dtype)
    return o.view(1, 1, h, d), None                             # [B, T, H, D]


def register():
    """Registers the "sparsekv" attention implementation with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION_NAME, _attention_forward)
    _registered = True


class SparsekvGenerator:
    """Greedy generation / teacher-forced scoring of a transformers causal LM whose attention
    runs through one sparsekv session per call (created from the model config, deleted after).

    policy: sparsekv_client.Policy for the session (default: dense). dtype: the session's
    storage dtype ("float32" keeps the cache exact; "float16" halves it).
    """

    def __init__(self, model, client, policy=None, dtype="float32", flush_every_step=False):
        register()
        self.model = model
        self.client = client
        self.policy = policy or Policy()
        self.dtype = dtype
        self.flush_every_step = flush_every_step
        self.session_id = None
        self.last_logits = None
        cfg = model.config
        self.layers = cfg.num_hidden_layers
        self.q_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.q_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.q_heads

    def _forward(self, ids, start):
        import torch
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
        cfg = self.model.config
        old = cfg._attn_implementation
        cfg._attn_implementation = ATTENTION_NAME  # read by every attention layer per call
        _current.ctx = self
        try:
            with torch.no_grad():
                out = self.model(input_ids=ids, position_ids=pos, use_cache=False)
        finally:
            _current.ctx = None
            cfg._attn_implementation = old
        if self.flush_every_step:
            self.client.flush(self.session_id)
        return out.logits

    def _run(self, prompt_ids, continuation):
        """Prefill prompt_ids [1, P], then feed each id of `continuation` (teacher forcing) or
        greedy picks when continuation is an int (number of new tokens). Returns (ids, logits
        [P + steps, vocab] as float32 numpy)."""
        import torch
        info = self.client.create_session(layers=self.layers, kv_heads=self.kv_heads,
                                          q_heads=self.q_heads, head_dim=self.head_dim,
                                          dtype=self.dtype, policy=self.policy)
        self.session_id = info.id
        try:
            logits = [self._forward(prompt_ids, 0)[0].float().cpu()]
            ids = prompt_ids[0].tolist()
            steps = continuation if isinstance(continuation, int) else len(continuation)
            for i in range(steps):
                nxt = (int(logits[-1][-1].argmax()) if isinstance(continuation, int)
                       else int(continuation[i]))
                ids.append(nxt)
                step = torch.tensor([[nxt]], device=prompt_ids.device)
                logits.append(self._forward(step, len(ids) - 1)[0].float().cpu())
            self.last_logits = torch.cat(logits).numpy()
            return ids, self.last_logits
        finally:
            self.client.delete_session(self.session_id)
            self.session_id = None

    def generate(self, prompt_ids, max_new_tokens):
        """Greedy decoding; returns the prompt and new token ids as a list."""
        ids, _ = self._run(prompt_ids, int(max_new_tokens))
        return ids

    def score(self, prompt_ids, continuation_ids):
        """Teacher-forced logits [P + len(continuation), vocab] (float32 numpy)."""
        _, logits = self._run(prompt_ids, list(continuation_ids))
        return logits
