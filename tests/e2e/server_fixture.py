"""Shared helpers for the sparsekv end-to-end tests.

Everything here is written from the public contract only (proto/sparsekv/v1/kv_cache.proto):
stubs are generated from the .proto at test time with grpc_tools, the server is started as a
separate process, and the numerical reference is plain float64 numpy.

Run with Debian's interpreter (/usr/bin/python3), which sees python3-grpcio,
python3-grpc-tools and python3-numpy.
"""

import importlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np

_STUBS = None


def load_stubs(proto_dir):
    """Generates Python stubs for sparsekv/v1/kv_cache.proto into a temp dir and imports them.

    Returns (pb2, pb2_grpc)."""
    global _STUBS
    if _STUBS is not None:
        return _STUBS
    proto_dir = os.path.abspath(proto_dir)
    out = tempfile.mkdtemp(prefix="sparsekv-e2e-stubs-")
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", proto_dir,
           "--python_out=" + out, "--grpc_python_out=" + out, "sparsekv/v1/kv_cache.proto"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("protoc failed (%d): %s %s" % (r.returncode, r.stdout, r.stderr))
    sys.path.insert(0, out)  # sparsekv/ and sparsekv/v1/ import as namespace packages
    pb2 = importlib.import_module("sparsekv.v1.kv_cache_pb2")
    pb2_grpc = importlib.import_module("sparsekv.v1.kv_cache_pb2_grpc")
    _STUBS = (pb2, pb2_grpc)
    return _STUBS


class ServerProcess:
    """Starts sparsekv-server on ephemeral ports and waits for its ready file.

    Usage: with ServerProcess(bin, extra_flags=[...]) as s: s.stub.CreateSession(...)
    `preexec_fn` runs in the child before exec (e.g. to set resource limits). `listen`: the
    gRPC address, None = no --listen flag (the server's default)."""

    READY_TIMEOUT_S = 15.0

    def __init__(self, binary, proto_dir=None, extra_flags=(), preexec_fn=None,
                 listen="127.0.0.1:0"):
        self.binary = binary
        self.listen = listen
        self.preexec_fn = preexec_fn
        self.proto_dir = proto_dir
        self.extra_flags = list(extra_flags)
        self.proc = None
        self.tmp = None
        self.grpc_port = None
        self.metrics_port = None
        self.channel = None
        self.stub = None
        self.log_path = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self):
        if not self.binary or not os.path.isfile(self.binary):
            raise RuntimeError("server binary not found: %r" % (self.binary,))
        if not os.access(self.binary, os.X_OK):
            raise RuntimeError("server binary not executable: %r" % (self.binary,))
        self.tmp = tempfile.mkdtemp(prefix="sparsekv-e2e-")
        ready = os.path.join(self.tmp, "ready")
        self.log_path = os.path.join(self.tmp, "server.log")
        listen = [] if self.listen is None else ["--listen=" + self.listen]
        args = [self.binary] + listen + ["--metrics_listen=127.0.0.1:0",
                                         "--ready_file=" + ready] + self.extra_flags
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=self.preexec_fn)
        deadline = time.monotonic() + self.READY_TIMEOUT_S
        while True:
            ports = self._read_ready(ready)
            if ports is not None:
                self.grpc_port, self.metrics_port = ports
                break
            if self.proc.poll() is not None:
                raise RuntimeError("server exited with %s before becoming ready; log:\n%s"
                                   % (self.proc.returncode, self.log_tail()))
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server not ready within %.0f s (no complete %s); log:\n%s"
                                   % (self.READY_TIMEOUT_S, ready, self.log_tail()))
            time.sleep(0.05)
        if self.proto_dir:
            import grpc
            pb2, pb2_grpc = load_stubs(self.proto_dir)
            self.channel = grpc.insecure_channel(
                "127.0.0.1:%d" % self.grpc_port,
                options=[("grpc.max_send_message_length", -1),
                         ("grpc.max_receive_message_length", -1)])
            grpc.channel_ready_future(self.channel).result(timeout=10)
            self.stub = pb2_grpc.KvCacheServiceStub(self.channel)
        return self

    @staticmethod
    def _read_ready(path):
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            return None
        kv = {}
        for line in text.splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                kv[k.strip()] = v.strip()
        try:
            g, m = int(kv["grpc_port"]), int(kv["metrics_port"])
        except (KeyError, ValueError):
            return None  # not written completely yet
        if g <= 0 or m <= 0:
            return None
        return g, m

    def stop(self):
        """SIGTERM, wait up to 10 s, then SIGKILL. Returns the exit code."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    sys.stderr.write("server did not exit 10 s after SIGTERM; killing\n")
                    self.proc.kill()
                    self.proc.wait()
            rc = self.proc.returncode
            self.proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        return rc

    def cleanup(self):
        if self.tmp and os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n=4000):
        try:
            with open(self.log_path, "rb") as f:
                data = f.read()
            return data[-n:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def metrics_url(self):
        return "http://127.0.0.1:%d/metrics" % self.metrics_port

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        self.cleanup()
        return False


# -- process and metrics probes -----------------------------------------------------------

def rss_bytes(pid, field="VmRSS"):
    """A /proc/PID/status memory field (VmRSS, VmHWM) in bytes; None if unreadable."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def binary_is_asan(path):
    """True when the binary links AddressSanitizer (its RSS says nothing about the server)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    return b"__asan_init" in data or b"AddressSanitizer" in data


def scrape(server, name, **labels):
    """The sum of the series of metric `name` whose labels include `labels`, from the
    server's /metrics; None when there is no such series or the scrape fails."""
    import urllib.request
    try:
        text = urllib.request.urlopen(server.metrics_url(), timeout=10).read().decode()
    except OSError:
        return None
    total = None
    for line in text.splitlines():
        if not (line.startswith(name + " ") or line.startswith(name + "{")):
            continue
        if all('%s="%s"' % (k, v) in line for k, v in labels.items()):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


# -- dtype helpers ------------------------------------------------------------------------

def bf16_round(x):
    """Rounds float32 values to bfloat16 (round to nearest even on the upper 16 bits).

    Returns float32 values exactly representable in bfloat16. (No NaN in test data.)"""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    bits = x.view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32).reshape(x.shape)


def bf16_bits(x):
    """float32 values (already bf16-exact or not) -> little-endian bf16 uint16 bits (RNE)."""
    return (bf16_round(x).view(np.uint32) >> 16).astype("<u2")


class DT:
    """Numbers of the DType enum (kept independent of the stubs for reference code)."""
    UNSPECIFIED = 0
    FLOAT32 = 1
    FLOAT16 = 2
    BFLOAT16 = 3


DTYPE_NAME = {DT.FLOAT32: "float32", DT.FLOAT16: "float16", DT.BFLOAT16: "bfloat16"}
DTYPE_SIZE = {DT.FLOAT32: 4, DT.FLOAT16: 2, DT.BFLOAT16: 2}


def round_to(x, dtype):
    """Rounds values to what `dtype` can hold; returns float64."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == DT.FLOAT32:
        r = x
    elif dtype == DT.FLOAT16:
        r = x.astype(np.float16).astype(np.float32)  # numpy: round to nearest even
    elif dtype == DT.BFLOAT16:
        r = bf16_round(x)
    else:
        raise ValueError(dtype)
    return r.astype(np.float64)


def encode(x, dtype):
    """Encodes values as little-endian bytes of dtype (rounding to nearest even)."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == DT.FLOAT32:
        return np.ascontiguousarray(x.astype("<f4")).tobytes()
    if dtype == DT.FLOAT16:
        return np.ascontiguousarray(x.astype("<f2")).tobytes()
    if dtype == DT.BFLOAT16:
        return np.ascontiguousarray(bf16_bits(x)).tobytes()
    raise ValueError(dtype)


def make_tensor(pb2, x, dtype=DT.FLOAT32, shape=None):
    x = np.asarray(x)
    t = pb2.Tensor(dtype=dtype, data=encode(x, dtype))
    t.shape.extend(list(x.shape) if shape is None else list(shape))
    return t


def decode_tensor(t):
    """Tensor proto -> float64 numpy array of its shape. Checks the byte length."""
    shape = tuple(int(s) for s in t.shape)
    n = int(np.prod(shape)) if shape else 1
    if t.dtype == DT.FLOAT32:
        a = np.frombuffer(t.data, dtype="<f4")
    elif t.dtype == DT.FLOAT16:
        a = np.frombuffer(t.data, dtype="<f2")
    elif t.dtype == DT.BFLOAT16:
        a = (np.frombuffer(t.data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise AssertionError("tensor with dtype %d" % t.dtype)
    if a.size != n:
        raise AssertionError("tensor data holds %d elements, shape %s needs %d"
                             % (a.size, shape, n))
    return a.astype(np.float64).reshape(shape)


# -- float64 reference ---------------------------------------------------------------------

def reference_attention(q, k, v, scale=None):
    """float64 softmax(scale * q.K^T).V with grouped-query head mapping.

    q: [Hq, D]; k, v: [T, Hkv, D]. Returns (out [Hq, D], lse [Hq])."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    hq, d = q.shape
    t, hkv, d2 = k.shape
    assert d == d2 and v.shape == k.shape and hq % hkv == 0 and t > 0
    if scale is None:
        scale = 1.0 / np.sqrt(d)
    group = hq // hkv
    out = np.zeros((hq, d))
    lse = np.zeros(hq)
    for h in range(hq):
        g = h // group
        s = scale * (k[:, g, :] @ q[h])
        m = s.max()
        p = np.exp(s - m)
        z = p.sum()
        out[h] = (p / z) @ v[:, g, :]
        lse[h] = m + np.log(z)
    return out, lse


# -- unittest runner that never counts a skip as a pass -------------------------------------

def main(module):
    """Entry point of a test script run as `script SERVER_BIN PROTO_DIR`: sets the module's
    SERVER_BIN and PROTO_DIR and runs its tests. Returns the exit status."""
    if len(sys.argv) < 3:
        print("usage: %s SERVER_BIN PROTO_DIR" % sys.argv[0])
        print("0 passed, 1 failed")
        return 2
    module.SERVER_BIN, module.PROTO_DIR = sys.argv[1], sys.argv[2]
    if not os.path.isfile(module.SERVER_BIN):
        print("FAIL: server binary %s does not exist" % module.SERVER_BIN)
        print("0 passed, 1 failed")
        return 1
    return run_tests(module.__name__)


def run_tests(module_name, argv_rest=()):
    """Runs the tests of `module_name`; prints 'N passed, M failed'; returns the exit code."""
    loader = unittest.TestLoader()
    suite = loader.loadTestsFromModule(sys.modules[module_name])
    runner = unittest.TextTestRunner(verbosity=2, stream=sys.stdout)
    result = runner.run(suite)
    # setUpModule/setUpClass errors are reported as errors of a placeholder "test" that is not
    # in testsRun; the tests they kept from running are not counted at all.
    problems = result.failures + result.errors
    in_tests = [t for t, _ in problems if isinstance(t, unittest.TestCase)]
    failed = len(problems) + len(result.skipped) + len(result.unexpectedSuccesses)
    passed = (result.testsRun - len(in_tests) - len(result.skipped)
              - len(result.unexpectedSuccesses) - len(result.expectedFailures))
    if result.skipped:
        print("note: %d skipped test(s) are counted as failures" % len(result.skipped))
    if result.testsRun == 0:
        print("no tests ran")
        failed = max(failed, 1)
    print("%d passed, %d failed" % (passed, failed))
    sys.stdout.flush()
    return 0 if failed == 0 else 1
