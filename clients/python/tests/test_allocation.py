#!/usr/bin/python3
"""sparsekv_client.allocation: the per-(layer, K/V) sparsity solver (numpy only, no server)."""

import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sparsekv_client import Policy  # noqa: E402
from sparsekv_client.allocation import (allocate, keep_count, load_allocation,  # noqa: E402
                                       save_allocation)

POINTS = [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9]


def convex_curves(rng, layers):
    """Random increasing convex losses: a * s^p with p in [2, 5]."""
    a = rng.uniform(0.1, 5.0, size=(layers, 2, 1))
    p = rng.uniform(2.0, 5.0, size=(layers, 2, 1))
    return a * np.asarray(POINTS)[None, None, :] ** p


def summed(curves, k, v):
    c = np.asarray(curves)
    return sum(np.interp(s, POINTS, c[l, t]) for l in range(c.shape[0])
               for t, s in ((0, k[l]), (1, v[l])))


def test_mean_is_exact_and_bounds_hold():
    rng = np.random.default_rng(1)
    for layers in (1, 2, 6, 13):
        curves = convex_curves(rng, layers)
        for target in (0.0, 0.33, 0.5, 0.7, 0.9):
            k, v = allocate(curves, POINTS, target)
            s = np.array(k + v)
            assert len(k) == len(v) == layers
            assert abs(s.mean() - target) <= 0.01 / 2 + 1e-9, (layers, target, s.mean())
            assert s.min() >= 0.0 and s.max() <= 0.9 + 1e-12, s


def test_head_dim_keeps_exactly_the_uniform_bytes():
    rng = np.random.default_rng(4)
    for head_dim in (64, 128):
        for target in (0.5, 0.7):
            curves = convex_curves(rng, 6)
            curves[2] *= 30.0
            k, v = allocate(curves, POINTS, target, head_dim=head_dim)
            kept = [keep_count(head_dim, s) for s in k + v]
            assert sum(kept) == 12 * keep_count(head_dim, target), (head_dim, target, kept)
            # every sparsity is a whole number of entries, read back exactly by keep_count
            for s in k + v:
                i = round(s * head_dim)
                assert abs(s - i / head_dim) < 1e-6 and keep_count(head_dim, s) == head_dim - i
            assert k[2] < target and v[2] < target, (k, v)
            assert max(k + v) <= 0.9, (k, v)  # never beyond the last measured point
            u = 1.0 - keep_count(head_dim, target) / head_dim  # the uniform policy's start
            assert summed(curves, k, v) <= summed(curves, [u] * 6, [u] * 6) + 1e-12


def test_never_worse_than_uniform():
    rng = np.random.default_rng(2)
    for _ in range(20):
        curves = convex_curves(rng, 6)
        for target in (0.5, 0.7):
            k, v = allocate(curves, POINTS, target)
            uniform = summed(curves, [target] * 6, [target] * 6)
            assert summed(curves, k, v) <= uniform + 1e-12


def test_sensitive_layer_gets_less_sparsity():
    curves = np.tile(np.asarray(POINTS) ** 3, (6, 2, 1))
    curves[4] *= 20.0  # layer 4 costs 20x as much at every sparsity
    k, v = allocate(curves, POINTS, 0.7)
    assert k[4] < 0.7 and v[4] < 0.7, (k, v)
    others = [k[i] for i in range(6) if i != 4] + [v[i] for i in range(6) if i != 4]
    assert min(others) > 0.7, (k, v)
    # identical curves: the uniform allocation is already optimal and stays
    k, v = allocate(np.tile(np.asarray(POINTS) ** 3, (6, 2, 1)), POINTS, 0.7)
    assert k == [0.7] * 6 and v == [0.7] * 6, (k, v)


def test_bad_arguments_are_named():
    curves = np.zeros((2, 2, len(POINTS)))
    for kwargs, word in ((dict(curves=np.zeros((2, 3, 7))), "curves"),
                         (dict(points=[0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9]), "points"),
                         (dict(max_sparsity=0.95), "max_sparsity"),
                         (dict(target=0.95), "target")):
        args = dict(curves=curves, points=POINTS, target=0.5)
        args.update(kwargs)
        try:
            allocate(**args)
        except ValueError as e:
            assert word in str(e), (word, e)
        else:
            raise AssertionError("no error for %s" % word)


def test_file_round_trip():
    rng = np.random.default_rng(3)
    curves = convex_curves(rng, 3)
    k, v = allocate(curves, POINTS, 0.5)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "cal.json")
        save_allocation(path, curves, POINTS, {0.5: (k, v)}, "output_aware", model="m")
        assert load_allocation(path, 0.5) == ("output_aware", k, v)
        # a target the file has no allocation for is solved from the stored curves
        k7, v7 = allocate(curves, POINTS, 0.7)
        assert load_allocation(path, 0.7) == ("output_aware", k7, v7)
        # Policy.calibrated builds the session policy from the file
        p = Policy.calibrated(path, 0.5, dense_window=16)
        assert (p.k.direction, p.k.scoring, p.k.layer_sparsity) == ("per_token", "output_aware", k)
        assert (p.v.sparsity, p.v.layer_sparsity, p.dense_window) == (0.5, v, 16)


if __name__ == "__main__":
    for name, fn in sorted(globals().items()):
        if name.startswith("test_") and callable(fn):
            fn()
            print("ok", name)
    print("PASS")
