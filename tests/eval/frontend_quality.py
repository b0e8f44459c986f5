#!/usr/bin/python3
"""Perplexity and top-1 agreement of a real model whose decode attention runs in sparsekv.

Drives clients/python/examples/llama_frontend.py (numpy Llama, local prefill of the first
--prefill tokens, then every position decoded through DecodeStream with its new K/V, one
request per layer carrying one item per pruning configuration) over validation data of the
models in ../shared/models, teacher-forced, and compares every configuration with the local
dense forward (llama_numpy.forward) of the same tokens:

  ppl          exp(mean NLL of the true next token) over all positions (positions < prefill
               are the dense prefill and identical in every configuration, as in the models'
               READMEs where nothing is pruned before position 32)
  ppl vs dense relative change against the local dense forward
  top-1        fraction of positions whose argmax equals the dense argmax (all / pos >= 32)
  KL           mean KL(dense || config) of the next-token distribution, nats

Sessions store float32 (only pruning error counts) unless the config says otherwise. The
sparsity-0 configuration must reproduce the local dense logits (checked, see --ci).

Modes
  --ci       small run for ctest (stories260k story 0, docs-byte-10m 256 tokens): asserts
             that sparsity 0 matches the local dense logits (fp32 and fp16 storage) and that
             pruned perplexities are finite and not below dense by more than 2%.
  (default)  the full matrix: sparsity 0 / 0.5 / 0.7 x K-only, V-only, K+V x per-token,
             per-channel x magnitude, output-aware, mixed policies, the background schedule
             (chunk_tokens 32) and, with --attribution, per-(layer, KV head) loss attribution.

Command used for RESULTS (about 12 minutes on 2 cores):
  /usr/bin/python3 tests/eval/frontend_quality.py --server-bin build/bin/sparsekv-server \
      --docs-windows 2 --docs-tokens 2048 --stories 16 --attribution \
      --json /tmp/frontend_quality.json --md /tmp/frontend_quality.md

Models and data are read from ../shared (SPARSEKV_SHARED overrides); without them the script
prints SKIP and exits 0.
"""

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
EXAMPLES = os.path.join(REPO, "clients", "python", "examples")
sys.path.insert(0, EXAMPLES)
sys.path.insert(0, os.path.join(REPO, "clients", "python"))
import llama_numpy as L  # noqa: E402
import llama_frontend as F  # noqa: E402
from sparsekv_client import Client, Policy, TensorPolicy  # noqa: E402
from sparsekv_client.testing import server_target  # noqa: E402

WINDOW = 32
NONE = TensorPolicy(0.0)


def tp(s, d, sc):
    return TensorPolicy(s, d, sc)


def policy(k=NONE, v=NONE, chunk=0):
    return Policy(k=k, v=v, dense_window=WINDOW, chunk_tokens=chunk)


def main_configs(sparsities=(0.5, 0.7), background=True):
    """[(name, group, Policy, schedule)]. K-only per-channel output-aware and V per-token
    output-aware (= magnitude) are left out; per-channel K is covered by K-only magnitude
    and K+V both scorings."""
    out = [("dense", "dense", policy(), "strict")]
    combos = [("K+V", "per_token", "magnitude"), ("K+V", "per_token", "output_aware"),
              ("K+V", "per_channel", "magnitude"), ("K+V", "per_channel", "output_aware"),
              ("K", "per_token", "magnitude"), ("K", "per_token", "output_aware"),
              ("K", "per_channel", "magnitude"),
              ("V", "per_token", "magnitude"), ("V", "per_channel", "magnitude"),
              ("V", "per_channel", "output_aware")]
    for s in sparsities:
        pct = "%d%%" % round(100 * s)
        for target, d, sc in combos:
            t = tp(s, d, sc)
            pol = policy(k=t if "K" in target else NONE, v=t if "V" in target else NONE)
            out.append(("%s %s %s %s" % (target, pct, d.replace("_", "-"),
                                         "mag" if sc == "magnitude" else "oa"),
                        "matrix", pol, "strict"))
        out.append(("K+V %s K per-token mag, V per-channel oa" % pct, "mixed",
                    policy(k=tp(s, "per_token", "magnitude"),
                           v=tp(s, "per_channel", "output_aware")), "strict"))
        out.append(("K+V %s K per-token oa, V per-channel oa" % pct, "mixed",
                    policy(k=tp(s, "per_token", "output_aware"),
                           v=tp(s, "per_channel", "output_aware")), "strict"))
        if background:
            out.append(("K+V %s per-token mag, background chunk 32" % pct, "background",
                        policy(k=tp(s, "per_token", "magnitude"),
                               v=tp(s, "per_token", "magnitude"), chunk=32), "background"))
            out.append(("K+V %s K per-token mag, V per-channel oa, background chunk 32" % pct,
                        "background", policy(k=tp(s, "per_token", "magnitude"),
                                             v=tp(s, "per_channel", "output_aware"), chunk=32),
                        "background"))
    return out


def schedule_configs():
    """Per-token K+V compressed on whole-group boundaries (Flush every 32 steps) beside the
    mixed policy, whose Flush compresses whole groups for K too: the fair comparison."""
    out = []
    for s in (0.5, 0.7):
        pct = "%d%%" % round(100 * s)
        pt = policy(k=tp(s, "per_token", "magnitude"), v=tp(s, "per_token", "magnitude"))
        out.append(("K+V %s per-token mag, group-flush" % pct, "schedule", pt, "group-flush"))
        out.append(("K+V %s K per-token mag, V per-channel oa" % pct, "mixed",
                    policy(k=tp(s, "per_token", "magnitude"),
                           v=tp(s, "per_channel", "output_aware")), "strict"))
        out.append(("K %s per-token mag, group-flush" % pct, "schedule",
                    policy(k=tp(s, "per_token", "magnitude")), "group-flush"))
    return out


def calibrated_configs(paths):
    """Uniform per-token K+V against calibrated per-(layer, K/V) allocations read from JSON
    files written by clients/python/examples/calibrate_llama.py ({"scoring": ...,
    "allocations": {"0.5": {"k": [...], "v": [...]}, ...}})."""
    out = {"dense": ("dense", "dense", policy(), "strict")}
    for path in paths:
        with open(path) as f:
            targets = sorted(float(t) for t in json.load(f)["allocations"])
        for s in targets:
            cal = Policy.calibrated(path, s, dense_window=WINDOW)
            sc = cal.k.scoring
            tag = "mag" if sc == "magnitude" else "oa"
            name = "K+V %d%% per-token %s" % (round(100 * s), tag)
            # keyed by name: the same uniform config may come from two files
            out[name] = (name, "matrix", policy(k=tp(s, "per_token", sc),
                                                v=tp(s, "per_token", sc)), "strict")
            fmt = lambda xs: "/".join("%.2f" % a for a in xs)  # noqa: E731
            name += ", calibrated (K %s, V %s)" % (fmt(cal.k.layer_sparsity),
                                                   fmt(cal.v.layer_sparsity))
            out[name] = (name, "calibrated", cal, "strict")
    return list(out.values())


def attribution_configs(model, s=0.7, heads=False):
    """K+V per-token magnitude at s applied to one layer (or one (layer, KV head) with
    heads=True) at a time: the other heads use a local dense attention."""
    out = []
    Hq, Hkv = model.n_heads, model.n_kv_heads
    g = Hq // Hkv
    pol_kv = policy(k=tp(s, "per_token", "magnitude"), v=tp(s, "per_token", "magnitude"))
    for li in range(model.n_layers):
        mask = np.zeros((model.n_layers, Hq), bool)
        mask[li] = True
        out.append(("K+V %d%% per-token mag, only layer %d" % (round(100 * s), li),
                    "attr-layer", pol_kv, "strict", mask))
        if heads:
            for kv in range(Hkv):
                mask = np.zeros((model.n_layers, Hq), bool)
                mask[li, kv * g:(kv + 1) * g] = True
                out.append(("K+V %d%% per-token mag, only layer %d kv-head %d"
                            % (round(100 * s), li, kv), "attr-head", pol_kv, "strict", mask))
    return out


class Acc:
    def __init__(self):
        self.nll = 0.0
        self.n = 0
        self.agree = 0
        self.agree32 = 0
        self.n32 = 0
        self.kl = 0.0
        self.max_abs = 0.0
        self.max_logit = 0.0

    def add(self, logits, dense, targets, prefill):
        self.nll += float(L.nll(logits, targets).sum())
        self.n += len(targets)
        a = logits.argmax(-1) == dense.argmax(-1)
        self.agree += int(a.sum())
        self.agree32 += int(a[WINDOW:].sum())
        self.n32 += max(0, len(targets) - WINDOW)
        self.kl += float(L.kl_dense_to_pruned(dense, logits).sum())
        self.max_abs = max(self.max_abs, float(np.abs(logits - dense).max()))
        self.max_logit = max(self.max_logit, float(np.abs(dense).max()))

    def result(self):
        return {"ppl": math.exp(self.nll / self.n), "nll_nats": self.nll / self.n,
                "top1": self.agree / self.n, "top1_pos32": self.agree32 / max(1, self.n32),
                "kl": self.kl / self.n, "positions": self.n,
                "max_abs_logit_diff": self.max_abs, "max_abs_logit": self.max_logit}


def sequences(model_name, args):
    """[(name, inputs, targets)]"""
    if model_name == "docs-byte-10m":
        stream = L.docs_valid_stream()
        nw = L.docs_num_windows(stream)
        n = args.docs_windows
        idx = [int(round(j * (nw - 1) / max(1, n - 1))) for j in range(n)] if n > 1 else [0]
        if args.docs_window_list:
            idx = [int(w) for w in args.docs_window_list.split(",")]
        out = []
        for i in idx:
            x, y = L.docs_window(stream, i)
            out.append(("window %d" % i, x[:args.docs_tokens], y[:args.docs_tokens]))
        return out
    out = []
    for i, s in enumerate(L.tinystories_ids()[:args.stories]):
        s = np.array(s[:args.story_tokens + 1])
        out.append(("story %d" % i, s[:-1], s[1:]))
    return out


def evaluate(model, client, cfgs, seqs, args, log):
    """Runs every config on every sequence; returns {name: result dict}."""
    fe = F.ServiceLlama(model, client)
    accs = {c[0]: Acc() for c in cfgs}
    for sname, x, y in seqs:
        t0 = time.perf_counter()
        dense = L.forward(model, x)
        t1 = time.perf_counter()
        streams = []
        for c in cfgs:
            name, _, pol, sched = c[:4]
            mask = c[4] if len(c) > 4 else None
            dtype = c[5] if len(c) > 5 else "float32"
            streams.append(F.StreamConfig(name, x, pol, sched, dtype, mask))
        # batches of at most --batch streams (one DecodeStream request per layer per batch);
        # streams with a local-dense head mask go in their own batches (they keep a local
        # dense cache)
        for group in ([s for s in streams if s.service_heads is None],
                      [s for s in streams if s.service_heads is not None]):
            for b0 in range(0, len(group), args.batch):
                part = group[b0:b0 + args.batch]
                logits, _ = fe.run(part, prefill=args.prefill)
                for s, lg in zip(part, logits):
                    accs[s.name].add(lg, dense, y, args.prefill)
        log("%s %s: %d tokens, %d configs, local dense %.1f s, service decode %.1f s"
            % (model.name, sname, len(x), len(cfgs), t1 - t0, time.perf_counter() - t1))
        if args.partial:  # running totals after every sequence (long runs)
            with open(args.partial, "a") as f:
                f.write(json.dumps({"model": model.name, "after": sname,
                                    "results": {n: a.result() for n, a in accs.items()}})
                        + "\n")
    log("  client-side: %s" % {k: (round(v, 1) if isinstance(v, float) else v)
                              for k, v in fe.stats.items()})
    return {name: a.result() for name, a in accs.items()}


def md_table(model_name, cfgs, res, dense_ppl):
    lines = ["| config | schedule | ppl | ppl vs dense | top-1 agree | top-1 (pos >= 32) | "
             "KL nats |", "|---|---|---|---|---|---|---|"]
    for c in cfgs:
        r = res[c[0]]
        lines.append("| %s | %s | %.4f | %+.2f%% | %.4f | %.4f | %.5f |"
                     % (c[0], c[3], r["ppl"], 100 * (r["ppl"] / dense_ppl - 1), r["top1"],
                        r["top1_pos32"], r["kl"]))
    return "\n".join(lines)


def run(args):
    models = {"docs-byte-10m": os.path.join(L.MODELS, "docs-byte-10m"),
              "stories260k": os.path.join(L.MODELS, "stories260k")}
    missing = [p for p in list(models.values()) + [os.path.join(L.DATA, "docs-valid.txt"),
               os.path.join(L.DATA, "tinystories-valid-16.ids")] if not os.path.exists(p)]
    if missing:
        print("SKIP: models/data not found: %s" % ", ".join(missing))
        return 77  # ctest's SKIP_RETURN_CODE: reported as skipped, never as passed
    log = lambda s: (print(s), sys.stdout.flush())
    report = {"host": platform.node(), "prefill": args.prefill, "dense_window": WINDOW,
              "models": {}}
    md = []
    failures = []
    with server_target(args.server, args.server_bin) as target:
        with Client(target, timeout=60) as client:
            client.wait_ready()
            report["server"] = vars_of(client.server_info())
            order = ["stories260k", "docs-byte-10m"]
            for mname in order:
                if args.only and mname != args.only:
                    continue
                model = L.load(models[mname])
                seqs = sequences(mname, args)
                if args.ci:
                    s5 = policy(k=tp(0.5, "per_token", "magnitude"),
                                v=tp(0.5, "per_token", "magnitude"))
                    s7 = policy(k=tp(0.7, "per_token", "magnitude"),
                                v=tp(0.7, "per_channel", "output_aware"))
                    cfgs = [("dense", "dense", policy(), "strict"),
                            ("dense fp16 storage", "dense", policy(), "strict", None,
                             "float16"),
                            ("K+V 50% per-token mag", "matrix", s5, "strict"),
                            ("K+V 70% K per-token mag, V per-channel oa", "mixed", s7,
                             "strict"),
                            ("K+V 70% K per-token mag, V per-channel oa, bg chunk 32",
                             "background", policy(k=s7.k, v=s7.v, chunk=32), "background")]
                elif args.schedules:
                    cfgs = [("dense", "dense", policy(), "strict")] + schedule_configs()
                elif args.calibrated:
                    cfgs = calibrated_configs(args.calibrated.split(","))
                else:
                    cfgs = main_configs(background=not args.no_background)
                    if args.attribution and mname == "docs-byte-10m":
                        cfgs += attribution_configs(model, heads=args.attribution_heads)
                t0 = time.perf_counter()
                res = evaluate(model, client, cfgs, seqs, args, log)
                elapsed = time.perf_counter() - t0
                dense_acc = Acc()
                for _, x, y in seqs:
                    lg = L.forward(model, x)
                    dense_acc.add(lg, lg, y, args.prefill)
                dres = dense_acc.result()
                report["models"][mname] = {
                    "sequences": [s[0] for s in seqs], "tokens": int(sum(len(s[1])
                                                                          for s in seqs)),
                    "local_dense": dres, "seconds": elapsed,
                    "configs": [{"name": c[0], "group": c[1], "schedule": c[3],
                                 "policy": policy_dict(c[2]), "dtype":
                                 c[5] if len(c) > 5 else "float32",
                                 **res[c[0]]} for c in cfgs]}
                md.append("### %s (%s; %d tokens; local dense ppl %.4f)\n\n%s\n"
                          % (mname, ", ".join(s[0] for s in seqs),
                             report["models"][mname]["tokens"], dres["ppl"],
                             md_table(mname, cfgs, res, dres["ppl"])))
                # checks: sparsity 0 == local dense
                for c in cfgs:
                    r = res[c[0]]
                    if c[1] == "dense":
                        fp16 = len(c) > 5 and c[5] == "float16"
                        tol = 0.1 if fp16 else 2e-3
                        ok = r["max_abs_logit_diff"] <= tol and abs(r["ppl"] / dres["ppl"] - 1) \
                            <= (2e-3 if fp16 else 1e-5)
                        log("%s %s: max |logit diff| %.2e (tol %.0e, |logit| <= %.1f), ppl %.6f "
                            "vs local %.6f, top-1 %.5f -> %s"
                            % (mname, c[0], r["max_abs_logit_diff"], tol, r["max_abs_logit"],
                               r["ppl"], dres["ppl"], r["top1"], "ok" if ok else "FAIL"))
                        if not ok:
                            failures.append("%s %s does not match local dense" % (mname, c[0]))
                    elif not (math.isfinite(r["ppl"]) and r["ppl"] >= dres["ppl"] * 0.98):
                        failures.append("%s %s: ppl %.4f vs dense %.4f" % (mname, c[0], r["ppl"],
                                                                           dres["ppl"]))
    text = "\n".join(md)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("all checks passed")
    return 0


def vars_of(x):
    return {k: v for k, v in vars(x).items() if isinstance(v, (int, float, str, list))}


def policy_dict(p):
    return {"k": vars(p.k), "v": vars(p.v), "dense_window": p.dense_window,
            "chunk_tokens": p.chunk_tokens or 256, "group_tokens": p.group_tokens or 32}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--server", default=None, help="HOST:PORT of a running server")
    g.add_argument("--server-bin", default=None, help="start this server binary (port 0)")
    ap.add_argument("--ci", action="store_true")
    ap.add_argument("--only", choices=["docs-byte-10m", "stories260k"])
    ap.add_argument("--docs-windows", type=int, default=1)
    ap.add_argument("--docs-tokens", type=int, default=2048)
    ap.add_argument("--stories", type=int, default=16)
    ap.add_argument("--story-tokens", type=int, default=512)
    ap.add_argument("--prefill", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64, help="streams per DecodeStream request")
    ap.add_argument("--attribution", action="store_true")
    ap.add_argument("--attribution-heads", action="store_true",
                    help="also per (layer, KV head); implies --attribution")
    ap.add_argument("--no-background", action="store_true")
    ap.add_argument("--schedules", action="store_true",
                    help="only the group-flush vs mixed-policy comparison")
    ap.add_argument("--partial", help="append running totals (JSON lines) here after "
                    "every sequence")
    ap.add_argument("--docs-window-list", default="",
                    help="comma-separated docs-byte-10m window indices (overrides --docs-windows)")
    ap.add_argument("--calibrated", default="",
                    help="comma-separated allocation files from calibrate_llama.py: uniform "
                    "vs calibrated per-(layer, K/V) sparsity at the files' mean sparsities")
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args()
    if not args.server and not args.server_bin:
        ap.error("--server or --server-bin is required")
    if args.attribution_heads:
        args.attribution = True
    if args.ci:
        args.docs_windows, args.docs_tokens, args.stories = 1, 256, 1
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
