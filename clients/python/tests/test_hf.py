"""sparsekv behind a Hugging Face transformers model (run where torch and transformers exist,
e.g. the GPU machine; prints SKIP and exits 0 elsewhere).

Usage: test_hf.py SERVER_ADDRESS MODEL_DIR TEXT_FILE [--device cuda|cpu]

Checks, on docs-byte-10m (a trained Llama with GQA):
1. dense session, float32 storage: teacher-forced logits equal transformers' own forward
   (its sdpa attention on the same device) to fp32 rounding, and greedy generation gives the
   same tokens as model.generate;
2. pruned sessions: reports perplexity and top-1 agreement against dense for 0.5 / 0.7
   per-token magnitude K+V with the strictest schedule (Flush after every step).
Prints `N passed, M failed` and exits non-zero on failure.
"""

import argparse
import math
import sys
import time

import numpy as np

try:
    import torch
    import transformers  # noqa: F401
except ImportError:
    print("SKIP: torch/transformers not installed")
    sys.exit(77)  # reported as skipped, never as passed

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from sparsekv_client import Client, Policy  # noqa: E402
from sparsekv_client.hf import SparsekvGenerator  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("server")
    ap.add_argument("model_dir")
    ap.add_argument("text")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--steps", type=int, default=256)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(args.model_dir, attn_implementation="sdpa")
    model = model.float().to(args.device).eval()
    data = open(args.text, "rb").read().split(b"\x1e")[0]
    ids = [256] + list(data[: args.prompt + args.steps])
    prompt = torch.tensor([ids[: args.prompt]], device=args.device)
    cont = ids[args.prompt: args.prompt + args.steps]
    passed = failed = 0

    def check(name, ok, detail):
        nonlocal passed, failed
        print("%s %s: %s" % ("ok  " if ok else "FAIL", name, detail))
        passed += ok
        failed += not ok

    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids[: args.prompt + args.steps]],
                                           device=args.device)).logits[0].float().cpu().numpy()
    client = Client(args.server)
    t0 = time.time()
    dense = SparsekvGenerator(model, client).score(prompt, cont)
    dt = time.time() - t0
    diff = float(np.max(np.abs(dense - ref)))
    # fp32 everywhere; the service accumulates in a different order than cuBLAS/sdpa: a few
    # 1e-5 on logits of magnitude ~20.
    check("dense logits match transformers", diff < 2e-3,
          "max |diff| %.2e over %d positions (logits up to %.1f), %.1f ms per token" %
          (diff, ref.shape[0], float(np.max(np.abs(ref))), 1e3 * dt / len(ids)))
    gen = SparsekvGenerator(model, client).generate(prompt[:, :64], 48)
    hf = model.generate(prompt[:, :64], max_new_tokens=48, do_sample=False)[0].tolist()
    check("greedy generation matches model.generate", gen == hf,
          "%d of 48 new tokens equal" % sum(a == b for a, b in zip(gen[64:], hf[64:])))

    targets = np.array(ids[1: args.prompt + args.steps + 1])
    def nll(lg):
        lg = lg[args.prompt - 1: args.prompt + args.steps - 1].astype(np.float64)
        t = targets[args.prompt - 1: args.prompt + args.steps - 1]
        m = lg.max(axis=1, keepdims=True)
        lp = lg - m - np.log(np.exp(lg - m).sum(axis=1, keepdims=True))
        return -lp[np.arange(len(t)), t].mean()
    base = nll(dense)
    print("dense: bits/byte %.4f over %d predicted bytes" % (base / math.log(2), args.steps))
    for s in (0.5, 0.7):
        pol = Policy.uniform(s)
        pol.dense_window = 32
        pruned = SparsekvGenerator(model, client, policy=pol, flush_every_step=True).score(prompt, cont)
        sl = slice(args.prompt - 1, args.prompt + args.steps - 1)
        agree = float(np.mean(pruned[sl].argmax(1) == dense[sl].argmax(1)))
        ppl = math.exp(nll(pruned) - base) - 1
        check("K+V %.0f%% per-token magnitude runs" % (100 * s), np.isfinite(ppl),
              "perplexity %+.2f%% vs dense, top-1 agreement %.3f" % (100 * ppl, agree))
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
