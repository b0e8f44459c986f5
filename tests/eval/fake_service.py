"""A stand-in sparsekv server in Python, backed by prune_numpy.SessionSim (test double).

It serves the subset of sparsekv.v1.KvCacheService that attention_quality.py's service
backend uses (CreateSession, GetSession, DeleteSession, AppendKV, Decode, Flush, ReadKV), with
pruning, so that code path can be exercised before the C++ server prunes. Background
compression is off (Flush only). Not a reference for anything else.

  /usr/bin/python3 tests/eval/fake_service.py --port 50999 &
  /usr/bin/python3 tests/eval/attention_quality.py --backend service --server localhost:50999
"""

import argparse
import os
import sys
import threading
from concurrent import futures

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention_quality as AQ  # noqa: E402
import prune_numpy as P  # noqa: E402


def serve(port):
    import grpc
    pb2, pb2_grpc = AQ.load_stubs()
    dirs = {pb2.PRUNE_DIRECTION_PER_CHANNEL: P.PER_CHANNEL}
    scor = {pb2.SCORING_OUTPUT_AWARE: P.OUTPUT_AWARE}
    lock = threading.Lock()
    sessions = {}

    def arr(t):
        dt = {pb2.DTYPE_FLOAT32: "<f4", pb2.DTYPE_FLOAT16: "<f2"}[t.dtype]
        return np.frombuffer(t.data, dt).astype(np.float32).reshape(list(t.shape))

    def tensor(a):
        a = np.ascontiguousarray(a, dtype="<f4")
        return pb2.Tensor(dtype=pb2.DTYPE_FLOAT32, shape=list(a.shape), data=a.tobytes())

    def session_msg(sid):
        req, sim = sessions[sid]
        st = pb2.SessionStats(tokens_per_layer=[x.shape[0] for x in sim.K])
        sk, sv = sim.achieved_sparsity()
        st.achieved_sparsity_k, st.achieved_sparsity_v = sk, sv
        return pb2.Session(id=sid, tenant=req.tenant, layout=req.layout, policy=req.policy,
                           stats=st)

    class Servicer(pb2_grpc.KvCacheServiceServicer):
        def CreateSession(self, req, ctx):
            lay, pol = req.layout, req.policy

            def tp(t):
                return P.TensorPolicy(t.sparsity, dirs.get(t.direction, P.PER_TOKEN),
                                      scor.get(t.scoring, P.MAGNITUDE))
            policy = P.Policy(tp(pol.k), tp(pol.v), window=pol.dense_window or 32,
                              chunk=pol.chunk_tokens or 256, group=pol.group_tokens or 32)
            store = "fp16" if lay.dtype in (0, pb2.DTYPE_FLOAT16) else "fp32"
            sim = P.SessionSim(lay.num_layers, lay.num_kv_heads, lay.num_q_heads,
                               lay.head_dim, policy, store=store)
            with lock:
                if req.session_id in sessions:
                    ctx.abort(grpc.StatusCode.ALREADY_EXISTS, "exists")
                sessions[req.session_id] = (req, sim)
                return session_msg(req.session_id)

        def GetSession(self, req, ctx):
            with lock:
                return session_msg(req.session_id)

        def DeleteSession(self, req, ctx):
            with lock:
                sessions.pop(req.session_id, None)
            return pb2.DeleteSessionResponse()

        def AppendKV(self, it, ctx):
            n = 0
            for m in it:
                with lock:
                    sim = sessions[m.session_id][1]
                    k, v = arr(m.k), arr(m.v)
                    for i in range(k.shape[0]):
                        sim.append(m.layer_begin + i, k[i], v[i])
                    n += 1
            return pb2.AppendKVResponse(messages=n)

        def Flush(self, req, ctx):
            with lock:
                return pb2.FlushResponse(tokens_compressed=sessions[req.session_id][1].flush())

        def Decode(self, req, ctx):
            res = []
            with lock:
                for it in req.items:
                    sim = sessions[it.session_id][1]
                    nk = arr(it.new_k) if it.HasField("new_k") else None
                    nv = arr(it.new_v) if it.HasField("new_v") else None
                    out, lse = sim.decode(it.layer, arr(it.q), nk, nv, it.scale or None)
                    res.append(pb2.DecodeResult(out=tensor(out),
                                                tokens_attended=sim.K[it.layer].shape[0]))
            return pb2.DecodeResponse(results=res, request_id=req.request_id)

        def ReadKV(self, req, ctx):
            with lock:
                sim = sessions[req.session_id][1]
                msgs = [pb2.ReadKVResponse(layer=l, token_begin=0, k=tensor(sim.K[l]),
                                           v=tensor(sim.V[l])) for l in range(sim.L)]
            for m in msgs:
                yield m

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_send_message_length", -1),
                                  ("grpc.max_receive_message_length", -1)])
    pb2_grpc.add_KvCacheServiceServicer_to_server(Servicer(), server)
    bound = server.add_insecure_port("127.0.0.1:%d" % port)
    server.start()
    print("fake sparsekv service on 127.0.0.1:%d" % bound, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=50999)
    serve(ap.parse_args().port)
