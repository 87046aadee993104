"""Cost of profile-contrastive decoding against plain decoding, batch 1 and 16.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/contrast_cost.py [--threads N] [--reps 2] [--max-new-tokens 64]

The same 16 prompts (the study's email test mails when data/email-short is prepared, else the built-in
sample; k=1, max_length 256) are generated greedily with plain decoding and with --contrast-alpha 1
(guard 0.1), whose every step runs the with-profile and the profile-free prompt of each row in one batch
of 2B rows. Each half of that batch is prefilled at its own length (the profile-free prompts are
shorter), into the in-place KV cache; "before" is the joint prefill at the with-profile length with
transformers' concatenating cache. Runs are interleaved within each repetition so that machine load hits
all alike; tokens/s is the median over repetitions. Target: contrast costs at most 1.6x the time per
generated token of plain decoding at batch 16. Writes benchmarks/results/contrast_cost.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data/email-short/test.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--data", default=str(DATA) if DATA.exists() else "builtin:sample-test",
                    help="prompts (default: the study's email test mails when data/email-short is prepared)")
    ap.add_argument("--model", default="smollm2-135m", help="model spec (tiny-random for the smoke test)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/contrast_cost.md"))
    args = ap.parse_args()

    import torch

    from percontrast.datasets import load_records
    from percontrast.files import write_text_atomic
    from percontrast.generation import DecodingOptions, generate_from_ids
    from percontrast.models import load_model
    from percontrast.options import PromptOptions
    from percontrast.prompts import get_task
    from percontrast.runinfo import run_info

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    model.eval()
    task = get_task("email")
    recs = load_records(args.data, task)
    if len(recs) < 16:   # the built-in sample is small: add its training messages
        recs += load_records("builtin:sample-train", task)
    recs = recs[:16]
    builder = PromptOptions(task="email", k=1, max_length=256).prompt_builder(tok, reserve_tokens=args.max_new_tokens)
    enc = [builder.encode(r, with_response=False) for r in recs]
    with_p, without_p = [e["prompt_with"] for e in enc], [e["prompt_without"] for e in enc]
    plain = DecodingOptions(max_new_tokens=args.max_new_tokens)
    contrast = DecodingOptions(max_new_tokens=args.max_new_tokens, contrast_alpha=1.0, contrast_plausibility=0.1)
    runs = {f"{kind} b{b}": (lambda o=o, b=b, c=c: generate_from_ids(model, tok, with_p, o, b, False, True,
                                                                      contrast_prompts=c))
            for b in (1, 16) for kind, o, c in (("plain", plain, None), ("contrast", contrast, without_p))}
    # "before": the joint 2B-row prefill at the with-profile length and transformers' concatenating cache
    for kind, o, c in (("plain", plain, None), ("contrast", contrast, without_p)):
        runs[f"{kind} b16 before"] = (lambda o=o, c=c: generate_from_ids(
            model, tok, with_p, o, 16, False, True, contrast_prompts=c, preallocate=False))
    runs["plain b16"]()   # warm-up
    rates: dict[str, list[float]] = {k: [] for k in runs}
    load0 = os.getloadavg()
    for rep in range(args.reps):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            out = fn()
            sec = time.perf_counter() - t0
            n = sum(len(o) for o in out)
            rates[name].append(n / sec)
            print(f"rep {rep} {name}: {n} tokens in {sec:.1f} s = {n / sec:.2f} tok/s", flush=True)
    load1 = os.getloadavg()
    med = {k: statistics.median(v) for k, v in rates.items()}
    info = run_info()
    lines = [f"# Profile-contrastive decoding: cost against plain decoding ({args.model}, greedy)", "",
             f"Command: `.venv/bin/python benchmarks/contrast_cost.py {' '.join(sys.argv[1:])}`", "",
             f"Machine: {info['machine']}, torch threads {torch.get_num_threads()}; date {info['date']}; "
             f"load average {load0[0]:.1f} at start, {load1[0]:.1f} at end.",
             f"16 prompts of `{args.data}` (email, k=1), contrast alpha 1.0, plausibility 0.1; "
             f"{args.reps} interleaved repetitions, median tokens/s.", "",
             "| batch | plain tok/s | contrast tok/s | time per token, contrast / plain |", "|---|---|---|---|"]
    for b in (1, 16):
        p, c = med[f"plain b{b}"], med[f"contrast b{b}"]
        lines.append(f"| {b} | {p:.2f} | {c:.2f} | {p / c:.2f}x |")
    p, c = med["plain b16 before"], med["contrast b16 before"]
    lines.append(f"| 16, before (joint prefill, concatenating cache) | {p:.2f} | {c:.2f} | {p / c:.2f}x |")
    lines += ["", "Target: at most 1.6x at batch 16 (it was 2.00x, 2026-11-28)."]
    write_text_atomic(Path(args.out), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
