"""ExportSession / ImportSession between two real servers: the imported session reads and
decodes bit-identically (and keeps pruning); damaged, reordered, truncated or foreign streams
are refused and add nothing.

Run: /usr/bin/python3 snapshot_test.py SERVER_BIN PROTO_DIR
"""

import os
import sys
import unittest

import grpc
import numpy as np

import server_fixture as fx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "clients", "python"))
from sparsekv_client import crc32c  # noqa: E402  (the client's pure-Python CRC-32C)

SERVER_BIN = PROTO_DIR = None
pb2 = pb2_grpc = None
DT = fx.DT


def t(x, dtype=DT.FLOAT32):
    return fx.make_tensor(pb2, np.asarray(x, np.float32), dtype)


class SnapshotTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        global pb2, pb2_grpc
        pb2, pb2_grpc = fx.load_stubs(PROTO_DIR)
        # A's small message limit splits the export into many pieces.
        cls.a = fx.ServerProcess(SERVER_BIN, PROTO_DIR,
                                 extra_flags=["--max_message_bytes=16384"]).start()
        cls.b = fx.ServerProcess(SERVER_BIN, PROTO_DIR).start()
        rng = np.random.default_rng(5)
        cls.a.stub.CreateSession(pb2.CreateSessionRequest(
            session_id="mig", tenant="t1", labels={"model": "m"},
            layout=pb2.Layout(num_layers=2, num_kv_heads=2, num_q_heads=8, head_dim=64,
                              dtype=DT.FLOAT16),
            policy=pb2.Policy(k=pb2.TensorPolicy(sparsity=0.7),
                              v=pb2.TensorPolicy(sparsity=0.5,
                                                 direction=pb2.PRUNE_DIRECTION_PER_CHANNEL),
                              chunk_tokens=64, dense_window=16)), timeout=10)
        for layer in range(2):
            for _ in range(10):  # 20 tokens per message: under A's 16 KiB limit
                k = rng.standard_normal((1, 20, 2, 64))
                v = rng.standard_normal((1, 20, 2, 64))
                cls.a.stub.AppendKV(iter([pb2.AppendKVRequest(
                    session_id="mig", layer_begin=layer, k=t(k, DT.FLOAT16),
                    v=t(v, DT.FLOAT16),
                    obs_q=t(rng.standard_normal((1, 4, 8, 64)), DT.FLOAT16))]), timeout=10)
        cls.a.stub.Flush(pb2.FlushRequest(session_id="mig"), timeout=30)
        cls.pieces = list(cls.a.stub.ExportSession(pb2.ExportSessionRequest(session_id="mig"),
                                                   timeout=30))

    @classmethod
    def tearDownClass(cls):
        for s in (cls.a, cls.b):
            alive = s.alive()
            rc = s.stop()
            s.cleanup()
            assert alive and rc == 0, "a server died or exited %s" % rc

    def imported(self):
        return [x.id for x in self.b.stub.ListSessions(pb2.ListSessionsRequest(),
                                                       timeout=10).sessions]

    def expect_refused(self, pieces, code, pattern):
        with self.assertRaises(grpc.RpcError) as cm:
            self.b.stub.ImportSession(iter(pieces), timeout=30)
        self.assertEqual(cm.exception.code(), code, cm.exception.details())
        self.assertRegex(cm.exception.details(), pattern)
        self.assertNotIn("mig", self.imported())

    def test_1_damaged_streams_are_refused(self):
        p = self.pieces
        self.assertGreater(len(p), 3)
        self.assertTrue(p[-1].last)
        self.assertEqual(sum(len(x.data) for x in p), p[-1].offset + len(p[-1].data))
        flipped = pb2.SessionChunk()
        flipped.CopyFrom(p[1])
        flipped.data = bytes([flipped.data[0] ^ 1]) + flipped.data[1:]
        self.expect_refused([p[0], flipped] + list(p[2:]), grpc.StatusCode.DATA_LOSS,
                            r"message 2 of the stream fails its checksum")
        self.expect_refused([p[0]] + list(p[2:]), grpc.StatusCode.DATA_LOSS,
                            r"starts at byte \d+, expected")
        self.expect_refused(list(p[:-1]), grpc.StatusCode.INVALID_ARGUMENT,
                            r"ended before the last piece")
        other = pb2.SessionChunk()
        other.CopyFrom(p[0])
        other.format_version = 9
        self.expect_refused([other] + list(p[1:]), grpc.StatusCode.FAILED_PRECONDITION,
                            r"version 9")
        # A piece re-checksummed after damage: only the whole-snapshot checksum catches it.
        forged = pb2.SessionChunk()
        forged.CopyFrom(p[2])
        forged.data = bytes([forged.data[5] ^ 0x40]).join([forged.data[:5], forged.data[6:]])
        forged.crc32c = crc32c(forged.data)
        self.expect_refused(list(p[:2]) + [forged] + list(p[3:]), grpc.StatusCode.DATA_LOSS,
                            r"snapshot is damaged")

    def test_2_imported_session_is_identical(self):
        s = self.b.stub.ImportSession(iter(self.pieces), timeout=30)
        self.assertEqual(s.id, "mig")
        self.assertEqual(s.tenant, "t1")
        self.assertEqual(dict(s.labels), {"model": "m"})
        sa = self.a.stub.GetSession(pb2.GetSessionRequest(session_id="mig"), timeout=10).stats
        self.assertEqual(list(s.stats.tokens_per_layer), list(sa.tokens_per_layer))
        self.assertEqual(s.stats.chunks, sa.chunks)
        self.assertGreater(s.stats.chunks, 0)
        self.assertEqual(s.stats.bytes_accounted, sa.bytes_accounted)
        for layer in range(2):
            ra = list(self.a.stub.ReadKV(pb2.ReadKVRequest(session_id="mig", layer_begin=layer,
                                                           layer_count=1), timeout=10))
            rb = list(self.b.stub.ReadKV(pb2.ReadKVRequest(session_id="mig", layer_begin=layer,
                                                           layer_count=1), timeout=10))
            self.assertEqual(b"".join(m.k.data for m in ra), b"".join(m.k.data for m in rb))
            self.assertEqual(b"".join(m.v.data for m in ra), b"".join(m.v.data for m in rb))
        rng = np.random.default_rng(6)
        for step in range(40):  # with new tokens: both keep pruning the same way
            item = pb2.DecodeItem(session_id="mig", layer=step % 2, want_lse=True,
                                  q=t(rng.standard_normal((8, 64))),
                                  new_k=t(rng.standard_normal((2, 64))),
                                  new_v=t(rng.standard_normal((2, 64))))
            oa = self.a.stub.Decode(pb2.DecodeRequest(items=[item]), timeout=10).results[0]
            ob = self.b.stub.Decode(pb2.DecodeRequest(items=[item]), timeout=10).results[0]
            self.assertEqual(oa.out.data, ob.out.data, "step %d" % step)
            self.assertEqual(oa.lse.data, ob.lse.data, "step %d" % step)
        self.expect_refused_again()

    def expect_refused_again(self):
        with self.assertRaises(grpc.RpcError) as cm:
            self.b.stub.ImportSession(iter(self.pieces), timeout=30)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.ALREADY_EXISTS)


if __name__ == "__main__":
    sys.exit(fx.main(sys.modules[__name__]))
