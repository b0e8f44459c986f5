"""Bearer-token auth and tenant isolation on the real server (--auth=token, --auth_token_file),
driven by the Python client and the CLI:

- no token or an unknown one: UNAUTHENTICATED on every RPC; gRPC health needs no token;
- tenant A cannot get, read, decode into, append to, flush, export or delete tenant B's
  session (NOT_FOUND, the same message as an unknown id) and cannot create in B's tenant or
  list it (PERMISSION_DENIED); A's listing shows only A's sessions; an admin lists and reads
  all;
- the token file is reread without a restart: an added token starts working, a removed one
  stops, a malformed version keeps the previous tokens; metrics count refusals and reloads;
- the CLI takes --token and SPARSEKV_TOKEN and never prints the token;
- --auth=none serves as before, and says so loudly at start; bad auth flags stop the server.

Usage: auth_test.py SERVER_BIN CLI_BIN REPO_ROOT.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

import numpy as np

SERVER = sys.argv.pop(1)
CLI = sys.argv.pop(1)
REPO = sys.argv.pop(1)
sys.path.insert(0, os.path.join(REPO, "clients", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sparsekv_client as sk  # noqa: E402
from server_fixture import ServerProcess  # noqa: E402

TOKEN_A = "alpha-token-0123456789abcdef"
TOKEN_B = "bravo-token-0123456789abcdef"
TOKEN_C = "charlie-token-0123456789abc"
TOKEN_ADMIN = "admin-token-0123456789abcdef"
LAYERS, KV, Q, DIM = 2, 2, 4, 32


def write_tokens(path, lines):
    """Replaces the token file atomically, as an operator (or a Kubernetes Secret) does."""
    with open(path + ".tmp", "w") as f:
        f.write("# token tenant role\n" + "".join(line + "\n" for line in lines))
    os.rename(path + ".tmp", path)


def wait_for(predicate, seconds=10.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


class AuthTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="sparsekv-auth-e2e-")
        cls.tokens = os.path.join(cls.dir, "tokens")
        write_tokens(cls.tokens, [TOKEN_A + " alpha user", TOKEN_B + " bravo user",
                                  TOKEN_ADMIN + " ops admin"])
        cls.server = ServerProcess(SERVER, extra_flags=[
            "--auth=token", "--auth_token_file=" + cls.tokens]).start()
        cls.target = "127.0.0.1:%d" % cls.server.grpc_port
        cls.rng = np.random.default_rng(14)

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        shutil.rmtree(cls.dir, ignore_errors=True)

    def client(self, token):
        c = sk.Client(self.target, timeout=10.0, token=token)
        self.addCleanup(c.close)
        return c

    def assertCode(self, code, fn, *args, **kw):
        with self.assertRaises(sk.SparsekvError) as e:
            r = fn(*args, **kw)
            if hasattr(r, "__next__"):
                list(r)
        self.assertEqual(e.exception.code, code, str(e.exception))
        return e.exception

    def make_session(self, client, sid, tenant=""):
        client.create_session(LAYERS, KV, Q, DIM, session_id=sid, tenant=tenant)
        k = self.rng.standard_normal((LAYERS, 80, KV, DIM), dtype=np.float32).astype(np.float16)
        client.append_kv(sid, k, k)
        client.flush(sid)

    def q(self):
        return self.rng.standard_normal((Q, DIM), dtype=np.float32)

    def metrics(self):
        with urllib.request.urlopen(self.server.metrics_url(), timeout=10) as r:
            return r.read().decode()

    def metric(self, text, name):
        m = re.search("^" + re.escape(name) + r" (\S+)$", text, re.M)
        return float(m.group(1)) if m else None

    def test_without_a_known_token_every_rpc_is_unauthenticated(self):
        for token in ("", "unknown-token-0123456789"):
            c = self.client(token)
            self.assertCode("UNAUTHENTICATED", c.server_info)
            self.assertCode("UNAUTHENTICATED", c.create_session, 1, 1, 1, 16)
            self.assertCode("UNAUTHENTICATED", c.get_session, "any")
            self.assertCode("UNAUTHENTICATED", c.list_sessions)
            self.assertCode("UNAUTHENTICATED", c.read_kv, "any")
            self.assertCode("UNAUTHENTICATED", c.export_session, "any")
            k = np.zeros((1, 1, 1, 16), np.float32)
            self.assertCode("UNAUTHENTICATED", c.append_kv, "any", k, k)
            with c.decode_stream() as s:
                self.assertCode("UNAUTHENTICATED", s.decode, "any", 0, np.ones((1, 16), np.float32))
            # Health (and reflection) need no token: load balancers and probes have none.
            self.assertEqual(c.health(), "SERVING")
        text = self.metrics()
        self.assertGreaterEqual(
            self.metric(text, 'sparsekv_auth_failures_total{reason="unauthenticated"}'), 16)
        self.assertNotIn(TOKEN_A, self.server.log_tail(100000))

    def test_tenants_are_isolated(self):
        a, b, admin = self.client(TOKEN_A), self.client(TOKEN_B), self.client(TOKEN_ADMIN)
        self.make_session(b, "iso-b")
        self.make_session(a, "iso-a")
        want_k, _ = b.read_kv("iso-b")
        foreign = [
            lambda sid: a.get_session(sid),
            lambda sid: a.read_kv(sid),
            lambda sid: a.decode(sid, 0, self.q()),
            lambda sid: a.append_kv(sid, *(2 * [np.ones((LAYERS, 1, KV, DIM), np.float32)])),
            lambda sid: a.flush(sid),
            lambda sid: a.export_session(sid),
            lambda sid: a.delete_session(sid),
        ]
        for i, call in enumerate(foreign):
            seen = self.assertCode("NOT_FOUND", call, "iso-b")
            unknown = self.assertCode("NOT_FOUND", call, "iso-b-unknown")
            self.assertEqual(seen.message.replace("iso-b", "ID"),
                             unknown.message.replace("iso-b-unknown", "ID"), i)
        with a.decode_stream() as s:
            self.assertCode("NOT_FOUND", s.decode, "iso-b", 0, self.q())
        # B's session is intact.
        got_k, _ = b.read_kv("iso-b")
        np.testing.assert_array_equal(got_k, want_k)
        self.assertEqual(b.get_session("iso-b").stats.tokens_per_layer, [80] * LAYERS)

        self.assertCode("PERMISSION_DENIED", a.create_session, 1, 1, 1, 16, session_id="iso-x",
                        tenant="bravo")
        self.assertCode("PERMISSION_DENIED", a.list_sessions, "bravo")
        self.assertEqual(a.get_session("iso-a").tenant, "alpha")
        self.assertEqual([s.id for s in a.list_sessions() if s.id.startswith("iso-")], ["iso-a"])
        self.assertEqual([s.id for s in b.list_sessions() if s.id.startswith("iso-")], ["iso-b"])
        self.assertEqual([s.id for s in admin.list_sessions() if s.id.startswith("iso-")],
                         ["iso-a", "iso-b"])
        # An admin reaches every session (drain: export and delete of all).
        self.assertTrue(len(admin.export_session("iso-b")) > 0)
        admin.delete_session("iso-b")
        a.delete_session("iso-a")
        text = self.metrics()
        self.assertGreaterEqual(
            self.metric(text, 'sparsekv_auth_failures_total{reason="permission_denied"}'), 2)

    def test_token_file_reloads_without_restart(self):
        c = self.client(TOKEN_C)
        self.assertCode("UNAUTHENTICATED", c.server_info)
        before = self.metric(self.metrics(),
                             'sparsekv_auth_token_file_reloads_total{result="ok"}') or 0
        try:
            write_tokens(self.tokens, [TOKEN_A + " alpha user", TOKEN_C + " charlie user",
                                       TOKEN_ADMIN + " ops admin"])
            self.assertTrue(wait_for(lambda: self._works(c)), "an added token never worked")
            b = self.client(TOKEN_B)
            self.assertCode("UNAUTHENTICATED", b.server_info)  # removed with the same reload
            write_tokens(self.tokens, [TOKEN_A + " alpha"])  # malformed: the old table stays
            self.assertTrue(wait_for(lambda: self.metric(
                self.metrics(), 'sparsekv_auth_token_file_reloads_total{result="error"}') >= 1))
            self.assertTrue(self._works(c))
            self.assertIn("reload failed, keeping the previous", self.server.log_tail())
            self.assertGreater(self.metric(
                self.metrics(), 'sparsekv_auth_token_file_reloads_total{result="ok"}'), before)
        finally:
            write_tokens(self.tokens, [TOKEN_A + " alpha user", TOKEN_B + " bravo user",
                                       TOKEN_ADMIN + " ops admin"])
            self.assertTrue(wait_for(lambda: self._works(self.client(TOKEN_B))))
        self.assertCode("UNAUTHENTICATED", c.server_info)  # removed again
        self.assertNotIn(TOKEN_C, self.server.log_tail(100000))

    @staticmethod
    def _works(client):
        try:
            client.server_info()
            return True
        except sk.SparsekvError:
            return False

    def cli(self, *args, env_token=None):
        env = dict(os.environ)
        env.pop("SPARSEKV_TOKEN", None)
        if env_token is not None:
            env["SPARSEKV_TOKEN"] = env_token
        return subprocess.run([CLI, "--server=" + self.target, "--timeout=5s"] + list(args),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=30, env=env)

    def test_cli_sends_the_token(self):
        a = self.client(TOKEN_A)
        a.create_session(1, 1, 1, 16, session_id="cli-a")
        self.addCleanup(a.delete_session, "cli-a")
        self.client(TOKEN_B).create_session(1, 1, 1, 16, session_id="cli-b")
        self.addCleanup(self.client(TOKEN_B).delete_session, "cli-b")
        r = self.cli("--token=" + TOKEN_A, "list")
        self.assertEqual(r.returncode, 0, r.stdout)
        self.assertIn("cli-a", r.stdout)
        self.assertNotIn("cli-b", r.stdout)
        r = self.cli("get", "cli-b", env_token=TOKEN_A)
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertIn("NOT_FOUND", r.stdout)
        r = self.cli("info", env_token=TOKEN_B)
        self.assertEqual(r.returncode, 0, r.stdout)
        r = self.cli("--token=wrong-token-0123456789", "info")
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertIn("UNAUTHENTICATED", r.stdout)
        self.assertNotIn("wrong-token-0123456789", r.stdout)
        self.assertEqual(self.cli("health").returncode, 0)  # no token needed

    def test_auth_none_serves_everyone_and_says_so(self):
        with ServerProcess(SERVER) as s:
            with sk.Client("127.0.0.1:%d" % s.grpc_port, timeout=10.0, token="") as c:
                self.make_session(c, "none-1", tenant="anyone")
                self.assertEqual(c.get_session("none-1").tenant, "anyone")
                c.create_session(1, 1, 1, 16, session_id="none-2")
                self.assertEqual(c.get_session("none-2").tenant, "default")
                self.assertEqual(sorted(x.id for x in c.list_sessions()), ["none-1", "none-2"])
                c.decode("none-1", 0, self.q())
            self.assertIn("WARNING: --auth=none", s.log_tail())

    def test_bad_auth_flags_stop_the_server(self):
        bad = os.path.join(self.dir, "bad-tokens")
        with open(bad, "w") as f:
            f.write("short alpha user\n")
        for flags, message in (
                (["--auth=token"], "--auth=token needs --auth_token_file"),
                (["--auth=token", "--auth_token_file=" + bad], "line 1"),
                (["--auth=token", "--auth_token_file=" + bad + ".missing"], "cannot stat"),
                (["--auth_token_file=" + self.tokens], "needs --auth=token"),
                (["--auth=tokens"], "--auth must be")):
            r = subprocess.run([SERVER, "--listen=127.0.0.1:0", "--metrics_listen="] + flags,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=20)
            self.assertNotEqual(r.returncode, 0, flags)
            self.assertIn(message, r.stdout, flags)


if __name__ == "__main__":
    unittest.main(verbosity=2)
