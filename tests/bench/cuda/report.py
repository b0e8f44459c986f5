#!/usr/bin/env python3
"""Merges batch_decode_bench's and sdpa_baseline.py's JSON lines (one run) into a markdown table
with each mode's speed-up over the faster PyTorch SDPA backend and over the project's own dense
kernel, and issue #13's targets.

Usage: report.py BENCH.jsonl BASELINE.jsonl
"""
import json
import sys


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                rows.append(json.loads(line))
    return rows


def target(mode, batch):
    if mode == "s0.7":
        return 2.0 if batch == 1 else 2.3
    if mode == "s0.5":
        return 1.5
    return 1 / 1.1  # own dense within 10% of the baseline


def main():
    bench = load(sys.argv[1])
    base = {(r["batch"], r["context"], r["head_dim"], r["dtype"]): r for r in load(sys.argv[2])}
    dtype_names = {"float16": "float16", "bfloat16": "bfloat16"}
    print("| batch | context | head_dim | dtype | mode | MB read | ms | TB/s | SDPA ms (backend) "
          "| SDPA TB/s | speed-up vs SDPA | target | vs own dense |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    dense = {}
    for r in bench:
        key = (r["batch"], r["context"], r["head_dim"], dtype_names.get(r["dtype"], r["dtype"]))
        if r["mode"] == "dense":
            dense[key] = r["ms"]
        b = base.get(key)
        if b and b.get("best_ms"):
            sp = b["best_ms"] / r["ms"]
            tgt = target(r["mode"], r["batch"])
            met = "met" if sp >= tgt else "missed"
            base_s = f"{b['best_ms']:.4f} ({b['best']})"
            base_tb = f"{b['tbps']:.2f}"
            sp_s = f"**{sp:.2f}x**"
            tgt_s = (f">= {tgt:.2f}x: {met}" if r["mode"] != "dense"
                     else f"<= 1.10x SDPA time: {met}")
        else:
            base_s, base_tb, sp_s, tgt_s = "n/a", "n/a", "n/a", "n/a"
        own = f"{dense[key] / r['ms']:.2f}x" if key in dense else "n/a"
        print(f"| {r['batch']} | {r['context']} | {r['head_dim']} | {r['dtype']} | {r['mode']} | "
              f"{r['bytes'] / 1e6:.1f} | {r['ms']:.4f} | {r['tbps']:.2f} | {base_s} | {base_tb} "
              f"| {sp_s} | {tgt_s} | {own} |")
    print()
    print("SDPA per backend (ms): " + "; ".join(
        f"{k[0]}x{k[1]} d{k[2]} {k[3]}: cudnn {v.get('cudnn_ms') or 'n/a'}, "
        f"flash {v.get('flash_ms') or 'n/a'}" for k, v in base.items()))


if __name__ == "__main__":
    main()
