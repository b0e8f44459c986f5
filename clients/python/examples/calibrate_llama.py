#!/usr/bin/python3
"""Calibrates per-(layer, K/V) sparsity for a Llama checkpoint (numpy forward, no torch).

For every layer and for K and V separately, prunes only that tensor of only that layer at a
few sparsities (per-token, the service's exact keep count and tie rule, magnitude or
output-aware scores) with the strictest schedule (every position older than the 32-token
window read pruned), reruns the model from that layer on and measures the mean KL divergence
of the next-token distribution from the dense one. sparsekv_client.allocation.allocate then
spreads each target mean sparsity over the layers so that the summed KL is smallest; the
result is written as JSON for TensorPolicy(layer_sparsity=...), llama_frontend.py
--allocation, tests/eval/frontend_quality.py --calibrated, or the CLI's --k_layer_sparsity /
--v_layer_sparsity.

    /usr/bin/python3 clients/python/examples/calibrate_llama.py \\
        --model ../shared/models/docs-byte-10m --docs-windows 300,520 --tokens 768 \\
        --scoring output_aware --out docs-byte-10m.oa.json

Calibrate on text that is not your evaluation text. Cost: layers x 2 x (points - 1) partial
forwards per sequence for the curves, then per target and refinement round layers x 2 x 4
more (docs-byte-10m, 2 x 768 tokens, targets 0.5 and 0.7, 2 rounds: about 25 minutes on one
core).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
import llama_numpy as L  # noqa: E402
from sparsekv_client.allocation import (allocate, exchange, keep_count,  # noqa: E402
                                       load_allocation, save_allocation)

WINDOW = 32


def prune_per_token(x, sparsity, scores):
    """Keeps the top-k scores of every row x[t, h, :] (ties to the lower index), zeroes the
    rest."""
    D = x.shape[-1]
    k = keep_count(D, sparsity)
    order = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    mask = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return np.where(mask, x, 0).astype(np.float32)


def scores(tensor, x, q, scoring):
    """Per-token ranking scores: |x|, or for output-aware K |x| times the root summed square
    of the query channels of the KV head's group (per-token V is magnitude either way)."""
    a = np.abs(x.astype(np.float64))
    if scoring == "magnitude" or tensor == "v":
        return a
    T, Hkv, D = x.shape
    g = q.shape[1] // Hkv
    u = np.sqrt((q.astype(np.float64) ** 2).reshape(T, Hkv, g, D).sum(axis=(0, 2)))
    return a * u[None]


def measure(model, sequences, points, scoring, log=print):
    """curves [layers, 2, len(points)]: mean KL (nats, positions >= WINDOW) of pruning one
    (layer, K or V) alone at each sparsity, averaged over the sequences."""
    n = len(model.layers)
    curves = np.zeros((n, 2, len(points)))
    t0 = time.perf_counter()
    for si, ids in enumerate(sequences):
        ids = np.asarray(ids, dtype=np.int64)
        rope = L.rope_tables(len(ids), model.head_dim, model.theta)
        res = [model.embed[ids].astype(np.float32)]
        for li in range(n):
            res.append(L.layer_forward(model, li, res[-1], rope))
        dense = L.final_logits(model, res[-1])
        for li in range(n):
            for ti, tensor in enumerate(("k", "v")):
                for pi, s in enumerate(points):
                    if s == 0:
                        continue

                    def hook(_, q, k, v, s=s, tensor=tensor):
                        x = k if tensor == "k" else v
                        pruned = prune_per_token(x, s, scores(tensor, x, q, scoring))
                        return {tensor: pruned, "window": WINDOW}

                    x = L.layer_forward(model, li, res[li], rope, attention_hook=hook)
                    for lj in range(li + 1, n):
                        x = L.layer_forward(model, lj, x, rope)
                    kl = L.kl_dense_to_pruned(dense, L.final_logits(model, x))[WINDOW:]
                    curves[li, ti, pi] += float(kl.mean()) / len(sequences)
        log("sequence %d/%d measured (%.0f s)" % (si + 1, len(sequences),
                                                  time.perf_counter() - t0))
    return curves


def pruning_hook(k_layers, v_layers, scoring):
    """attention_hook that prunes every layer's K and V at the given sparsities."""
    def hook(li, q, k, v):
        r = {"window": WINDOW}
        if k_layers[li] > 0:
            r["k"] = prune_per_token(k, k_layers[li], scores("k", k, q, scoring))
        if v_layers[li] > 0:
            r["v"] = prune_per_token(v, v_layers[li], scores("v", v, q, scoring))
        return r
    return hook


def refine(model, sequences, k_layers, v_layers, scoring, max_sparsity, step=0.1, reach=2,
           log=print):
    """One in-context refinement of an allocation. Single-layer curves miss how pruning errors
    compound across layers (on docs-byte-10m the summed single-layer KL at a uniform 70% is
    0.048, the measured KL of all layers pruned together 0.057-0.078). Here every (layer, K/V)
    is moved by -reach..reach steps while all the others stay pruned at the allocation, the
    whole-model KL is measured, and the pairwise exchange reallocates on those in-context
    costs (same mean). Returns (k_layers, v_layers, KL of the input allocation)."""
    n = len(model.layers)
    alloc = np.array([[k_layers[li], v_layers[li]] for li in range(n)], dtype=np.float64)
    offsets = np.arange(-reach, reach + 1) * step
    table = np.zeros((n, 2, len(offsets)))
    allowed = np.zeros((n, 2, len(offsets)), dtype=bool)
    base_kl = 0.0
    t0 = time.perf_counter()
    for si, ids in enumerate(sequences):
        ids = np.asarray(ids, dtype=np.int64)
        rope = L.rope_tables(len(ids), model.head_dim, model.theta)
        dense = L.forward(model, ids)
        hook = pruning_hook(alloc[:, 0], alloc[:, 1], scoring)
        res = [model.embed[ids].astype(np.float32)]
        for li in range(n):
            res.append(L.layer_forward(model, li, res[-1], rope, attention_hook=hook))
        base = float(L.kl_dense_to_pruned(dense, L.final_logits(model, res[-1]))[WINDOW:].mean())
        base_kl += base / len(sequences)
        for li in range(n):
            for ti in range(2):
                for oi, d in enumerate(offsets):
                    s = round(alloc[li, ti] + d, 6)
                    if s < 0 or s > max_sparsity + 1e-9:
                        continue
                    allowed[li, ti, oi] = True
                    if d == 0:
                        table[li, ti, oi] += base / len(sequences)
                        continue
                    moved = alloc.copy()
                    moved[li, ti] = s
                    h = pruning_hook(moved[:, 0], moved[:, 1], scoring)
                    x = res[li]
                    for lj in range(li, n):
                        x = L.layer_forward(model, lj, x, rope, attention_hook=h)
                    kl = L.kl_dense_to_pruned(dense, L.final_logits(model, x))[WINDOW:]
                    table[li, ti, oi] += float(kl.mean()) / len(sequences)
        log("refine: sequence %d/%d (%.0f s)" % (si + 1, len(sequences),
                                                 time.perf_counter() - t0))
    cost = np.where(allowed, table, np.inf).reshape(2 * n, len(offsets))
    idx = exchange(cost, np.full(2 * n, reach))
    new = np.round(alloc + (idx.reshape(n, 2) - reach) * step, 6)
    return [float(x) for x in new[:, 0]], [float(x) for x in new[:, 1]], base_kl


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(L.MODELS, "docs-byte-10m"),
                    help="checkpoint folder, or a model name under ../shared/models")
    ap.add_argument("--docs-windows", default="300,520",
                    help="docs-valid.txt windows to calibrate on (docs-byte-10m)")
    ap.add_argument("--stories", default="",
                    help="tinystories-valid-16.ids story indices instead (stories260k)")
    ap.add_argument("--tokens", type=int, default=768, help="tokens per sequence")
    ap.add_argument("--scoring", choices=["magnitude", "output_aware"], default="output_aware")
    ap.add_argument("--points", default="0,0.3,0.5,0.6,0.7,0.8,0.9",
                    help="sparsities measured per (layer, K/V); the allocation stays within "
                    "the last")
    ap.add_argument("--targets", default="0.5,0.7", help="mean sparsities to allocate")
    ap.add_argument("--refine", type=int, default=2,
                    help="in-context refinement rounds per target (see refine())")
    ap.add_argument("--start",
                    help="start the refinement from this calibration file's allocation for "
                    "each target (for example one made on shorter sequences)")
    ap.add_argument("--reach", type=int, default=2,
                    help="refinement tries moves of 1..reach steps of 0.1 x head_dim entries")
    ap.add_argument("--curves-from",
                    help="reuse the single-layer curves of an earlier calibration file "
                    "(same model, text and scoring) instead of measuring them")
    ap.add_argument("--out", required=True, help="calibration JSON to write")
    args = ap.parse_args()
    if not os.path.isdir(args.model) and os.path.isdir(os.path.join(L.MODELS, args.model)):
        args.model = os.path.join(L.MODELS, args.model)  # a name under ../shared/models
    if not os.path.isdir(args.model):
        print("SKIP: model not found: %s" % args.model)
        return 77  # ctest's SKIP_RETURN_CODE
    model = L.load(args.model)
    if args.stories:
        all_ids = L.tinystories_ids()
        seqs = [np.asarray(all_ids[int(i)][:args.tokens]) for i in args.stories.split(",")]
        source = "stories " + args.stories
    else:
        stream = L.docs_valid_stream()
        seqs = [L.docs_window(stream, int(w))[0][:args.tokens]
                for w in args.docs_windows.split(",")]
        source = "docs windows " + args.docs_windows
    if args.curves_from:
        with open(args.curves_from) as f:
            old = json.load(f)
        points, curves = old["points"], np.asarray(old["curves"])
        curves_meta = {"curves_source": old.get("source"), "curves_tokens": old.get("tokens")}
    else:
        points = [float(p) for p in args.points.split(",")]
        curves = measure(model, seqs, points, args.scoring)
        curves_meta = {}
    # Refinement moves whole entries (about 0.1 of head_dim), so the allocation keeps exactly
    # the uniform policy's bytes.
    step = max(1, round(0.1 * model.head_dim)) / model.head_dim
    allocations, history = {}, {}
    fmt = lambda xs: " ".join("%.2f" % x for x in xs)
    for t in (float(x) for x in args.targets.split(",")):
        if args.start:
            _, k, v = load_allocation(args.start, t)
            print("mean %.2f from %s: K %s  V %s" % (t, args.start, fmt(k), fmt(v)))
        else:
            k, v = allocate(curves, points, t, max_sparsity=points[-1], head_dim=model.head_dim)
            print("mean %.2f from single-layer curves: K %s  V %s" % (t, fmt(k), fmt(v)))
        history["%g" % t] = []
        for r in range(args.refine):
            k2, v2, kl = refine(model, seqs, k, v, args.scoring, points[-1], step=step,
                                reach=args.reach)
            history["%g" % t].append({"k": k, "v": v, "kl": kl})
            print("  round %d: KL of that allocation %.5f -> K %s  V %s"
                  % (r + 1, kl, fmt(k2), fmt(v2)))
            if (k2, v2) == (k, v):
                break
            k, v = k2, v2
        allocations[t] = (k, v)
    save_allocation(args.out, curves, points, allocations, args.scoring,
                    model=os.path.basename(os.path.normpath(args.model)), source=source,
                    tokens=args.tokens, window=WINDOW, loss="mean KL nats, positions >= 32",
                    head_dim=model.head_dim, **curves_meta,
                    refinement=history)
    # The file must give back what was allocated, with the asked-for mean.
    for t, (k, v) in allocations.items():
        scoring, k2, v2 = load_allocation(args.out, t)
        mean = float(np.mean(k2 + v2))
        kept = sum(keep_count(model.head_dim, s) for s in k2 + v2)
        uniform = 2 * len(k2) * keep_count(model.head_dim, t)
        if (scoring, k2, v2) != (args.scoring, k, v) or abs(mean - t) > 0.01 or kept != uniform:
            print("FAIL: %s gives mean %.4f for target %.2f" % (args.out, mean, t))
            return 1
    print("wrote %s" % args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
