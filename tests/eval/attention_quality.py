"""Decode-attention quality of pruned KV caches on real K/V/Q of the two test models.

For each model, a dense numpy forward (llama_numpy) over validation text captures the
post-RoPE q/k/v of every layer. Each sequence is then replayed as a decoder would drive
sparsekv, once per pruning configuration:

  1. AppendKV of the first P tokens of every layer (--prefill, default 32), Flush;
  2. for t = P .. T-1: one Decode item per layer with q = q[t] and new_k/new_v = k[t], v[t]
     (the new token is appended, then attended), then Flush, so that after every step all
     but the newest W = 32 tokens are compressed (per-channel: whole groups of G = 32), and
     the query attends to W + 1 dense tokens plus the compressed rest. Output-aware scoring
     sees exactly the decode queries each token met in the dense tail.

At the sampled positions t (every --stride-th position from --min-pos on), the metric is the
relative error of the attention output against dense attention over the same tokens,
||out_pruned - out_dense|| / ||out_dense||, per (layer, query head, position), averaged
(the JSON also has the median and 90th percentile).

Backends
  --backend numpy     prune_numpy.replay_decode (the oracle; equals prune_numpy.SessionSim)
  --backend service   the same protocol through the gRPC API of a running sparsekv-server
                      (--server HOST:PORT); also reports the service's deviation from the
                      numpy oracle per configuration. Configurations the server refuses
                      (UNIMPLEMENTED while pruning is not built) are reported as such.
                      --decode-compute f16 creates every session (the dense one too) with
                      policy decode_compute FLOAT16: fp16 products in decode attention,
                      ~1e-3 relative error on fp16 caches (--store fp16) served by a CPU with
                      AVX512-FP16, fp32 elsewhere; the report names the arithmetic the
                      server says was in force (default f32).

Run (numpy, about 3 minutes on 2 cores):
  /usr/bin/python3 tests/eval/attention_quality.py --backend numpy \
      --json /tmp/attn_quality.json --md /tmp/attn_quality.md
Service:
  /usr/bin/python3 tests/eval/attention_quality.py --backend service --server localhost:50051
Service, fp16 cache and fp16 decode arithmetic:
  /usr/bin/python3 tests/eval/attention_quality.py --backend service --server localhost:50051 \
      --store fp16 --decode-compute f16

Models and data are read from ../shared relative to the repository root (/work/shared); the
script exits 0 with a SKIP line when they are absent.
"""

import argparse
import importlib
import json
import math
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
import llama_numpy as L  # noqa: E402
import prune_numpy as P  # noqa: E402

TARGETS = ("K", "V", "K+V")


def make_configs(sparsities):
    out = []
    for s in sparsities:
        for target in TARGETS:
            for direction in (P.PER_TOKEN, P.PER_CHANNEL):
                for scoring in (P.MAGNITUDE, P.OUTPUT_AWARE):
                    out.append({"sparsity": s, "target": target, "direction": direction,
                                "scoring": scoring})
    return out


def config_name(c):
    return "%s %.0f%% %s %s" % (c["target"], 100 * c["sparsity"], c["direction"],
                                "mag" if c["scoring"] == P.MAGNITUDE else "oa")


def make_policy(c, window=32, chunk=256, group=32):
    tp = P.TensorPolicy(c["sparsity"], c["direction"], c["scoring"])
    none = P.TensorPolicy(0.0)
    return P.Policy(k=tp if "K" in c["target"] else none,
                    v=tp if "V" in c["target"] else none,
                    window=window, chunk=chunk, group=group)


# ---------------------------------------------------------------------------------------------
# data capture

def capture_sequences(model_name, args):
    """[(name, q [L,T,Hq,D], k [L,T,Hkv,D], v)] for the model's sampled sequences."""
    m = L.load(os.path.join(L.MODELS, model_name))
    seqs = []
    if model_name == "docs-byte-10m":
        stream = L.docs_valid_stream()
        nw = L.docs_num_windows(stream)
        idx = [int(round(j * (nw - 1) / max(1, args.docs_windows - 1)))
               for j in range(args.docs_windows)] if args.docs_windows > 1 else [0]
        for i in idx:
            x, _ = L.docs_window(stream, i)
            seqs.append(("window %d" % i, x[:args.docs_tokens]))
    else:
        for i, s in enumerate(L.tinystories_ids()[:args.stories]):
            seqs.append(("story %d" % i, np.array(s[:512])))
    out = []
    for name, ids in seqs:
        _, caps = L.capture_qkv(m, ids)
        q = np.stack([c["q"] for c in caps])
        k = np.stack([c["k"] for c in caps])
        v = np.stack([c["v"] for c in caps])
        out.append((name, q, k, v))
    return m, out


def positions(T, args):
    return list(range(max(args.min_pos, args.prefill), T, args.stride))


def rel_errors(outs, dense, pos):
    """Array of ||o - d|| / ||d|| over (position, layer, head)."""
    errs = []
    for t in pos:
        d = dense[t].astype(np.float64)
        o = outs[t].astype(np.float64)
        errs.append(np.linalg.norm(o - d, axis=-1) / np.maximum(np.linalg.norm(d, axis=-1),
                                                                  1e-30))
    return np.stack(errs).reshape(-1)


# ---------------------------------------------------------------------------------------------
# numpy backend

_WORK = {}


def _numpy_job(job):
    mi, si, ci = job
    _, seqs, dense, pos = _WORK["models"][mi]
    _, q, k, v = seqs[si]
    cfg = _WORK["configs"][ci]
    args = _WORK["args"]
    pol = make_policy(cfg, chunk=args.chunk)
    outs = P.replay_decode(q, k, v, pol, pos[si], start=args.prefill, store=args.store,
                           u_mode=args.u_mode)
    return job, rel_errors(outs, dense[si], pos[si])


def run_numpy(models, configs, args):
    _WORK.update(models=models, configs=configs, args=args)
    jobs = [(mi, si, ci) for mi in range(len(models)) for si in range(len(models[mi][1]))
            for ci in range(len(configs))]
    # longest first for better packing on the workers
    jobs.sort(key=lambda j: -models[j[0]][1][j[1]][1].shape[1])
    if args.workers > 1:
        with mp.get_context("fork").Pool(args.workers) as pool:
            res = pool.map(_numpy_job, jobs, chunksize=1)
    else:
        res = [_numpy_job(j) for j in jobs]
    errs = {}
    for (mi, si, ci), e in res:
        errs.setdefault((mi, ci), []).append(e)
    return {key: {"errors": np.concatenate(v)} for key, v in errs.items()}


# ---------------------------------------------------------------------------------------------
# service backend

def load_stubs():
    out = tempfile.mkdtemp(prefix="sparsekv-eval-stubs-")
    proto_dir = os.path.join(REPO, "proto")
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", proto_dir, "--python_out=" + out,
           "--grpc_python_out=" + out, "sparsekv/v1/kv_cache.proto"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("protoc failed: %s %s" % (r.stdout, r.stderr))
    sys.path.insert(0, out)
    return (importlib.import_module("sparsekv.v1.kv_cache_pb2"),
            importlib.import_module("sparsekv.v1.kv_cache_pb2_grpc"))


def run_service(models, configs, args):
    import grpc
    pb2, pb2_grpc = load_stubs()
    ch = grpc.insecure_channel(args.server, options=[("grpc.max_send_message_length", -1),
                                                     ("grpc.max_receive_message_length", -1)])
    grpc.channel_ready_future(ch).result(timeout=10)
    stub = pb2_grpc.KvCacheServiceStub(ch)
    store_dt = {"fp32": pb2.DTYPE_FLOAT32, "fp16": pb2.DTYPE_FLOAT16}[args.store]
    dirs = {P.PER_TOKEN: pb2.PRUNE_DIRECTION_PER_TOKEN,
            P.PER_CHANNEL: pb2.PRUNE_DIRECTION_PER_CHANNEL}
    scor = {P.MAGNITUDE: pb2.SCORING_MAGNITUDE, P.OUTPUT_AWARE: pb2.SCORING_OUTPUT_AWARE}
    compute = {"f32": pb2.DECODE_COMPUTE_FLOAT32,
               "f16": pb2.DECODE_COMPUTE_FLOAT16}[args.decode_compute]
    compute_names = {pb2.DECODE_COMPUTE_FLOAT32: "f32", pb2.DECODE_COMPUTE_FLOAT16: "f16"}

    def tensor(a):
        a = np.ascontiguousarray(a, dtype="<f4")
        return pb2.Tensor(dtype=pb2.DTYPE_FLOAT32, shape=list(a.shape), data=a.tobytes())

    def tpolicy(c, on):
        if not on:
            return pb2.TensorPolicy(sparsity=0.0)
        return pb2.TensorPolicy(sparsity=c["sparsity"], direction=dirs[c["direction"]],
                                scoring=scor[c["scoring"]])

    results = {}
    in_force = set()  # decode arithmetic the server reported for the sessions
    run_id = "%x" % int(time.time() * 1000)
    for mi, (m, seqs, dense, pos) in enumerate(models):
        layout = pb2.Layout(num_layers=m.n_layers, num_kv_heads=m.n_kv_heads,
                            num_q_heads=m.n_heads, head_dim=m.head_dim, dtype=store_dt)
        for si, (sname, q, k, v) in enumerate(seqs):
            Lz, T = q.shape[0], q.shape[1]
            # one session per configuration, plus a dense one (sanity check of the path)
            sessions = {}
            for ci, c in enumerate([None] + list(configs)):
                sid = "eval-%s-%d-%d-%d" % (run_id, mi, si, ci)
                pol = pb2.Policy(dense_window=32, chunk_tokens=args.chunk, group_tokens=32,
                                 decode_compute=compute)
                if c is not None:
                    pol.k.CopyFrom(tpolicy(c, "K" in c["target"]))
                    pol.v.CopyFrom(tpolicy(c, "V" in c["target"]))
                try:
                    stub.CreateSession(pb2.CreateSessionRequest(
                        session_id=sid, tenant="eval", layout=layout, policy=pol,
                        ttl_seconds=3600, labels={"harness": "attention_quality"}))
                    sessions[ci] = sid
                except grpc.RpcError as e:
                    results[(mi, ci - 1)] = {"status": "%s: %s" % (e.code().name, e.details())}
            try:
                for ci, sid in list(sessions.items()):
                    try:
                        stub.AppendKV(iter([pb2.AppendKVRequest(
                            session_id=sid, layer_begin=0, k=tensor(k[:, :args.prefill]),
                            v=tensor(v[:, :args.prefill]))]))
                        if ci > 0:
                            stub.Flush(pb2.FlushRequest(session_id=sid))
                    except grpc.RpcError as e:
                        results[(mi, ci - 1)] = {"status": "%s: %s" % (e.code().name,
                                                                      e.details())}
                        del sessions[ci]
                want = set(pos[si])
                outs = {ci: {} for ci in sessions}
                for t in range(args.prefill, T):
                    items, owners = [], []
                    for ci, sid in sessions.items():
                        for layer in range(Lz):
                            items.append(pb2.DecodeItem(
                                session_id=sid, layer=layer, q=tensor(q[layer, t]),
                                new_k=tensor(k[layer, t]), new_v=tensor(v[layer, t])))
                            owners.append((ci, layer))
                    resp = stub.Decode(pb2.DecodeRequest(items=items,
                                                         out_dtype=pb2.DTYPE_FLOAT32))
                    if t in want:
                        per = {}
                        for (ci, layer), r in zip(owners, resp.results):
                            a = np.frombuffer(r.out.data, dtype="<f4").reshape(
                                m.n_heads, m.head_dim)
                            per.setdefault(ci, [None] * Lz)[layer] = a
                        for ci, arrs in per.items():
                            outs[ci][t] = np.stack(arrs)
                    for ci, sid in sessions.items():
                        if ci > 0:
                            stub.Flush(pb2.FlushRequest(session_id=sid))
                stats, stored = {}, {}
                for ci, sid in sessions.items():
                    s = stub.GetSession(pb2.GetSessionRequest(session_id=sid)).stats
                    stats[ci] = (s.achieved_sparsity_k, s.achieved_sparsity_v)
                    in_force.add(compute_names.get(s.decode_compute_in_force, "unspecified"))
                    if ci > 0 and not args.no_oracle:
                        stored[ci] = read_kv(stub, pb2, sid, Lz, T, m.n_kv_heads, m.head_dim)
            finally:
                for sid in sessions.values():
                    try:
                        stub.DeleteSession(pb2.DeleteSessionRequest(session_id=sid))
                    except grpc.RpcError:
                        pass
            for ci in sessions:
                key = (mi, ci - 1)
                e = rel_errors(outs[ci], dense[si], pos[si])
                r = results.setdefault(key, {"errors": [], "oracle": [], "achieved": []})
                r["errors"].append(e)
                r["achieved"].append(stats[ci])
                if ci > 0 and not args.no_oracle:
                    pol = make_policy(configs[ci - 1], chunk=args.chunk)
                    ref, rk, rv, nc = P.replay_decode(
                        q, k, v, pol, pos[si], start=args.prefill, store=args.store,
                        u_mode=args.u_mode, return_cache=True)
                    r["oracle"].append(rel_errors(outs[ci], ref, pos[si]))
                    sk, sv = stored[ci]
                    r.setdefault("kept_mismatch", []).append(
                        (float(((sk[:, :nc] != 0) != (rk[:, :nc] != 0)).mean()) if nc else 0.0,
                         float(((sv[:, :nc] != 0) != (rv[:, :nc] != 0)).mean()) if nc else 0.0))
    for r in results.values():
        if "errors" in r:
            r["errors"] = np.concatenate(r["errors"])
            r["oracle"] = np.concatenate(r["oracle"]) if r["oracle"] else None
    args.decode_compute_in_force = ",".join(sorted(in_force)) or "n/a"
    return results


def read_kv(stub, pb2, sid, n_layers, T, n_kv, head_dim):
    """The session's stored K/V [L, T, Hkv, D] float32 via ReadKV (pruned elements are 0)."""
    K = np.zeros((n_layers, T, n_kv, head_dim), np.float32)
    V = np.zeros_like(K)
    np_dt = {pb2.DTYPE_FLOAT32: "<f4", pb2.DTYPE_FLOAT16: "<f2"}
    for msg in stub.ReadKV(pb2.ReadKVRequest(session_id=sid)):
        for X, t in ((K, msg.k), (V, msg.v)):
            if t.dtype == pb2.DTYPE_BFLOAT16:
                a = (np.frombuffer(t.data, "<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                a = np.frombuffer(t.data, np_dt[t.dtype]).astype(np.float32)
            a = a.reshape(list(t.shape))
            X[msg.layer, msg.token_begin:msg.token_begin + a.shape[0]] = a
    return K, V


# ---------------------------------------------------------------------------------------------
# report

def summarize(e):
    return {"mean": float(e.mean()), "median": float(np.median(e)),
            "p90": float(np.percentile(e, 90)), "count": int(e.size)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=("numpy", "service"), default="numpy")
    ap.add_argument("--server", default="localhost:50051", help="HOST:PORT (service backend)")
    ap.add_argument("--models", default="docs-byte-10m,stories260k")
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--docs-windows", type=int, default=1,
                    help="docs-byte-10m 2048-token windows, spread evenly (default 1: window 0)")
    ap.add_argument("--docs-tokens", type=int, default=2048, help="tokens per docs window")
    ap.add_argument("--stories", type=int, default=8, help="stories260k stories (<= 16)")
    ap.add_argument("--prefill", type=int, default=32, help="tokens uploaded before decoding")
    ap.add_argument("--min-pos", type=int, default=64, help="first sampled query position")
    ap.add_argument("--stride", type=int, default=16, help="sample every n-th position")
    ap.add_argument("--chunk", type=int, default=256, help="policy chunk_tokens")
    ap.add_argument("--store", choices=("fp32", "fp16"), default="fp32",
                    help="session storage dtype (fp32 isolates the pruning error)")
    ap.add_argument("--u-mode", choices=("window", "cumulative"), default="window",
                    help="oracle's u_j accumulation (see prune_numpy)")
    ap.add_argument("--workers", type=int, default=2, help="processes (numpy backend)")
    ap.add_argument("--decode-compute", choices=("f32", "f16"), default="f32",
                    help="service backend: policy decode_compute of the sessions (f16: fp16 "
                         "products, ~1e-3 relative error; fp16 caches on AVX512-FP16 CPUs only)")
    ap.add_argument("--no-oracle", action="store_true",
                    help="service backend: skip the numpy-oracle comparison")
    ap.add_argument("--json", help="write results as JSON here")
    ap.add_argument("--md", help="write the markdown table here")
    args = ap.parse_args()
    if args.decode_compute != "f32" and args.backend != "service":
        ap.error("--decode-compute f16 needs --backend service")

    names = [s for s in args.models.split(",") if s]
    missing = [n for n in names if not os.path.exists(os.path.join(L.MODELS, n, "config.json"))]
    for f in ("docs-valid.txt", "tinystories-valid-16.ids"):
        if not os.path.exists(os.path.join(L.DATA, f)):
            missing.append("data/" + f)
    if missing:
        print("SKIP: shared models/data not found under %s: %s" % (L.SHARED, ", ".join(missing)))
        return 77  # ctest's SKIP_RETURN_CODE: reported as skipped, never as passed

    t0 = time.time()
    configs = make_configs([float(s) for s in args.sparsities.split(",")])
    models = []
    for n in names:
        m, seqs = capture_sequences(n, args)
        pos = [positions(s[1].shape[1], args) for s in seqs]
        dense = [P.dense_decode(q, k, v, p) for (_, q, k, v), p in zip(seqs, pos)]
        models.append((m, seqs, dense, pos))
        print("captured %s: %s (%.0f s)" % (n, ", ".join("%s T=%d" % (s[0], s[1].shape[1])
                                                         for s in seqs), time.time() - t0),
              file=sys.stderr, flush=True)
    if args.backend == "numpy":
        results = run_numpy(models, configs, args)
    else:
        results = run_service(models, configs, args)
    elapsed = time.time() - t0

    cmd = "/usr/bin/python3 tests/eval/attention_quality.py " + " ".join(
        a for a in sys.argv[1:])
    sampled = []
    for m, seqs, dense, pos in models:
        sampled.append("%s: %s; query positions %d..%d every %d (%d per sequence at most) x "
                       "%d layers x %d query heads" % (
                           m.name, ", ".join("%s (T=%d)" % (s[0], s[1].shape[1]) for s in seqs),
                           max(args.min_pos, args.prefill), seqs[0][1].shape[1] - 1,
                           args.stride, max(len(p) for p in pos), m.n_layers, m.n_heads))
    lines = []
    lines.append("Decode-attention relative error vs dense, mean of ||out - dense|| / ||dense|| "
                 "over (layer, query head, position); backend `%s`, storage %s, dense window "
                 "32 (+ the new token), group 32, Flush after every decode step, prefill %d "
                 "tokens." % (args.backend, args.store, args.prefill))
    if args.backend == "service":
        lines[-1] += (" Decode arithmetic requested %s, in force %s." %
                      (args.decode_compute, args.decode_compute_in_force))
    lines.append("")
    lines.append("Command: `%s` (%.0f s on %d cores, %s)" % (
        cmd, elapsed, os.cpu_count() or 0, platform.node()))
    lines.append("")
    for s in sampled:
        lines.append("- " + s)
    lines.append("")
    head = "| sparsity | pruned | direction | scoring | " + " | ".join(m[0].name for m in models)
    if args.backend == "service":
        head += " | " + " | ".join("%s vs oracle" % m[0].name for m in models)
    lines.append(head + " |")
    lines.append("|" + "---|" * (head.count("|") - 0))
    out_json = {"command": cmd, "backend": args.backend, "elapsed_s": elapsed,
                "sampling": sampled, "args": vars(args), "results": []}
    for ci, c in enumerate(configs):
        row = ["%.0f%%" % (100 * c["sparsity"]), c["target"],
               "per-token" if c["direction"] == P.PER_TOKEN else "per-channel",
               "magnitude" if c["scoring"] == P.MAGNITUDE else "output-aware"]
        extra = []
        jr = dict(c, name=config_name(c), models={})
        for mi, mm in enumerate(models):
            r = results.get((mi, ci), {})
            if "errors" in r:
                sm = summarize(r["errors"])
                row.append("%.4f" % sm["mean"])
                jm = dict(sm)
                if r.get("oracle") is not None:
                    jm["vs_oracle"] = summarize(r["oracle"])
                    extra.append("%.1e" % jm["vs_oracle"]["mean"])
                elif args.backend == "service":
                    extra.append("-")
                if r.get("achieved"):
                    jm["achieved_sparsity_kv"] = r["achieved"]
                if r.get("kept_mismatch"):
                    # fraction of compressed K / V elements whose kept/dropped state differs
                    # between the service (ReadKV) and the oracle: 0 for magnitude scoring
                    jm["kept_mismatch_kv"] = r["kept_mismatch"]
                    extra[-1] += " (kept-set mismatch K %.1e, V %.1e)" % tuple(
                        np.max(np.array(r["kept_mismatch"]), axis=0))
            else:
                row.append(r.get("status", "n/a").split(":")[0])
                jm = {"status": r.get("status", "n/a")}
                if args.backend == "service":
                    extra.append("-")
            jr["models"][mm[0].name] = jm
        if c["direction"] == P.PER_TOKEN and c["scoring"] == P.OUTPUT_AWARE and c["target"] == "V":
            row[3] += " (= magnitude)"
        lines.append("| " + " | ".join(row + extra) + " |")
        out_json["results"].append(jr)
    if args.backend == "service":
        for mi, mm in enumerate(models):
            r = results.get((mi, -1), {})
            if "errors" in r:
                lines.append("")
                lines.append("Dense session sanity (%s): mean rel. error %.2e vs numpy dense."
                             % (mm[0].name, summarize(r["errors"])["mean"]))
                out_json.setdefault("dense_sanity", {})[mm[0].name] = summarize(r["errors"])
    md = "\n".join(lines)
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out_json, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
