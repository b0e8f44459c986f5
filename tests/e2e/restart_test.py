"""Restart without loss, against the real binary: with --snapshot_dir a SIGTERM writes every
session and the next start restores them bit-identically (deleted ones stay deleted); with
--checkpoint_interval a kill -9 loses nothing checkpointed; damaged files are skipped, moved
aside and reported while the rest is served; a directory that cannot take the files is
reported, retried, and never stops the server.

Run: /usr/bin/python3 restart_test.py SERVER_BIN PROTO_DIR
"""

import base64
import os
import re
import resource
import shutil
import sys
import tempfile
import time
import unittest

import grpc
import numpy as np

import server_fixture as fx

SERVER_BIN = PROTO_DIR = None
pb2 = pb2_grpc = None
DT = fx.DT

# Ids of every allowed character, one long enough to need more than a short file name.
IDS = ["flushed", "dense-only", "a.b:c_d-" + "x" * 90]


def t(x, dtype=DT.FLOAT32):
    return fx.make_tensor(pb2, np.asarray(x, np.float32), dtype)


def file_name(session_id):
    """The server's file name of a session (core/snapshot_dir.h: base32 of the id)."""
    return "s-" + base64.b32encode(session_id.encode()).decode().lower().rstrip("=") + ".skv"


def create(stub, sid, rng, tokens, flush, dtype=DT.FLOAT16, layers=2, sparsity=0.7):
    """A session with `tokens` tokens per layer (observation queries included), optionally
    flushed, and two decode steps with new tokens behind it."""
    stub.CreateSession(pb2.CreateSessionRequest(
        session_id=sid, tenant="t1", labels={"model": "m"},
        layout=pb2.Layout(num_layers=layers, num_kv_heads=2, num_q_heads=8, head_dim=64,
                          dtype=dtype),
        policy=pb2.Policy(k=pb2.TensorPolicy(sparsity=sparsity),
                          v=pb2.TensorPolicy(sparsity=sparsity),
                          chunk_tokens=64, dense_window=16)), timeout=10)
    stub.AppendKV(iter([pb2.AppendKVRequest(
        session_id=sid, layer_begin=0, k=t(rng.standard_normal((layers, tokens, 2, 64)), dtype),
        v=t(rng.standard_normal((layers, tokens, 2, 64)), dtype),
        obs_q=t(rng.standard_normal((layers, 4, 8, 64))))]), timeout=30)
    if flush:
        stub.Flush(pb2.FlushRequest(session_id=sid), timeout=30)
    for step in range(2):
        decode(stub, sid, step % layers, rng)


def decode(stub, sid, layer, rng):
    item = pb2.DecodeItem(session_id=sid, layer=layer, want_lse=True,
                          q=t(rng.standard_normal((8, 64))),
                          new_k=t(rng.standard_normal((2, 64))),
                          new_v=t(rng.standard_normal((2, 64))))
    r = stub.Decode(pb2.DecodeRequest(items=[item]), timeout=10).results[0]
    return r.out.data + r.lse.data


def exported(stub, sid):
    return b"".join(p.data for p in stub.ExportSession(
        pb2.ExportSessionRequest(session_id=sid), timeout=30))


def read_kv(stub, sid):
    return [(m.layer, m.k.data, m.v.data) for m in stub.ReadKV(
        pb2.ReadKVRequest(session_id=sid), timeout=30)]


def ids(stub):
    return sorted(s.id for s in stub.ListSessions(pb2.ListSessionsRequest(),
                                                  timeout=10).sessions)


def wait_for(predicate, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.05)


def read_file(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


class RestartTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        global pb2, pb2_grpc
        pb2, pb2_grpc = fx.load_stubs(PROTO_DIR)

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="sparsekv-restart-")
        self.dir = os.path.join(self.root, "snaps")
        self.servers = []

    def tearDown(self):
        for s in self.servers:
            s.stop()
            s.cleanup()
        shutil.rmtree(self.root, ignore_errors=True)

    def start(self, *flags, preexec_fn=None):
        s = fx.ServerProcess(SERVER_BIN, PROTO_DIR, extra_flags=list(flags),
                             preexec_fn=preexec_fn).start()
        self.servers.append(s)
        return s

    def stop_ok(self, s):
        alive = s.alive()
        rc = s.stop()
        log = s.log_tail()
        self.assertTrue(alive, "server died:\n" + log)
        self.assertEqual(rc, 0, log)
        return log

    def fill(self, s, rng):
        create(s.stub, IDS[0], rng, tokens=150, flush=True)     # chunks + dense tail
        create(s.stub, IDS[1], rng, tokens=40, flush=False)     # below the pruning threshold
        create(s.stub, IDS[2], rng, tokens=150, flush=True, dtype=DT.BFLOAT16, layers=1)
        create(s.stub, "doomed", rng, tokens=20, flush=False)
        s.stub.DeleteSession(pb2.DeleteSessionRequest(session_id="doomed"), timeout=10)

    def test_a_sigterm_writes_and_restart_restores_bit_identically(self):
        rng = np.random.default_rng(1)
        a = self.start("--snapshot_dir=" + self.dir)
        self.fill(a, rng)
        before = {sid: exported(a.stub, sid) for sid in IDS}
        kv = {sid: read_kv(a.stub, sid) for sid in IDS}
        # A twin of every session on a server without a directory, to compare decode steps.
        twin = self.start()
        for sid in IDS:
            twin.stub.ImportSession(iter(a.stub.ExportSession(
                pb2.ExportSessionRequest(session_id=sid), timeout=30)), timeout=30)
        log = self.stop_ok(a)
        self.assertRegex(log, r"shutdown to .*: wrote 3 sessions .* 0 failed")
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(file_name(sid) for sid in IDS))

        b = self.start("--snapshot_dir=" + self.dir)
        self.assertRegex(b.log_tail(), r"restored 3 sessions \(\d+ bytes\), skipped 0")
        self.assertEqual(ids(b.stub), sorted(IDS))  # "doomed" stays deleted
        for sid in IDS:
            self.assertEqual(exported(b.stub, sid), before[sid], sid)
            self.assertEqual(read_kv(b.stub, sid), kv[sid], sid)
        self.assertGreater(b.stub.GetSession(pb2.GetSessionRequest(session_id=IDS[0]),
                                             timeout=10).stats.chunks, 0)
        for step in range(12):  # new tokens: both go on the same way, pruning included
            sid = IDS[step % 3]
            seed = np.random.default_rng(100 + step)
            layer = step % 2 if sid != IDS[2] else 0
            self.assertEqual(decode(b.stub, sid, layer, seed),
                             decode(twin.stub, sid, layer, np.random.default_rng(100 + step)),
                             "step %d" % step)
        self.assertEqual(fx.scrape(b, "sparsekv_snapshot_restores_total", result="ok"), 3)
        self.assertEqual(fx.scrape(b, "sparsekv_snapshot_restores_total", result="skipped"), 0)
        self.stop_ok(b)

    def test_b_checkpoints_survive_kill_9(self):
        rng = np.random.default_rng(2)
        a = self.start("--snapshot_dir=" + self.dir, "--checkpoint_interval=200ms")
        self.fill(a, rng)
        want = {sid: exported(a.stub, sid) for sid in IDS}
        kv = {sid: read_kv(a.stub, sid) for sid in IDS}
        # Each file is the session's snapshot as ExportSession streams it.
        wait_for(lambda: all(read_file(os.path.join(self.dir, file_name(sid))) == want[sid]
                             for sid in IDS), "checkpoints of every session")
        time.sleep(0.5)  # more than an interval: the pass that wrote them has ended
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(file_name(sid) for sid in IDS))
        ok = fx.scrape(a, "sparsekv_snapshot_writes_total", result="ok")
        self.assertGreaterEqual(ok, 3)
        self.assertEqual(fx.scrape(a, "sparsekv_snapshot_writes_total", result="error"), 0)
        self.assertIsNotNone(fx.scrape(a, "sparsekv_snapshot_last_write_seconds"))
        time.sleep(0.5)  # unchanged sessions are not rewritten
        self.assertEqual(fx.scrape(a, "sparsekv_snapshot_writes_total", result="ok"), ok)
        a.proc.kill()
        a.proc.wait()
        self.assertEqual(a.proc.returncode, -9)

        b = self.start("--snapshot_dir=" + self.dir)
        self.assertRegex(b.log_tail(), r"restored 3 sessions \(\d+ bytes\), skipped 0")
        self.assertEqual(ids(b.stub), sorted(IDS))
        for sid in IDS:
            self.assertEqual(exported(b.stub, sid), want[sid], sid)
            self.assertEqual(read_kv(b.stub, sid), kv[sid], sid)
        # A deletion reaches the directory at the next checkpoint too.
        c_dir_flags = ("--snapshot_dir=" + self.dir, "--checkpoint_interval=200ms")
        self.stop_ok(b)
        c = self.start(*c_dir_flags)
        c.stub.DeleteSession(pb2.DeleteSessionRequest(session_id=IDS[1]), timeout=10)
        wait_for(lambda: not os.path.exists(os.path.join(self.dir, file_name(IDS[1]))),
                 "the deleted session's file to go")
        self.stop_ok(c)

    def test_c_damaged_files_are_skipped_and_the_rest_served(self):
        rng = np.random.default_rng(3)
        a = self.start("--snapshot_dir=" + self.dir)
        self.fill(a, rng)
        kv = read_kv(a.stub, IDS[0])
        self.stop_ok(a)
        flipped = os.path.join(self.dir, file_name(IDS[1]))
        data = bytearray(read_file(flipped))
        data[len(data) // 2] ^= 0x01
        with open(flipped, "wb") as f:
            f.write(bytes(data))
        cut = os.path.join(self.dir, file_name(IDS[2]))
        with open(cut, "r+b") as f:
            f.truncate(len(read_file(cut)) * 2 // 3)

        b = self.start("--snapshot_dir=" + self.dir)
        log = b.log_tail()
        self.assertRegex(log, r"restored 1 sessions \(\d+ bytes\), skipped 2")
        for path in (flipped, cut):
            name = os.path.basename(path)
            self.assertRegex(log, re.escape(name) + r": DATA_LOSS: snapshot is damaged: .*"
                             r"moved to " + re.escape(name) + r"\.bad")
            self.assertFalse(os.path.exists(path))
            self.assertTrue(os.path.exists(path + ".bad"))
        self.assertEqual(ids(b.stub), [IDS[0]])
        self.assertEqual(read_kv(b.stub, IDS[0]), kv)
        self.assertEqual(fx.scrape(b, "sparsekv_snapshot_restores_total", result="skipped"), 2)
        self.assertEqual(fx.scrape(b, "sparsekv_snapshot_restores_total", result="ok"), 1)
        create(b.stub, "new", rng, tokens=20, flush=False)  # serving as usual
        self.stop_ok(b)
        # The moved-aside files stay for an operator; the next start does not retry them.
        self.assertTrue(os.path.exists(flipped + ".bad") and os.path.exists(cut + ".bad"))
        c = self.start("--snapshot_dir=" + self.dir)
        self.assertRegex(c.log_tail(), r"restored 2 sessions \(\d+ bytes\), skipped 0")
        self.stop_ok(c)

    def test_d_unusable_directory_is_reported_and_never_fatal(self):
        rng = np.random.default_rng(4)
        # A directory whose parent is a regular file: unusable even for root.
        blocker = os.path.join(self.root, "file")
        with open(blocker, "w") as f:
            f.write("x")
        a = self.start("--snapshot_dir=" + os.path.join(blocker, "snaps"))
        self.assertRegex(a.log_tail(), r"nothing restored: .*Not a directory")
        create(a.stub, "s1", rng, tokens=20, flush=False)
        log = self.stop_ok(a)
        self.assertRegex(log, r"shutdown to .*: wrote 0 sessions .* 2 failed .*Not a directory")

        # A file size limit (as a full disk would): the large session's writes fail and are
        # retried at every checkpoint, the small one's succeed, no partial file is left.
        def limit_file_size():
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))
        b = self.start("--snapshot_dir=" + self.dir, "--checkpoint_interval=200ms",
                       preexec_fn=limit_file_size)
        create(b.stub, "small", rng, tokens=20, flush=False, layers=1)
        create(b.stub, "large", rng, tokens=300, flush=False, sparsity=0.0)
        wait_for(lambda: (fx.scrape(b, "sparsekv_snapshot_writes_total", result="error")
                          or 0) >= 3, "three failed checkpoint writes")
        self.assertTrue(b.alive())
        self.assert_only_small_written(b)
        self.assertEqual(read_file(os.path.join(self.dir, file_name("small"))),
                         exported(b.stub, "small"))
        self.assertGreaterEqual(fx.scrape(b, "sparsekv_snapshot_writes_total", result="ok"), 1)
        self.assertEqual(ids(b.stub), ["large", "small"])  # still serving
        log = self.stop_ok(b)
        self.assertRegex(log, r"checkpoint to .*RESOURCE_EXHAUSTED: cannot write .*"
                              r"File too large")
        self.assertRegex(log, r"shutdown to .*: wrote 0 sessions .* 1 failed")
        self.assertLessEqual(set(os.listdir(self.dir)), {file_name("small"), file_name("large")})

    def assert_only_small_written(self, server):
        """The small session's file holds it; no temporary file is left; the large session
        was never written with its tokens (a checkpoint may have caught it between its
        CreateSession and its AppendKV, still empty and small enough to fit)."""
        names = set(os.listdir(self.dir))
        self.assertIn(file_name("small"), names)
        self.assertLessEqual(names, {file_name("small"), file_name("large")})
        if file_name("large") in names:
            self.assertNotEqual(read_file(os.path.join(self.dir, file_name("large"))),
                                exported(server.stub, "large"))


if __name__ == "__main__":
    sys.exit(fx.main(sys.modules[__name__]))
