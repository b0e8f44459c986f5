#!/usr/bin/python3
"""End-to-end test: a Python grpcio client written only from kv_cache.proto.

Usage: /usr/bin/python3 python_client_test.py SERVER_BIN PROTO_DIR

Creates sessions, uploads K/V, runs decode steps (unary, batched, bidi stream) and compares the
outputs with a float64 numpy reference of softmax(q.K^T / sqrt(D)).V computed here, from the
K/V values as the server stores them (rounded to the session dtype first).

Tolerances (all outputs are compared after the server's float32 computation):
- The reference is evaluated on exactly the values the server holds: K, V are rounded to the
  storage dtype in numpy, and q is rounded to the storage dtype too before sending (so the
  result does not depend on whether the server converts q to the storage dtype or to float32;
  in float32 sessions q is sent unrounded). What remains is float32 arithmetic on the server.
- Logits: a D-term float32 dot product has error <= D * u * sum|q_i k_i| (u = 2^-24 ~ 6e-8);
  with N(0,1) data and D <= 128, sum|q_i k_i| * scale <= ~8, so <= ~6e-5 worst case, ~1e-6
  typical (errors add like a random walk). A logit error e changes every softmax weight by a
  relative e, and the weighted sum of T values adds <= T * u relative (257 * 6e-8 = 1.5e-5).
  So |out - ref| <= ~1e-4 * max|V| is a bound with margin on the worst case; any systematic
  bug (wrong head mapping, wrong scale, dropped token, float16 intermediate with 2^-11
  relative error) is >= ~5e-4 * max|V| and is caught.
- Large logits (q scaled x30, logits up to ~+-200: exp() overflows in float32 without
  max-subtraction): the logit error grows with |logit|, so 2e-3 * max|V| there.
- LSE: error <= max logit error + log(1 + T*u) ~ 1e-4 absolute for |logits| <= ~10.
- out_dtype FLOAT16 / BFLOAT16: the float32 result is rounded once more, adding half an ulp,
  <= 2^-11 (fp16) / 2^-8 (bf16) of |out| (plus 2^-24 absolute for fp16 subnormals).
"""

import os
import queue
import sys
import threading
import time
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import server_fixture as fx  # noqa: E402
from server_fixture import DT  # noqa: E402

SERVER_BIN = None
PROTO_DIR = None
SERVER = None
pb2 = None
grpc = None

OUT_ATOL_REL = 1e-4      # of max|V|, float32 output (see module docstring)
BIG_LOGIT_ATOL_REL = 2e-3
LSE_ATOL = 1e-4

_ids = [0]


def new_id(prefix):
    _ids[0] += 1
    return "%s-%d" % (prefix, _ids[0])


def setUpModule():
    global SERVER, pb2, grpc
    import grpc as _grpc
    grpc = _grpc
    pb2, _ = fx.load_stubs(PROTO_DIR)
    SERVER = fx.ServerProcess(SERVER_BIN, PROTO_DIR).start()


def tearDownModule():
    if SERVER is not None:
        alive = SERVER.alive()
        rc = SERVER.stop()
        print("server exit code after SIGTERM: %s" % rc)
        log = SERVER.log_tail()
        SERVER.cleanup()
        if not alive:
            raise AssertionError("server died during the tests; log:\n" + log)
        if rc != 0:
            raise AssertionError("server exited with %s after SIGTERM (expected a clean 0); "
                                 "log:\n%s" % (rc, log))


class Cache:
    """Client-side mirror of a session's cache as the server should store it (float64)."""

    def __init__(self, layers, kv_heads, q_heads, head_dim, dtype):
        self.layers, self.kv, self.hq, self.d, self.dtype = layers, kv_heads, q_heads, head_dim, dtype
        self.k = [np.zeros((0, kv_heads, head_dim)) for _ in range(layers)]
        self.v = [np.zeros((0, kv_heads, head_dim)) for _ in range(layers)]

    def add(self, layer, k, v):
        self.k[layer] = np.concatenate([self.k[layer], fx.round_to(k, self.dtype)], axis=0)
        self.v[layer] = np.concatenate([self.v[layer], fx.round_to(v, self.dtype)], axis=0)

    def tokens(self):
        return [int(x.shape[0]) for x in self.k]


class E2EBase(unittest.TestCase):
    maxDiff = 4000

    @property
    def stub(self):
        return SERVER.stub

    def create(self, layers, kv_heads, q_heads, head_dim, dtype=DT.FLOAT16, sid=None,
               tenant="", labels=None, send_dtype=True):
        sid = sid or new_id("s")
        layout = pb2.Layout(num_layers=layers, num_kv_heads=kv_heads, num_q_heads=q_heads,
                            head_dim=head_dim, dtype=dtype if send_dtype else 0)
        req = pb2.CreateSessionRequest(session_id=sid, tenant=tenant, layout=layout)
        if labels:
            for k, v in labels.items():
                req.labels[k] = v
        s = self.stub.CreateSession(req, timeout=30)
        self.assertEqual(s.id, sid)
        return sid, Cache(layers, kv_heads, q_heads, head_dim, dtype)

    def append(self, sid, cache, per_layer, in_dtype=DT.FLOAT32, split=None):
        """per_layer: {layer: (k [T,Hkv,D], v [T,Hkv,D]) float32}. One message per layer, or
        `split` tokens per message."""
        reqs = []
        for layer in sorted(per_layer):
            k, v = per_layer[layer]
            t = k.shape[0]
            step = split or t
            for b in range(0, t, step):
                kk = k[b:b + step][None]
                vv = v[b:b + step][None]
                reqs.append(pb2.AppendKVRequest(session_id=sid, layer_begin=layer,
                                                k=fx.make_tensor(pb2, kk, in_dtype),
                                                v=fx.make_tensor(pb2, vv, in_dtype)))
        resp = self.stub.AppendKV(iter(reqs), timeout=60)
        # The server stores what it got converted to its dtype; mirror it.
        for layer in sorted(per_layer):
            k, v = per_layer[layer]
            cache.add(layer, fx.round_to(k, in_dtype), fx.round_to(v, in_dtype))
        self.assertEqual(resp.messages, len(reqs))
        self.assertEqual(resp.tokens_appended, sum(kv[0].shape[0] for kv in per_layer.values()))
        self.assertEqual(list(resp.tokens_per_layer), cache.tokens())
        return resp

    def item(self, sid, layer, q, q_dtype=DT.FLOAT32, new_k=None, new_v=None, want_lse=False,
             scale=0.0):
        it = pb2.DecodeItem(session_id=sid, layer=layer, q=fx.make_tensor(pb2, q, q_dtype),
                            want_lse=want_lse, scale=scale)
        if new_k is not None:
            it.new_k.CopyFrom(fx.make_tensor(pb2, new_k, DT.FLOAT32))
            it.new_v.CopyFrom(fx.make_tensor(pb2, new_v, DT.FLOAT32))
        return it

    def check_out(self, res, cache, layer, q, out_dtype=DT.FLOAT32, lse=False, scale=None,
                  atol_rel=OUT_ATOL_REL, what=""):
        ref, ref_lse = fx.reference_attention(q, cache.k[layer], cache.v[layer], scale)
        self.assertEqual(res.out.dtype, out_dtype if out_dtype else DT.FLOAT32, what)
        self.assertEqual(list(res.out.shape), [cache.hq, cache.d], what)
        got = fx.decode_tensor(res.out)
        vmax = float(np.abs(cache.v[layer]).max()) or 1.0
        tol = atol_rel * vmax
        if out_dtype == DT.FLOAT16:
            tol = tol + 2.0 ** -11 * np.abs(ref) + 2.0 ** -24
        elif out_dtype == DT.BFLOAT16:
            tol = tol + 2.0 ** -8 * np.abs(ref)
        err = np.abs(got - ref)
        bad = err > tol
        if bad.any():
            i = np.unravel_index(np.argmax(err - tol), err.shape)
            self.fail("%s: %d of %d outputs off; worst at %s: got %r, ref %r (tol %r, "
                      "max|V| %r, tokens %d)" % (what, int(bad.sum()), err.size, i, got[i], ref[i],
                                                  tol if np.isscalar(tol) else tol[i], vmax,
                                                  cache.k[layer].shape[0]))
        self.assertEqual(res.tokens_attended, cache.k[layer].shape[0], what)
        if lse:
            self.assertEqual(res.lse.dtype, DT.FLOAT32, what)
            self.assertEqual(list(res.lse.shape), [cache.hq], what)
            got_lse = fx.decode_tensor(res.lse)
            np.testing.assert_allclose(got_lse, ref_lse, rtol=1e-6, atol=LSE_ATOL,
                                       err_msg=what + " lse")
        return got


def rand_kv(rng, t, kv, d):
    return (rng.standard_normal((t, kv, d)).astype(np.float32),
            rng.standard_normal((t, kv, d)).astype(np.float32))


class NumericsTest(E2EBase):
    LENGTHS = [1, 3, 81, 257]

    def _numerics(self, dtype, head_dim, q_heads=8, kv_heads=2, lengths=None, seed=0):
        lengths = lengths or self.LENGTHS
        rng = np.random.default_rng(seed)
        layers = len(lengths)
        sid, cache = self.create(layers, kv_heads, q_heads, head_dim, dtype)
        data = {l: rand_kv(rng, t, kv_heads, head_dim) for l, t in enumerate(lengths)}
        # the longest layer is uploaded in pieces of 100 tokens to test ordered appends
        self.append(sid, cache, data, split=100)
        name = "%s D=%d q=%d kv=%d" % (fx.DTYPE_NAME[dtype], head_dim, q_heads, kv_heads)
        for layer in range(layers):
            # q rounded to the storage dtype (see module docstring), sent as float32
            q = fx.round_to(rng.standard_normal((q_heads, head_dim)), dtype)
            r = self.stub.Decode(pb2.DecodeRequest(items=[self.item(sid, layer, q, want_lse=True)],
                                                   request_id=7 + layer), timeout=30)
            self.assertEqual(r.request_id, 7 + layer)
            self.assertEqual(len(r.results), 1)
            self.check_out(r.results[0], cache, layer, q, lse=True,
                           what="%s layer %d plain" % (name, layer))
            # decode with a new token appended first
            nk, nv = rand_kv(rng, 1, kv_heads, head_dim)
            nk, nv = nk[0], nv[0]
            r = self.stub.Decode(pb2.DecodeRequest(
                items=[self.item(sid, layer, q, new_k=nk, new_v=nv, want_lse=True)]), timeout=30)
            cache.add(layer, nk[None], nv[None])
            self.check_out(r.results[0], cache, layer, q, lse=True,
                           what="%s layer %d with new_k/new_v" % (name, layer))
            # and again without new token: the appended one must still be there
            q2 = fx.round_to(rng.standard_normal((q_heads, head_dim)), dtype)
            r = self.stub.Decode(pb2.DecodeRequest(items=[self.item(sid, layer, q2)]), timeout=30)
            self.check_out(r.results[0], cache, layer, q2, what="%s layer %d after" % (name, layer))
            self.assertEqual(len(r.results[0].lse.data), 0, "lse returned without want_lse")
        s = self.stub.GetSession(pb2.GetSessionRequest(session_id=sid), timeout=10)
        self.assertEqual(list(s.stats.tokens_per_layer), cache.tokens())
        self.assertEqual(s.stats.tokens_total, sum(cache.tokens()))
        self.assertEqual(s.stats.decode_steps, 3 * layers)
        return sid, cache

    def test_fp16_d64(self):
        self._numerics(DT.FLOAT16, 64, seed=1)

    def test_fp16_d128(self):
        self._numerics(DT.FLOAT16, 128, seed=2)

    def test_fp32_d64(self):
        self._numerics(DT.FLOAT32, 64, seed=3)

    def test_fp32_d128(self):
        self._numerics(DT.FLOAT32, 128, seed=4)

    def test_bf16_d64(self):
        self._numerics(DT.BFLOAT16, 64, seed=5)

    def test_bf16_d128(self):
        self._numerics(DT.BFLOAT16, 128, seed=6)

    def test_mha_odd_head_dim(self):
        # q_heads == kv_heads, head_dim not a multiple of 8 or 16 (SIMD tails)
        self._numerics(DT.FLOAT16, 80, q_heads=4, kv_heads=4, lengths=[5, 33], seed=7)

    def test_mqa(self):
        # one KV head shared by 6 query heads
        self._numerics(DT.FLOAT32, 96, q_heads=6, kv_heads=1, lengths=[2, 70], seed=8)

    def test_head_dim_bounds(self):
        self._numerics(DT.FLOAT16, 1, q_heads=2, kv_heads=1, lengths=[4], seed=9)
        self._numerics(DT.FLOAT16, 512, q_heads=2, kv_heads=1, lengths=[40], seed=10)

    def test_unspecified_layout_dtype_is_float16(self):
        rng = np.random.default_rng(11)
        sid, cache = self.create(1, 2, 4, 64, DT.FLOAT16, send_dtype=False)
        s = self.stub.GetSession(pb2.GetSessionRequest(session_id=sid), timeout=10)
        self.assertIn(s.layout.dtype, (DT.FLOAT16,),
                      "layout dtype unspecified should be stored as FLOAT16")
        self.append(sid, cache, {0: rand_kv(rng, 20, 2, 64)})
        rk = self.read_all(sid)[0][0]
        self.assertEqual(rk.dtype, DT.FLOAT16)

    def test_large_logits_stable_softmax(self):
        # logits up to ~+-200: exp overflows float32 unless the max is subtracted
        rng = np.random.default_rng(12)
        sid, cache = self.create(1, 2, 8, 64, DT.FLOAT32)
        self.append(sid, cache, {0: rand_kv(rng, 130, 2, 64)})
        q = (30.0 * rng.standard_normal((8, 64))).astype(np.float32)
        r = self.stub.Decode(pb2.DecodeRequest(items=[self.item(sid, 0, q, want_lse=True)]),
                             timeout=30)
        got = self.check_out(r.results[0], cache, 0, q, atol_rel=BIG_LOGIT_ATOL_REL,
                             what="large logits")
        self.assertTrue(np.isfinite(got).all())
        ref_out, ref_lse = fx.reference_attention(q, cache.k[0], cache.v[0])
        # lse ~ 100s here: relative error of float32 logits
        np.testing.assert_allclose(fx.decode_tensor(r.results[0].lse), ref_lse, rtol=2e-5,
                                   atol=1e-3)

    def test_unrounded_q_fp32_session_and_scale(self):
        rng = np.random.default_rng(13)
        sid, cache = self.create(2, 2, 8, 64, DT.FLOAT32)
        self.append(sid, cache, {0: rand_kv(rng, 50, 2, 64), 1: rand_kv(rng, 9, 2, 64)})
        q = rng.standard_normal((8, 64)).astype(np.float32)
        for scale in (0.0, 0.5, 0.01):
            r = self.stub.Decode(pb2.DecodeRequest(
                items=[self.item(sid, 1, q, want_lse=True, scale=scale)]), timeout=30)
            self.check_out(r.results[0], cache, 1, q, lse=True, scale=scale or None,
                           what="scale=%g" % scale)

    def test_input_dtypes_converted(self):
        # K/V uploaded as bfloat16 into a float16 session, float16 into a bfloat16 session,
        # float16 into a float32 session; q sent as float16 / bfloat16 bytes.
        rng = np.random.default_rng(14)
        for store, send in ((DT.FLOAT16, DT.BFLOAT16), (DT.BFLOAT16, DT.FLOAT16),
                            (DT.FLOAT32, DT.FLOAT16)):
            sid, cache = self.create(1, 2, 4, 64, store)
            self.append(sid, cache, {0: rand_kv(rng, 37, 2, 64)}, in_dtype=send)
            q = fx.round_to(fx.round_to(rng.standard_normal((4, 64)), send), store)
            r = self.stub.Decode(pb2.DecodeRequest(
                items=[self.item(sid, 0, q, q_dtype=send, want_lse=True)]), timeout=30)
            self.check_out(r.results[0], cache, 0, q, lse=True,
                           what="store %s, sent %s" % (fx.DTYPE_NAME[store], fx.DTYPE_NAME[send]))
            k, v = self.read_all(sid)[0]
            np.testing.assert_array_equal(fx.decode_tensor(k), cache.k[0])
            np.testing.assert_array_equal(fx.decode_tensor(v), cache.v[0])

    def test_out_dtypes(self):
        rng = np.random.default_rng(15)
        for store in (DT.FLOAT16, DT.BFLOAT16, DT.FLOAT32):
            sid, cache = self.create(1, 2, 8, 128, store)
            self.append(sid, cache, {0: rand_kv(rng, 81, 2, 128)})
            q = fx.round_to(rng.standard_normal((8, 128)), store)
            for out_dtype in (DT.UNSPECIFIED, DT.FLOAT32, DT.FLOAT16, DT.BFLOAT16):
                r = self.stub.Decode(pb2.DecodeRequest(items=[self.item(sid, 0, q, want_lse=True)],
                                                       out_dtype=out_dtype), timeout=30)
                self.check_out(r.results[0], cache, 0, q, out_dtype=out_dtype, lse=True,
                               what="store %s out %s" % (fx.DTYPE_NAME[store],
                                                         fx.DTYPE_NAME.get(out_dtype, "default")))
                expect_bytes = 8 * 128 * (4 if out_dtype in (DT.UNSPECIFIED, DT.FLOAT32) else 2)
                self.assertEqual(len(r.results[0].out.data), expect_bytes)

    def test_batched_decode_two_sessions(self):
        rng = np.random.default_rng(16)
        sa, ca = self.create(2, 2, 8, 64, DT.FLOAT16)
        sb, cb = self.create(3, 1, 4, 128, DT.BFLOAT16)
        self.append(sa, ca, {0: rand_kv(rng, 40, 2, 64), 1: rand_kv(rng, 81, 2, 64)})
        self.append(sb, cb, {1: rand_kv(rng, 257, 1, 128)})
        qa = fx.round_to(rng.standard_normal((8, 64)), DT.FLOAT16)
        qb = fx.round_to(rng.standard_normal((4, 128)), DT.BFLOAT16)
        nk, nv = rand_kv(rng, 1, 1, 128)
        req = pb2.DecodeRequest(items=[
            self.item(sa, 1, qa, want_lse=True),
            self.item(sb, 1, qb, new_k=nk[0], new_v=nv[0], want_lse=True)], request_id=42)
        r = self.stub.Decode(req, timeout=30)
        self.assertEqual(r.request_id, 42)
        self.assertEqual(len(r.results), 2)
        cb.add(1, nk, nv)
        self.check_out(r.results[0], ca, 1, qa, lse=True, what="batch item 0")
        self.check_out(r.results[1], cb, 1, qb, lse=True, what="batch item 1")
        s = self.stub.GetSession(pb2.GetSessionRequest(session_id=sb), timeout=10)
        self.assertEqual(list(s.stats.tokens_per_layer), [0, 258, 0])

    def _stream(self, reqs):
        return list(self.stub.DecodeStream(iter(reqs), timeout=60))

    def test_decode_stream(self):
        rng = np.random.default_rng(17)
        sid, cache = self.create(2, 2, 8, 64, DT.FLOAT16)
        self.append(sid, cache, {0: rand_kv(rng, 10, 2, 64), 1: rand_kv(rng, 3, 2, 64)})
        reqs, expect = [], []
        for i in range(6):
            layer = i % 2
            q = fx.round_to(rng.standard_normal((8, 64)), DT.FLOAT16)
            nk, nv = rand_kv(rng, 1, 2, 64)
            reqs.append(pb2.DecodeRequest(
                items=[self.item(sid, layer, q, new_k=nk[0], new_v=nv[0], want_lse=True)],
                request_id=100 + i))
            expect.append((layer, q, nk, nv))
        resps = self._stream(reqs)
        self.assertEqual(len(resps), len(reqs))
        for i, (resp, (layer, q, nk, nv)) in enumerate(zip(resps, expect)):
            self.assertEqual(resp.request_id, 100 + i)
            self.assertEqual(resp.error_code, 0, resp.error_message)
            cache.add(layer, nk, nv)
            self.check_out(resp.results[0], cache, layer, q, lse=True, what="stream msg %d" % i)
        s = self.stub.GetSession(pb2.GetSessionRequest(session_id=sid), timeout=10)
        self.assertEqual(list(s.stats.tokens_per_layer), [13, 6])

    def test_decode_stream_ping_pong(self):
        # The client waits for each response before sending the next request: the server
        # must answer without waiting for the client to half-close the stream.
        rng = np.random.default_rng(18)
        sid, cache = self.create(1, 2, 8, 128, DT.BFLOAT16)
        self.append(sid, cache, {0: rand_kv(rng, 30, 2, 128)})
        qq = queue.Queue()

        def gen():
            while True:
                m = qq.get()
                if m is None:
                    return
                yield m

        call = self.stub.DecodeStream(gen(), timeout=60)
        try:
            for i in range(5):
                q = fx.round_to(rng.standard_normal((8, 128)), DT.BFLOAT16)
                nk, nv = rand_kv(rng, 1, 2, 128)
                qq.put(pb2.DecodeRequest(items=[self.item(sid, 0, q, new_k=nk[0], new_v=nv[0])],
                                         request_id=i + 1))
                resp = next(call)
                self.assertEqual(resp.request_id, i + 1)
                self.assertEqual(resp.error_code, 0, resp.error_message)
                cache.add(0, nk, nv)
                self.check_out(resp.results[0], cache, 0, q, what="ping-pong %d" % i)
        finally:
            qq.put(None)
        self.assertEqual(list(call), [])

    def test_decode_stream_bad_request_continues(self):
        rng = np.random.default_rng(19)
        sid, cache = self.create(1, 2, 4, 64, DT.FLOAT16)
        self.append(sid, cache, {0: rand_kv(rng, 12, 2, 64)})
        q = fx.round_to(rng.standard_normal((4, 64)), DT.FLOAT16)
        bad_shape = fx.make_tensor(pb2, np.zeros((4, 63), np.float32))
        reqs = [
            pb2.DecodeRequest(items=[self.item(sid, 0, q)], request_id=1),
            pb2.DecodeRequest(items=[self.item("no-such-session-xyz", 0, q)], request_id=2),
            pb2.DecodeRequest(items=[pb2.DecodeItem(session_id=sid, layer=0, q=bad_shape)],
                              request_id=3),
            pb2.DecodeRequest(items=[self.item(sid, 5, q)], request_id=4),
            pb2.DecodeRequest(items=[self.item(sid, 0, q, want_lse=True)], request_id=5),
            # validated whole: the good item's new token must not be appended
            pb2.DecodeRequest(items=[self.item(sid, 0, q, new_k=np.ones((2, 64), np.float32),
                                               new_v=np.ones((2, 64), np.float32)),
                                     self.item(sid, 1, q)], request_id=6),
        ]
        resps = self._stream(reqs)
        self.assertEqual([r.request_id for r in resps], [1, 2, 3, 4, 5, 6])
        self.assertEqual([r.error_code for r in resps],
                         [0, grpc.StatusCode.NOT_FOUND.value[0],
                          grpc.StatusCode.INVALID_ARGUMENT.value[0],
                          grpc.StatusCode.INVALID_ARGUMENT.value[0], 0,
                          grpc.StatusCode.INVALID_ARGUMENT.value[0]],
                         [r.error_message for r in resps])
        self.assertIn("no-such-session-xyz", resps[1].error_message)
        self.assertIn("shape", resps[2].error_message.lower())
        self.assertIn("layer", resps[3].error_message.lower())
        for i in (1, 2, 3):
            self.assertEqual(len(resps[i].results), 0)
        self.check_out(resps[0].results[0], cache, 0, q, what="stream before errors")
        self.check_out(resps[4].results[0], cache, 0, q, lse=True, what="stream after errors")
        s = self.stub.GetSession(pb2.GetSessionRequest(session_id=sid), timeout=10)
        self.assertEqual(list(s.stats.tokens_per_layer), [12],
                         "a rejected stream request appended its good item's token")

    def test_long_context_chunk_boundaries(self):
        # 1100 tokens crosses the default chunk size (256) and dense window (32) several
        # times; with sparsity 0 the cache stays exact whatever the server does with chunks.
        rng = np.random.default_rng(24)
        sid, cache = self.create(1, 2, 8, 128, DT.FLOAT16)
        self.append(sid, cache, {0: rand_kv(rng, 1100, 2, 128)}, split=300)
        for i in range(3):
            q = fx.round_to(rng.standard_normal((8, 128)), DT.FLOAT16)
            nk, nv = rand_kv(rng, 1, 2, 128)
            r = self.stub.Decode(pb2.DecodeRequest(
                items=[self.item(sid, 0, q, new_k=nk[0], new_v=nv[0], want_lse=True)]), timeout=30)
            cache.add(0, nk, nv)
            self.check_out(r.results[0], cache, 0, q, lse=True, what="long context step %d" % i)
        k, v = self.read_all(sid)[0]
        np.testing.assert_array_equal(fx.decode_tensor(k), cache.k[0])
        np.testing.assert_array_equal(fx.decode_tensor(v), cache.v[0])

    def test_concurrent_clients(self):
        # Several client threads decode their own sessions at once (with new tokens), while
        # another thread sends bad requests; every result must match its reference.
        n_threads, steps = 4, 15
        sessions = []
        for i in range(n_threads):
            rng = np.random.default_rng(100 + i)
            dtype = (DT.FLOAT16, DT.BFLOAT16, DT.FLOAT32, DT.FLOAT16)[i]
            sid, cache = self.create(2, 2, 8, 64, dtype)
            self.append(sid, cache, {0: rand_kv(rng, 50 + 10 * i, 2, 64),
                                     1: rand_kv(rng, 7, 2, 64)})
            sessions.append((sid, cache, dtype, rng))
        errors = []
        results = {}

        def worker(idx):
            sid, cache, dtype, rng = sessions[idx]
            out = []
            try:
                for step in range(steps):
                    layer = step % 2
                    q = fx.round_to(rng.standard_normal((8, 64)), dtype)
                    nk, nv = rand_kv(rng, 1, 2, 64)
                    r = self.stub.Decode(pb2.DecodeRequest(
                        items=[self.item(sid, layer, q, new_k=nk[0], new_v=nv[0])]), timeout=60)
                    out.append((layer, q, nk, nv, r.results[0]))
            except Exception as e:  # noqa: BLE001 (reported below)
                errors.append("thread %d: %r" % (idx, e))
            results[idx] = out

        def spoiler():
            bad = pb2.DecodeRequest(items=[pb2.DecodeItem(
                session_id=sessions[0][0], layer=0, q=fx.make_tensor(pb2, np.ones((8, 3))))])
            for _ in range(30):
                try:
                    self.stub.Decode(bad, timeout=60)
                    errors.append("spoiler request succeeded")
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                        errors.append("spoiler got %s" % e.code())

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
        threads.append(threading.Thread(target=spoiler))
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        self.assertEqual(errors, [])
        for idx, (sid, cache, dtype, _) in enumerate(sessions):
            self.assertEqual(len(results[idx]), steps)
            for step, (layer, q, nk, nv, res) in enumerate(results[idx]):
                cache.add(layer, nk, nv)
                self.check_out(res, cache, layer, q, what="thread %d step %d" % (idx, step))
            s = self.stub.GetSession(pb2.GetSessionRequest(session_id=sid), timeout=10)
            self.assertEqual(list(s.stats.tokens_per_layer), cache.tokens())

    # -- ReadKV --------------------------------------------------------------------------
    def read_all(self, sid, **kw):
        """Returns {layer: (k Tensor-like, v Tensor-like)} merged over messages."""
        msgs = list(self.stub.ReadKV(pb2.ReadKVRequest(session_id=sid, **kw), timeout=60))
        by_layer = {}
        for m in msgs:
            by_layer.setdefault(m.layer, []).append(m)
        out = {}
        for layer, ms in by_layer.items():
            ms.sort(key=lambda m: m.token_begin)
            k = pb2.Tensor(dtype=ms[0].k.dtype)
            v = pb2.Tensor(dtype=ms[0].v.dtype)
            rows = 0
            pos = ms[0].token_begin
            for m in ms:
                self.assertEqual(m.token_begin, pos, "ReadKV pieces of layer %d not contiguous"
                                 % layer)
                self.assertEqual(m.k.dtype, k.dtype)
                self.assertEqual(list(m.k.shape), list(m.v.shape))
                self.assertEqual(len(m.k.shape), 3, "ReadKV k shape %s" % list(m.k.shape))
                rows += m.k.shape[0]
                pos += m.k.shape[0]
                k.data += m.k.data
                v.data += m.v.data
            tail = list(ms[0].k.shape[1:])
            k.shape.extend([rows] + tail)
            v.shape.extend([rows] + tail)
            out[layer] = (k, v)
        return out

    def test_readkv_roundtrip(self):
        rng = np.random.default_rng(20)
        for dtype in (DT.FLOAT16, DT.FLOAT32, DT.BFLOAT16):
            sid, cache = self.create(3, 2, 8, 64, dtype)
            self.append(sid, cache, {0: rand_kv(rng, 81, 2, 64), 2: rand_kv(rng, 257, 2, 64)})
            got = self.read_all(sid)
            for layer in (0, 2):
                k, v = got[layer]
                self.assertEqual(k.dtype, dtype)
                self.assertEqual(list(k.shape), [cache.tokens()[layer], 2, 64])
                self.assertEqual(len(k.data), cache.tokens()[layer] * 2 * 64 * fx.DTYPE_SIZE[dtype])
                np.testing.assert_array_equal(fx.decode_tensor(k), cache.k[layer])
                np.testing.assert_array_equal(fx.decode_tensor(v), cache.v[layer])
            # the empty layer 1 reads back as nothing or as zero rows
            if 1 in got:
                self.assertEqual(got[1][0].shape[0], 0)
            # a window: layers [2, 3), tokens [100, 150)
            w = self.read_all(sid, layer_begin=2, layer_count=1, token_begin=100, token_count=50)
            self.assertEqual(sorted(w), [2])
            np.testing.assert_array_equal(fx.decode_tensor(w[2][0]), cache.k[2][100:150])
            np.testing.assert_array_equal(fx.decode_tensor(w[2][1]), cache.v[2][100:150])

    def test_multi_layer_append_message(self):
        # one message covering layers [1, 3) with k shape [2, T, kv, D]
        rng = np.random.default_rng(21)
        sid, cache = self.create(4, 2, 4, 32, DT.FLOAT16)
        k = rng.standard_normal((2, 17, 2, 32)).astype(np.float32)
        v = rng.standard_normal((2, 17, 2, 32)).astype(np.float32)
        resp = self.stub.AppendKV(iter([pb2.AppendKVRequest(
            session_id=sid, layer_begin=1, k=fx.make_tensor(pb2, k), v=fx.make_tensor(pb2, v))]),
            timeout=30)
        self.assertEqual(resp.tokens_appended, 34)
        self.assertEqual(list(resp.tokens_per_layer), [0, 17, 17, 0])
        cache.add(1, k[0], v[0])
        cache.add(2, k[1], v[1])
        for layer in (1, 2):
            q = fx.round_to(rng.standard_normal((4, 32)), DT.FLOAT16)
            r = self.stub.Decode(pb2.DecodeRequest(items=[self.item(sid, layer, q)]), timeout=30)
            self.check_out(r.results[0], cache, layer, q, what="multi-layer msg layer %d" % layer)

    # -- session management --------------------------------------------------------------
    def test_get_session_stats(self):
        rng = np.random.default_rng(22)
        for dtype in (DT.FLOAT16, DT.FLOAT32):
            sid, cache = self.create(3, 2, 8, 64, dtype, tenant="stats-t", labels={"a": "b"})
            s0 = self.stub.GetSession(pb2.GetSessionRequest(session_id=sid), timeout=10)
            self.assertEqual(s0.tenant, "stats-t")
            self.assertEqual(dict(s0.labels), {"a": "b"})
            self.assertEqual(s0.layout.num_layers, 3)
            self.assertEqual(s0.layout.num_kv_heads, 2)
            self.assertEqual(s0.layout.num_q_heads, 8)
            self.assertEqual(s0.layout.head_dim, 64)
            self.assertEqual(s0.layout.dtype, dtype)
            self.assertEqual(list(s0.stats.tokens_per_layer), [0, 0, 0])
            self.assertEqual(s0.stats.bytes_dense, 0)
            self.assertGreater(s0.create_time_unix_ms, 1_600_000_000_000)
            self.append(sid, cache, {0: rand_kv(rng, 81, 2, 64), 1: rand_kv(rng, 3, 2, 64)})
            s = self.stub.GetSession(pb2.GetSessionRequest(session_id=sid), timeout=10)
            self.assertEqual(list(s.stats.tokens_per_layer), [81, 3, 0])
            self.assertEqual(s.stats.tokens_total, 84)
            # sparsity 0 keeps the cache dense (proto): K + V payload in the storage dtype
            dense = 84 * 2 * 64 * 2 * fx.DTYPE_SIZE[dtype]
            self.assertEqual(s.stats.bytes_dense_equivalent, dense)
            self.assertEqual(s.stats.bytes_dense, dense)
            self.assertEqual(s.stats.bytes_compressed, 0)
            self.assertGreaterEqual(s.last_access_time_unix_ms, s0.create_time_unix_ms)

    def test_server_generated_id(self):
        s = self.stub.CreateSession(pb2.CreateSessionRequest(
            layout=pb2.Layout(num_layers=1, num_kv_heads=1, num_q_heads=1, head_dim=8)),
            timeout=10)
        self.assertTrue(s.id)
        self.assertEqual(s.tenant, "default")
        g = self.stub.GetSession(pb2.GetSessionRequest(session_id=s.id), timeout=10)
        self.assertEqual(g.id, s.id)

    def test_list_sessions_paging_and_tenant(self):
        ids_a = sorted("list-a-%d" % i for i in range(5))
        ids_b = sorted("list-b-%d" % i for i in range(2))
        for sid in ids_a:
            self.create(1, 1, 1, 8, sid=sid, tenant="tenant-a")
        for sid in ids_b:
            self.create(1, 1, 1, 8, sid=sid, tenant="tenant-b")
        seen, token, pages = [], "", 0
        while True:
            r = self.stub.ListSessions(pb2.ListSessionsRequest(tenant="tenant-a", page_size=1,
                                                               page_token=token), timeout=10)
            pages += 1
            self.assertLessEqual(len(r.sessions), 1)
            for s in r.sessions:
                self.assertEqual(s.tenant, "tenant-a")
            seen += [s.id for s in r.sessions]
            token = r.next_page_token
            if not token:
                break
            self.assertLess(pages, 20, "paging does not terminate")
        self.assertEqual(seen, ids_a)
        r = self.stub.ListSessions(pb2.ListSessionsRequest(tenant="tenant-b"), timeout=10)
        self.assertEqual([s.id for s in r.sessions], ids_b)
        self.assertEqual(r.next_page_token, "")
        r = self.stub.ListSessions(pb2.ListSessionsRequest(page_size=1000), timeout=10)
        all_ids = [s.id for s in r.sessions]
        self.assertEqual(all_ids, sorted(all_ids), "ListSessions not ordered by id")
        for sid in ids_a + ids_b:
            self.assertIn(sid, all_ids)
        r = self.stub.ListSessions(pb2.ListSessionsRequest(tenant="tenant-none"), timeout=10)
        self.assertEqual(len(r.sessions), 0)

    def test_list_sessions_default_page_size(self):
        ids = sorted("many-%03d" % i for i in range(105))
        for sid in ids:
            self.create(1, 1, 1, 8, sid=sid, tenant="many")
        r = self.stub.ListSessions(pb2.ListSessionsRequest(tenant="many"), timeout=10)
        self.assertEqual([s.id for s in r.sessions], ids[:100], "page_size 0 means 100")
        self.assertTrue(r.next_page_token)
        r = self.stub.ListSessions(pb2.ListSessionsRequest(
            tenant="many", page_size=1000, page_token=r.next_page_token), timeout=10)
        self.assertEqual([s.id for s in r.sessions], ids[100:])
        self.assertEqual(r.next_page_token, "")
        for sid in ids:
            self.stub.DeleteSession(pb2.DeleteSessionRequest(session_id=sid), timeout=10)

    def test_ttl_eviction(self):
        # ttl_seconds is idle time; the server's janitor evicts expired sessions.
        rng = np.random.default_rng(25)
        sid_short, cache = self.create(1, 2, 2, 16, DT.FLOAT16)
        sid_kept, _ = self.create(1, 2, 2, 16, DT.FLOAT16)
        # recreate with TTLs (CreateSession helper has no ttl argument)
        for sid, ttl in ((sid_short, 1), (sid_kept, 2)):
            self.stub.DeleteSession(pb2.DeleteSessionRequest(session_id=sid), timeout=10)
            self.stub.CreateSession(pb2.CreateSessionRequest(
                session_id=sid, ttl_seconds=ttl, layout=pb2.Layout(
                    num_layers=1, num_kv_heads=2, num_q_heads=2, head_dim=16)), timeout=10)
        self.assertEqual(self.stub.GetSession(pb2.GetSessionRequest(session_id=sid_short),
                                              timeout=10).ttl_seconds, 1)
        self.append(sid_short, Cache(1, 2, 2, 16, DT.FLOAT16), {0: rand_kv(rng, 5, 2, 16)})
        kept_cache = Cache(1, 2, 2, 16, DT.FLOAT16)
        self.append(sid_kept, kept_cache, {0: rand_kv(rng, 3, 2, 16)})
        q = fx.round_to(rng.standard_normal((2, 16)), DT.FLOAT16)
        evicted_at = None
        t0 = time.monotonic()
        while time.monotonic() - t0 < 8:
            # keep sid_kept busy with decode steps: use resets its idle time. Every call that
            # names a session counts as use (GetSession and ReadKV too), so sid_short is
            # watched through ListSessions, which does not touch it.
            r = self.stub.Decode(pb2.DecodeRequest(items=[self.item(sid_kept, 0, q)]), timeout=10)
            self.check_out(r.results[0], kept_cache, 0, q, what="kept alive")
            if evicted_at is None:
                listed = self.stub.ListSessions(pb2.ListSessionsRequest(page_size=1000),
                                                timeout=10)
                if sid_short not in [x.id for x in listed.sessions]:
                    evicted_at = time.monotonic() - t0
            if evicted_at is not None and time.monotonic() - t0 > 4:
                break
            time.sleep(0.3 if evicted_at is None else 0.5)
        self.assertIsNotNone(evicted_at, "session with ttl_seconds=1 not evicted within 8 s")
        self.stub.GetSession(pb2.GetSessionRequest(session_id=sid_kept), timeout=10)

    def test_delete_session(self):
        rng = np.random.default_rng(23)
        sid, cache = self.create(2, 2, 4, 64, DT.FLOAT16)
        self.append(sid, cache, {0: rand_kv(rng, 10, 2, 64)})
        held = self.stub.GetSession(pb2.GetSessionRequest(session_id=sid),
                                    timeout=10).stats.bytes_accounted
        r = self.stub.DeleteSession(pb2.DeleteSessionRequest(session_id=sid), timeout=10)
        # everything the session held: the 10 tokens' payload, the rest of their 32-row dense
        # block, scoring statistics and metadata
        self.assertEqual(r.bytes_freed, held)
        self.assertGreater(r.bytes_freed, 10 * 2 * 64 * 2 * 2)
        q = np.zeros((4, 64), np.float32)
        calls = [
            lambda: self.stub.GetSession(pb2.GetSessionRequest(session_id=sid), timeout=10),
            lambda: self.stub.DeleteSession(pb2.DeleteSessionRequest(session_id=sid), timeout=10),
            lambda: self.stub.Decode(pb2.DecodeRequest(items=[self.item(sid, 0, q)]), timeout=10),
            lambda: list(self.stub.ReadKV(pb2.ReadKVRequest(session_id=sid), timeout=10)),
        ]
        for i, c in enumerate(calls):
            with self.assertRaises(grpc.RpcError, msg="call %d" % i) as cm:
                c()
            self.assertEqual(cm.exception.code(), grpc.StatusCode.NOT_FOUND, "call %d" % i)
            self.assertIn(sid, cm.exception.details(), "call %d" % i)
        # the id can be reused after deletion
        self.create(1, 1, 1, 8, sid=sid)

    def test_server_info(self):
        info = self.stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=10)
        self.assertTrue(info.version)
        self.assertEqual(info.kernel_backend, "cpu")
        self.assertTrue(info.kernel_variant)
        self.assertGreater(info.max_message_bytes, 0)
        self.assertGreater(info.sessions, 0)


if __name__ == "__main__":
    sys.exit(fx.main(sys.modules[__name__]))
