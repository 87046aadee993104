"""Where an evaluation cell's seconds go, today's path against the faster one, side by side in ONE run.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/eval_cell.py          # study shape: 155 email test mails, 128 tokens
    .venv/bin/python benchmarks/eval_cell.py --model tiny-random --limit 8 --max-new-tokens 8 --out /tmp/ec   # smoke

A compare cell (``percontrast compare``, ``commands/compare.py``) generates for every test example, scores
the gold responses (likelihood: NLL, personal tokens, mean PIR), then computes ROUGE / METEOR, the
degeneration flags and own-author attribution. This script times each phase of one such cell on the
study's data and decoding (email, k 1, max_length 256, greedy with the 3-gram ban, ``--max-new-tokens``
128: at or above the 95th percentile of the gold mails' length), for two paths:

  before  what a cell ran until 2026-12-03: generation batches of 16 with transformers' concatenating KV
          cache (``preallocate=False``), then the likelihood pass over the gold responses, batches of 16 in
          record order (``bucket=False``): every with-profile prompt runs through the model twice (the
          rule for dropping finished rows from a batch is today's on both paths);
  after   what compare runs now (``score.generate_and_score_records``): each with-profile prompt is
          prefilled once into the in-place KV cache, the gold response is scored on top of it, the cache is
          cut back and decoding continues; batches of ``--batch-after`` (0, the default: chosen from memory).

Each round runs before then after (``--reps`` rounds; the median is reported; run it alone: the two paths
are minutes long and cannot be interleaved finer). Prefill is also timed on its own (``max_new_tokens`` 1)
for both. Both paths' generations are compared (float32: a batch of other rows can flip a near-tie, so
the share of identical generations is reported, not assumed) and so are their likelihood values. Then
ROUGE / METEOR, degeneration and attribution are timed once (the same code on both paths). Writes
OUT.md and OUT.json.
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
    ap.add_argument("--batch-after", type=int, default=0, help="0: chosen from memory (batch_size 0)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/eval_cell"))
    args = ap.parse_args()

    import torch

    from percontrast.attribution import attribution_share, fit_attributor
    from percontrast.commands.score import generate_and_score_records, score_records
    from percontrast.datasets import load_records
    from percontrast.degeneration import degeneration_flags
    from percontrast.files import write_text_atomic
    from percontrast.generation import auto_batch_size, generate_from_ids, score_batch_cap
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

    paths = {"before": {"batch": args.batch_before, "preallocate": False, "bucket": False, "shared": False},
             "after": {"batch": args.batch_after, "preallocate": True, "bucket": True, "shared": True}}
    # each path's decoding options carry its batch size: 0 (after) is "from memory" only when the OPTIONS
    # say 0 (a batch_size argument of 0 falls back to the options' own, 16 by default)
    decode = {name: DecodingOptions(max_new_tokens=args.max_new_tokens, no_repeat_ngram_size=3, batch_size=p["batch"])
              for name, p in paths.items()}
    one = {name: DecodingOptions(max_new_tokens=1, batch_size=p["batch"]) for name, p in paths.items()}

    def generate(p, opts, info=None):
        return generate_from_ids(model, tok, prompts, opts, p["batch"] or None, False, True, info=info,
                                 preallocate=p["preallocate"])

    secs: dict[str, dict[str, list[float]]] = {name: {} for name in paths}
    outputs: dict[str, dict] = {name: {} for name in paths}

    def timed(name: str, phase: str, fn):
        t0 = time.perf_counter()
        value = fn()
        secs[name].setdefault(phase, []).append(time.perf_counter() - t0)
        print(f"{name:6s} {phase:24s} {secs[name][phase][-1]:7.1f} s", flush=True)
        return value

    def before_pass(p):
        info: list = []
        ids = timed("before", "generation", lambda: generate(p, decode["before"], info))
        rows = timed("before", "likelihood", lambda: score_records(
            model, tok, recs, like_builder, batch_size=p["batch"], progress=False, bucket=False))
        return ids, info, rows

    def after_pass(p):
        info: list = []
        texts, rows = timed("after", "generation + likelihood", lambda: generate_and_score_records(
            model, tok, recs, like_builder, decode["after"], batch_size=p["batch"] or None, progress=False,
            info=info))
        return texts, info, rows

    generate(paths["after"], one["after"])         # warm-up (allocator, kernels)
    load0 = os.getloadavg()
    for _ in range(args.reps):
        for name, p in paths.items():
            timed(name, "prefill", lambda: generate(p, one[name]))
        ids, info, rows = before_pass(paths["before"])
        outputs["before"].update(texts=[tok.decode(g, skip_special_tokens=True).strip() for g in ids],
                                 info=info, rows=rows)
        texts, info, rows = after_pass(paths["after"])
        outputs["after"].update(texts=texts, info=info, rows=rows)
    load1 = os.getloadavg()
    # The text-side phases run the same code on both paths; timed once, on the after path's texts.
    texts = outputs["after"]["texts"]
    refs = [r["output"] for r in recs]
    post: dict[str, float] = {}
    score_examples(texts[:2], refs[:2], DEFAULT_METRICS)   # warm-up: WordNet loads once per process
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
    b, a = med["before"], med["after"]
    b["decode"] = max(b["generation"] - b["prefill"], 0.0)
    b["model total"] = b["generation"] + b["likelihood"]
    a["model total"] = a["generation + likelihood"]
    for m in (a, b):
        m["cell total"] = m["model total"] + sum(post.values())
    same = [x == y for x, y in zip(outputs["before"]["texts"], outputs["after"]["texts"])]
    diff = max((abs(x - y) for ra, rb in zip(outputs["before"]["rows"], outputs["after"]["rows"])
                for k in ("logp_with", "logp_without") for x, y in zip(ra[k], rb[k])), default=0.0)
    new_tokens = {name: sum(i["new_tokens"] for i in o["info"]) for name, o in outputs.items()}
    # the batch sizes generate_and_score resolves for batch_size 0 (generation: the KV cache; scoring: the logits)
    batch_after = args.batch_after or auto_batch_size(model, max(len(p) for p in prompts) + args.max_new_tokens)
    score_after = args.batch_after or auto_batch_size(
        model, max(len(p) for p in prompts) + gold_lens[-1], logit_positions=gold_lens[-1], cap=score_batch_cap(model))
    info = run_info()
    res = {"command": "benchmarks/eval_cell.py " + " ".join(sys.argv[1:]), "machine": info["machine"],
           "date": info["date"], "git_commit": info.get("git_commit"), "torch_threads": torch.get_num_threads(),
           "load_average_start": load0, "load_average_end": load1, "model": args.model, "data": args.data,
           "examples": len(recs), "max_new_tokens": args.max_new_tokens, "paths": paths, "seconds": med,
           "text_side_seconds": post, "new_tokens": new_tokens, "identical_generations": sum(same),
           "max_abs_logp_difference": diff,
           "gold_tokens": {"median": gold_lens[len(gold_lens) // 2], "p95": gold_lens[int(0.95 * (len(gold_lens) - 1))]},
           "batch_after_resolved": {"generation": batch_after, "scoring": score_after}, "speedup_cell": b["cell total"] / a["cell total"],
           "speedup_model": b["model total"] / a["model total"]}
    lines = [f"# Evaluation cell: where the seconds go ({args.model})", "",
             f"Command: `.venv/bin/python {res['command']}`", "",
             f"Machine: {info['machine']}; torch threads {torch.get_num_threads()}; date {info['date']}; "
             f"git {info.get('git_commit')}; load average {load0[0]:.2f} at start, {load1[0]:.2f} at end.",
             f"Data: {len(recs)} records of `{args.data}`, gold response {res['gold_tokens']['median']} tokens "
             f"median, {res['gold_tokens']['p95']} at the 95th percentile; max_new_tokens {args.max_new_tokens}, "
             f"greedy with the 3-gram ban; {args.reps} round(s), median seconds.", "",
             f"- before (the code until 2026-12-03): batch {args.batch_before}, transformers' concatenating KV cache, "
             "generation and likelihood as two passes (the prompt prefilled twice), likelihood batches in record order "
             "(finished rows leave the batch by the current rule, a quarter at a time, on both paths)",
             f"- after (compare's cells now): generation batch {batch_after}, scoring batch {score_after} "
             f"({'from memory, batch_size 0' if not args.batch_after else 'fixed'}), in-place KV cache, one prefill "
             "per prompt for generation and the gold likelihood", "",
             "| phase | before (s) | after (s) | before / after |", "|---|---|---|---|",
             f"| prefill alone (1 new token; inside generation) | {b['prefill']:.1f} | {a['prefill']:.1f} | "
             f"{b['prefill'] / a['prefill']:.2f}x |",
             f"| decoding (generation - prefill) | {b['decode']:.1f} | | |",
             f"| generation | {b['generation']:.1f} | | |",
             f"| likelihood (gold responses, both prompts) | {b['likelihood']:.1f} | | |",
             f"| model total (generation + likelihood) | {b['model total']:.1f} | {a['model total']:.1f} | "
             f"**{res['speedup_model']:.2f}x** |",
             f"| cell total (+ text-side phases) | {b['cell total']:.1f} | {a['cell total']:.1f} | "
             f"**{res['speedup_cell']:.2f}x** |", "",
             "Same code on both paths, timed once: " + ", ".join(f"{k} {v:.1f} s" for k, v in post.items()) + ".", "",
             f"Generated tokens: before {new_tokens['before']}, after {new_tokens['after']}; identical generations "
             f"{sum(same)}/{len(same)} (float32: a batch of other rows can flip a near-tie); largest |log-prob "
             f"difference| of the likelihood rows {diff:.2e}.", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix(".json"), json.dumps(res, indent=1, default=str))
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
