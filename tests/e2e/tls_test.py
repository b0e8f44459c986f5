"""TLS and mutual TLS on the real server's gRPC port (--tls_cert_file, --tls_key_file,
--tls_client_ca_file), driven by the Python client:

- TLS: a client that trusts the server's CA creates a session, appends and decodes (the
  output equals a plaintext server's, bit for bit); a plaintext client, and a client that
  trusts another CA, cannot call it;
- mutual TLS: a client without a certificate, or with one from another CA, cannot call it; one
  with a certificate from the configured CA can;
- bad configurations stop the server at start with a message naming the flag: a key without a
  certificate, a file that is not PEM, a client CA without a server certificate.

The `sparsekv` CLI (--tls_ca_file, --tls_cert_file, --tls_key_file, --tls_server_name) reaches
the same servers, and is refused without the right files.

Usage: tls_test.py SERVER_BIN CLI_BIN REPO_ROOT. Exits 77 (skipped) without openssl.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import numpy as np

SERVER = sys.argv.pop(1)
CLI = sys.argv.pop(1)
REPO = sys.argv.pop(1)
sys.path.insert(0, os.path.join(REPO, "clients", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sparsekv_client as sk  # noqa: E402
from server_fixture import ServerProcess  # noqa: E402

SKIP = 77


def openssl(args, cwd):
    subprocess.run(["openssl"] + args, cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def make_pki(d):
    """A CA that signs a server and a client certificate, and another CA with its own client."""
    for ca in ("ca", "other-ca"):
        openssl(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                 "/CN=" + ca, "-keyout", ca + ".key", "-out", ca + ".pem"], d)
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write("subjectAltName=DNS:sparsekv.test,IP:127.0.0.1\n")
    for name, ca in (("server", "ca"), ("client", "ca"), ("stranger", "other-ca")):
        openssl(["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=" + name, "-keyout",
                 name + ".key", "-out", name + ".csr"], d)
        openssl(["x509", "-req", "-in", name + ".csr", "-CA", ca + ".pem", "-CAkey", ca + ".key",
                 "-CAcreateserial", "-days", "2", "-out", name + ".pem", "-extfile", "san.ext"],
                d)


def roundtrip(client):
    """Create, append, decode; returns the decode output's bytes."""
    rng = np.random.default_rng(3)
    sid = "tls-%d" % os.getpid()
    client.create_session(1, 2, 4, 32, session_id=sid)
    k = rng.standard_normal((1, 40, 2, 32), dtype=np.float32).astype(np.float16)
    client.append_kv(sid, k, k)
    q = rng.standard_normal((4, 32), dtype=np.float32)
    out, _ = client.decode(sid, 0, q, want_lse=True, out_dtype="float32")
    client.delete_session(sid)
    return np.asarray(out).tobytes()


class TlsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="sparsekv-tls-e2e-")
        make_pki(cls.dir)
        cls.servers = []

    @classmethod
    def tearDownClass(cls):
        for s in cls.servers:
            s.stop()
        shutil.rmtree(cls.dir, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.dir, name)

    def start(self, flags):
        s = ServerProcess(SERVER, extra_flags=flags).start()
        self.servers.append(s)
        return "127.0.0.1:%d" % s.grpc_port, s

    def tls(self, root, cert=None):
        return sk.TlsOptions(root_certs=self.path(root + ".pem"),
                             cert_chain=self.path(cert + ".pem") if cert else None,
                             private_key=self.path(cert + ".key") if cert else None,
                             server_name_override="sparsekv.test")

    def refused(self, target, tls):
        c = sk.Client(target, timeout=3.0, tls=tls)
        try:
            with self.assertRaises(sk.SparsekvError) as e:
                c.server_info()
            self.assertEqual(e.exception.code, "UNAVAILABLE", str(e.exception))
        finally:
            c.close()

    def test_tls(self):
        plain_target, _ = self.start([])
        target, server = self.start(["--tls_cert_file=" + self.path("server.pem"),
                                     "--tls_key_file=" + self.path("server.key")])
        with sk.Client(target, timeout=10.0, tls=self.tls("ca")) as c:
            got = roundtrip(c)
        with sk.Client(plain_target, timeout=10.0) as c:
            want = roundtrip(c)
        self.assertEqual(got, want, "decode over TLS differs from plaintext")
        self.refused(target, None)                  # plaintext client
        self.refused(target, self.tls("other-ca"))  # does not trust the server
        self.assertIn("gRPC port TLS", server.log_tail())

    def test_mutual_tls(self):
        target, server = self.start(["--tls_cert_file=" + self.path("server.pem"),
                                     "--tls_key_file=" + self.path("server.key"),
                                     "--tls_client_ca_file=" + self.path("ca.pem")])
        with sk.Client(target, timeout=10.0, tls=self.tls("ca", "client")) as c:
            self.assertTrue(len(roundtrip(c)) > 0)
        self.refused(target, self.tls("ca"))              # no client certificate
        self.refused(target, self.tls("ca", "stranger"))  # signed by another CA
        self.assertIn("mutual TLS", server.log_tail())

    def test_default_listen_address(self):
        # Without --listen a plaintext port serves this host only; with TLS, every interface.
        import socket
        probe = socket.socket()
        try:
            probe.bind(("0.0.0.0", 50051))
        except OSError:
            self.skipTest("port 50051 is in use here")
        finally:
            probe.close()
        # Listening sockets on port 50051 (0xC383) as /proc/net/tcp{,6} write the address:
        # gRPC binds IPv6 sockets, 127.0.0.1 as ::ffff:127.0.0.1 and 0.0.0.0 as [::].
        loopback = {"0100007F", "0000000000000000FFFF00000100007F"}
        anywhere = {"00000000", "00000000000000000000000000000000"}
        for flags, want in (([], loopback),
                            (["--tls_cert_file=" + self.path("server.pem"),
                              "--tls_key_file=" + self.path("server.key")], anywhere)):
            s = ServerProcess(SERVER, extra_flags=flags, listen=None).start()
            try:
                self.assertEqual(s.grpc_port, 50051)
                listening = set()
                for name in ("/proc/net/tcp", "/proc/net/tcp6"):
                    with open(name) as f:
                        for line in f.readlines()[1:]:
                            local, state = line.split()[1], line.split()[3]
                            if state == "0A" and local.endswith(":C383"):
                                listening.add(local.split(":")[0])
                self.assertTrue(listening and listening <= want, "%s: %s" % (flags, listening))
            finally:
                s.stop()

    def cli(self, target, *flags):
        return subprocess.run([CLI, "--server=" + target, "--timeout=3s"] + list(flags) +
                              ["info"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=30)

    def test_cli(self):
        target, _ = self.start(["--tls_cert_file=" + self.path("server.pem"),
                                "--tls_key_file=" + self.path("server.key"),
                                "--tls_client_ca_file=" + self.path("ca.pem")])
        name = "--tls_server_name=sparsekv.test"
        ok = self.cli(target, "--tls_ca_file=" + self.path("ca.pem"), name,
                      "--tls_cert_file=" + self.path("client.pem"),
                      "--tls_key_file=" + self.path("client.key"))
        self.assertEqual(ok.returncode, 0, ok.stdout)
        self.assertIn("version", ok.stdout)
        for flags in ([],  # plaintext
                      ["--tls_ca_file=" + self.path("ca.pem"), name],  # no client certificate
                      ["--tls_ca_file=" + self.path("other-ca.pem"), name,
                       "--tls_cert_file=" + self.path("client.pem"),
                       "--tls_key_file=" + self.path("client.key")]):  # untrusted server
            r = self.cli(target, *flags)
            self.assertEqual(r.returncode, 3, "%s: %s" % (flags, r.stdout))  # unreachable
        bad = self.cli(target, "--tls_cert_file=" + self.path("client.pem"))
        self.assertEqual(bad.returncode, 2, bad.stdout)  # usage: a certificate without its key
        self.assertIn("go together", bad.stdout)

    def test_bad_configuration_stops_the_server(self):
        cases = [
            (["--tls_key_file=" + self.path("server.key")], "go together"),
            (["--tls_cert_file=" + self.path("san.ext"),
              "--tls_key_file=" + self.path("server.key")], "--tls_cert_file="),
            (["--tls_client_ca_file=" + self.path("ca.pem")], "--tls_client_ca_file needs"),
            (["--tls_cert_file=" + self.path("server.pem"),
              "--tls_key_file=" + self.path("missing.key")], "--tls_key_file="),
        ]
        for flags, message in cases:
            r = subprocess.run([SERVER, "--listen=127.0.0.1:0", "--metrics_listen="] + flags,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=20)
            self.assertNotEqual(r.returncode, 0, flags)
            self.assertIn(message, r.stdout, flags)


if __name__ == "__main__":
    if shutil.which("openssl") is None:
        print("SKIPPED: openssl not found")
        sys.exit(SKIP)
    unittest.main(verbosity=2)
