#!/usr/bin/env python3
"""Portability check of sparsekv_client on any grpcio/protobuf (no server binary needed).

Runs an in-process Python gRPC server that implements a few sparsekv.v1 RPCs with the
package's own message classes (unary, client-, server- and bidi-streaming) and drives it
with the Client. Used to check the runtime-descriptor approach on protobuf versions other
than Debian's (e.g. protobuf 7 / grpcio 1.8x). Prints "N passed, M failed".

Usage: python3 clients/python/tests/test_portable.py
"""

import os
import sys
import unittest
from concurrent import futures

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpc  # noqa: E402
import google.protobuf  # noqa: E402

import sparsekv_client as sk  # noqa: E402
from sparsekv_client._proto import pb  # noqa: E402


def _ser(m):
    return m.SerializeToString()


class Fake:
    """Echo server: Decode returns q * 2; AppendKV counts tokens; ReadKV returns zeros."""

    def __init__(self):
        self.tokens = 0

    def create(self, req, ctx):
        if req.session_id == "dup":
            ctx.abort(grpc.StatusCode.ALREADY_EXISTS, "session \"dup\" exists")
        return pb.Session(id=req.session_id or "gen-1", layout=req.layout, policy=req.policy)

    def decode_one(self, req):
        r = pb.DecodeResponse(request_id=req.request_id)
        for it in req.items:
            q = sk.from_tensor(it.q).astype(np.float32)
            res = r.results.add(tokens_attended=1)
            res.out.CopyFrom(sk.to_tensor(q * 2))
        return r

    def decode(self, req, ctx):
        return self.decode_one(req)

    def stream(self, it, ctx):
        for req in it:
            if any(x.session_id == "bad" for x in req.items):
                yield pb.DecodeResponse(request_id=req.request_id, error_code=5,
                                        error_message="session \"bad\" not found")
            else:
                yield self.decode_one(req)

    def append(self, it, ctx):
        n = 0
        for m in it:
            n += 1
            self.tokens += int(m.k.shape[0] * m.k.shape[1])
        return pb.AppendKVResponse(messages=n, tokens_appended=self.tokens)

    # ExportSession of SNAP in 3 pieces, damaged as the session id asks; ImportSession joins
    # the pieces it gets and answers with their count and size in the labels.
    SNAP = b"SKVSNAP\0\x07\x00\x00\x00" + bytes(range(256)) * 3

    def export(self, req, ctx):
        pieces = list(sk.snapshot_pieces(self.SNAP, 300))
        mode = req.session_id
        if mode == "crc":
            pieces[1].crc32c ^= 1
        elif mode == "gap":
            del pieces[1]
        elif mode == "nolast":
            del pieces[-1]
        elif mode == "afterlast":
            pieces.append(pieces[-1])
        elif mode == "version":
            pieces[2].format_version = 8
        yield from pieces

    def import_(self, it, ctx):
        pieces = list(it)
        m = pb.Session(id="imported")
        m.labels["pieces"] = ",".join("%d:%d:%d:%d:%d" % (
            p.offset, len(p.data), p.format_version, p.last, p.crc32c == sk.crc32c(p.data))
            for p in pieces)
        m.labels["bytes"] = str(len(b"".join(p.data for p in pieces)))
        return m

    def read(self, req, ctx):
        for layer in range(2):
            m = pb.ReadKVResponse(layer=layer)
            m.k.CopyFrom(sk.to_tensor(np.zeros((3, 1, 4), np.float16)))
            m.v.CopyFrom(sk.to_tensor(np.ones((3, 1, 4), np.float16)))
            yield m


class PortableTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        f = Fake()
        h = grpc.method_handlers_generic_handler("sparsekv.v1.KvCacheService", {
            "CreateSession": grpc.unary_unary_rpc_method_handler(
                f.create, pb.CreateSessionRequest.FromString, _ser),
            "Decode": grpc.unary_unary_rpc_method_handler(
                f.decode, pb.DecodeRequest.FromString, _ser),
            "DecodeStream": grpc.stream_stream_rpc_method_handler(
                f.stream, pb.DecodeRequest.FromString, _ser),
            "AppendKV": grpc.stream_unary_rpc_method_handler(
                f.append, pb.AppendKVRequest.FromString, _ser),
            "ReadKV": grpc.unary_stream_rpc_method_handler(
                f.read, pb.ReadKVRequest.FromString, _ser),
            "ExportSession": grpc.unary_stream_rpc_method_handler(
                f.export, pb.ExportSessionRequest.FromString, _ser),
            "ImportSession": grpc.stream_unary_rpc_method_handler(
                f.import_, pb.SessionChunk.FromString, _ser)})
        cls.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        cls.server.add_generic_rpc_handlers((h,))
        port = cls.server.add_insecure_port("127.0.0.1:0")
        cls.server.start()
        cls.client = sk.Client("127.0.0.1:%d" % port, timeout=5)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop(None)

    def test_unary_and_errors(self):
        s = self.client.create_session(2, 1, 2, 4,
                                       policy=sk.Policy.uniform(0.5, decode_compute="f16"))
        self.assertEqual(s.id, "gen-1")
        self.assertEqual(s.policy.k.direction, "per_token")
        self.assertEqual(s.policy.decode_compute, "f16")
        with self.assertRaises(sk.SparsekvError) as cm:
            self.client.create_session(2, 1, 2, 4, session_id="dup")
        self.assertEqual(cm.exception.code, "ALREADY_EXISTS")
        with self.assertRaises(sk.SparsekvError) as cm:
            self.client.get_session("x")  # not implemented by the fake
        self.assertEqual(cm.exception.code, "UNIMPLEMENTED")
        out, lse = self.client.decode("a", 0, np.ones((2, 4), np.float16))
        np.testing.assert_array_equal(out, 2 * np.ones((2, 4)))
        self.assertIsNone(lse)

    def test_streams(self):
        r = self.client.append_kv("a", np.zeros((2, 10, 1, 4)), np.zeros((2, 10, 1, 4)),
                                  max_message_bytes=100)
        self.assertEqual(r.messages, 10)  # 64 bytes per token of both layers
        k, v = self.client.read_kv("a")
        self.assertEqual((k.shape, k.dtype), ((2, 3, 1, 4), np.float16))
        with self.client.decode_stream() as st:
            out, _ = st.decode("a", 0, np.full((2, 4), 3.0))
            np.testing.assert_array_equal(out, 6.0)
            with self.assertRaises(sk.SparsekvError) as cm:
                st.decode("bad", 0, np.ones((2, 4)))
            self.assertEqual(cm.exception.code, "NOT_FOUND")
            self.assertEqual(st.step([sk.DecodeItem("a", 1, np.ones((2, 4)))])[0].out[0, 0], 2)

    def test_export_checks_each_piece(self):
        self.assertEqual(sk.crc32c(b"123456789"), 0xE3069283)  # the CRC-32C check value
        self.assertEqual(sk.crc32c(b"6789", sk.crc32c(b"12345")), 0xE3069283)
        self.assertEqual(self.client.export_session("good"), Fake.SNAP)
        for mode in ("crc", "gap", "nolast", "afterlast", "version"):
            with self.subTest(mode):
                with self.assertRaises(sk.SparsekvError) as cm:
                    self.client.export_session(mode)
                self.assertEqual(cm.exception.code, "DATA_LOSS")

    def test_import_splits_into_pieces(self):
        info = self.client.import_session(Fake.SNAP, piece_bytes=300)
        n = len(Fake.SNAP)
        want = ["%d:%d:7:%d:1" % (o, min(300, n - o), o + 300 >= n) for o in range(0, n, 300)]
        self.assertEqual(info.labels["pieces"].split(","), want)  # version 7 from the header
        self.assertEqual(info.labels["bytes"], str(n))
        info = self.client.import_session(b"", format_version=3)
        self.assertEqual(info.labels["pieces"], "0:0:3:1:1")  # one empty last piece
        with self.assertRaises(ValueError):
            list(sk.snapshot_pieces(Fake.SNAP, 0))


if __name__ == "__main__":
    print("protobuf %s (%s), grpcio %s, numpy %s, python %s" % (
        google.protobuf.__version__,
        __import__("google.protobuf.internal.api_implementation",
                   fromlist=["Type"]).Type(), grpc.__version__, np.__version__,
        sys.version.split()[0]))
    result = unittest.TextTestRunner(verbosity=2, stream=sys.stdout).run(
        unittest.TestLoader().loadTestsFromModule(sys.modules[__name__]))
    bad = len(result.failures) + len(result.errors) + len(result.skipped)
    print("%d passed, %d failed" % (result.testsRun - len(result.failures) - len(result.errors)
                                    - len(result.skipped), bad))
    sys.exit(1 if bad or not result.testsRun else 0)
