"""Greedy generation throughput: our loop against ``model.generate`` on the same prompts, batch 16 and 32.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/generation_throughput.py     # study prompts, 64 tokens
    .venv/bin/python benchmarks/generation_throughput.py --model tiny-random --n 4 --max-new-tokens 4 --reps 1 --out /tmp/g.md

The same ``--n`` prompts (the study's email test mails when ``data/email-short`` is prepared, else the
built-in sample; with-profile prompts, k 1, max_length 256) are generated greedily by
``generation.generate_from_ids`` (our loop: sorted batches, LM head on the last position only,
finished rows dropped, in-place KV cache) and by ``model.generate`` on the same sorted, left-padded
batches (transformers' loop, its own DynamicCache, finished rows kept). Runs are interleaved within
each repetition so machine load hits all alike; tokens/s is the median over repetitions. Both must
produce the same token ids (checked and reported). Also our loop at batch 1 when ``--with-b1``, and
the prefill alone (one new token) to show what batching cannot speed up. Writes ``--out`` (markdown).
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
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--n", type=int, default=64, help="prompts")
    ap.add_argument("--batches", default="16,32", help="batch sizes, comma-separated")
    ap.add_argument("--with-b1", action="store_true", help="also our loop one prompt at a time")
    ap.add_argument("--model", default="smollm2-135m", help="model spec (tiny-random for the smoke test)")
    ap.add_argument("--data", default=str(DATA) if DATA.exists() else "builtin:sample-test")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/generation_throughput.md"))
    args = ap.parse_args()

    import torch

    from percontrast.datasets import load_records
    from percontrast.files import write_text_atomic
    from percontrast.generation import DecodingOptions, _hf_generate_batch, end_ids, generate_from_ids
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
    if len(recs) < args.n:   # the built-in sample is small: add its training messages
        recs += load_records("builtin:sample-train", task)
    builder = PromptOptions(task="email", k=1, max_length=256).prompt_builder(tok, reserve_tokens=args.max_new_tokens)
    prompts = [builder.encode(r, with_response=False)["prompt_with"] for r in recs[: args.n]]
    opts = DecodingOptions(max_new_tokens=args.max_new_tokens)
    eos = end_ids(model, tok)
    batches = [int(b) for b in args.batches.split(",")]

    def hf(ps, bs):  # model.generate on the same sorted, left-padded batches as our loop
        order = sorted(range(len(ps)), key=lambda i: -len(ps[i]))
        out = [None] * len(ps)
        with torch.no_grad():
            for s in range(0, len(order), bs):
                idx = order[s:s + bs]
                for i, r in zip(idx, _hf_generate_batch(model, tok, [ps[i] for i in idx], opts, eos, "cpu")[0]):
                    out[i] = r
        return out

    runs = {}
    if args.with_b1:
        runs["ours b1"] = lambda: generate_from_ids(model, tok, prompts, opts, 1, False, True)
    for b in batches:
        runs[f"ours b{b}"] = lambda b=b: generate_from_ids(model, tok, prompts, opts, b, False, True)
        runs[f"model.generate b{b}"] = lambda b=b: hf(prompts, b)
    one = DecodingOptions(max_new_tokens=1)
    prefill = {f"prefill only b{b}": (lambda b=b: generate_from_ids(model, tok, prompts, one, b, False, True))
               for b in batches}
    generate_from_ids(model, tok, prompts[:4], opts, 4, False, True)  # warm-up (allocator, kernels)
    rates: dict[str, list[float]] = {k: [] for k in runs}
    secs: dict[str, list[float]] = {k: [] for k in (*runs, *prefill)}
    tokens: dict[str, int] = {}
    outputs: dict[str, list] = {}
    load0 = os.getloadavg()
    for rep in range(args.reps):
        for name, fn in {**prefill, **runs}.items():
            t0 = time.perf_counter()
            out = fn()
            sec = time.perf_counter() - t0
            secs[name].append(sec)
            if name in runs:
                n = sum(len(o) for o in out)
                tokens[name], outputs[name] = n, out
                rates[name].append(n / sec)
                print(f"rep {rep} {name}: {n} tokens in {sec:.1f} s = {n / sec:.2f} tok/s", flush=True)
    load1 = os.getloadavg()
    ref = outputs[f"model.generate b{batches[0]}"]
    same = {k: sum(a == b for a, b in zip(o, ref)) for k, o in outputs.items()}
    med = {k: statistics.median(v) for k, v in rates.items()}
    sec = {k: statistics.median(v) for k, v in secs.items()}
    info = run_info()
    lens = sorted(len(p) for p in prompts)
    lines = [
        f"# Generation throughput, {args.model} (greedy): our loop vs model.generate", "",
        f"Command: `.venv/bin/python benchmarks/generation_throughput.py {' '.join(sys.argv[1:])}`", "",
        f"Machine: {info['machine']}, torch threads {torch.get_num_threads()}; date {info['date']}; "
        f"git {info.get('git_commit')}; load average {load0[0]:.2f} at start, {load1[0]:.2f} at end.",
        f"Prompts: {len(prompts)} records of `{args.data}` (email task, with profile, k=1, max_length 256), "
        f"{lens[0]}-{lens[-1]} tokens (median {lens[len(lens) // 2]}); max_new_tokens {args.max_new_tokens}; "
        f"runs interleaved in each of {args.reps} repetitions, median reported.", "",
        "| run | generated tokens | tokens/s (median) | per rep | identical to model.generate |", "|---|---|---|---|---|"]
    for k in runs:
        lines.append(f"| {k} | {tokens[k]} | {med[k]:.2f} | {', '.join(f'{r:.2f}' for r in rates[k])} | "
                     f"{same[k]}/{len(prompts)} |")
    lines += ["", "| batch | ours / model.generate (tokens/s) |", "|---|---|"]
    for b in batches:
        lines.append(f"| {b} | {med[f'ours b{b}'] / med[f'model.generate b{b}']:.2f}x |")
    lines += ["", "Prefill alone (max_new_tokens 1, median seconds for all prompts): " +
              ", ".join(f"batch {b} {sec[f'prefill only b{b}']:.1f} s" for b in batches) +
              "; the rest of each run is decoding.", ""]
    write_text_atomic(Path(args.out), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
