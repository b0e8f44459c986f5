"""LocalServer: runs a sparsekv-server binary on free ports for tests and examples.

    with LocalServer("build/bin/sparsekv-server", flags=["--decode_threads=1"]) as srv:
        client = Client(srv.target)
    with server_target(args.server, args.server_bin) as target:   # --server or --server-bin
        client = Client(target)

The server is started with --listen=127.0.0.1:0 --metrics_listen=127.0.0.1:0 and a
--ready_file, which it writes once serving (grpc_port=N, metrics_port=M).
"""

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time


class LocalServer:
    def __init__(self, binary, flags=(), ready_timeout=15.0, metrics=True):
        self.binary = binary
        self.flags = list(flags)
        self.ready_timeout = ready_timeout
        self.metrics = metrics
        self.proc = None
        self.tmp = None
        self.grpc_port = None
        self.metrics_port = None
        self._log = None

    @property
    def target(self):
        return "127.0.0.1:%d" % self.grpc_port

    @property
    def log_path(self):
        return os.path.join(self.tmp, "server.log")

    def start(self):
        if not self.binary or not os.access(self.binary, os.X_OK):
            raise RuntimeError("server binary not found or not executable: %r" % (self.binary,))
        self.tmp = tempfile.mkdtemp(prefix="sparsekv-py-")
        ready = os.path.join(self.tmp, "ready")
        args = [self.binary, "--listen=127.0.0.1:0",
                "--metrics_listen=" + ("127.0.0.1:0" if self.metrics else ""),
                "--ready_file=" + ready] + self.flags
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout
        while True:
            kv = self._read(ready)
            if kv.get("grpc_port", 0) > 0 and (not self.metrics or kv.get("metrics_port", 0) > 0):
                self.grpc_port, self.metrics_port = kv["grpc_port"], kv.get("metrics_port")
                return self
            if self.proc.poll() is not None:
                raise RuntimeError("server exited with %s before becoming ready:\n%s"
                                   % (self.proc.returncode, self.log_tail()))
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server not ready within %.0f s:\n%s"
                                   % (self.ready_timeout, self.log_tail()))
            time.sleep(0.03)

    @staticmethod
    def _read(path):
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            return {}
        kv = {}
        for line in text.splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                try:
                    kv[k.strip()] = int(v)
                except ValueError:
                    pass
        return kv

    def log_tail(self, n=4000):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            rc = self.proc.returncode
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return rc

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


@contextlib.contextmanager
def server_target(server=None, server_bin=None, flags=(), metrics=False):
    """HOST:PORT of the server to use for the duration of the block: `server` as given, or a
    LocalServer started from `server_bin` (and stopped, its files removed, afterwards). For
    scripts that take either --server or --server-bin."""
    if server_bin:
        with LocalServer(server_bin, flags, metrics=metrics) as srv:
            yield srv.target
    else:
        yield server
