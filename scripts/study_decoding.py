"""Decoding choice for the study, on the VALIDATION users, with the untrained model (the only model
that exists before training, so the choice cannot favour a method): each decoding variant in one
process, the same prompts, every study metric (ROUGE-1/L, METEOR, own-author attribution,
hit-the-cap and loop shares).

    OMP_NUM_THREADS=2 .venv/bin/python scripts/study_decoding.py \
        --data data/email-short/val.jsonl --limit 48 --task email --out results/study/email-decoding

Variants: no_repeat_ngram_size 0 and 3 (plain greedy), then profile-contrastive decoding at
alpha 0.5, 1, 2 (with the n-gram setting given by --contrast-ngram) and alpha 1 against another
user's profile (swap). Writes results.json and results.md into --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--task", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--contrast-ngram", type=int, default=3)
    ap.add_argument("--alphas", type=float, nargs="*", default=[0.5, 1.0, 2.0])
    ap.add_argument("--limit", type=int, default=None, help="Use only the first N records.")
    ap.add_argument("--no-swap", action="store_true", help="Skip the swap variant.")
    ap.add_argument("--resume", action="store_true",
                    help="Keep the rows already in --out/results.json (same data, size and model) and run only "
                         "the variants it lacks.")
    a = ap.parse_args(argv)

    from percontrast.attribution import attribution_share, fit_attributor, gold_ceiling
    from percontrast.commands.evaluate import score
    from percontrast.datasets import load_records
    from percontrast.degeneration import degeneration_flags, degeneration_summary
    from percontrast.generation import generate_for
    from percontrast.options import DecodingOptions, ModelDataOptions
    from percontrast.prompts import get_task
    from percontrast.runinfo import run_info

    opts = ModelDataOptions(model=a.model, data=a.data, task=a.task, k=a.k, max_length=a.max_length)
    recs = load_records(a.data, get_task(a.task), limit=a.limit)
    model, tok = opts.load_model()
    att = fit_attributor(recs, seed=0)
    variants = [("greedy", {"no_repeat_ngram_size": 0}), ("greedy, no-repeat 3", {"no_repeat_ngram_size": 3})]
    variants += [(f"contrast alpha {x:g}, no-repeat {a.contrast_ngram}",
                  {"no_repeat_ngram_size": a.contrast_ngram, "contrast_alpha": x}) for x in a.alphas]
    if not a.no_swap:
        variants += [(f"contrast alpha 1 swap, no-repeat {a.contrast_ngram}",
                      {"no_repeat_ngram_size": a.contrast_ngram, "contrast_alpha": 1.0,
                       "contrast_counterfactual": "swap"})]
    rows, earlier = [], []
    old = Path(a.out) / "results.json"
    if a.resume and old.exists():
        prev = json.loads(old.read_text())
        cfg = prev["run"]["config"]
        if (cfg["data"], prev["n"], prev["model"], cfg["max_length"]) != (a.data, len(recs), a.model, a.max_length):
            raise SystemExit(f"{old}: made for {cfg['data']} ({prev['n']} records, {prev['model']}, max_length "
                             f"{cfg['max_length']}), not {a.data} ({len(recs)}, {a.model}, {a.max_length}); "
                             f"drop --resume or choose another --out")
        rows = prev["rows"]
        earlier = [*prev.get("earlier_runs", []), prev["run"]]
    done = {r["variant"] for r in rows}
    for name, kw in variants:
        if name in done:
            continue
        dec = DecodingOptions(max_new_tokens=a.max_new_tokens, batch_size=16, **kw)
        info: list = []
        t0 = time.perf_counter()
        texts = generate_for(model, tok, recs, a.task, opts, dec, use_profile=True, progress=False, info=info)
        secs = time.perf_counter() - t0
        _, corpus = score(texts, recs, ["rouge1", "rougeL", "meteor"])
        deg = degeneration_summary([degeneration_flags(t, i["ended"]) for t, i in zip(texts, info)], texts)
        own = attribution_share(att, texts, [r["user_id"] for r in recs])
        rows.append({"variant": name, "decoding": kw, **corpus, "attributed": own["share"],
                     "hit_cap": deg["hit_cap"], "loop": deg["loop"], "seq_rep_4": deg["seq_rep_4"],
                     "distinct_2": deg["distinct_2"], "seconds": round(secs, 1)})
        print(json.dumps(rows[-1]), flush=True)
    # plain first, then contrast by alpha, swap last: the table reads as the alpha curve
    rows.sort(key=lambda r: (r["decoding"].get("contrast_alpha", 0) > 0,
                             r["decoding"].get("contrast_counterfactual") == "swap",
                             r["decoding"].get("contrast_alpha", 0), r["decoding"].get("no_repeat_ngram_size", 0)))
    gold = gold_ceiling(att, recs)
    label = a.data if a.limit is None else f"{a.data} (first {a.limit})"
    res = {"data": label, "n": len(recs), "model": a.model, "rows": rows,
           "attribution": {"chance": gold["chance"], "ceiling": gold["share"]}, "run": run_info(opts)}
    if earlier:
        res["earlier_runs"] = earlier
    write(res, Path(a.out))


def write(res: dict, out: Path) -> None:
    from percontrast.files import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(res, indent=1, default=str))
    head = "| decoding | ROUGE-1 | ROUGE-L | METEOR | own-author % | hit cap % | loop % | seq-rep-4 | distinct-2 | s |"
    lines = [f"# Decoding on validation ({res['data']}, {res['n']} examples, untrained {res['model']})", "",
             head, "|" + "---|" * 10]

    def f(x, scale=1.0, digits=3):
        return "—" if x is None else f"{scale * x:.{digits}f}"
    for r in res["rows"]:
        lines.append(f"| {r['variant']} | {f(r['rouge1'], 100, 2)} | {f(r['rougeL'], 100, 2)} | "
                     f"{f(r['meteor'], 100, 2)} | {f(r['attributed'], 100, 1)} | {f(r['hit_cap'], 100, 1)} | "
                     f"{f(r['loop'], 100, 1)} | {f(r['seq_rep_4'])} | {f(r['distinct_2'])} | {r['seconds']:.0f} |")
    att, run = res["attribution"], res["run"]
    lines += ["", f"Attribution: chance (majority user) {100 * att['chance']:.1f}%, gold responses "
              f"{100 * att['ceiling']:.1f}%.", "", f"Machine: {run.get('machine')}; date {run.get('date')}; "
              f"git {run.get('git_commit')}."]
    for e in res.get("earlier_runs", []):
        lines.append(f"Rows kept from an earlier run: {e.get('machine')}; date {e.get('date')}; git {e.get('git_commit')}.")
    lines.append("")
    write_text_atomic(out / "results.md", "\n".join(lines))


if __name__ == "__main__":
    main()
