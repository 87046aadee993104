"""Decoding choice for the study, on the VALIDATION users, with the untrained model (the only model
that exists before training, so the choice cannot favour a method): each decoding variant in one
process, the same prompts, every study metric (ROUGE-1/L, METEOR, own-author attribution,
hit-the-cap and loop shares).

    OMP_NUM_THREADS=2 .venv/bin/python scripts/study_decoding.py \
        --data data/email-short/val.jsonl --limit 48 --task email --out results/study/email-decoding

The same grid on a fine-tuned model of the study (issue 12: is the best contrast alpha different after
training?): --train-from COMPARE_YAML --arm ce --seed 0 trains that arm's model exactly as the compare
config's cell would (its train: block, variants, learning rate and clip; model, k and max_length are
taken from it too), on its training data, then decodes the validation records with it:

    OMP_NUM_THREADS=2 .venv/bin/python scripts/study_decoding.py --train-from \
        configs/compare/study/email-main.yaml --arm ce --seed 0 --data data/email-short/val.jsonl \
        --limit 48 --task email --no-plain --no-swap --alphas 0.25 0.5 1 2 --out results/study/email-decoding-ce

Variants: no_repeat_ngram_size 0 and 3 (plain greedy), then profile-contrastive decoding at each
of --alphas (default 0.5, 1, 2; with the n-gram setting given by --contrast-ngram) and alpha 1
against another user's profile (swap; --no-swap skips it). Writes results.json, results.md and
alpha_curve.png into --out. --resume keeps the rows already there and runs only the missing
variants (the study's grid: --alphas 0.25 0.5 1 2 --resume); --summarize-only redraws from results.json.
--curves DIR [DIR ...] draws the alpha curves of several earlier runs (e.g. the untrained, ce and perce
models) on one figure, --out/alpha_curves.png, and runs nothing.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="Validation records to decode (not needed with --curves/--summarize-only).")
    ap.add_argument("--task")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--contrast-ngram", type=int, default=3)
    ap.add_argument("--alphas", type=float, nargs="*", default=[0.5, 1.0, 2.0])
    ap.add_argument("--limit", type=int, default=None, help="Use only the first N records.")
    ap.add_argument("--no-swap", action="store_true", help="Skip the swap variant.")
    ap.add_argument("--no-plain", action="store_true",
                    help="Skip plain greedy without the n-gram ban (alpha 0 with --contrast-ngram stays).")
    ap.add_argument("--train-from", metavar="COMPARE_YAML", default=None,
                    help="Decode a model trained as this compare config's --arm/--seed cell, not the untrained one.")
    ap.add_argument("--arm", default=None, help="With --train-from: the trained arm (ce, perce, perce@norm, ...).")
    ap.add_argument("--seed", type=int, default=0, help="With --train-from: the training seed.")
    ap.add_argument("--summarize-only", action="store_true",
                    help="Only rebuild results.md and alpha_curve.png from --out/results.json.")
    ap.add_argument("--resume", action="store_true",
                    help="Keep the rows already in --out/results.json (same data, size and model) and run only "
                         "the variants it lacks.")
    ap.add_argument("--curves", nargs="+", metavar="DIR", default=None,
                    help="Only draw the alpha curves of these earlier runs on one figure (--out/alpha_curves.png).")
    a = ap.parse_args(argv)
    if a.curves:
        runs = []
        for d in a.curves:
            src = Path(d) / "results.json"
            if not src.exists():
                raise SystemExit(f"--curves: {src} not found; it draws runs made earlier")
            runs.append(json.loads(src.read_text()))
        Path(a.out).mkdir(parents=True, exist_ok=True)
        plot_models(runs, Path(a.out) / "alpha_curves.png")
        return
    if a.summarize_only:
        src = Path(a.out) / "results.json"
        if not src.exists():
            raise SystemExit(f"{src}: not found; --summarize-only rebuilds the table and plot of an earlier run")
        write(json.loads(src.read_text()), Path(a.out))
        return
    if not (a.data and a.task):
        ap.error("--data and --task are required to decode")

    from percontrast.attribution import attribution_share, fit_attributor, gold_ceiling
    from percontrast.commands.evaluate import score
    from percontrast.datasets import load_records
    from percontrast.degeneration import degeneration_flags, degeneration_summary
    from percontrast.generation import generate_for
    from percontrast.options import DecodingOptions, ModelDataOptions
    from percontrast.prompts import get_task
    from percontrast.runinfo import run_info

    trained = None
    if a.train_from is not None:
        model, tok, trained, study = train_arm(a.train_from, a.arm, a.seed)
        a.model, a.k, a.max_length = study.model, study.k, study.max_length   # decode as the study's cells do
    elif a.arm is not None:
        raise SystemExit("--arm needs --train-from COMPARE_YAML (the config whose cell defines the model)")
    opts = ModelDataOptions(model=a.model, data=a.data, task=a.task, k=a.k, max_length=a.max_length)
    recs = load_records(a.data, get_task(a.task), limit=a.limit)
    if trained is None:
        model, tok = opts.load_model()
    att = fit_attributor(recs, seed=0)
    variants = [] if a.no_plain else [("greedy", {"no_repeat_ngram_size": 0})]
    variants += [("greedy, no-repeat 3", {"no_repeat_ngram_size": 3})]
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
        # results written before max_new_tokens was recorded were all made with the default, 48
        then = (cfg["data"], prev["n"], prev["model"], cfg["max_length"], prev.get("max_new_tokens", 48),
                model_label(prev.get("trained")))
        now = (a.data, len(recs), a.model, a.max_length, a.max_new_tokens, model_label(trained))
        if then != now:
            raise SystemExit(f"{old}: made for (data, records, model, max_length, max_new_tokens, trained) {then}, not "
                             f"{now}; drop --resume or choose another --out")
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
    res = {"data": label, "n": len(recs), "model": a.model, "trained": trained,
           "max_new_tokens": a.max_new_tokens, "rows": rows,
           "attribution": {"chance": gold["chance"], "ceiling": gold["share"]}, "run": run_info(opts)}
    if earlier:
        res["earlier_runs"] = earlier
    write(res, Path(a.out))


def train_arm(path: str, arm: str | None, seed: int):
    """Train ``arm``'s model at ``seed`` as the compare config's cell would; one line on a bad config or arm."""
    from percontrast import config as cfgmod
    from percontrast.commands import compare as C
    from percontrast.commands.compare_report import model_method, train_method
    from percontrast.datasets import load_records
    from percontrast.errors import UserError
    from percontrast.models import default_device
    from percontrast.prompts import get_task

    try:
        cfg = cfgmod.build(C.CompareConfig, cfgmod.read_yaml(path), source=path)
        if arm is None or train_method(arm) not in C.TRAINED_METHODS or "+" in arm:
            raise UserError(f"--arm: give a trained arm of {path} (e.g. ce, perce, perce@norm), not {arm!r}")
        if arm not in cfg.methods:
            raise UserError(f"{path}: methods has no arm {arm!r}")
        settings = cfg.settings()
        if len(settings) != 1:
            raise UserError(f"{path}: {len(settings)} (learning rate, clip) settings; --train-from needs a config "
                            "with one (the study's main configs)")
        (setting,) = settings
        tcfg = cfg.train_config(model_method(arm), seed, setting["lr"], (setting["clip_min"], setting["clip_max"]),
                                output_dir=str(Path(cfg.output_dir) / "_train" / f"decoding_{arm}__seed{seed}"))
        records = load_records(cfg.data, get_task(cfg.task), limit=cfg.limit)
    except UserError as e:
        raise SystemExit(str(e)) from None
    model, tok, info = C.train_model(tcfg, records)
    model.to(default_device())
    trained = {"config": path, "arm": arm, "seed": seed, "lr": setting["lr"], "clip": [setting["clip_min"],
               setting["clip_max"]], "steps": info["steps"], "train_s": info["train_s"], "curve": info.get("curve")}
    return model, tok, trained, cfg


def model_label(trained: dict | None) -> str:
    return "untrained" if not trained else f"{trained['arm']} seed {trained['seed']} ({trained['config']})"


def write(res: dict, out: Path) -> None:
    from percontrast.files import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(res, indent=1, default=str))
    head = "| decoding | ROUGE-1 | ROUGE-L | METEOR | own-author % | hit cap % | loop % | seq-rep-4 | distinct-2 | s |"
    lines = [f"# Decoding on validation ({res['data']}, {res['n']} examples, {res['model']}, "
             f"{model_label(res.get('trained'))})", "",
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
    plot_alpha(res, out / "alpha_curve.png")


def _curve(res: dict) -> list[dict]:
    """Rows on the no-profile contrast curve, by alpha (alpha 0 = plain greedy with the same n-gram ban)."""
    def ngram(r):
        return r["decoding"].get("no_repeat_ngram_size", 0)
    contrast = [r for r in res["rows"] if r["decoding"].get("contrast_alpha", 0) > 0]
    if not contrast:
        return []
    n = ngram(contrast[0])
    curve = [r for r in res["rows"] if ngram(r) == n and r["decoding"].get("contrast_counterfactual") != "swap"]
    return sorted(curve, key=lambda r: r["decoding"].get("contrast_alpha", 0))


_PANELS = [("rouge1", "ROUGE-1"), ("rougeL", "ROUGE-L"), ("meteor", "METEOR"), ("attributed", "own-author %")]


def plot_models(runs: list[dict], path: Path) -> None:
    """One line per model (untrained, ce, perce, ...) on each metric's alpha curve; the runs must share
    their validation records, so chance and gold attribution are drawn once."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from percontrast.commands.compare_report import save_figure

    keys = {(r["data"], r["n"]) for r in runs}
    if len(keys) != 1:
        raise SystemExit(f"--curves: the runs decode different records {sorted(keys)}; draw them apart")
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(3.2 * len(_PANELS), 3.0))
    for i, res in enumerate(runs):
        curve = _curve(res)
        xs = [r["decoding"].get("contrast_alpha", 0) for r in curve]
        for ax, (key, _) in zip(axes, _PANELS):
            ax.plot(xs, [100 * r[key] for r in curve], marker="o", color=f"C{i}",
                    label=model_label(res.get("trained")).split(" (")[0])
    att = runs[0]["attribution"]
    axes[-1].axhline(100 * att["chance"], color="grey", ls=":", label="chance")
    axes[-1].axhline(100 * att["ceiling"], color="grey", ls="--", label="gold mails")
    for ax, (_, label) in zip(axes, _PANELS):
        ax.set_xlabel("contrast alpha")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"{runs[0]['data']}, {runs[0]['n']} examples: contrast alpha per model", fontsize=9)
    save_figure(fig, path)


def plot_alpha(res: dict, path: Path) -> None:
    """The alpha curve: each metric against alpha, no-profile contrast (alpha 0 = plain greedy with the same
    n-gram ban); the swap variant and chance / gold attribution as markers and lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from percontrast.commands.compare_report import save_figure

    curve = _curve(res)
    if not curve:
        return
    n = curve[0]["decoding"].get("no_repeat_ngram_size", 0)
    swap = [r for r in res["rows"] if r["decoding"].get("contrast_counterfactual") == "swap"]
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(3.2 * len(_PANELS), 3.0))
    for ax, (key, label) in zip(axes, _PANELS):
        xs = [r["decoding"].get("contrast_alpha", 0) for r in curve]
        ax.plot(xs, [100 * r[key] for r in curve], marker="o", label="vs no profile")
        for r in swap:
            ax.plot([r["decoding"]["contrast_alpha"]], [100 * r[key]], marker="s", ls="", color="C3",
                    label="vs another user's profile")
        if key == "attributed":
            ax.axhline(100 * res["attribution"]["chance"], color="grey", ls=":", label="chance")
            ax.axhline(100 * res["attribution"]["ceiling"], color="grey", ls="--", label="gold mails")
        ax.set_xlabel("contrast alpha")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"{res['data']}, {res['n']} examples, {res['model']} {model_label(res.get('trained'))} "
                 f"(no-repeat {n})", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
