"""Regression tests for issue #11's findings, each driven against the real server binary as a
hostile or careless client would: raw bytes that do not parse, mismatched dtypes, streams that
fail midway, cancelled uploads, huge ids, reads past the end, small message limits, slow
clients on the metrics port, and deadlines or SIGTERM during heavy work.

Run: /usr/bin/python3 hostile_test.py SERVER_BIN PROTO_DIR
"""

import re
import socket
import sys
import threading
import time
import unittest
import urllib.request

import grpc
import numpy as np

import server_fixture as fx

SERVER_BIN = PROTO_DIR = None
pb2 = pb2_grpc = None
DT = fx.DT
SERVICE = "/sparsekv.v1.KvCacheService/"
GARBAGE = b"\xff\xff\xff\xff\x0f"  # field 0x1fffffff... with a truncated varint: never parses


def t(x, dtype=DT.FLOAT32):
    return fx.make_tensor(pb2, np.asarray(x, np.float32), dtype)


def raw(channel, kind, method):
    """A callable sending raw request bytes and returning raw response bytes."""
    make = {"uu": channel.unary_unary, "su": channel.stream_unary,
            "us": channel.unary_stream, "ss": channel.stream_stream}[kind]
    return make(SERVICE + method, request_serializer=None, response_deserializer=None)




def scraped(server, name, **labels):
    return fx.scrape(server, name, **labels) or 0.0


class Base(unittest.TestCase):
    FLAGS = []

    @classmethod
    def setUpClass(cls):
        global pb2, pb2_grpc
        pb2, pb2_grpc = fx.load_stubs(PROTO_DIR)
        cls.server = fx.ServerProcess(SERVER_BIN, PROTO_DIR, extra_flags=cls.FLAGS).start()
        cls.stub = cls.server.stub

    @classmethod
    def tearDownClass(cls):
        alive = cls.server.alive()
        rc = cls.server.stop()
        if not alive or rc != 0:
            print("server log:\n" + cls.server.log_tail())
        cls.server.cleanup()
        assert alive, "the server died"
        assert rc == 0, "the server exited with %s" % rc

    def expect(self, fn, code, pattern):
        with self.assertRaises(grpc.RpcError) as cm:
            fn()
        self.assertEqual(cm.exception.code(), code, cm.exception.details())
        self.assertRegex(cm.exception.details() or "", pattern)
        return cm.exception

    def create(self, sid, layers=1, kv=2, hq=4, d=16, dtype=DT.FLOAT16, **policy):
        self.stub.CreateSession(pb2.CreateSessionRequest(
            session_id=sid, layout=pb2.Layout(num_layers=layers, num_kv_heads=kv,
                                              num_q_heads=hq, head_dim=d, dtype=dtype),
            policy=pb2.Policy(**policy)), timeout=10)

    def append_msg(self, sid, tokens, seed, layers=1, kv=2, d=16, obs=0, hq=4,
                   dtype=DT.FLOAT32, layer_begin=0):
        rng = np.random.default_rng(seed)
        k = rng.standard_normal((layers, tokens, kv, d))
        v = rng.standard_normal((layers, tokens, kv, d))
        r = pb2.AppendKVRequest(session_id=sid, k=t(k, dtype), v=t(v, dtype),
                                layer_begin=layer_begin)
        if obs:
            r.obs_q.CopyFrom(t(rng.standard_normal((layers, obs, hq, d)), dtype))
        return r

    def tokens(self, sid):
        return list(self.stub.GetSession(pb2.GetSessionRequest(session_id=sid),
                                         timeout=10).stats.tokens_per_layer)


class WireTest(Base):
    """Bytes that do not parse, and streams that fail midway."""

    def test_unary_garbage_is_invalid_argument_naming_the_type(self):
        for method, typ in [("CreateSession", "CreateSessionRequest"),
                            ("GetSession", "GetSessionRequest"),
                            ("ListSessions", "ListSessionsRequest"),
                            ("DeleteSession", "DeleteSessionRequest"),
                            ("Decode", "DecodeRequest"), ("Flush", "FlushRequest"),
                            ("GetServerInfo", "GetServerInfoRequest")]:
            call = raw(self.server.channel, "uu", method)
            self.expect(lambda: call(GARBAGE, timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
                        r"does not parse as sparsekv\.v1\.%s" % typ)
        call = raw(self.server.channel, "us", "ReadKV")
        self.expect(lambda: list(call(GARBAGE, timeout=10)), grpc.StatusCode.INVALID_ARGUMENT,
                    r"does not parse as sparsekv\.v1\.ReadKVRequest")

    def test_append_stream_with_a_bad_message_fails_naming_it(self):
        self.create("w-append")
        before = scraped(self.server, "sparsekv_rpc_requests_total", method="AppendKV",
                        code="INVALID_ARGUMENT")
        good1 = self.append_msg("w-append", 5, seed=1).SerializeToString()
        good2 = self.append_msg("w-append", 7, seed=2).SerializeToString()
        call = raw(self.server.channel, "su", "AppendKV")
        self.expect(lambda: call(iter([good1, GARBAGE, good2]), timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    r"message 2 of the stream.*does not parse.*1 earlier messages applied, 5")
        self.assertEqual(self.tokens("w-append"), [5])
        # The call is counted when the server is done with it, which may be just after the
        # client has its status.
        after = before
        for _ in range(50):
            after = scraped(self.server, "sparsekv_rpc_requests_total", method="AppendKV",
                           code="INVALID_ARGUMENT")
            if after > before:
                break
            time.sleep(0.1)
        self.assertEqual(after - before, 1)

    def test_decode_stream_with_a_bad_message_ends_with_its_status(self):
        self.create("w-stream")
        self.stub.AppendKV(iter([self.append_msg("w-stream", 3, seed=3)]), timeout=10)
        q = t(np.ones((4, 16)))
        good = pb2.DecodeRequest(request_id=7, items=[pb2.DecodeItem(
            session_id="w-stream", layer=0, q=q)]).SerializeToString()
        call = raw(self.server.channel, "ss", "DecodeStream")
        answers = []
        with self.assertRaises(grpc.RpcError) as cm:
            for resp in call(iter([good, GARBAGE, good]), timeout=10):
                answers.append(pb2.DecodeResponse.FromString(resp))
        self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertRegex(cm.exception.details(), r"message 2 of the stream.*1 earlier requests")
        self.assertEqual([a.request_id for a in answers], [7])

    def test_cancelled_upload_is_counted_as_cancelled(self):
        self.create("w-cancel")
        before = scraped(self.server, "sparsekv_rpc_requests_total", method="AppendKV",
                        code="CANCELLED")
        ok_before = scraped(self.server, "sparsekv_rpc_requests_total", method="AppendKV",
                           code="OK")
        gate = threading.Event()

        def messages():
            yield self.append_msg("w-cancel", 4, seed=4)
            gate.wait(10)  # the client cancels while the stream is open

        future = self.stub.AppendKV.future(messages(), timeout=10)
        time.sleep(0.5)
        future.cancel()
        gate.set()
        deadline = time.time() + 5
        while time.time() < deadline:
            got = scraped(self.server, "sparsekv_rpc_requests_total", method="AppendKV",
                         code="CANCELLED")
            if got > before:
                break
            time.sleep(0.1)
        self.assertEqual(got - before, 1)
        self.assertEqual(scraped(self.server, "sparsekv_rpc_requests_total", method="AppendKV",
                                code="OK"), ok_before)

    def test_decode_with_float32_k_and_float16_v_is_rejected(self):
        self.create("w-dtype", kv=64, hq=64, d=64)
        nk = np.ones((64, 64))
        item = pb2.DecodeItem(session_id="w-dtype", layer=0, q=t(np.ones((64, 64))),
                              new_k=t(nk, DT.FLOAT32), new_v=t(nk, DT.FLOAT16))
        self.expect(lambda: self.stub.Decode(pb2.DecodeRequest(items=[item]), timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT, r"new_k is float32 but new_v is float16")
        self.assertEqual(self.tokens("w-dtype"), [0])

    def test_a_huge_id_is_rejected_without_being_echoed(self):
        big = "x" * 100000
        for fn in [lambda: self.stub.GetSession(pb2.GetSessionRequest(session_id=big), timeout=10),
                   lambda: self.stub.DeleteSession(pb2.DeleteSessionRequest(session_id=big),
                                                   timeout=10),
                   lambda: self.create(big)]:
            e = self.expect(fn, grpc.StatusCode.INVALID_ARGUMENT, r"session_id must be 1\.\.128")
            self.assertLess(len(e.details()), 300)

    def test_non_finite_values_are_rejected_naming_tensor_and_index(self):
        self.create("w-nan")
        r = self.append_msg("w-nan", 4, seed=5)
        k = np.ones((1, 4, 2, 16), np.float32)
        k[0, 1, 0, 3] = np.nan
        r.k.CopyFrom(t(k))
        self.expect(lambda: self.stub.AppendKV(iter([r]), timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT, r"k\[flat index 35\] is nan")
        k[0, 1, 0, 3] = 1e6  # finite, but Inf once stored as fp16
        r.k.CopyFrom(t(k))
        self.expect(lambda: self.stub.AppendKV(iter([r]), timeout=10),
                    grpc.StatusCode.INVALID_ARGUMENT, r"overflows the session's float16")
        q = np.ones((4, 16), np.float32)
        q[2, 2] = np.inf
        self.expect(lambda: self.stub.Decode(pb2.DecodeRequest(items=[pb2.DecodeItem(
            session_id="w-nan", layer=0, q=t(q))]), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT, r"q\[flat index 34\] is inf")
        self.assertEqual(self.tokens("w-nan"), [0])

    def test_reading_past_the_end_is_out_of_range(self):
        self.create("w-read", layers=2)
        self.stub.AppendKV(iter([self.append_msg("w-read", 10, seed=6, layers=2)]), timeout=10)
        for begin, count in [(11, 0), (5, 6), (0, 11)]:
            self.expect(lambda: list(self.stub.ReadKV(pb2.ReadKVRequest(
                session_id="w-read", token_begin=begin, token_count=count), timeout=10)),
                grpc.StatusCode.OUT_OF_RANGE, r"outside layer 0's 10 tokens")
        got = list(self.stub.ReadKV(pb2.ReadKVRequest(session_id="w-read", token_begin=10),
                                    timeout=10))
        self.assertEqual(got, [])  # at the end: nothing to read, not an error
        got = list(self.stub.ReadKV(pb2.ReadKVRequest(session_id="w-read", token_begin=4,
                                                      token_count=6), timeout=10))
        self.assertEqual([(m.layer, m.token_begin, m.k.shape[0]) for m in got],
                         [(0, 4, 6), (1, 4, 6)])


class SmallMessagesTest(Base):
    """--max_message_bytes under ReadKV's 2 MiB chunk, and ListSessions pages under it."""

    FLAGS = ["--max_message_bytes=262144"]

    def test_readkv_messages_fit_the_limit(self):
        self.create("s-read", kv=8, hq=8, d=128)  # 4 KiB of K+V per token
        rng = np.random.default_rng(7)
        for _ in range(4):  # 4 x 48 tokens x 4 KiB (fp16 on the wire: 192 KiB per message)
            self.stub.AppendKV(iter([pb2.AppendKVRequest(
                session_id="s-read", k=t(rng.standard_normal((1, 48, 8, 128)), DT.FLOAT16),
                v=t(rng.standard_normal((1, 48, 8, 128)), DT.FLOAT16))]), timeout=10)
        msgs = list(self.stub.ReadKV(pb2.ReadKVRequest(session_id="s-read"), timeout=10))
        self.assertGreater(len(msgs), 1)
        self.assertEqual(sum(m.k.shape[0] for m in msgs), 192)
        for m in msgs:
            self.assertLessEqual(m.ByteSize(), 262144)

    def test_list_pages_fit_the_limit(self):
        for i in range(12):
            self.stub.CreateSession(pb2.CreateSessionRequest(
                session_id="s-list-%02d" % i, labels={"l%d" % j: "v" * 256 for j in range(32)},
                layout=pb2.Layout(num_layers=1, num_kv_heads=1, num_q_heads=1, head_dim=8)),
                timeout=10)
        seen, token = [], ""
        for _ in range(20):
            page = self.stub.ListSessions(pb2.ListSessionsRequest(page_size=1000,
                                                                  page_token=token), timeout=10)
            self.assertLessEqual(page.ByteSize(), 262144)
            seen += [s.id for s in page.sessions]
            token = page.next_page_token
            if not token:
                break
        self.assertEqual(sorted(x for x in seen if x.startswith("s-list-")),
                         ["s-list-%02d" % i for i in range(12)])


class SlowWorkTest(Base):
    """Deadlines during heavy observation queries, and slow clients on the metrics port."""

    FLAGS = ["--max_obs_tokens=100000", "--decode_threads=0"]

    def heavy(self, sid):
        # 2 layers x 8000 observation queries, each over 8192 tokens x 8 heads x 128: about
        # 10 s of one core in a release build, far more under sanitizers (messages in fp16 to
        # stay under the 64 MiB message limit)
        self.create(sid, layers=2, kv=8, hq=8, d=128)
        for layer in range(2):
            self.stub.AppendKV(iter([self.append_msg(sid, 8192, seed=8 + layer, kv=8, d=128,
                                                     dtype=DT.FLOAT16, layer_begin=layer)]),
                               timeout=60)
        return self.append_msg(sid, 8, seed=10, layers=2, kv=8, d=128, obs=8000, hq=8,
                               dtype=DT.FLOAT16)

    def test_deadline_during_observation_queries_applies_nothing(self):
        msg = self.heavy("slow-deadline")
        t0 = time.time()
        self.expect(lambda: self.stub.AppendKV(iter([msg]), timeout=1.0),
                    grpc.StatusCode.DEADLINE_EXCEEDED, r".")
        time.sleep(1.5)  # the server notices at the next query and drops the message
        self.assertEqual(self.tokens("slow-deadline"), [8192] * 2)
        self.assertLess(time.time() - t0, 10)

    def test_half_requests_on_the_metrics_port_do_not_block_scrapes(self):
        socks = []
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", self.server.metrics_port))
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
            socks.append(s)
        try:
            t0 = time.time()
            body = urllib.request.urlopen(self.server.metrics_url(), timeout=10).read()
            self.assertIn(b"sparsekv_sessions", body)
            self.assertLess(time.time() - t0, 3.0)
        finally:
            for s in socks:
                s.close()


class ShutdownTest(unittest.TestCase):
    def test_sigterm_during_heavy_work_exits_within_the_grace(self):
        global pb2, pb2_grpc
        pb2, pb2_grpc = fx.load_stubs(PROTO_DIR)
        server = fx.ServerProcess(SERVER_BIN, PROTO_DIR, extra_flags=[
            "--max_obs_tokens=100000", "--decode_threads=0", "--shutdown_grace=1s"]).start()
        try:
            helper = SlowWorkTest("heavy")
            helper.stub = server.stub
            msg = helper.heavy("shut-heavy")
            errors = []

            def upload():
                try:
                    server.stub.AppendKV(iter([msg]), timeout=60)
                except grpc.RpcError as e:
                    errors.append(e.code())

            th = threading.Thread(target=upload)
            th.start()
            time.sleep(0.5)
            t0 = time.time()
            server.proc.send_signal(2)  # SIGINT: the same path as SIGTERM
            rc = server.proc.wait(timeout=15)
            took = time.time() - t0
            th.join(10)
            self.assertEqual(rc, 0)
            # grace 1 s, then running calls are cancelled and stop at their next check (one
            # observation query), plus 2-3 s for the metrics HTTP server to stop; the
            # uncancelled work alone would take 10 s or more
            self.assertLess(took, 8.0, "shutdown took %.1f s" % took)
            self.assertEqual(len(errors), 1)
        finally:
            server.stop()
            server.cleanup()


if __name__ == "__main__":
    sys.exit(fx.main(sys.modules[__name__]))
