"""Self-checks of tests/eval/prune_numpy.py (the pruning oracle). Needs numpy only.

Run:  /usr/bin/python3 tests/eval/test_prune_numpy.py     (a few seconds)
Prints one line per check, then "N passed, M failed"; exits 1 on failure.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prune_numpy as P  # noqa: E402

RESULTS = []


def check(name, ok, detail=""):
    RESULTS.append(bool(ok))
    print("%s  %s  %s" % ("PASS" if ok else "FAIL", name, detail), flush=True)


def test_keep_count():
    cases = [(128, 0.5, 64), (128, 0.7, 38), (64, 0.5, 32), (64, 0.7, 19), (8, 0.5, 4),
             (8, 0.7, 2), (32, 0.5, 16), (32, 0.7, 10), (64, 0.0, 64), (4, 0.99, 1),
             (1, 0.5, 1), (3, 0.5, 2), (2, 0.75, 1)]
    bad = [(n, s, P.keep_count(n, s), k) for n, s, k in cases if P.keep_count(n, s) != k]
    check("keep_count table", not bad, "mismatches %s" % bad)
    # the float32-vs-float64 ambiguity the docstring warns about
    check("keep_count arith differs at s=0.3 n=5",
          (P.keep_count(5, 0.3), P.keep_count(5, 0.3, arith="float32")) == (3, 4),
          "float64 %d, float32 %d" % (P.keep_count(5, 0.3), P.keep_count(5, 0.3, "float32")))


def test_ties_and_counts():
    x = np.array([[[1.0, -2.0, 2.0, 0.5, -2.0, 1.0, 0.0, 2.0]]], np.float32)  # [1, 1, 8]
    _, m = P.prune(x, 0.5, P.PER_TOKEN)
    # |x| = 1 2 2 .5 2 1 0 2: the four 2s win; k=4 -> indices 1, 2, 4, 7
    check("ties: all top values kept", m[0, 0].nonzero()[0].tolist() == [1, 2, 4, 7],
          str(m[0, 0].astype(int)))
    _, m = P.prune(x, 0.7, P.PER_TOKEN)  # k=2 of four tied 2s -> lowest indices 1, 2
    check("ties go to the lower index", m[0, 0].nonzero()[0].tolist() == [1, 2],
          str(m[0, 0].astype(int)))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((96, 3, 64)).astype(np.float16).astype(np.float32)
    for s in (0.5, 0.7):
        _, m = P.prune(x, s, P.PER_TOKEN)
        k = P.keep_count(64, s)
        check("per-token keeps exactly k=%d per row at %.1f" % (k, s),
              (m.sum(-1) == k).all())
        _, m = P.prune(x, s, P.PER_CHANNEL, group=32)
        kc = P.keep_count(32, s)
        per = m.reshape(3, 32, 3, 64).sum(axis=1)
        check("per-channel keeps exactly k=%d per (group, head, channel) at %.1f" % (kc, s),
              (per == kc).all())
        # kept elements dominate dropped ones within each vector
        xv = np.abs(P.per_channel_vectors(x, 32))
        mv = P.per_channel_vectors(m, 32)
        lo = np.where(mv, xv, np.inf).min(-1)
        hi = np.where(~mv, xv, -np.inf).max(-1)
        check("per-channel kept >= dropped at %.1f" % s, (lo >= hi).all())


def test_pack():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 2, 128)).astype(np.float32)
    xp, m = P.prune(x, 0.7, P.PER_TOKEN)
    bits, vals = P.pack_vectors(x, m)
    k = P.keep_count(128, 0.7)
    ok = bits.shape == (5, 2, 2) and vals.shape == (5, 2, k)
    # unpack and compare
    rec = np.zeros_like(x)
    for t in range(5):
        for h in range(2):
            idx = [i for i in range(128) if (int(bits[t, h, i // 64]) >> (i % 64)) & 1]
            ok &= len(idx) == k
            rec[t, h, idx] = vals[t, h]
    check("pack_vectors round trip (bitmap LSB first, values in index order)",
          ok and np.array_equal(rec, xp))


def test_scores():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((32, 2, 8))
    w = rng.random((32, 2))
    u = rng.random((32, 2, 8))
    full_k = w[:, :, None] * u * np.abs(x)
    for d in (P.PER_TOKEN, P.PER_CHANNEL):
        a = P.prune(x, 0.5, d, P.scores_for(x, "k", d, P.OUTPUT_AWARE, w, u), 32)[1]
        b = P.prune(x, 0.5, d, full_k, 32)[1]
        # dropping the factor constant within a vector does not change the ranking
        # (per-channel: u varies per token here, so only per-token is exact)
        if d == P.PER_TOKEN:
            check("output-aware K per-token ranking = w*u*|K| ranking", np.array_equal(a, b))
    a = P.prune(x, 0.5, P.PER_TOKEN, P.scores_for(x, "v", P.PER_TOKEN, P.OUTPUT_AWARE, w, u))[1]
    check("output-aware V per-token = magnitude", np.array_equal(a, P.prune(x, 0.5)[1]))


def _policies():
    TP = P.TensorPolicy
    yield "mag token K+V", P.Policy(TP(0.5), TP(0.7), chunk=64)
    yield "mag channel K+V", P.Policy(TP(0.5, P.PER_CHANNEL), TP(0.7, P.PER_CHANNEL), chunk=64)
    yield "oa token K, oa channel V", P.Policy(TP(0.7, P.PER_TOKEN, P.OUTPUT_AWARE),
                                               TP(0.5, P.PER_CHANNEL, P.OUTPUT_AWARE), chunk=64)
    yield "oa channel K only", P.Policy(TP(0.7, P.PER_CHANNEL, P.OUTPUT_AWARE), chunk=64)


def test_replay_matches_sim():
    rng = np.random.default_rng(4)
    L_, T, Hq, Hkv, D = 2, 150, 4, 2, 16
    q = rng.standard_normal((L_, T, Hq, D)).astype(np.float32)
    k = rng.standard_normal((L_, T, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((L_, T, Hkv, D)).astype(np.float32)
    start = 40
    sample = list(range(start, T, 7))
    for name, pol in _policies():
        for u_mode in ("window", "cumulative"):
            sim = P.SessionSim(L_, Hkv, Hq, D, pol, u_mode=u_mode)
            for l in range(L_):
                sim.append(l, k[l, :start], v[l, :start])
            sim.flush()
            outs = {}
            for t in range(start, T):
                o = np.stack([sim.decode(l, q[l, t], k[l, t], v[l, t])[0] for l in range(L_)])
                sim.flush()
                if t in sample:
                    outs[t] = o
            rep = P.replay_decode(q, k, v, pol, sample, start=start, u_mode=u_mode)
            err = max(float(np.abs(outs[t] - rep[t]).max()) for t in sample)
            check("replay_decode == SessionSim (%s, u=%s)" % (name, u_mode), err < 1e-5,
                  "max |diff| %.2e; achieved sparsity K/V %.3f/%.3f" % (
                      (err,) + sim.achieved_sparsity()))


def test_schedule():
    TP = P.TensorPolicy
    rng = np.random.default_rng(5)
    pol = P.Policy(TP(0.5, P.PER_CHANNEL), TP(0.5), window=32, chunk=64, group=32)
    sim = P.SessionSim(1, 2, 4, 8, pol, eager=True)
    sim.append(0, rng.standard_normal((95, 2, 8)), rng.standard_normal((95, 2, 8)))
    a = sim.compressed_tokens(0)  # 95 < 32 + 64: nothing yet
    sim.append(0, rng.standard_normal((1, 2, 8)), rng.standard_normal((1, 2, 8)))
    b = sim.compressed_tokens(0)  # 96 = W + C: oldest 64 compressed
    sim.append(0, rng.standard_normal((40, 2, 8)), rng.standard_normal((40, 2, 8)))
    c = sim.compressed_tokens(0)  # 136: tail 72 < 96
    sim.flush()
    d = sim.compressed_tokens(0)  # floor_32(136 - 32) = 96
    check("schedule: background at W+C, flush whole groups", (a, b, c, d) == (0, 64, 64, 96),
          str((a, b, c, d)))
    # magnitude: kept set independent of the schedule
    x = rng.standard_normal((200, 2, 8)).astype(np.float32)
    s1 = P.SessionSim(1, 2, 4, 8, pol, eager=True)
    s2 = P.SessionSim(1, 2, 4, 8, pol, eager=False)
    for t in range(0, 200, 13):
        s1.append(0, x[t:t + 13], x[t:t + 13])
    s2.append(0, x, x)
    s1.flush()
    s2.flush()
    check("magnitude kept set independent of schedule",
          np.array_equal(s1.read_kv(0)[0], s2.read_kv(0)[0]) and s1.ncomp == s2.ncomp == [160])


def main():
    test_keep_count()
    test_ties_and_counts()
    test_pack()
    test_scores()
    test_replay_matches_sim()
    test_schedule()
    ok = sum(RESULTS)
    bad = len(RESULTS) - ok
    print("%d passed, %d failed" % (ok, bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
