#!/usr/bin/python3
"""Tests of the sparsekv_client package against a real sparsekv-server.

Usage: /usr/bin/python3 clients/python/tests/test_client.py SERVER_BIN

Starts the server on free ports (--ready_file), then exercises every method of the client.
The TLS tests run the client against a small TLS (and mutual-TLS) gRPC server written here in
Python with certificates made by openssl, because sparsekv-server has no TLS flags yet.
Prints "N passed, M failed"; a skipped test counts as failed.
"""

import base64
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from concurrent import futures

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PKG_ROOT = os.path.dirname(HERE)
REPO = os.path.abspath(os.path.join(PKG_ROOT, "..", ".."))
sys.path.insert(0, PKG_ROOT)

import grpc  # noqa: E402

import sparsekv_client as sk  # noqa: E402
from sparsekv_client import tensors as T  # noqa: E402
from sparsekv_client.testing import LocalServer  # noqa: E402

SERVER_BIN = None
SERVER = None
CLIENT = None
_n = [0]


def sid(prefix="t"):
    _n[0] += 1
    return "%s-%d" % (prefix, _n[0])


def setUpModule():
    global SERVER, CLIENT
    SERVER = LocalServer(SERVER_BIN, flags=["--decode_threads=1"]).start()
    CLIENT = sk.Client(SERVER.target, timeout=20)
    CLIENT.wait_ready(10)


def tearDownModule():
    if CLIENT is not None:
        CLIENT.close()
    if SERVER is not None:
        SERVER.__exit__(None, None, None)


def ref_attention(q, k, v):
    """float64 reference: q [Hq, D], k/v [T, Hkv, D] -> (out [Hq, D], lse [Hq])."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    hq, d = q.shape
    g = hq // k.shape[1]
    out, lse = np.zeros((hq, d)), np.zeros(hq)
    for h in range(hq):
        s = (k[:, h // g] @ q[h]) / np.sqrt(d)
        m = s.max()
        p = np.exp(s - m)
        out[h] = p @ v[:, h // g] / p.sum()
        lse[h] = m + np.log(p.sum())
    return out, lse


def rnd(shape, seed, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


class DescriptorTest(unittest.TestCase):
    def test_shipped_descriptor_matches_proto(self):
        sys.path.insert(0, os.path.join(PKG_ROOT, "tools"))
        import gen_descriptor  # needs grpc_tools (Debian: python3-grpc-tools)
        from google.protobuf import descriptor_pb2
        from sparsekv_client._descriptor import FILE_DESCRIPTOR_SET_B64
        fresh = descriptor_pb2.FileDescriptorSet.FromString(
            gen_descriptor.build_descriptor_set(os.path.join(REPO, "proto")))
        shipped = descriptor_pb2.FileDescriptorSet.FromString(
            base64.b64decode("".join(FILE_DESCRIPTOR_SET_B64)))
        self.assertEqual(fresh, shipped, "run clients/python/tools/gen_descriptor.py")

    def test_every_rpc_has_a_method(self):
        self.assertEqual(set(sk.client.METHODS),
                         {"CreateSession", "GetSession", "ListSessions", "DeleteSession",
                          "AppendKV", "Decode", "DecodeStream", "Flush", "ReadKV",
                          "ExportSession", "ImportSession", "GetServerInfo"})


class TensorTest(unittest.TestCase):
    def test_round_trips(self):
        x = rnd((3, 4), 1)
        t = sk.to_tensor(x)
        self.assertEqual((t.dtype, list(t.shape)), (T.FLOAT32, [3, 4]))
        np.testing.assert_array_equal(sk.from_tensor(t), x)
        h = x.astype(np.float16)
        t = sk.to_tensor(h)
        self.assertEqual(t.dtype, T.FLOAT16)
        self.assertEqual(sk.from_tensor(t).dtype, np.float16)
        np.testing.assert_array_equal(sk.from_tensor(t), h)
        b = sk.from_tensor(sk.to_tensor(x, "bfloat16"))
        np.testing.assert_allclose(b, x, rtol=2 ** -8)
        self.assertEqual(sk.from_tensor(sk.to_tensor(np.float64(2.5) * np.ones(2))).dtype,
                         np.float32)

    def test_bad_length_and_dtype(self):
        t = sk.to_tensor(np.zeros((2, 2), np.float32))
        t.shape[0] = 3
        with self.assertRaises(ValueError):
            sk.from_tensor(t)
        with self.assertRaises(ValueError):
            sk.to_tensor(np.zeros(2), "int8")


class ServerTest(unittest.TestCase):
    def test_health_and_info(self):
        self.assertEqual(CLIENT.health(), "SERVING")
        # the server's default health service knows only "" (the whole server)
        with self.assertRaises(sk.SparsekvError) as cm:
            CLIENT.health("no.such.Service")
        self.assertEqual(cm.exception.code, "NOT_FOUND")
        info = CLIENT.server_info()
        self.assertEqual(info.kernel_backend, "cpu")
        self.assertTrue(info.version)
        self.assertGreater(info.max_message_bytes, 0)
        self.assertEqual(info.unimplemented_rpcs, [])

    def test_unreachable_server(self):
        with sk.Client("127.0.0.1:1", timeout=1.0) as c:
            with self.assertRaises(sk.SparsekvError) as cm:
                c.server_info()
            self.assertIn(cm.exception.code, ("UNAVAILABLE", "DEADLINE_EXCEEDED"))
            with self.assertRaises(sk.SparsekvError) as cm:
                c.wait_ready(0.5)
            self.assertEqual(cm.exception.code, "UNAVAILABLE")


class SessionTest(unittest.TestCase):
    def test_lifecycle(self):
        pol = sk.Policy(k=sk.TensorPolicy(0.5, "per_token", "output_aware"),
                        v=sk.TensorPolicy(0.7, "per_channel", "magnitude"),
                        dense_window=16, chunk_tokens=64, group_tokens=64)
        name = sid("life")
        s = CLIENT.create_session(3, 2, 4, 16, dtype="bfloat16", policy=pol, session_id=name,
                                  tenant="tenant-a", ttl_seconds=120, labels={"a": "b"})
        self.assertEqual(s.id, name)
        self.assertEqual(s.layout, sk.Layout(3, 2, 4, 16, "bfloat16"))
        self.assertEqual(s.policy.k, pol.k)
        self.assertEqual(s.policy.v.direction, "per_channel")
        self.assertEqual((s.policy.dense_window, s.policy.chunk_tokens), (16, 64))
        self.assertAlmostEqual(s.policy.v.sparsity, 0.7, places=6)
        self.assertEqual((s.tenant, s.ttl_seconds, s.labels), ("tenant-a", 120, {"a": "b"}))
        g = CLIENT.get_session(name)
        self.assertEqual(g.stats.tokens_per_layer, [0, 0, 0])
        self.assertGreater(g.create_time_unix_ms, 0)
        with self.assertRaises(sk.SparsekvError) as cm:
            CLIENT.create_session(3, 2, 4, 16, session_id=name)
        self.assertEqual(cm.exception.code, "ALREADY_EXISTS")
        self.assertEqual(cm.exception.status, grpc.StatusCode.ALREADY_EXISTS)
        self.assertGreaterEqual(CLIENT.delete_session(name), 0)
        with self.assertRaises(sk.SparsekvError) as cm:
            CLIENT.get_session(name)
        self.assertEqual(cm.exception.code, "NOT_FOUND")
        with self.assertRaises(sk.SparsekvError) as cm:
            CLIENT.delete_session(name)
        self.assertEqual(cm.exception.code, "NOT_FOUND")

    def test_decode_compute(self):
        # Unspecified is echoed as the server default, f32; the client spells values f32/f16.
        s = CLIENT.create_session(1, 1, 2, 32, session_id=sid("dc"))
        self.addCleanup(lambda: CLIENT.delete_session(s.id))
        self.assertEqual((s.policy.decode_compute, s.stats.decode_compute_in_force),
                         ("f32", "f32"))
        pols = {c: sk.Policy.uniform(0.5, decode_compute=c) for c in ("f32", "f16")}
        ids = {}
        for c, pol in pols.items():
            info = CLIENT.create_session(1, 2, 8, 64, dtype="float16", policy=pol,
                                         session_id=sid("dc-" + c))
            ids[c] = info.id
            self.addCleanup(lambda i=info.id: CLIENT.delete_session(i))
            self.assertEqual(info.policy.decode_compute, c)
        in_force = CLIENT.get_session(ids["f16"]).stats.decode_compute_in_force
        self.assertIn(in_force, ("f16", "f32"))  # f16 needs a CPU with AVX512-FP16
        k, v = rnd((1, 300, 2, 64), 31), rnd((1, 300, 2, 64), 32)
        for i in ids.values():
            CLIENT.append_kv(i, k, v)
            CLIENT.flush(i)
        q = rnd((8, 64), 33)
        o32, _ = CLIENT.decode(ids["f32"], 0, q)
        o16, _ = CLIENT.decode(ids["f16"], 0, q)
        err = np.linalg.norm(o16 - o32, axis=1) / np.linalg.norm(o32, axis=1)
        self.assertLess(err.max(), 1e-2)
        # A float32 cache has no fp16 path.
        f = CLIENT.create_session(1, 1, 2, 32, dtype="float32", policy=pols["f16"],
                                  session_id=sid("dc-fp32"))
        self.addCleanup(lambda: CLIENT.delete_session(f.id))
        self.assertEqual(f.stats.decode_compute_in_force, "f32")
        with self.assertRaises(ValueError):
            sk.Policy(decode_compute="f8").to_proto()
        with self.assertRaises(sk.SparsekvError) as cm:
            CLIENT.create_session(1, 1, 1, 8, policy=sk.Policy(decode_compute=7))
        self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
        self.assertIn("policy.decode_compute", cm.exception.message)

    def test_server_generated_id_and_defaults(self):
        s = CLIENT.create_session(1, 1, 1, 8)
        self.assertTrue(s.id)
        self.assertEqual(s.layout.dtype, "float16")
        CLIENT.delete_session(s.id)

    def test_invalid_layout(self):
        with self.assertRaises(sk.SparsekvError) as cm:
            CLIENT.create_session(2, 3, 4, 16)  # q_heads not a multiple of kv_heads
        self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
        self.assertTrue(cm.exception.message)

    def test_list_pages(self):
        tenant = sid("tenant")
        names = sorted(sid("list") for _ in range(5))
        for n in names:
            CLIENT.create_session(1, 1, 1, 8, session_id=n, tenant=tenant)
        got = [s.id for s in CLIENT.list_sessions(tenant=tenant, page_size=2)]
        self.assertEqual(got, names)
        everyone = [s.id for s in CLIENT.list_sessions(page_size=3)]
        self.assertTrue(set(names) <= set(everyone))
        for n in names:
            CLIENT.delete_session(n)
        self.assertEqual(list(CLIENT.list_sessions(tenant=tenant)), [])


class DataTest(unittest.TestCase):
    L, HKV, HQ, D = 2, 2, 6, 32

    def new(self, dtype="float32", policy=None):
        s = CLIENT.create_session(self.L, self.HKV, self.HQ, self.D, dtype=dtype,
                                  policy=policy, session_id=sid("data"))
        self.addCleanup(lambda: CLIENT.delete_session(s.id))
        return s.id

    def test_append_split_and_read_back(self):
        s = self.new("float32")
        k, v = rnd((self.L, 100, self.HKV, self.D), 2), rnd((self.L, 100, self.HKV, self.D), 3)
        # 1 token of both layers = 2 * 2*32*4 * 2 = 1 KiB; a 3000-byte cap gives 2-token messages
        r = CLIENT.append_kv(s, k, v, max_message_bytes=3000)
        self.assertEqual(r.messages, 50)
        self.assertEqual(r.tokens_appended, 200)
        self.assertEqual(r.tokens_per_layer, [100, 100])
        # a cap below one token of all layers splits by layer too
        r = CLIENT.append_kv(s, k[:, :3], v[:, :3], max_message_bytes=600)
        self.assertEqual(r.messages, 6)
        kk, vv = CLIENT.read_kv(s)
        self.assertEqual(kk.shape, (self.L, 103, self.HKV, self.D))
        self.assertEqual(kk.dtype, np.float32)
        np.testing.assert_array_equal(kk[:, :100], k)
        np.testing.assert_array_equal(vv[:, 100:], v[:, :3])
        k1, v1 = CLIENT.read_kv(s, layer_begin=1, layer_count=1, token_begin=10, token_count=5)
        np.testing.assert_array_equal(k1[0], k[1, 10:15])
        parts = list(CLIENT.read_kv_layers(s))
        self.assertEqual([p[0] for p in parts], [0, 1])

    def test_append_fp16_into_fp16_session_is_exact(self):
        s = self.new("float16")
        k = rnd((self.L, 40, self.HKV, self.D), 4, np.float16)
        v = rnd((self.L, 40, self.HKV, self.D), 5, np.float16)
        CLIENT.append_kv(s, k, v)
        kk, vv = CLIENT.read_kv(s)
        self.assertEqual(kk.dtype, np.float16)
        np.testing.assert_array_equal(kk, k)
        np.testing.assert_array_equal(vv, v)

    def test_append_layer_range_and_obs_q(self):
        s = self.new("float32", sk.Policy.uniform(0.5, "per_token", "output_aware"))
        k, v = rnd((1, 64, self.HKV, self.D), 6), rnd((1, 64, self.HKV, self.D), 7)
        r = CLIENT.append_kv(s, k, v, layer_begin=1, obs_q=rnd((1, 4, self.HQ, self.D), 8))
        self.assertEqual(r.tokens_per_layer, [0, 64])
        f = CLIENT.flush(s)
        self.assertEqual(f.tokens_compressed, 32)
        self.assertEqual(f.stats.chunks_output_aware_k, 1)
        self.assertEqual(f.stats.scoring_in_force_k, "output_aware")

    def test_append_errors(self):
        s = self.new()
        with self.assertRaises(ValueError):
            CLIENT.append_kv(s, np.zeros((2, 3, 2, 32)), np.zeros((2, 4, 2, 32)))
        with self.assertRaises(sk.SparsekvError) as cm:
            CLIENT.append_kv(s, np.zeros((2, 3, 3, 32)), np.zeros((2, 3, 3, 32)))
        self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
        with self.assertRaises(sk.SparsekvError) as cm:
            CLIENT.append_kv("no-such-session", np.zeros((2, 3, 2, 32)), np.zeros((2, 3, 2, 32)))
        self.assertEqual(cm.exception.code, "NOT_FOUND")
        with self.assertRaises(sk.SparsekvError) as cm:
            CLIENT.append_kv(s, np.zeros((2, 1, 2, 32)), np.zeros((2, 1, 2, 32)), layer_begin=1)
        self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")

    def test_decode_matches_reference(self):
        s = self.new("float32")
        k, v = rnd((self.L, 50, self.HKV, self.D), 9), rnd((self.L, 50, self.HKV, self.D), 10)
        CLIENT.append_kv(s, k, v)
        q = rnd((self.HQ, self.D), 11)
        out, lse = CLIENT.decode(s, 1, q, want_lse=True)
        ro, rl = ref_attention(q, k[1], v[1])
        self.assertEqual(out.shape, (self.HQ, self.D))
        np.testing.assert_allclose(out, ro, atol=1e-4 * np.abs(v).max())
        np.testing.assert_allclose(lse, rl, atol=1e-4)
        out, lse = CLIENT.decode(s, 0, q)
        self.assertIsNone(lse)
        # new token appended, fp16 inputs, fp16 output
        nk, nv = rnd((self.HKV, self.D), 12, np.float16), rnd((self.HKV, self.D), 13, np.float16)
        out, _ = CLIENT.decode(s, 0, q.astype(np.float16), nk, nv, out_dtype="float16")
        self.assertEqual(out.dtype, np.float16)
        ro, _ = ref_attention(q.astype(np.float16), np.concatenate([k[0], nk[None]]),
                              np.concatenate([v[0], nv[None]]))
        np.testing.assert_allclose(out.astype(np.float32), ro, atol=2e-3 * np.abs(v).max())
        self.assertEqual(CLIENT.get_session(s).stats.tokens_per_layer, [51, 50])
        with self.assertRaises(ValueError):
            CLIENT.decode(s, 0, q, new_k=nk)

    def test_decode_batch_and_errors(self):
        a, b = self.new(), self.new()
        k, v = rnd((self.L, 20, self.HKV, self.D), 14), rnd((self.L, 20, self.HKV, self.D), 15)
        CLIENT.append_kv(a, k, v)
        CLIENT.append_kv(b, v, k)
        q = rnd((self.HQ, self.D), 16)
        res = CLIENT.decode_batch([sk.DecodeItem(a, 0, q, want_lse=True),
                                   sk.DecodeItem(b, 1, q)])
        self.assertEqual(len(res), 2)
        np.testing.assert_allclose(res[0].out, ref_attention(q, k[0], v[0])[0], atol=1e-4 * 5)
        np.testing.assert_allclose(res[1].out, ref_attention(q, v[1], k[1])[0], atol=1e-4 * 5)
        self.assertEqual(res[0].tokens_attended, 20)
        self.assertIsNotNone(res[0].lse)
        with self.assertRaises(sk.SparsekvError) as cm:  # one bad item fails the whole call
            CLIENT.decode_batch([sk.DecodeItem(a, 0, q, rnd((2, 32), 1), rnd((2, 32), 2)),
                                 sk.DecodeItem(b, 7, q)])
        self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
        self.assertEqual(CLIENT.get_session(a).stats.tokens_per_layer, [20, 20])
        with self.assertRaises(sk.SparsekvError) as cm:
            CLIENT.decode(a, 0, rnd((self.HQ, self.D + 1), 3))
        self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
        with self.assertRaises(sk.SparsekvError) as cm:
            CLIENT.decode("missing", 0, q)
        self.assertEqual(cm.exception.code, "NOT_FOUND")

    def test_decode_stream(self):
        s = self.new()
        q = rnd((self.HQ, self.D), 20)
        ks, vs = [], []
        with CLIENT.decode_stream(session_id=s) as st:
            for t in range(5):
                nk, nv = rnd((self.HKV, self.D), 100 + t), rnd((self.HKV, self.D), 200 + t)
                ks.append(nk)
                vs.append(nv)
                out, lse = st.decode(s, 0, q, nk, nv, want_lse=True)
                ro, rl = ref_attention(q, np.stack(ks), np.stack(vs))
                np.testing.assert_allclose(out, ro, atol=1e-4 * 5)
                np.testing.assert_allclose(lse, rl, atol=1e-4)
            # an error response does not end the stream
            with self.assertRaises(sk.SparsekvError) as cm:
                st.decode("missing", 0, q)
            self.assertEqual(cm.exception.code, "NOT_FOUND")
            self.assertIsNotNone(cm.exception.request_id)
            with self.assertRaises(sk.SparsekvError) as cm:
                st.step([sk.DecodeItem(s, 9, q)])
            self.assertEqual(cm.exception.code, "INVALID_ARGUMENT")
            # pipelined: several requests in flight, answered in order
            ids = [st.send([sk.DecodeItem(s, 1, q * i)]) for i in range(1, 4)]
            self.assertEqual(ids, sorted(ids))
            outs = [st.recv()[0].out for _ in ids]
            self.assertEqual(len(outs), 3)
            with self.assertRaises(sk.SparsekvError) as cm:
                st.recv()
            self.assertEqual(cm.exception.code, "FAILED_PRECONDITION")
        self.assertEqual(CLIENT.get_session(s).stats.tokens_per_layer, [5, 0])
        with self.assertRaises(sk.SparsekvError):
            st.send([sk.DecodeItem(s, 0, q)])  # closed

    def test_flush_prunes(self):
        s = self.new("float32", sk.Policy.uniform(0.5))
        k = rnd((self.L, 100, self.HKV, self.D), 30)
        CLIENT.append_kv(s, k, k)
        f = CLIENT.flush(s)
        self.assertEqual(f.tokens_compressed, 2 * (100 - 32))
        self.assertAlmostEqual(f.stats.achieved_sparsity_k, 0.5, places=5)
        self.assertLess(f.stats.compression_ratio, 1.0)
        kk, _ = CLIENT.read_kv(s)
        self.assertEqual(int((kk[:, :68] == 0).sum(axis=-1).min()), self.D // 2)
        np.testing.assert_array_equal(kk[:, 68:], k[:, 68:])
        self.assertEqual(len(CLIENT.flush_many([s, s])), 2)
        with self.assertRaises(sk.SparsekvError) as cm:
            CLIENT.flush("missing")
        self.assertEqual(cm.exception.code, "NOT_FOUND")

    def test_bfloat16_wire(self):
        s = self.new("bfloat16")
        k = rnd((self.L, 8, self.HKV, self.D), 40)
        CLIENT.append_kv(s, k, k, wire_dtype="bfloat16")
        kk, _ = CLIENT.read_kv(s)
        self.assertEqual(kk.dtype, np.float32)
        np.testing.assert_array_equal(kk, sk.from_tensor(sk.to_tensor(k, "bfloat16")))

    def test_metadata_and_routing_header(self):
        with sk.Client(SERVER.target, metadata=[("x-tenant-hint", "a")]) as c:
            self.assertEqual(c.health(), "SERVING")
            s = c.create_session(1, 1, 1, 8)
            c.delete_session(s.id)


# ---------------------------------------------------------------------------------------------
# TLS against a Python gRPC server (sparsekv-server has no TLS flags yet)

class SnapshotTest(unittest.TestCase):
    """export_session / import_session / migrate between the module's server and a second
    one: the copy reads and decodes bit for bit like the original; damaged streams are
    refused and add nothing."""

    @classmethod
    def setUpClass(cls):
        cls.server_b = LocalServer(SERVER_BIN, flags=["--decode_threads=1"]).start()
        cls.b = sk.Client(cls.server_b.target, timeout=20)

    @classmethod
    def tearDownClass(cls):
        cls.b.close()
        cls.server_b.__exit__(None, None, None)

    def make_session(self):
        """A session with compressed chunks, a dense tail and decode steps behind it."""
        s = sid("snap")
        CLIENT.create_session(2, 2, 8, 64, dtype="float16", session_id=s, labels={"m": "x"},
                              policy=sk.Policy(k=sk.TensorPolicy(0.7),
                                               v=sk.TensorPolicy(0.5, "per_channel"),
                                               chunk_tokens=64, dense_window=16))
        CLIENT.append_kv(s, rnd((2, 300, 2, 64), 1), rnd((2, 300, 2, 64), 2),
                         obs_q=rnd((2, 4, 8, 64), 3))
        CLIENT.flush(s)
        for t in range(6):  # 3 steps per layer: read_kv needs equal layer lengths
            CLIENT.decode(s, t % 2, rnd((8, 64), 10 + t), new_k=rnd((2, 64), 20 + t),
                          new_v=rnd((2, 64), 30 + t))
        self.assertGreater(CLIENT.get_session(s).stats.chunks, 0)
        return s

    def assert_same(self, a, b, s):
        """Identical read-back bytes, and identical answers to the same next decode steps
        (each appends a token, so both copies must also keep storing the same way)."""
        ka, va = a.read_kv(s)
        kb, vb = b.read_kv(s)
        self.assertEqual((ka.dtype, ka.shape), (kb.dtype, kb.shape))
        self.assertEqual(ka.tobytes(), kb.tobytes())
        self.assertEqual(va.tobytes(), vb.tobytes())
        for t in range(4):
            args = (s, t % 2, rnd((8, 64), 100 + t))
            kw = dict(new_k=rnd((2, 64), 200 + t), new_v=rnd((2, 64), 300 + t), want_lse=True)
            oa, la = a.decode(*args, **kw)
            ob, lb = b.decode(*args, **kw)
            self.assertEqual(oa.tobytes(), ob.tobytes())
            self.assertEqual(la.tobytes(), lb.tobytes())
        ia, ib = a.get_session(s), b.get_session(s)
        self.assertEqual((ia.layout, ia.policy, ia.labels, ia.stats.tokens_per_layer),
                         (ib.layout, ib.policy, ib.labels, ib.stats.tokens_per_layer))

    def test_export_import_on_another_server(self):
        s = self.make_session()
        snap = CLIENT.export_session(s)
        self.assertTrue(snap.startswith(sk.client.SNAPSHOT_MAGIC))
        pieces = list(sk.snapshot_pieces(snap, 10000))
        self.assertEqual(len(pieces), -(-len(snap) // 10000))
        self.assertEqual([p.last for p in pieces], [False] * (len(pieces) - 1) + [True])
        info = self.b.import_session(snap, piece_bytes=10000)
        self.assertEqual(info.id, s)
        self.assert_same(CLIENT, self.b, s)
        with self.assertRaises(sk.SparsekvError) as cm:  # the id is taken now
            self.b.import_session(snap)
        self.assertEqual(cm.exception.code, "ALREADY_EXISTS")

    def test_import_after_delete(self):
        s = self.make_session()
        k0, v0 = CLIENT.read_kv(s)
        snap = CLIENT.export_session(s)
        CLIENT.delete_session(s)
        CLIENT.import_session(snap)
        k1, v1 = CLIENT.read_kv(s)
        self.assertEqual((k0.tobytes(), v0.tobytes()), (k1.tobytes(), v1.tobytes()))

    def test_migrate(self):
        s = self.make_session()
        k0, _ = CLIENT.read_kv(s)
        out0, _ = CLIENT.decode(s, 1, rnd((8, 64), 7))
        info = CLIENT.migrate(s, self.b)
        self.assertEqual(info.id, s)
        with self.assertRaises(sk.SparsekvError) as cm:
            CLIENT.get_session(s)
        self.assertEqual(cm.exception.code, "NOT_FOUND")
        self.assertEqual(self.b.read_kv(s)[0].tobytes(), k0.tobytes())
        self.assertEqual(self.b.decode(s, 1, rnd((8, 64), 7))[0].tobytes(), out0.tobytes())

    def test_damaged_streams_refused_and_nothing_added(self):
        s = self.make_session()
        snap = CLIENT.export_session(s)
        cases = []
        pieces = list(sk.snapshot_pieces(snap, 4096))
        bad = list(sk.snapshot_pieces(snap, 4096))
        bad[1].data = bad[1].data[:100] + bytes([bad[1].data[100] ^ 1]) + bad[1].data[101:]
        cases.append(("a piece whose bytes fail its CRC-32C", bad, "DATA_LOSS"))
        cases.append(("pieces out of order", [pieces[1], pieces[0]] + pieces[2:], "DATA_LOSS"))
        damaged = bytearray(snap)
        damaged[len(snap) // 2] ^= 0xFF  # pieces carry good CRCs; the snapshot's own fail
        cases.append(("a damaged snapshot", list(sk.snapshot_pieces(bytes(damaged))),
                      "DATA_LOSS"))
        cases.append(("bytes that are not a snapshot",
                      list(sk.snapshot_pieces(b"not a snapshot")), "DATA_LOSS"))
        cases.append(("another format version",
                      list(sk.snapshot_pieces(snap, format_version=99)), "FAILED_PRECONDITION"))
        cases.append(("no last piece", pieces[:-1], "INVALID_ARGUMENT"))
        for what, stream, code in cases:
            with self.subTest(what):
                with self.assertRaises(sk.SparsekvError) as cm:
                    self.b.import_session_pieces(stream, session_id=s)
                self.assertEqual(cm.exception.code, code, cm.exception.message)
                self.assertEqual(cm.exception.status, getattr(grpc.StatusCode, code))
                with self.assertRaises(sk.SparsekvError) as cm:
                    self.b.get_session(s)
                self.assertEqual(cm.exception.code, "NOT_FOUND")

    def test_export_unknown_session(self):
        with self.assertRaises(sk.SparsekvError) as cm:
            CLIENT.export_session("no-such-session")
        self.assertEqual(cm.exception.code, "NOT_FOUND")


def _openssl(args, cwd):
    subprocess.run(["openssl"] + args, cwd=cwd, check=True, capture_output=True)


class TlsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if shutil.which("openssl") is None:
            raise unittest.SkipTest("openssl not found")
        cls.dir = tempfile.mkdtemp(prefix="sparsekv-tls-")
        d = cls.dir
        _openssl(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                  "/CN=test-ca", "-keyout", "ca.key", "-out", "ca.pem"], d)
        ext = os.path.join(d, "san.ext")
        with open(ext, "w") as f:
            f.write("subjectAltName=DNS:sparsekv.test,IP:127.0.0.1\n")
        for name in ("server", "client"):
            _openssl(["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=%s" % name,
                      "-keyout", name + ".key", "-out", name + ".csr"], d)
            _openssl(["x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                      "-CAcreateserial", "-days", "2", "-out", name + ".pem", "-extfile", ext], d)
        _openssl(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                  "/CN=other-ca", "-keyout", "other.key", "-out", "other.pem"], d)
        rd = lambda n: open(os.path.join(d, n), "rb").read()
        info = sk.pb.ServerInfo(version="tls-test", kernel_backend="cpu")
        handler = grpc.method_handlers_generic_handler("sparsekv.v1.KvCacheService", {
            "GetServerInfo": grpc.unary_unary_rpc_method_handler(
                lambda req, ctx: info,
                request_deserializer=sk.pb.GetServerInfoRequest.FromString,
                response_serializer=lambda m: m.SerializeToString())})
        cls.servers = []
        cls.ports = {}
        for mode, require in (("tls", False), ("mtls", True)):
            srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            srv.add_generic_rpc_handlers((handler,))
            creds = grpc.ssl_server_credentials([(rd("server.key"), rd("server.pem"))],
                                                root_certificates=rd("ca.pem"),
                                                require_client_auth=require)
            cls.ports[mode] = srv.add_secure_port("127.0.0.1:0", creds)
            srv.start()
            cls.servers.append(srv)

    @classmethod
    def tearDownClass(cls):
        for s in getattr(cls, "servers", []):
            s.stop(None)
        shutil.rmtree(getattr(cls, "dir", "/nonexistent"), ignore_errors=True)

    def p(self, n):
        return os.path.join(self.dir, n)

    def info(self, mode, tls):
        with sk.Client("127.0.0.1:%d" % self.ports[mode], timeout=5, tls=tls) as c:
            return c.server_info().version

    def test_server_auth(self):
        self.assertEqual(self.info("tls", sk.TlsOptions(root_certs=self.p("ca.pem"))), "tls-test")
        pem = open(self.p("ca.pem"), "rb").read()
        tls = sk.TlsOptions(root_certs=pem, server_name_override="sparsekv.test")
        self.assertEqual(self.info("tls", tls), "tls-test")

    def test_untrusted_server_rejected(self):
        with self.assertRaises(sk.SparsekvError) as cm:
            self.info("tls", sk.TlsOptions(root_certs=self.p("other.pem")))
        self.assertEqual(cm.exception.code, "UNAVAILABLE")

    def test_mutual_tls(self):
        tls = sk.TlsOptions(root_certs=self.p("ca.pem"), cert_chain=self.p("client.pem"),
                            private_key=self.p("client.key"))
        self.assertEqual(self.info("mtls", tls), "tls-test")
        with self.assertRaises(sk.SparsekvError) as cm:
            self.info("mtls", sk.TlsOptions(root_certs=self.p("ca.pem")))
        self.assertEqual(cm.exception.code, "UNAVAILABLE")

    def test_options_validation(self):
        with self.assertRaises(ValueError):
            sk.TlsOptions(cert_chain=self.p("client.pem")).channel_credentials()
        with self.assertRaises(TypeError):
            sk.Client("127.0.0.1:1", tls="yes")


def run_tests():
    runner = unittest.TextTestRunner(verbosity=2, stream=sys.stdout)
    result = runner.run(unittest.TestLoader().loadTestsFromModule(sys.modules[__name__]))
    problems = result.failures + result.errors
    in_tests = [t for t, _ in problems if isinstance(t, unittest.TestCase)]
    failed = len(problems) + len(result.skipped) + len(result.unexpectedSuccesses)
    passed = (result.testsRun - len(in_tests) - len(result.skipped)
              - len(result.unexpectedSuccesses) - len(result.expectedFailures))
    if result.skipped:
        print("note: %d skipped test(s) are counted as failures" % len(result.skipped))
    if result.testsRun == 0:
        failed = max(failed, 1)
    print("%d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    SERVER_BIN = os.path.abspath(sys.argv[1])
    sys.exit(run_tests())
