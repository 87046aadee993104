"""Where an evaluation cell's seconds go, today's path against the faster one, side by side in ONE run.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/eval_cell.py          # study shape: 155 email test mails, 128 tokens
    .venv/bin/python benchmarks/eval_cell.py --model tiny-random --limit 8 --max-new-tokens 8 --out /tmp/ec   # smoke

A compare cell (``percontrast compare``, ``commands/compare.py``) generates for every test example, scores
the gold responses (likelihood: NLL, personal tokens, mean PIR), then computes ROUGE / METEOR, the
degeneration flags and own-author attribution. This script times each phase of one such cell on the
study's data and decoding (email, k 1, max_length 256, greedy with the 3-gram ban, ``--max-new-tokens``
128: at or above the 95th percentile of the gold mails' length), for two paths:

  before  what a cell ran until now: generation batches of 16 with transformers' concatenating KV cache
          (``preallocate=False``), likelihood batches of 16 in record order (``bucket=False``);
  after   the current defaults: the in-place KV cache, length-bucketed likelihood batches, and batches
          of ``--batch-after`` for both.

Phases are interleaved (before, after, before, ... per phase, ``--reps`` rounds) so that a change of
machine load hits both paths alike; the median is reported. Prefill is measured on its own
(``max_new_tokens`` 1: one forward over the prompts) and decoding is the rest of generation. Both paths'
token ids are compared (float32: a batch of other rows can flip a near-tie, so the share of identical
generations is reported, not assumed) and so are their likelihood values. Writes OUT.md and OUT.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data/email-short/test.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA) if DATA.exists() else "builtin:sample-test",
                    help="test records (default: the study's email test split, prepared as in results/study)")
    ap.add_argument("--task", default="email")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-before", type=int, default=16)
    ap.add_argument("--batch-after", type=int, default=32)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/eval_cell"))
    args = ap.parse_args()

    import torch

    from percontrast.attribution import attribution_share, fit_attributor
    from percontrast.commands.score import score_records
    from percontrast.datasets import load_records
    from percontrast.degeneration import degeneration_flags
    from percontrast.files import write_text_atomic
    from percontrast.generation import generate_from_ids
    from percontrast.metrics import DEFAULT_METRICS, aggregate, score_examples
    from percontrast.models import load_model
    from percontrast.options import DecodingOptions, PromptOptions
    from percontrast.prompts import get_task
    from percontrast.runinfo import run_info

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    model.eval()
    recs = load_records(args.data, get_task(args.task), limit=args.limit)
    popts = PromptOptions(task=args.task, k=1, max_length=256)
    builder = popts.prompt_builder(tok, reserve_tokens=args.max_new_tokens)
    prompts = [builder.encode(r, with_response=False)["prompt_with"] for r in recs]
    like_builder = popts.prompt_builder(tok)
    gold_lens = sorted(len(builder.encode(r)["response"]) for r in recs)

    paths = {"before": {"batch": args.batch_before, "preallocate": False, "bucket": False},
             "after": {"batch": args.batch_after, "preallocate": True, "bucket": True}}
    decode = DecodingOptions(max_new_tokens=args.max_new_tokens, no_repeat_ngram_size=3)
    one = DecodingOptions(max_new_tokens=1)

    def generate(p, opts, info=None):
        return generate_from_ids(model, tok, prompts, opts, p["batch"], False, True, info=info,
                                 preallocate=p["preallocate"])

    secs: dict[str, dict[str, list[float]]] = {name: {} for name in paths}
    outputs: dict[str, dict] = {name: {} for name in paths}

    def timed(name: str, phase: str, fn):
        t0 = time.perf_counter()
        value = fn()
        secs[name].setdefault(phase, []).append(time.perf_counter() - t0)
        print(f"{name:6s} {phase:12s} {secs[name][phase][-1]:7.1f} s", flush=True)
        return value

    generate(paths["after"], one)                  # warm-up (allocator, kernels)
    load0 = os.getloadavg()
    for _ in range(args.reps):
        for name, p in paths.items():
            timed(name, "prefill", lambda: generate(p, one))
        for name, p in paths.items():
            info: list = []
            ids = timed(name, "generation", lambda: generate(p, decode, info))
            outputs[name].update(ids=ids, info=info)
        for name, p in paths.items():
            outputs[name]["rows"] = timed(name, "likelihood", lambda: score_records(
                model, tok, recs, like_builder, batch_size=p["batch"], progress=False, bucket=p["bucket"]))
    load1 = os.getloadavg()
    # The text-side phases run the same code on both paths; timed once, on the after path's texts.
    texts = [tok.decode(g, skip_special_tokens=True).strip() for g in outputs["after"]["ids"]]
    refs = [r["output"] for r in recs]
    post: dict[str, float] = {}
    t0 = time.perf_counter()
    aggregate(score_examples(texts, refs, DEFAULT_METRICS), DEFAULT_METRICS)
    post["ROUGE + METEOR"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    [degeneration_flags(t, i["ended"]) for t, i in zip(texts, outputs["after"]["info"])]
    post["degeneration"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if len({r.get("user_id") for r in recs}) > 1:
        attribution_share(fit_attributor(recs, seed=0), texts, [r["user_id"] for r in recs])
    post["attribution (fit + predict)"] = time.perf_counter() - t0

    med = {name: {ph: statistics.median(v) for ph, v in s.items()} for name, s in secs.items()}
    for name in med:
        med[name]["decode"] = max(med[name]["generation"] - med[name]["prefill"], 0.0)
        med[name]["model total"] = med[name]["generation"] + med[name]["likelihood"]
        med[name]["cell total"] = med[name]["model total"] + sum(post.values())
    same = [a == b for a, b in zip(outputs["before"]["ids"], outputs["after"]["ids"])]
    diff = max((abs(x - y) for ra, rb in zip(outputs["before"]["rows"], outputs["after"]["rows"])
                for k in ("logp_with", "logp_without") for x, y in zip(ra[k], rb[k])), default=0.0)
    new_tokens = {name: sum(len(g) for g in o["ids"]) for name, o in outputs.items()}
    info = run_info()
    res = {"command": "benchmarks/eval_cell.py " + " ".join(sys.argv[1:]), "machine": info["machine"],
           "date": info["date"], "git_commit": info.get("git_commit"), "torch_threads": torch.get_num_threads(),
           "load_average_start": load0, "load_average_end": load1, "model": args.model, "data": args.data,
           "examples": len(recs), "max_new_tokens": args.max_new_tokens, "paths": paths, "seconds": med,
           "text_side_seconds": post, "new_tokens": new_tokens, "identical_generations": sum(same),
           "max_abs_logp_difference": diff,
           "gold_tokens": {"median": gold_lens[len(gold_lens) // 2], "p95": gold_lens[int(0.95 * (len(gold_lens) - 1))]},
           "speedup": {ph: med["before"][ph] / med["after"][ph] for ph in med["before"] if med["after"][ph] > 0}}
    phases = ["prefill", "decode", "generation", "likelihood", "model total", "cell total"]
    lines = [f"# Evaluation cell: where the seconds go ({args.model})", "",
             f"Command: `.venv/bin/python {res['command']}`", "",
             f"Machine: {info['machine']}; torch threads {torch.get_num_threads()}; date {info['date']}; "
             f"git {info.get('git_commit')}; load average {load0[0]:.2f} at start, {load1[0]:.2f} at end.",
             f"Data: {len(recs)} records of `{args.data}`, gold response {res['gold_tokens']['median']} tokens "
             f"median, {res['gold_tokens']['p95']} at the 95th percentile; max_new_tokens {args.max_new_tokens}, "
             f"greedy with the 3-gram ban; {args.reps} interleaved round(s), median seconds.", "",
             f"- before: batch {args.batch_before}, concatenating KV cache, likelihood in record order",
             f"- after: batch {args.batch_after}, in-place KV cache, length-bucketed likelihood", "",
             "| phase | before (s) | after (s) | before / after |", "|---|---|---|---|"]
    for ph in phases:
        b, a = med["before"][ph], med["after"][ph]
        lines.append(f"| {ph} | {b:.1f} | {a:.1f} | {b / a if a > 0 else float('nan'):.2f}x |")
    lines += ["", "Same code on both paths, timed once: " +
              ", ".join(f"{k} {v:.1f} s" for k, v in post.items()) + " (inside 'cell total').", "",
              f"Generated tokens: before {new_tokens['before']}, after {new_tokens['after']}; identical generations "
              f"{sum(same)}/{len(same)} (float32: a near-tie can flip with the batch's other rows); largest |log-prob "
              f"difference| of the likelihood rows {diff:.2e}.", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix(".json"), json.dumps(res, indent=1, default=str))
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
