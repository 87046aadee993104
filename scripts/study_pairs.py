"""Paired differences between any two arms of a finished ``compare`` run, beyond compare's own "vs ce"
columns: the protocol check (ce - untrained), what the profile does (untrained with - without), and
what contrastive decoding adds to each model (X+contrast - X). Same statistics as compare: pairs on
shared seeds and examples (an untrained greedy arm, run once, stands for every seed of the other),
mean difference with a 95% bootstrap interval over seeds, then examples (10,000 resamples, RNG seed 0).

    .venv/bin/python scripts/study_pairs.py results/study/email-main

Writes pairs.md (with a per-seed table: overlap scores and mean generated tokens, or the likelihood
metrics of a run without generations) and pairs.json into
that folder; pairs whose arms have no cells are skipped. A method that the run trained at several clips
is one arm per clip, named with it: ``perce[0:5]``, ``perce[0.8:5]``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_PAIRS = ["ce - base_profile", "perce - base_profile", "perce - ce", "base_profile - base_noprofile",
                 "ce - base_noprofile", "base_profile+contrast - base_profile", "ce+contrast - ce",
                 "perce+contrast - perce", "perce+contrast - ce+contrast", "ce+contrast - base_profile+contrast",
                 # PerCE's ablations against PerCE itself and against ce; the other baselines against ce
                 "perce@norm - perce", "perce@norm - ce", "perce@every4 - perce", "lossce - ce", "entce - ce",
                 "jsd - ce", "threshold - ce", "jsd - perce", "threshold - perce",
                 # a clip ablation (email-clip.yaml): a method run at several clips is named "perce[0:5]" etc.
                 "perce[0:5] - perce[0.8:5]", "perce[1:5] - perce[0.8:5]", "perce[0:5] - ce", "perce[1:5] - ce",
                 "perce[0.8:5] - ce"]
SCALED = {"rouge1", "rouge2", "rougeL", "rougeLsum", "meteor", "attributed", "hit_cap", "loop"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--pairs", nargs="*", default=DEFAULT_PAIRS, help='"A - B" each (difference A minus B).')
    ap.add_argument("--eval-set", default="test")
    ap.add_argument("--resamples", type=int, default=10_000)
    a = ap.parse_args(argv)

    from percontrast.commands.compare_report import _LABEL, is_base, pair_by_seed, vs_reference
    from percontrast.files import write_text_atomic

    run = Path(a.run_dir)
    if not (run / "results.json").exists():
        raise SystemExit(f"{run / 'results.json'}: not found; give the output_dir of a finished compare run")
    bad = [p for p in a.pairs if len(p.split(" - ")) != 2]
    if bad:
        raise SystemExit(f"--pairs: {bad[0]!r} is not of the form 'A - B' (spaces around the minus)")
    res = json.loads((run / "results.json").read_text())
    metrics = res["metrics"]
    cells = [c for p in sorted((run / "cells").glob("*.json"))
             if (c := json.loads(p.read_text()))["eval_set"] == a.eval_set]
    clips: dict[str, set] = {}
    for c in cells:
        if c.get("clip_min") is not None:
            clips.setdefault(c["method"], set()).add((c["clip_min"], c["clip_max"]))
    arms: dict[str, list[dict]] = {}
    for c in cells:   # a method run at several clips is one arm per clip: "perce[0.8:5]"
        name = c["method"]
        if len(clips.get(name, ())) > 1:
            name += f"[{c['clip_min']:g}:{c['clip_max']:g}]"
        arms.setdefault(name, []).append(c)
    for v in arms.values():
        v.sort(key=lambda c: c["seed"])
    deterministic = not res["decoding"].get("do_sample")
    rows = []
    for pair in a.pairs:
        left, right = (s.strip() for s in pair.split(" - "))
        if left not in arms or right not in arms:
            continue
        ca, cb = arms[left], arms[right]
        if is_base(right) and deterministic:        # the once-run arm stands for every seed of the other
            cb, ca = pair_by_seed(cb, ca, True)
        else:
            ca, cb = pair_by_seed(ca, cb, is_base(left) and deterministic)
        row = {"pair": pair, "seeds": sorted({c["seed"] for c in ca + cb if c["trained"]}), "metrics": {}}
        for m in metrics:
            d, _ = vs_reference(ca, cb, m, a.resamples)
            row["metrics"][m] = None if d is None else {k: d["two_level"][k] for k in ("diff", "lo", "hi")}
        rows.append(row)
    write_text_atomic(run / "pairs.json", json.dumps({"eval_set": a.eval_set, "rows": rows}, indent=1))
    lines = [f"# Paired differences, {run} ({a.eval_set})", "",
             "Mean difference A - B over shared seeds and examples [95% bootstrap over seeds, then examples]; "
             "ROUGE/METEOR and shares x100, NLL in nats/token.", "",
             "| A - B | trained seeds | " + " | ".join(_LABEL.get(m, m) for m in metrics) + " |",
             "|" + "---|" * (len(metrics) + 2)]
    for r in rows:
        cells = []
        for m in metrics:
            d = r["metrics"][m]
            k = 100 if m in SCALED else 1
            fmt = "{:+.2f}" if m in SCALED else "{:+.3f}"
            if d is None or d["lo"] is None:
                cells.append("—")
            elif m not in SCALED and d["diff"] == d["lo"] == d["hi"] == 0:
                cells.append("same model")   # likelihood of two decodings of one model: identical by definition
            else:
                cells.append(f"{fmt.format(k * d['diff'])} [{fmt.format(k * d['lo'])}, {fmt.format(k * d['hi'])}]")
        lines.append(f"| {r['pair']} | {', '.join(map(str, r['seeds'])) or '—'} | " + " | ".join(cells) + " |")
    # per seed: how much seeds disagree, and how long the outputs are (short outputs cost ROUGE recall);
    # a likelihood-only run (generate: false) has no overlap scores, so it shows its likelihood metrics
    per_seed = ([m for m in ("rouge1", "rougeL", "meteor") if m in metrics]
                or [m for m in ("nll", "nll_personal", "nll_other", "mean_pir") if m in metrics])
    lines += ["", "Per seed (ROUGE/METEOR x100; new tokens: mean generated tokens per example, the cap is "
              "max_new_tokens):", "",
              "| arm | seed | " + " | ".join(_LABEL.get(m, m) for m in per_seed) + " | mean new tokens |",
              "|" + "---|" * (len(per_seed) + 3)]
    for arm, cells in arms.items():
        for c in cells:
            toks = [e.get("new_tokens") for e in c["examples"]]
            mean_toks = f"{sum(toks) / len(toks):.1f}" if toks and None not in toks else "—"
            m = c["metrics"]
            vals = [("—" if k not in m else f"{100 * m[k]:.2f}" if k in SCALED else f"{m[k]:.3f}") for k in per_seed]
            lines.append(f"| {arm} | {c['seed']} | " + " | ".join(vals) + f" | {mean_toks} |")
    write_text_atomic(run / "pairs.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
