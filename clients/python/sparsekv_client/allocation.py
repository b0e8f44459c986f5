"""Calibrated per-layer sparsity: spend a session's byte budget where pruning hurts least.

A uniform sparsity prunes every layer's K and V alike, but layers differ a lot in how much
pruning them costs (on docs-byte-10m one layer of six carries most of the perplexity loss).
Calibration measures, once per model on sample text, the loss of pruning one (layer, K or V)
alone at a few sparsities, and `allocate` then picks per-(layer, K/V) sparsities with the same
mean -- the same bytes per token in the per-token format, whose size is linear in the kept
count -- that minimise the summed loss. The result goes into `TensorPolicy(layer_sparsity=)`.

    curves = measure(...)           # [layers, 2 (K, V), len(points)], e.g. mean KL in nats
    k, v = allocate(curves, points, target=0.7)
    policy = Policy(k=TensorPolicy(0.7, layer_sparsity=k), v=TensorPolicy(0.7, layer_sparsity=v))

clients/python/examples/calibrate_llama.py measures the curves for the numpy Llama and writes
a file that `load_allocation` reads. Summing single-layer losses assumes they add up (first
order); tests/eval/frontend_quality.py --calibrated measures what the allocation really does.
"""

import json
import math

import numpy as np

__all__ = ["allocate", "exchange", "keep_count", "load_allocation", "save_allocation"]


def keep_count(n, sparsity):
    """The service's kept entries per vector: clamp(floor((1 - s) * n + 0.5), 1, n)."""
    return int(min(n, max(1, math.floor((1.0 - sparsity) * n + 0.5))))


def allocate(curves, points, target, max_sparsity=0.9, step=0.01, head_dim=None):
    """Per-(layer, K/V) sparsities with mean `target` minimising the summed loss.

    curves: [layers, 2, P] loss of pruning that layer's K (index 0) or V (index 1) alone at
    each of `points` (P increasing sparsities starting at 0.0, where the loss is 0);
    interpolated linearly in between; max_sparsity must not exceed points[-1] (no
    extrapolation).

    Without head_dim, sparsities are multiples of `step` in [0, max_sparsity] with mean
    `target` (within step / (2 * layers)). With head_dim (per-token pruning), every sparsity is
    a whole number of pruned entries i / head_dim and the kept entries sum exactly to those of
    the uniform policy at `target`: the same bytes per token, not just the same mean.
    Returns (k_list, v_list), each [layers] floats.
    """
    curves = np.asarray(curves, dtype=np.float64)
    points = np.asarray(points, dtype=np.float64)
    if curves.ndim != 3 or curves.shape[1] != 2 or curves.shape[2] != len(points):
        raise ValueError("curves must be [layers, 2, len(points)], got %s" % (curves.shape,))
    if points[0] != 0.0 or np.any(np.diff(points) <= 0):
        raise ValueError("points must increase from 0.0")
    if max_sparsity > points[-1] + 1e-12:
        raise ValueError("max_sparsity %.3f beyond the last measured point %.3f"
                         % (max_sparsity, points[-1]))
    if not 0.0 <= target <= max_sparsity:
        raise ValueError("target %.3f outside [0, %.3f]" % (target, max_sparsity))
    flat = curves.reshape(-1, len(points))
    n = flat.shape[0]
    if head_dim:
        # index i = entries pruned per vector; every entry starts at the uniform policy's
        most = int(math.floor(max_sparsity * head_dim + 1e-9))  # no point beyond max_sparsity
        grid = np.arange(most + 1) / float(head_dim)
        idx = np.full(n, head_dim - keep_count(head_dim, target))
    else:
        n_steps = int(round(max_sparsity / step))
        grid = np.arange(n_steps + 1) * step
        total = int(round(target / step * n))  # sum of step indices that gives the mean
        idx = np.full(n, total // n)
        idx[: total - idx.sum()] += 1  # spread the remainder: exact sum
    cost = np.stack([np.interp(grid, points, c) for c in flat])  # [entries, len(grid)]
    s = np.round(grid[exchange(cost, idx)], 6).reshape(curves.shape[0], 2)
    return [float(x) for x in s[:, 0]], [float(x) for x in s[:, 1]]


def exchange(cost, idx):
    """Pairwise exchange on a cost table: cost [entries, steps] (inf = not allowed), idx
    [entries] the starting step of every entry. Moves one entry a step up and another a step
    down (the sum of steps, i.e. the bytes, stays) while that lowers the summed cost; a
    monotone descent on a finite set, so it ends. Returns the final steps."""
    cost = np.asarray(cost, dtype=np.float64)
    idx = np.array(idx, dtype=np.int64)
    n, steps = cost.shape
    rows = np.arange(n)
    for _ in range(100 * n * steps):
        up = np.where(idx + 1 < steps, cost[rows, np.minimum(idx + 1, steps - 1)] - cost[rows, idx],
                      np.inf)
        dn = np.where(idx > 0, cost[rows, np.maximum(idx - 1, 0)] - cost[rows, idx], np.inf)
        a = int(np.argmin(up))
        order = np.argsort(dn, kind="stable")
        b = int(order[0]) if order[0] != a else int(order[1])
        if not up[a] + dn[b] < -1e-15:
            break
        idx[a] += 1
        idx[b] -= 1
    return idx


def save_allocation(path, curves, points, allocations, scoring, **meta):
    """Writes a calibration file: the measured curves, the scoring they were measured with and
    {target: (k_list, v_list)}."""
    doc = dict(meta)
    doc.update({"scoring": scoring, "points": [float(p) for p in points],
                "curves": np.asarray(curves, dtype=np.float64).tolist(),
                "allocations": {"%g" % t: {"k": list(k), "v": list(v)}
                                for t, (k, v) in sorted(allocations.items())}})
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def load_allocation(path, target):
    """(scoring, k_list, v_list) for mean sparsity `target` from a calibration file; the
    allocation is recomputed from the stored curves when the file has none for `target`."""
    with open(path) as f:
        doc = json.load(f)
    al = doc.get("allocations", {}).get("%g" % target)
    if al is not None:
        return doc["scoring"], list(al["k"]), list(al["v"])
    k, v = allocate(doc["curves"], doc["points"], target, head_dim=doc.get("head_dim"))
    return doc["scoring"], k, v
