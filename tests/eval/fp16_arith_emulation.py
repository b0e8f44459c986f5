"""Emulates the reduced-arithmetic decode kernels' roundings in numpy, on real q/k/v.

This chose the design of kernels/cpu/avx512_fp16_attention.cc (tests/bench/RESULTS.md,
section 1, "Numerics"). Every step that the kernel rounds to fp16 is rounded to fp16 here;
everything else is float64. A fused multiply-add is one rounding. The numbers are the error
of the attention output against float64 attention over the same fp16-stored K/V.

Candidates:
  K  q16         q * scale rounded to fp16, exact products and sums (what GPU kernels do)
     f32folds    fp16 products, summed per lane over head_dim / 32 words in fp16, lanes in fp32
     fold1..3    as f32folds, then 1..3 two-way folds of the 32 lanes in fp16, the rest fp32
                 (the kernel uses fold3)
     allfp16     all five folds in fp16
  V  v16         weights rounded to fp16, p * v summed per 64-token block in fp16, blocks in
                 fp32 (the kernel)
bf16 dot products (DecodeCompute::kBFloat16, kernels/cpu/avx512_bf16_attention.cc); products
of bf16 values are exact and the kernel's sums are fp32 (~1e-7), so sums are exact here:
  K  bf16        fp16 cache: q * scale rounded to bf16, K converted as the kernel does (the
                 fp16 significand rounded to 7 bits half away from zero, fp16 subnormals zero)
     bf16split   bf16 cache (K/V stored as bf16, the reference too): q * scale = hi + lo, both
                 bf16, K as stored (the kernel for bf16 caches)
     bf16hi      bf16 cache, q * scale rounded to bf16 once (the split's alternative)
  V  vbf16       fp16 cache: weights rounded to bf16 (normalised by their rounded sum), V
                 converted like K (the kernel); bf16 caches split the weights (exact here)

Run (about 15 s; docs-byte-10m window 0, 512 tokens):
  /usr/bin/python3 tests/eval/fp16_arith_emulation.py
Exits 0 with a SKIP line when ../shared/models is absent.
"""

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import llama_numpy as L  # noqa: E402

MODEL = "docs-byte-10m"
FOLDS = {"f32folds": 32, "fold1": 16, "fold2": 8, "fold3": 4, "allfp16": 1}
MODES = [("q16", "exact"), ("f32folds", "exact"), ("fold1", "exact"), ("fold2", "exact"),
         ("fold3", "exact"), ("allfp16", "exact"), ("exact", "v16"), ("fold3", "v16"),
         ("allfp16", "v16")]


def r16(x):
    return np.asarray(x).astype(np.float16).astype(np.float64)


def rb16(x):
    """Round to bf16 (nearest even), as vcvtneps2bf16 does for finite values."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def f16_to_bf16(x):
    """The kernel's integer fp16 -> bf16 conversion of fp16-stored x (values unscaled)."""
    h = np.asarray(x).astype(np.float16).view(np.uint16).astype(np.uint32)
    r = ((h & 0x7FFF) + 4) >> 3
    b = ((r | (h & 0x8000)) << 16).astype(np.uint32).view(np.float32).astype(np.float64)
    return np.where(r >> 7 == 0, 0.0, b * 2.0 ** 112)  # bf16 subnormal: zero in vdpbf16ps


# (K mode, V mode, storage)
BF16_MODES = [("bf16", "exact", "fp16"), ("bf16", "vbf16", "fp16"), ("bf16split", "exact", "bf16"),
              ("bf16hi", "exact", "bf16")]


def scores(qs, K, mode):
    """qs [D] (scaled), K [T, D] (fp16 values); D a multiple of 32."""
    if mode == "exact":
        return K @ qs
    if mode == "bf16":
        return f16_to_bf16(K) @ rb16(qs)
    if mode == "bf16split":
        hi = rb16(qs)
        return K @ (hi + rb16(qs - hi))
    if mode == "bf16hi":
        return K @ rb16(qs)
    qh = r16(qs)
    if mode == "q16":
        return K @ qh
    prod = K * qh  # exact: fp16 x fp16 fits float64
    acc = np.zeros((K.shape[0], 32))
    for w in range(K.shape[1] // 32):
        acc = r16(acc + prod[:, 32 * w:32 * w + 32])  # one FMA rounding per word
    n = 32
    while n > FOLDS[mode]:
        n //= 2
        acc = r16(acc[:, :n] + acc[:, n:2 * n])
    return acc.sum(1)


def attend(qs, K, V, kmode, vmode, block=64):
    s = scores(qs, K, kmode)
    if vmode == "exact":
        p = np.exp(s - s.max())
        return (p @ V) / p.sum()
    if vmode == "vbf16":  # one max for the whole sequence; the kernel's is per 64-token block
        p = rb16(np.exp(s - s.max()))
        return (p @ f16_to_bf16(V)) / p.sum()
    m, l, acc = -np.inf, 0.0, np.zeros(V.shape[1])
    for b in range(0, len(s), block):
        mn = max(m, s[b:b + block].max())
        alpha = np.exp(m - mn) if np.isfinite(m) else 0.0
        p = r16(np.exp(s[b:b + block] - mn))
        a16 = np.zeros(V.shape[1])
        for i, pi in enumerate(p):
            a16 = r16(a16 + pi * V[b + i])
        acc, l, m = acc * alpha + a16, l * alpha + p.sum(), mn
    return acc / l


def main():
    if not os.path.exists(os.path.join(L.MODELS, MODEL, "config.json")):
        print("SKIP: %s not found under %s" % (MODEL, L.MODELS))
        return 77  # reported as skipped, never as passed
    m = L.load(os.path.join(L.MODELS, MODEL))
    x, _ = L.docs_window(L.docs_valid_stream(), 0)
    _, caps = L.capture_qkv(m, x[:512])
    errs = {md: [] for md in MODES + BF16_MODES}
    for c in caps:
        q, k, v = c["q"], c["k"], c["v"]  # [T, heads, D]
        T, hq, d = q.shape
        g = hq // k.shape[1]
        pad = (-d) % 32  # zero channels change no sum
        for t in range(64, T, 32):
            for h in range(hq):
                K = np.pad(r16(k[:t + 1, h // g]), ((0, 0), (0, pad)))
                V = r16(v[:t + 1, h // g])
                qs = np.pad(q[t, h].astype(np.float64) / np.sqrt(d), (0, pad))
                ref = attend(qs, K, V, "exact", "exact")
                for md in MODES:
                    o = attend(qs, K, V, *md)
                    errs[md].append(np.linalg.norm(o - ref) / max(np.linalg.norm(ref), 1e-30))
                # bf16 caches: K/V stored as bf16, the reference over the same stored values.
                Kb = np.pad(rb16(k[:t + 1, h // g]), ((0, 0), (0, pad)))
                Vb = rb16(v[:t + 1, h // g])
                refb = attend(qs, Kb, Vb, "exact", "exact")
                for kmode, vmode, store in BF16_MODES:
                    if store == "fp16":
                        o, r = attend(qs, K, V, kmode, vmode), ref
                    else:
                        o, r = attend(qs, Kb, Vb, kmode, vmode), refb
                    errs[(kmode, vmode, store)].append(
                        np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30))
    print("%s, head_dim %d: attention-output relative error vs float64" % (MODEL, d))
    for md in MODES:
        e = np.array(errs[md])
        print("  K %-8s V %-5s mean %.2e  p90 %.2e  max %.2e"
              % (md[0], md[1], e.mean(), np.percentile(e, 90), e.max()))
    for md in BF16_MODES:
        e = np.array(errs[md])
        print("  K %-9s V %-5s (%s cache) mean %.2e  p90 %.2e  max %.2e"
              % (md[0], md[1], md[2], e.mean(), np.percentile(e, 90), e.max()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
