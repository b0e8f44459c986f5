#!/usr/bin/env python3
"""Dense decode baseline for tests/bench/cuda: PyTorch SDPA on the GPU machine.

The same shapes as batch_decode_bench (issue #13): q [batch, 32, 1, head_dim], K and V
[batch, 8, context, head_dim] contiguous, enable_gqa=True, under the cuDNN and the flash
backends (each alone); the faster is the baseline. Each call is timed alone with CUDA events
after warm-up, behind a ~30 us GPU spin (torch.cuda._sleep) so that Python's launch latency
stays out of the interval; the median of --iters is reported, rotating over enough copies of the inputs
that >= 240 MB are read between reuses (L2 is 60 MB). Prints one JSON object per shape.
"""
import argparse
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [
    (1, 32768, 128, "float16"),
    (1, 131072, 128, "float16"),
    (8, 32768, 128, "float16"),
    (16, 32768, 128, "float16"),
    (16, 131072, 128, "float16"),
    (64, 16384, 128, "float16"),
    (16, 32768, 64, "float16"),
    (16, 32768, 128, "bfloat16"),
]
KV_HEADS, Q_HEADS = 8, 32
L2_BYTES = 60e6


def time_calls(fn, sets, iters, warmup):
    for i in range(warmup):
        fn(i % sets)
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        try:  # a ~30 us GPU spin queued first: the events then time the GPU only
            torch.cuda._sleep(60000)
        except AttributeError:
            pass
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i % sets)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    out = open(args.json, "w") if args.json else None
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, "
          f"cuDNN {torch.backends.cudnn.version()}", file=sys.stderr)
    for batch, context, head_dim, dt in SHAPES:
        dtype = getattr(torch, dt)
        kv_bytes = 2 * batch * KV_HEADS * context * head_dim * 2
        sets = max(1, math.ceil(4 * L2_BYTES / kv_bytes))
        qs = [torch.randn(batch, Q_HEADS, 1, head_dim, device="cuda", dtype=dtype)
              for _ in range(sets)]
        ks = [torch.randn(batch, KV_HEADS, context, head_dim, device="cuda", dtype=dtype)
              for _ in range(sets)]
        vs = [torch.randn(batch, KV_HEADS, context, head_dim, device="cuda", dtype=dtype)
              for _ in range(sets)]
        row = {"batch": batch, "context": context, "head_dim": head_dim, "dtype": dt,
               "bytes": kv_bytes, "sets": sets}
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel([backend]):
                    def call(i):
                        return F.scaled_dot_product_attention(qs[i], ks[i], vs[i],
                                                              enable_gqa=True)
                    row[name + "_ms"] = time_calls(call, sets, args.iters, args.warmup)
            except Exception as e:  # a backend that does not take this shape
                row[name + "_ms"] = None
                row[name + "_error"] = str(e).splitlines()[0][:200]
        valid = [(row[n + "_ms"], n) for n in ("cudnn", "flash") if row[n + "_ms"] is not None]
        if valid:
            best_ms, best = min(valid)
            row["best_ms"], row["best"] = best_ms, best
            row["tbps"] = kv_bytes / (best_ms * 1e-3) / 1e12
        line = json.dumps(row)
        print(line)
        sys.stdout.flush()
        if out:
            out.write(line + "\n")
            out.flush()
        del qs, ks, vs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
