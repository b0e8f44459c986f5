#!/usr/bin/python3
"""End-to-end test: bad input gets the right gRPC status with a message naming the problem,
and the server keeps serving other sessions (their outputs unchanged, bit for bit).

Usage: /usr/bin/python3 bad_input_test.py SERVER_BIN PROTO_DIR

Two server instances: one with default flags for malformed requests, and one started with
--max_message_bytes=1048576 --host_budget_bytes=1000000 for the size and budget limits.
"""

import os
import re
import sys
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import server_fixture as fx  # noqa: E402
from server_fixture import DT  # noqa: E402

SERVER_BIN = None
PROTO_DIR = None
pb2 = None
grpc = None

MAX_MESSAGE_BYTES = 1048576
HOST_BUDGET_BYTES = 1000000

# float32 output vs float64 reference on values exact in the storage dtype: 1e-4 * max|V|
# (justified in python_client_test.py's docstring).
OUT_ATOL_REL = 1e-4


def setUpModule():
    global pb2, grpc
    import grpc as _grpc
    grpc = _grpc
    pb2, _ = fx.load_stubs(PROTO_DIR)


def t(x, dtype=DT.FLOAT32, shape=None):
    return fx.make_tensor(pb2, np.asarray(x, np.float32), dtype, shape)


def raw(dtype, shape, nbytes):
    tt = pb2.Tensor(dtype=dtype, data=b"\x00" * nbytes)
    tt.shape.extend(shape)
    return tt


class GoodSession:
    """A session with known contents whose decode output is recorded before the bad requests
    and compared after them."""

    def __init__(self, stub, sid, seed, layers=2, kv=2, hq=8, d=64, tokens=(81, 20),
                 dtype=DT.FLOAT16):
        self.stub, self.sid = stub, sid
        rng = np.random.default_rng(seed)
        stub.CreateSession(pb2.CreateSessionRequest(
            session_id=sid, layout=pb2.Layout(num_layers=layers, num_kv_heads=kv, num_q_heads=hq,
                                              head_dim=d, dtype=dtype)), timeout=10)
        self.k, self.v, reqs = [], [], []
        for layer, n in enumerate(tokens):
            if n == 0:  # an empty upload is invalid; the layer stays empty
                self.k.append(None)
                self.v.append(None)
                continue
            k = rng.standard_normal((1, n, kv, d)).astype(np.float32)
            v = rng.standard_normal((1, n, kv, d)).astype(np.float32)
            reqs.append(pb2.AppendKVRequest(session_id=sid, layer_begin=layer, k=t(k), v=t(v)))
            self.k.append(fx.round_to(k[0], dtype))
            self.v.append(fx.round_to(v[0], dtype))
        stub.AppendKV(iter(reqs), timeout=30)
        self.tokens = list(tokens)
        self.q = fx.round_to(rng.standard_normal((hq, d)), dtype)
        self.hq, self.d = hq, d
        self.before = self.decode_all()

    def decode_all(self):
        outs = []
        for layer in range(len(self.tokens)):
            if self.tokens[layer] == 0:
                continue
            r = self.stub.Decode(pb2.DecodeRequest(items=[pb2.DecodeItem(
                session_id=self.sid, layer=layer, q=t(self.q), want_lse=True)]), timeout=30)
            outs.append((r.results[0].out.data, r.results[0].lse.data))
        return outs

    def check(self, tc):
        s = self.stub.GetSession(pb2.GetSessionRequest(session_id=self.sid), timeout=10)
        tc.assertEqual(list(s.stats.tokens_per_layer), self.tokens,
                       "session %s token counts changed" % self.sid)
        after = self.decode_all()
        layers = [l for l in range(len(self.tokens)) if self.tokens[l]]
        for layer, (o0, l0), (o1, l1) in zip(layers, self.before, after):
            tc.assertEqual(o0, o1, "session %s layer %d output changed" % (self.sid, layer))
            tc.assertEqual(l0, l1, "session %s layer %d lse changed" % (self.sid, layer))
            ref, _ = fx.reference_attention(self.q, self.k[layer], self.v[layer])
            got = np.frombuffer(o1, "<f4").reshape(self.hq, self.d)
            np.testing.assert_allclose(got, ref, rtol=0,
                                       atol=OUT_ATOL_REL * np.abs(self.v[layer]).max())


class ErrorAsserts(unittest.TestCase):
    maxDiff = 4000

    def expect(self, fn, code, *patterns):
        """fn() must raise RpcError with `code`; every regex in patterns must occur
        (case-insensitive) in the status message. Returns the message."""
        try:
            fn()
        except grpc.RpcError as e:
            msg = e.details() or ""
            self.assertEqual(e.code(), code, "wrong status code (message: %r)" % msg)
            for p in patterns:
                self.assertTrue(re.search(p, msg, re.I),
                                "status message %r does not name the problem (/%s/)" % (msg, p))
            return msg
        self.fail("call succeeded; expected %s" % code)


class BadInputTest(ErrorAsserts):
    """Malformed requests against a server with default flags."""

    @classmethod
    def setUpClass(cls):
        cls.server = fx.ServerProcess(SERVER_BIN, PROTO_DIR).start()
        cls.stub = cls.server.stub
        cls.good = GoodSession(cls.stub, "good-1", seed=1)
        cls.good_bf16 = GoodSession(cls.stub, "good-2", seed=2, layers=1, kv=1, hq=4, d=128,
                                    tokens=(257,), dtype=DT.BFLOAT16)
        # the target of bad requests: 2 layers, kv 2, q 8, D 64, 10 tokens on layer 0
        cls.victim = GoodSession(cls.stub, "victim", seed=3, tokens=(10, 0))

    @classmethod
    def tearDownClass(cls):
        alive = cls.server.alive()
        cls.server.stop()
        if not alive:
            print("server died; log:\n" + cls.server.log_tail())
        cls.server.cleanup()
        assert alive, "server died during BadInputTest"

    def create(self, sid=None, layers=1, kv=2, hq=8, d=64, dtype=DT.FLOAT16, policy=None):
        req = pb2.CreateSessionRequest(session_id=sid or "", layout=pb2.Layout(
            num_layers=layers, num_kv_heads=kv, num_q_heads=hq, head_dim=d, dtype=dtype))
        if policy is not None:
            req.policy.CopyFrom(policy)
        return lambda: self.stub.CreateSession(req, timeout=10)

    def append(self, *reqs):
        return lambda: self.stub.AppendKV(iter(reqs), timeout=10)

    def decode(self, *items, out_dtype=0):
        return lambda: self.stub.Decode(pb2.DecodeRequest(items=list(items), out_dtype=out_dtype),
                                        timeout=10)

    def kv(self, shape_k, shape_v=None, sid="victim", layer=0, dtype=DT.FLOAT32):
        shape_v = shape_v or shape_k
        return pb2.AppendKVRequest(session_id=sid, layer_begin=layer,
                                   k=t(np.ones(shape_k), dtype), v=t(np.ones(shape_v), dtype))

    def q(self, shape=(8, 64), dtype=DT.FLOAT32):
        return t(np.ones(shape), dtype)

    IA = property(lambda self: grpc.StatusCode.INVALID_ARGUMENT)

    # -- CreateSession -------------------------------------------------------------------
    def test_create_heads_not_dividing(self):
        self.expect(self.create(kv=3, hq=8), self.IA, r"q_heads|kv_heads|multiple|divis")
        self.expect(self.create(kv=8, hq=4), self.IA, r"q_heads|kv_heads|multiple|divis")

    def test_create_zero_dims(self):
        self.expect(self.create(d=0), self.IA, r"head_dim")
        self.expect(self.create(d=513), self.IA, r"head_dim")
        self.expect(self.create(layers=0), self.IA, r"layers")
        self.expect(self.create(kv=0, hq=8), self.IA, r"kv_heads")
        self.expect(self.create(kv=2, hq=0), self.IA, r"q_heads")
        self.expect(lambda: self.stub.CreateSession(pb2.CreateSessionRequest(session_id="nolayout"),
                                                    timeout=10), self.IA, r"layout|layers")

    def test_create_bad_dtype(self):
        self.expect(self.create(dtype=7), self.IA, r"dtype")

    def test_create_bad_id(self):
        self.expect(self.create(sid="bad id!"), self.IA, r"\bid\b|session_id")
        self.expect(self.create(sid="x" * 129), self.IA, r"\bid\b|session_id")

    def test_create_duplicate(self):
        self.create(sid="dup-1")()
        msg = self.expect(self.create(sid="dup-1"), grpc.StatusCode.ALREADY_EXISTS, r"dup-1")
        self.assertTrue(msg)

    def test_create_bad_policy(self):
        for s in (1.0, -0.5, float("nan")):
            p = pb2.Policy(k=pb2.TensorPolicy(sparsity=s))
            self.expect(self.create(policy=p), self.IA, r"sparsity")
        p = pb2.Policy(group_tokens=48)
        self.expect(self.create(policy=p), self.IA, r"group")
        p = pb2.Policy(chunk_tokens=100)  # not a multiple of the group (32)
        self.expect(self.create(policy=p), self.IA, r"chunk")

    def test_sparsity_out_of_range(self):
        # Sparsity must be in [0, 1); the message names the field.
        for bad in (1.0, 1.5, -0.1, float("nan")):
            p = pb2.Policy(v=pb2.TensorPolicy(sparsity=bad))
            self.expect(self.create(sid="sparse-bad", policy=p), self.IA, r"policy\.v\.sparsity")
        p = pb2.Policy(k=pb2.TensorPolicy(sparsity=0.5), chunk_tokens=48)
        self.expect(self.create(sid="sparse-bad", policy=p), self.IA, r"chunk_tokens")

    # -- AppendKV ------------------------------------------------------------------------
    def test_append_wrong_shapes(self):
        self.expect(self.append(self.kv((1, 4, 3, 64))), self.IA, r"shape|kv_heads")
        self.expect(self.append(self.kv((1, 4, 2, 32))), self.IA, r"shape|head_dim")
        self.expect(self.append(self.kv((4, 2, 64))), self.IA, r"shape|rank|dim")
        self.expect(self.append(self.kv((1, 1, 4, 2, 64))), self.IA, r"shape|rank|dim")

    def test_append_k_v_mismatch(self):
        self.expect(self.append(self.kv((1, 4, 2, 64), (1, 5, 2, 64))), self.IA,
                    r"shape|same|match")

    def test_append_data_length(self):
        r = self.kv((1, 4, 2, 64))
        r.k.data = r.k.data[:-4]
        self.expect(self.append(r), self.IA, r"bytes|size|length|data")
        r = self.kv((1, 4, 2, 64))
        r.v.data = r.v.data + b"\0\0\0\0"
        self.expect(self.append(r), self.IA, r"bytes|size|length|data")
        r = self.kv((1, 4, 2, 64), dtype=DT.FLOAT16)
        r.k.dtype = DT.FLOAT32  # half the bytes float32 needs
        self.expect(self.append(r), self.IA, r"bytes|size|length|data")

    def test_append_bad_dtype(self):
        for bad in (DT.UNSPECIFIED, 9):
            r = self.kv((1, 4, 2, 64), dtype=DT.FLOAT16)
            r.k.dtype = bad
            self.expect(self.append(r), self.IA, r"dtype")

    def test_append_empty(self):
        r = pb2.AppendKVRequest(session_id="victim", layer_begin=0,
                                k=raw(DT.FLOAT32, [1, 0, 2, 64], 0),
                                v=raw(DT.FLOAT32, [1, 0, 2, 64], 0))
        self.expect(self.append(r), self.IA, r"empty|zero|token")
        r = pb2.AppendKVRequest(session_id="victim", layer_begin=0)  # no k, no v
        self.expect(self.append(r), self.IA, r"\bk\b|\bv\b|empty|missing|shape")
        r = self.kv((1, 4, 2, 64))
        r.ClearField("v")
        self.expect(self.append(r), self.IA, r"\bv\b|empty|missing|shape")

    def test_append_bad_shape_values(self):
        r = pb2.AppendKVRequest(session_id="victim", k=raw(DT.FLOAT32, [1, -4, 2, 64], 0),
                                v=raw(DT.FLOAT32, [1, -4, 2, 64], 0))
        self.expect(self.append(r), self.IA, r"shape|negative|token")
        # product overflows 64 bits: must be rejected, not wrap around to a small size
        big = [1, 1 << 40, 1 << 40, 64]
        r = pb2.AppendKVRequest(session_id="victim", k=raw(DT.FLOAT32, big, 16),
                                v=raw(DT.FLOAT32, big, 16))
        self.expect(self.append(r), self.IA, r"shape|size|bytes|large|kv_heads")

    def test_append_layer_out_of_range(self):
        self.expect(self.append(self.kv((1, 4, 2, 64), layer=2)), self.IA, r"layer")
        self.expect(self.append(self.kv((2, 4, 2, 64), layer=1)), self.IA, r"layer")
        self.expect(self.append(self.kv((3, 4, 2, 64), layer=0)), self.IA, r"layer")

    def test_append_unknown_session(self):
        self.expect(self.append(self.kv((1, 4, 2, 64), sid="nope-append")),
                    grpc.StatusCode.NOT_FOUND, r"nope-append")

    def test_append_session_ids(self):
        self.expect(self.append(self.kv((1, 4, 2, 64), sid="")), self.IA, r"session")
        # all messages of a stream must name the same session (messages are applied in
        # order, so the first one may land: send it to a scratch session)
        self.create(sid="mix-a")()
        self.expect(self.append(self.kv((1, 4, 2, 64), sid="mix-a"),
                                self.kv((1, 4, 2, 64), sid="victim")), self.IA, r"session")

    def test_append_obs_q_bad_shape(self):
        # obs_q must be [layers, obs_tokens, num_q_heads, head_dim]; 7 query heads is wrong.
        r = self.kv((1, 4, 2, 64))
        r.obs_q.CopyFrom(t(np.ones((1, 2, 7, 64))))
        self.expect(self.append(r), self.IA, r"obs_q")

    # -- Decode --------------------------------------------------------------------------
    def item(self, sid="victim", layer=0, q=None, new_k=None, new_v=None):
        it = pb2.DecodeItem(session_id=sid, layer=layer, q=q if q is not None else self.q())
        if new_k is not None:
            it.new_k.CopyFrom(new_k)
        if new_v is not None:
            it.new_v.CopyFrom(new_v)
        return it

    def test_decode_wrong_q_shape(self):
        self.expect(self.decode(self.item(q=self.q((8, 63)))), self.IA, r"shape|head_dim")
        self.expect(self.decode(self.item(q=self.q((4, 64)))), self.IA, r"shape|q_heads")
        self.expect(self.decode(self.item(q=self.q((512,)))), self.IA, r"shape|rank|dim")
        self.expect(self.decode(self.item(q=self.q((1, 8, 64)))), self.IA, r"shape|rank|dim")

    def test_decode_q_data_length(self):
        q = self.q()
        q.data = q.data[:-2]
        self.expect(self.decode(self.item(q=q)), self.IA, r"bytes|size|length|data")

    def test_decode_bad_dtype(self):
        for bad in (DT.UNSPECIFIED, 9):
            q = self.q()
            q.dtype = bad
            self.expect(self.decode(self.item(q=q)), self.IA, r"dtype")
        self.expect(self.decode(self.item(), out_dtype=9), self.IA, r"dtype")

    def test_decode_empty(self):
        self.expect(self.decode(), self.IA, r"item|empty")
        self.expect(self.decode(pb2.DecodeItem(session_id="victim", layer=0)), self.IA,
                    r"\bq\b|query|empty|missing|shape")
        self.expect(self.decode(self.item(q=raw(DT.FLOAT32, [8, 0], 0))), self.IA,
                    r"shape|empty|head_dim")

    def test_decode_new_kv(self):
        nk = t(np.ones((2, 64)))
        self.expect(self.decode(self.item(new_k=nk)), self.IA, r"new_v|new_k|both")
        self.expect(self.decode(self.item(new_v=nk)), self.IA, r"new_v|new_k|both")
        bad = t(np.ones((2, 32)))
        self.expect(self.decode(self.item(new_k=bad, new_v=bad)), self.IA, r"shape|head_dim")
        self.expect(self.decode(self.item(new_k=nk, new_v=bad)), self.IA, r"shape|head_dim|match")

    def test_decode_layer_out_of_range(self):
        self.expect(self.decode(self.item(layer=2)), self.IA, r"layer")
        self.expect(self.decode(self.item(layer=1 << 31)), self.IA, r"layer")

    def test_decode_empty_layer(self):
        # Layer 1 of the victim has no tokens and the item brings none. The proto does not say
        # what this returns; accepted: an error naming the problem, or the empty-softmax
        # convention of kernels/attention.h (out all zeros, lse -inf, tokens_attended 0).
        # Never NaN, never a crash.
        it = self.item(layer=1)
        it.want_lse = True
        try:
            r = self.decode(it)()
        except grpc.RpcError as e:
            self.assertIn(e.code(), (grpc.StatusCode.INVALID_ARGUMENT,
                                     grpc.StatusCode.FAILED_PRECONDITION), e.details())
            self.assertRegex(e.details(), r"(?i)empty|token|no ")
            return
        res = r.results[0]
        self.assertEqual(res.tokens_attended, 0)
        np.testing.assert_array_equal(fx.decode_tensor(res.out), np.zeros((8, 64)))
        lse = fx.decode_tensor(res.lse)
        self.assertEqual(lse.shape, (8,))
        self.assertTrue(np.all(np.isneginf(lse)), lse)

    def test_decode_unknown_session(self):
        self.expect(self.decode(self.item(sid="nope-decode")), grpc.StatusCode.NOT_FOUND,
                    r"nope-decode")

    def test_decode_validated_whole(self):
        nk = t(np.ones((2, 64)))
        good = self.item(new_k=nk, new_v=nk)
        self.expect(self.decode(good, self.item(q=self.q((8, 63)))), self.IA, r"shape|head_dim")
        self.expect(self.decode(good, self.item(sid="nope-2")), grpc.StatusCode.NOT_FOUND,
                    r"nope-2")
        self.expect(self.decode(good, self.item(layer=5)), self.IA, r"layer")
        s = self.stub.GetSession(pb2.GetSessionRequest(session_id="victim"), timeout=10)
        self.assertEqual(list(s.stats.tokens_per_layer), [10, 0],
                         "a rejected Decode request appended its good item's token")

    # -- other RPCs ----------------------------------------------------------------------
    def test_unknown_session_other_rpcs(self):
        nf = grpc.StatusCode.NOT_FOUND
        self.expect(lambda: self.stub.GetSession(pb2.GetSessionRequest(session_id="nope-g"),
                                                 timeout=10), nf, r"nope-g")
        self.expect(lambda: self.stub.DeleteSession(pb2.DeleteSessionRequest(session_id="nope-d"),
                                                    timeout=10), nf, r"nope-d")
        self.expect(lambda: list(self.stub.ReadKV(pb2.ReadKVRequest(session_id="nope-r"),
                                                  timeout=10)), nf, r"nope-r")

    def test_readkv_layer_out_of_range(self):
        self.expect(lambda: list(self.stub.ReadKV(pb2.ReadKVRequest(session_id="victim",
                                                                    layer_begin=2), timeout=10)),
                    self.IA, r"layer")
        self.expect(lambda: list(self.stub.ReadKV(pb2.ReadKVRequest(
            session_id="victim", layer_begin=1, layer_count=2), timeout=10)), self.IA, r"layer")

    def test_snapshot_rpcs_refuse_bad_input(self):
        self.expect(lambda: self.stub.Flush(pb2.FlushRequest(session_id="nope"), timeout=10),
                    grpc.StatusCode.NOT_FOUND, r"nope")
        self.expect(lambda: list(self.stub.ExportSession(
            pb2.ExportSessionRequest(session_id="nope"), timeout=10)),
            grpc.StatusCode.NOT_FOUND, r"nope")
        # a piece whose checksum does not match, and bytes that are no snapshot
        self.expect(lambda: self.stub.ImportSession(iter([pb2.SessionChunk(
            format_version=1, data=b"x", crc32c=1, last=True)]), timeout=10),
            grpc.StatusCode.DATA_LOSS, r"checksum")
        self.expect(lambda: self.stub.ImportSession(iter([pb2.SessionChunk(
            format_version=1, data=b"x", crc32c=0xa93c5f93, last=True)]), timeout=10),
            grpc.StatusCode.DATA_LOSS, r"bad magic")
        info = self.stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=10)
        self.assertEqual(list(info.unimplemented_rpcs), [])

    # runs last (alphabetical order): the other sessions are untouched
    def test_zz_good_sessions_intact(self):
        self.assertTrue(self.server.alive())
        self.good.check(self)
        self.good_bf16.check(self)
        self.victim.check(self)


class LimitsTest(ErrorAsserts):
    """Message size and host byte budget, on a server started with small limits."""

    @classmethod
    def setUpClass(cls):
        cls.server = fx.ServerProcess(SERVER_BIN, PROTO_DIR, extra_flags=[
            "--max_message_bytes=%d" % MAX_MESSAGE_BYTES,
            "--host_budget_bytes=%d" % HOST_BUDGET_BYTES]).start()
        cls.stub = cls.server.stub

    @classmethod
    def tearDownClass(cls):
        alive = cls.server.alive()
        cls.server.stop()
        if not alive:
            print("server died; log:\n" + cls.server.log_tail())
        cls.server.cleanup()
        assert alive, "server died during LimitsTest"

    def session(self, sid, d=64, kv=2, hq=8, chunk_tokens=0):
        self.stub.CreateSession(pb2.CreateSessionRequest(session_id=sid, layout=pb2.Layout(
            num_layers=1, num_kv_heads=kv, num_q_heads=hq, head_dim=d, dtype=DT.FLOAT16),
            policy=pb2.Policy(chunk_tokens=chunk_tokens)), timeout=10)

    def upload(self, sid, tokens, seed):
        # sent as float16: message size ~= stored size = tokens * 2 heads * 64 * 2 B * 2 (K, V)
        rng = np.random.default_rng(seed)
        k = rng.standard_normal((1, tokens, 2, 64)).astype(np.float32)
        v = rng.standard_normal((1, tokens, 2, 64)).astype(np.float32)
        r = pb2.AppendKVRequest(session_id=sid, k=t(k, DT.FLOAT16), v=t(v, DT.FLOAT16))
        return lambda: self.stub.AppendKV(iter([r]), timeout=30)

    def test_server_info_limits(self):
        info = self.stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=10)
        self.assertEqual(info.max_message_bytes, MAX_MESSAGE_BYTES)
        self.assertEqual(info.host_budget_bytes, HOST_BUDGET_BYTES)

    def test_oversized_messages(self):
        good = GoodSession(self.stub, "lim-good-1", seed=4, layers=1, tokens=(33,))
        self.session("lim-big")
        # 2 x 1 MiB of float32: the message exceeds --max_message_bytes
        k = np.ones((1, 2048, 2, 64), np.float32)
        r = pb2.AppendKVRequest(session_id="lim-big", k=t(k), v=t(k))
        self.assertGreater(r.ByteSize(), MAX_MESSAGE_BYTES)
        self.expect(lambda: self.stub.AppendKV(iter([r]), timeout=30),
                    grpc.StatusCode.RESOURCE_EXHAUSTED, r"larger|max|size|exceed|limit")
        q = np.ones((8, 64), np.float32)
        items = [pb2.DecodeItem(session_id="lim-good-1", layer=0, q=t(q))] * 600
        dr = pb2.DecodeRequest(items=items)
        self.assertGreater(dr.ByteSize(), MAX_MESSAGE_BYTES)
        self.expect(lambda: self.stub.Decode(dr, timeout=30),
                    grpc.StatusCode.RESOURCE_EXHAUSTED, r"larger|max|size|exceed|limit")
        s = self.stub.GetSession(pb2.GetSessionRequest(session_id="lim-big"), timeout=10)
        self.assertEqual(list(s.stats.tokens_per_layer), [0])
        good.check(self)
        # a message just under the limit still works
        self.upload("lim-big", 1000, seed=5)()
        self.stub.DeleteSession(pb2.DeleteSessionRequest(session_id="lim-big"), timeout=10)
        self.stub.DeleteSession(pb2.DeleteSessionRequest(session_id="lim-good-1"), timeout=10)

    def test_decode_new_token_over_budget(self):
        # The budget counts dense tail blocks of 32 token rows, allocated whole. Fill it with
        # whole blocks until another block does not fit: a decode step whose new token needs
        # that block is refused whole; one without a token still runs.
        used0 = self.stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=10).host_bytes_used
        # Chunks of 8192 tokens: the background pruner (which also repacks dense sessions'
        # blocks into chunks) stays away and the accounting holds still.
        self.session("bud-full", chunk_tokens=8192)
        self.upload("bud-full", 32, seed=10)()
        acc = lambda: self.stub.GetSession(pb2.GetSessionRequest(session_id="bud-full"),
                                           timeout=10).stats.bytes_accounted
        after_one = acc()
        info = self.stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=10)
        self.assertEqual(info.host_bytes_used, used0 + after_one)
        self.upload("bud-full", 32, seed=11)()
        block = acc() - after_one
        self.assertGreater(block, 32 * 512)  # payload plus the block's mass and object
        more = (HOST_BUDGET_BYTES - info.host_bytes_used - block) // block  # blocks that fit
        self.upload("bud-full", 32 * more, seed=12)()
        tokens = 64 + 32 * more
        info = self.stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=10)
        self.assertGreater(info.host_bytes_used + block, HOST_BUDGET_BYTES)
        q = t(np.ones((8, 64)))
        nk = t(np.ones((2, 64)))
        self.expect(lambda: self.stub.Decode(pb2.DecodeRequest(items=[pb2.DecodeItem(
            session_id="bud-full", layer=0, q=q, new_k=nk, new_v=nk)]), timeout=10),
            grpc.StatusCode.RESOURCE_EXHAUSTED, r"budget")
        r = self.stub.Decode(pb2.DecodeRequest(items=[pb2.DecodeItem(
            session_id="bud-full", layer=0, q=q)]), timeout=10)
        self.assertEqual(r.results[0].tokens_attended, tokens)
        self.assertEqual(
            self.stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=10).host_bytes_used,
            info.host_bytes_used)
        self.stub.DeleteSession(pb2.DeleteSessionRequest(session_id="bud-full"), timeout=10)

    def test_over_budget(self):
        # Budget 1,000,000 B. A holds 600 tokens = 307,200 B; B's single message of 1400
        # tokens = 716,800 B (< 1 MiB message limit) would bring the total to 1,024,000 B.
        self.session("bud-a")
        self.upload("bud-a", 600, seed=6)()
        good_a = GoodSession(self.stub, "bud-good", seed=7, layers=1, kv=1, hq=2, d=32,
                             tokens=(50,))  # 50 * 32 * 2 * 2 = 6,400 B
        self.session("bud-b")
        too_much = self.upload("bud-b", 1400, seed=8)
        self.expect(too_much, grpc.StatusCode.RESOURCE_EXHAUSTED, r"budget")
        # the rejected message appended nothing and nothing else was damaged
        s = self.stub.GetSession(pb2.GetSessionRequest(session_id="bud-b"), timeout=10)
        self.assertEqual(list(s.stats.tokens_per_layer), [0])
        s = self.stub.GetSession(pb2.GetSessionRequest(session_id="bud-a"), timeout=10)
        self.assertEqual(list(s.stats.tokens_per_layer), [600])
        good_a.check(self)
        # B still takes data that fits
        self.upload("bud-b", 10, seed=9)()
        info = self.stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=10)
        self.assertLessEqual(info.host_bytes_used, HOST_BUDGET_BYTES)
        self.assertGreaterEqual(info.host_bytes_used, 307200 + 6400 + 5120)
        # deleting A releases its bytes: the same upload now fits
        self.stub.DeleteSession(pb2.DeleteSessionRequest(session_id="bud-a"), timeout=10)
        too_much()
        s = self.stub.GetSession(pb2.GetSessionRequest(session_id="bud-b"), timeout=10)
        self.assertEqual(list(s.stats.tokens_per_layer), [1410])
        good_a.check(self)
        for sid in ("bud-b", "bud-good"):
            self.stub.DeleteSession(pb2.DeleteSessionRequest(session_id=sid), timeout=10)
        info = self.stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=10)
        self.assertEqual(info.host_bytes_used, 0)


class TenantBudgetTest(ErrorAsserts):
    """--tenant_budget_bytes: one tenant over its budget does not stop another."""

    TENANT_BUDGET = 200000

    @classmethod
    def setUpClass(cls):
        cls.server = fx.ServerProcess(SERVER_BIN, PROTO_DIR, extra_flags=[
            "--tenant_budget_bytes=%d" % cls.TENANT_BUDGET]).start()
        cls.stub = cls.server.stub

    @classmethod
    def tearDownClass(cls):
        alive = cls.server.alive()
        cls.server.stop()
        cls.server.cleanup()
        assert alive, "server died during TenantBudgetTest"

    def upload(self, sid, tokens):
        k = np.ones((1, tokens, 2, 64), np.float32)
        r = pb2.AppendKVRequest(session_id=sid, k=t(k), v=t(k))
        return lambda: self.stub.AppendKV(iter([r]), timeout=30)

    def test_tenant_budget(self):
        for sid, tenant in (("ta-1", "ta"), ("ta-2", "ta"), ("tb-1", "tb")):
            self.stub.CreateSession(pb2.CreateSessionRequest(
                session_id=sid, tenant=tenant, layout=pb2.Layout(
                    num_layers=1, num_kv_heads=2, num_q_heads=2, head_dim=64)), timeout=10)
        self.upload("ta-1", 300)()  # 153,600 B of tenant ta's 200,000
        self.expect(self.upload("ta-2", 100), grpc.StatusCode.RESOURCE_EXHAUSTED,
                    r"budget", r"tenant|\bta\b")
        self.upload("tb-1", 300)()  # tenant tb has its own budget
        s = self.stub.GetSession(pb2.GetSessionRequest(session_id="ta-2"), timeout=10)
        self.assertEqual(list(s.stats.tokens_per_layer), [0])


if __name__ == "__main__":
    sys.exit(fx.main(sys.modules[__name__]))
