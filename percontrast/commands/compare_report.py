"""The report of ``percontrast compare``: from finished cells to results.json/md/png.

Reads no file and trains nothing: it takes the cells the run loop (``compare.py``) has
checked and re-read, groups them per eval set and grid point, pairs each method with the
reference ``ce`` by seed and by example, and computes the per-method t-intervals, the
differences to ``ce`` with their bootstrap intervals and the relative gains (``summarize``);
then renders them as markdown (``render_markdown``) and as a plot (``plot``, the one file
it writes itself, atomically).

The method names live here so that the report never imports the run loop: ``compare.py``
imports this module, not the other way round.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

from ..errors import UserError
from ..files import write_bytes_atomic
from ..losses import CLIPPED_METHODS, METHODS
from ..options import DecodingOptions

# copy_retrieved: no model at all, the prediction is the first profile item shown in the prompt (cut
# to the generation budget): what pure copying scores on every metric.
COPY_BASELINE = "copy_retrieved"
BASE_METHODS = ("base_profile", "base_noprofile", COPY_BASELINE)
TRAINED_METHODS = METHODS
ALL_METHODS = BASE_METHODS + TRAINED_METHODS
# compare's default arms: the arms added later (nextquill, dft, copy_retrieved) run when named, so a
# config that relies on the default keeps its arms and cells.
DEFAULT_METHODS = ("base_profile", "base_noprofile", "ce", "lossce", "entce", "perce", "jsd", "threshold")
REFERENCE = "ce"
# An arm "X+contrast" is method X's model decoded with profile-contrastive decoding
# (compare's contrast_arm_alpha); base_noprofile has no profile to contrast. An arm "X+noprofile" is a
# trained X's model decoded from the prompt WITHOUT the profile: does the trained model use the profile?
CONTRAST_SUFFIX = "+contrast"
NOPROFILE_SUFFIX = "+noprofile"
DECODE_SUFFIXES = (CONTRAST_SUFFIX, NOPROFILE_SUFFIX)

# Metrics beside ROUGE/METEOR, from compare's own measurements. Shares are shown x100 like the
# overlap metrics; NLL and PIR are in nats, lower NLL is better.
LIKELIHOOD_METRICS = ("nll", "nll_personal", "nll_other", "mean_pir")
ATTRIBUTION_METRICS = ("attributed",)
DEGENERATION_METRICS = ("hit_cap", "loop")
# The LLM judge (judge.py): the 1-5 score is shown as it is, its digit mass x100 like a share.
JUDGE_METRICS = ("judge", "judge_mass")
# compare's repetition option: with the n-gram ban as decoded, and with it off (a second decoding).
# distinct_2 and the *_macro shares are corpus values (no per-example score, so no paired difference).
REPETITION_METRICS = ("seq_rep_4", "distinct_2", "noban_seq_rep_4", "noban_distinct_2", "noban_loop",
                      "noban_hit_cap")
# compare's copy_control option: copying from the prompt's profile and attribution that cannot be won
# by copying it (the classifier never saw the items shown in that example's prompt).
COPY_METRICS = ("copy_rate", "copy_span", "attributed_loo", "attributed_loo_macro")
# compare's specific_tokens option: NLL on the gold tokens specific to the user (specificity.py) and the rest
SPECIFIC_METRICS = ("nll_specific", "nll_nonspecific")
_UNSCALED = set(LIKELIHOOD_METRICS) | set(SPECIFIC_METRICS) | {"judge", "copy_span"}


# An arm "X@name" is trained method X with compare's variants[name] (TrainConfig overrides, e.g.
# normalize: weights) on top of the shared train: block: an ablation arm in the same table.
VARIANT_SEP = "@"


def model_method(arm: str) -> str:
    """The model an arm decodes with: "perce+contrast" -> "perce", "perce@norm+noprofile" -> "perce@norm"."""
    for suffix in DECODE_SUFFIXES:
        if arm.endswith(suffix):
            return arm[: -len(suffix)]
    return arm


def uses_profile(arm: str) -> bool:
    """Whether an arm's prompts hold the profile (base_noprofile and X+noprofile do not)."""
    return train_method(arm) != "base_noprofile" and not arm.endswith(NOPROFILE_SUFFIX)


def train_method(arm: str) -> str:
    """The loss an arm's model is trained with: "perce@norm+contrast" -> "perce"."""
    return model_method(arm).split(VARIANT_SEP, 1)[0]


def variant_of(arm: str) -> str | None:
    """The variant name of an arm ("perce@norm" -> "norm"), None for a plain method."""
    parts = model_method(arm).split(VARIANT_SEP, 1)
    return parts[1] if len(parts) == 2 else None


def uses_clip(method: str) -> bool:
    """Methods whose token weights are clipped to [m, M]; ce ignores the clip grid."""
    return train_method(method) in CLIPPED_METHODS


def is_base(arm: str) -> bool:
    return train_method(arm) in BASE_METHODS


def report_metrics(cfg) -> list[str]:
    """The columns of the report: the overlap metrics (when generating), then what compare measured
    itself: likelihood metrics, attribution, degeneration."""
    out = list(cfg.metrics) if cfg.generate else []
    out += list(LIKELIHOOD_METRICS) if cfg.likelihood else []
    out += list(SPECIFIC_METRICS) if cfg.likelihood and getattr(cfg, "specific_tokens", False) else []
    out += list(ATTRIBUTION_METRICS) if cfg.attribution and cfg.generate else []
    out += list(DEGENERATION_METRICS) if cfg.generate else []
    out += list(REPETITION_METRICS) if getattr(cfg, "repetition", False) and cfg.generate else []
    if getattr(cfg, "copy_control", False) and cfg.generate:
        out += list(COPY_METRICS) + (["attributed_macro"] if cfg.attribution else [])
    out += list(JUDGE_METRICS) if getattr(cfg, "judge", None) and cfg.generate else []
    return out


# ---------------------------------------------------------------- pairing and statistics

def _cells_for(cells, method, eval_name, setting, seeds):
    """Cells of one method at one grid point (base methods ignore the grid; ce ignores the clip)."""
    sel = []
    for c in cells:
        if c["method"] != method or c["eval_set"] != eval_name or c["seed"] not in seeds:
            continue
        if c["trained"]:
            if not math.isclose(c["lr"], setting["lr"]):
                continue
            if uses_clip(method) and not (math.isclose(c["clip_min"], setting["clip_min"])
                                          and math.isclose(c["clip_max"], setting["clip_max"])):
                continue
        sel.append(c)
    return sorted(sel, key=lambda c: c["seed"])


def pair_by_seed(cells: list[dict], ref_cells: list[dict], seed_independent: bool) -> tuple[list[dict], list[dict]]:
    """(method cells, reference cells), one pair per shared seed, in seed order.

    A seed-independent method (untrained, greedy: every seed would give the same output,
    which is why it is run once) stands for every reference seed. Otherwise only seeds
    both have count: averaging a 1-seed method against a 3-seed reference would compare
    one training run with the mean of three, mixing seed luck into the difference."""
    if seed_independent and cells:
        return [cells[0]] * len(ref_cells), list(ref_cells)
    by_seed = {c["seed"]: c for c in cells}
    ref = [r for r in ref_cells if r["seed"] in by_seed]
    return [by_seed[r["seed"]] for r in ref], ref


def score_table(cells: list[dict], metric: str, ids: list[str], all_ids: list[str] | None = None) -> list[list[float]]:
    """Per-example scores [seeds][examples], examples in the order of ``ids`` (paired by id). Every
    cell must hold exactly the examples ``all_ids`` (default ``ids``): a stale cell is refused."""
    rows = []
    for c in cells:
        by_id = {e["id"]: e["scores"].get(metric) for e in c["examples"]}
        if set(by_id) != set(all_ids if all_ids is not None else ids):
            raise UserError(f"cell {c['method']} seed {c['seed']} ({c['eval_set']}) has other test ids than the "
                            f"{REFERENCE} cells; delete the stale cells and rerun")
        rows.append([by_id[i] for i in ids])
    return rows


def paired_ids(cells: list[dict], ref_cells: list[dict], metric: str) -> tuple[list[str], list[str]]:
    """(the example ids a paired difference of ``metric`` averages, every example id in order). A
    per-example metric may be undefined for some examples (nll_personal: no personal token, the same
    set for every arm; judge: no digit among a server's top tokens, per arm): pairs drop out where any
    cell of either arm has no value, so both sides average the same examples."""
    all_ids = [e["id"] for e in ref_cells[0]["examples"]]
    defined = [{e["id"] for e in c["examples"] if e["scores"].get(metric) is not None} for c in cells + ref_cells]
    return [i for i in all_ids if all(i in d for d in defined)], all_ids


def vs_reference(cells: list[dict], ref_cells: list[dict], metric: str, resamples: int) -> tuple[dict, float | None]:
    """Paired difference (method - reference) of ``metric`` over shared seeds x examples:
    mean, examples-only bootstrap (seed-averaged per-example scores; ``lo``/``hi``), and the
    two-level bootstrap over seeds then examples (``two_level``); plus the relative gain in %."""
    import numpy as np

    from ..stats import paired_bootstrap, relative_gain, two_level_bootstrap

    ids, all_ids = paired_ids(cells, ref_cells, metric)
    if not ids:
        return None, None
    a = np.asarray(score_table(cells, metric, ids, all_ids))      # [S, I]
    b = np.asarray(score_table(ref_cells, metric, ids, all_ids))  # [S, I]
    res = paired_bootstrap(a.mean(axis=0), b.mean(axis=0), n_resamples=resamples, seed=0)
    res["seeds"] = [c["seed"] for c in ref_cells]
    res["two_level"] = two_level_bootstrap(a - b, n_resamples=resamples, seed=0)
    return res, relative_gain(float(a.mean()), float(b.mean()))


def _prompt_counts(cells: list[dict]) -> dict:
    """Prompt-length counters of a method's cells (the same prompts for every seed); cells
    written before they were recorded give None."""
    stats = [c.get("prompt_stats") for c in cells]
    if any(st is None for st in stats):
        return {"profile_cut": None, "profile_removed": None}
    return {"profile_cut": max(st.get("profile_cut", 0) for st in stats),
            "profile_removed": max(st.get("profile_removed", 0) for st in stats)}


def _row(cfg, m: str, mc: list[dict], ref_cells: list[dict], metrics: list[str]) -> dict:
    from ..stats import t_interval

    det = is_base(m) and not cfg.do_sample
    row = {"method": m, "seeds": [c["seed"] for c in mc], "metrics": {}, "vs_ce": {}, "gain_pct": {},
           "shared_seeds": None, "train_s": sum(c["train_s"] for c in mc) / len(mc),
           "eval_s": sum(c["eval_s"] for c in mc) / len(mc),
           "peak_mem_mb": max(c["peak_mem_bytes"] for c in mc) / 2 ** 20, "mem_kind": mc[0]["mem_kind"],
           "deterministic": det, "lr": mc[0].get("lr"), **_prompt_counts(mc)}
    for metric in metrics:
        d = t_interval([c["metrics"][metric] for c in mc]).as_dict()
        if det:  # greedy, untrained: every seed gives the same output
            d["lo"] = d["hi"] = d["mean"]
        row["metrics"][metric] = d
    if m == REFERENCE or not ref_cells:
        return row
    pm, pr = pair_by_seed(mc, ref_cells, det)
    row["shared_seeds"] = [c["seed"] for c in pr]
    for metric in metrics if pm else []:
        row["vs_ce"][metric], row["gain_pct"][metric] = vs_reference(pm, pr, metric, cfg.bootstrap_resamples)
    return row


def summarize(cfg, cells: list[dict], eval_sets: list[dict], settings: list[dict],
              base_seeds: list[int]) -> dict:
    """results.json's content: one group per (eval set, grid point), one row per method.

    ``cfg`` is the run's ``CompareConfig`` (read only: methods, seeds, metrics, decoding,
    prompt and train settings, ``bootstrap_resamples``); ``base_seeds`` are the seeds the
    untrained methods were run with."""
    # compare's run loop refuses a cell that lacks a metric of its config (read_cell); cells handed in
    # directly (tests, older runs) are summarized on the metrics they all have.
    # A cell whose judge scored no example has judge None: that column is left out (its digit mass,
    # always defined, stays and shows why).
    metrics = [m for m in report_metrics(cfg) if all(c["metrics"].get(m) is not None for c in cells)]
    groups = []
    for es in eval_sets:
        for st in settings:
            ref_cells = _cells_for(cells, REFERENCE, es["name"], cfg.setting_for(REFERENCE, st), cfg.seeds)
            rows = []
            for m in cfg.methods:
                mc = _cells_for(cells, m, es["name"], cfg.setting_for(m, st), base_seeds if is_base(m) else cfg.seeds)
                if mc:
                    rows.append(_row(cfg, m, mc, ref_cells, metrics))
            groups.append({"eval_set": es["name"], "task": es["task"], "data": es["data"],
                           "n_examples": len(ref_cells[0]["examples"]) if ref_cells else None, **st, "rows": rows})
    return {"model": cfg.model, "train_data": cfg.data, "task": cfg.task, "methods": cfg.methods, "seeds": cfg.seeds,
            "train": cfg.train, "decoding": {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DecodingOptions)},
            "prompt": {"k": cfg.k, "retriever": cfg.retriever, "max_length": cfg.max_length},
            "metrics": metrics, "bootstrap_resamples": cfg.bootstrap_resamples,
            "unhashed_cells": sorted(f"{c['method']}__seed{c['seed']}__{c['eval_set']}" for c in cells
                                     if c.get("unhashed")),
            "groups": groups, "curves": learning_curves(cells)}


def learning_curves(cells: list[dict]) -> dict:
    """Validation NLL per step of every trained model (train: eval_data / eval_every), one curve per
    (method, seed, learning rate, clip): {label: {seed: [[step, val_nll], ...]}}. A model's curve is
    stored in each of its cells; it is taken once."""
    out: dict = {}
    for c in sorted(cells, key=lambda c: (c["method"], c["seed"])):
        curve = (c.get("train") or {}).get("curve")
        if not curve or c["method"] != model_method(c["method"]):
            continue
        label = c["method"] + (f" lr{c['lr']:g}" if c.get("lr") else "") + \
            (f" [{c['clip_min']:g},{c['clip_max']:g}]" if c.get("clip_min") is not None else "")
        out.setdefault(label, {}).setdefault(str(c["seed"]), curve)
    return out


def save_figure(fig, path: Path) -> None:
    """Lay out, write as PNG atomically (a reader never sees half a file), and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def plot_curves(curves: dict, path: Path, title: str) -> None:
    """val NLL vs step, one colour per method (all seeds drawn, thin)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (label, seeds) in enumerate(sorted(curves.items())):
        colour = f"C{i % 10}"
        for j, pts in enumerate(seeds.values()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colour, alpha=0.8, lw=1.2,
                    marker="o", ms=2.5, label=label if j == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation NLL / token (with profile)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


# ---------------------------------------------------------------- markdown and plot

_LABEL = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum",
          "meteor": "METEOR", "nll": "NLL/token", "nll_personal": "NLL personal", "nll_other": "NLL other",
          "mean_pir": "mean PIR", "attributed": "own-author %", "hit_cap": "hit cap %", "loop": "loop %",
          "judge": "judge 1-5", "judge_mass": "judge digit mass %",
          "rouge1_precision": "ROUGE-1 P", "rouge1_recall": "ROUGE-1 R", "rougeL_precision": "ROUGE-L P",
          "rougeL_recall": "ROUGE-L R", "nll_specific": "NLL user-specific", "nll_nonspecific": "NLL not specific",
          "seq_rep_4": "seq-rep-4 %", "distinct_2": "distinct-2 %", "noban_seq_rep_4": "seq-rep-4 no ban %",
          "noban_distinct_2": "distinct-2 no ban %", "noban_loop": "loop no ban %", "noban_hit_cap": "hit cap no ban %",
          "copy_rate": "copy rate %", "copy_span": "copied span (words)", "attributed_loo": "own-author, shown left out %",
          "attributed_loo_macro": "own-author, shown left out, per user %", "attributed_macro": "own-author per user %"}


def _fmt_iv(d: dict, metric: str = "") -> str:
    k, f = (1, 3) if metric in _UNSCALED else (100, 2)
    if d["lo"] is None:
        return f"{k * d['mean']:.{f}f}"
    return f"{k * d['mean']:.{f}f} [{k * d['lo']:.{f}f}, {k * d['hi']:.{f}f}]"


def _fmt_delta(b: dict | None, shared: list | None, metric: str = "") -> str:
    if shared == []:
        return "no shared seed"
    if b is None:
        return "—"
    k, f = (1, 3) if metric in _UNSCALED else (100, 2)
    text = f"{k * b['diff']:+.{f}f} [{k * b['lo']:+.{f}f}, {k * b['hi']:+.{f}f}]"
    tl = b.get("two_level")  # absent in results written before it existed
    if tl is None:
        return text
    if not tl["seed_level"]:
        return text + " [n/a: 1 shared seed]"
    return text + f" [{k * tl['lo']:+.{f}f}, {k * tl['hi']:+.{f}f}]"


def _fmt_shared(r: dict) -> str:
    shared = r.get("shared_seeds")
    if r["method"] == REFERENCE or shared is None:
        return "—"
    return f"{len(shared)}{'*' if r['deterministic'] and shared else ''}"


_NOTES = ("Scores x100. Per method: mean over its seeds [95% t-interval over seeds]. "
          "Δ vs ce: mean paired difference over the seeds both methods have ('shared seeds'; pairs by seed "
          "and by test example); a method that shares no seed with ce is not compared ('no shared seed'). "
          "First bracket: 95% percentile bootstrap resampling test examples only (per-example differences "
          "averaged over the shared seeds; ignores seed variance). Second bracket: 95% two-level bootstrap "
          "resampling the shared seeds, then the test examples (seed and example variance); with one shared "
          "seed there is no seed level ('n/a: 1 shared seed'). {resamples} resamples each, RNG seed 0. "
          "Gain: relative difference against ce of the means over the shared seeds, in %. "
          "\\* untrained and greedy: evaluated once (the output is the same for every seed), and that run is "
          "paired with every ce seed. "
          "NLL/token, NLL personal / other (nats, lower is better) and mean PIR: the gold response scored "
          "with the profile, no generation; personal tokens are the gold tokens the untrained model gives "
          "PIR > 0.8 (one fixed set for every arm); corpus values are token-weighted, differences are over "
          "per-example means. own-author %: share of generations a char n-gram classifier trained on the "
          "eval users' profiles attributes to their own user. hit cap %: generations that reached "
          "max_new_tokens without an end token; loop %: generations with a repeated n-gram loop.")


def _group_tables(res: dict, g: dict) -> list[str]:
    label = [_LABEL.get(m, m) for m in res["metrics"]]
    head = ["method", "seeds"] + label + ["train+load s", "eval s", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    own_lr = any(r.get("lr") is not None and r["lr"] != g["lr"] for r in g["rows"])   # method_learning_rates
    for r in g["rows"]:
        name = f"{r['method']} (lr {r['lr']:g})" if own_lr and r.get("lr") is not None else r["method"]
        cells = [name, str(len(r["seeds"]))] + [_fmt_iv(r["metrics"][m], m) for m in res["metrics"]]
        cells += [f"{r['train_s']:.0f}", f"{r['eval_s']:.0f}", f"{r['peak_mem_mb']:.0f} ({r['mem_kind']})"]
        lines.append("| " + " | ".join(cells) + " |")
    head = ["method", "shared seeds with ce"] + \
           [f"Δ{x} vs ce [CI: examples] [CI: seeds, then examples]" for x in label] + [f"gain {x.removesuffix(' %')} (%)" for x in label]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in g["rows"]:
        if r["method"] == REFERENCE:
            continue
        shared = r.get("shared_seeds")
        cells = [r["method"], _fmt_shared(r)] + [_fmt_delta(r["vs_ce"].get(m), shared, m) for m in res["metrics"]]
        cells += ["—" if r["gain_pct"].get(m) is None else f"{r['gain_pct'][m]:+.1f}" for m in res["metrics"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", _prompt_note(g)]


def _prompt_note(g: dict) -> str:
    """How many eval prompts the length limit cut the profile of, or removed it from entirely."""
    counts = {(r.get("profile_cut"), r.get("profile_removed")) for r in g["rows"]}
    n = g["n_examples"] or "?"
    if len(counts) == 1:
        cut, removed = counts.pop()
        if cut is None:
            return "Prompt length: not recorded in these cells."
        return (f"Prompt length: max_length cut the profile in {cut} of {n} eval prompts and removed it entirely "
                f"in {removed} (same for every method).")
    parts = [f"{r['method']} {r.get('profile_cut')}/{r.get('profile_removed')}" for r in g["rows"]]
    return f"Prompt length (profile cut / removed, of {n} eval prompts): " + ", ".join(parts) + "."


def render_markdown(res: dict) -> str:
    lines = [f"# compare: {res['model']} on {res['task']} ({res['train_data']})", "",
             _NOTES.format(resamples=res["bootstrap_resamples"]), ""]
    for g in res["groups"]:
        lines += [f"## eval set `{g['eval_set']}` ({g['task']}, {g['n_examples']} examples), "
                  f"lr {g['lr']:g}, clip [{g['clip_min']:g}, {g['clip_max']:g}]", ""]
        lines += _group_tables(res, g) + [""]
    if res.get("attribution"):
        for name, a in res["attribution"].items():
            lines += [f"Attribution (`{name}`): {a['n_users']} users; chance {100 * a['chance']:.1f}%, majority "
                      f"class {100 * a['majority']:.1f}%, gold responses (ceiling) {100 * a['ceiling']:.1f}%.", ""]
    if res.get("curves"):
        lines += ["Learning curves (validation NLL / token, with profile; step: value), per model:", ""]
        for label, seeds in sorted(res["curves"].items()):
            for seed, pts in seeds.items():
                lines.append(f"- {label} seed {seed}: " + ", ".join(f"{p[0]}: {p[1]:.3f}" for p in pts))
        lines.append("")
    if res.get("judge"):
        j = res["judge"]
        who = j["judge"] + (f" (model {j['model']}, {j['api']} API)" if j.get("backend") == "server" else "")
        lines += [f"Judge: {who}, rubric {j['prompt_version']}. judge 1-5: sum over s of s*p(s) from the judge's "
                  "next-token probabilities of the digits 1-5, renormalized over them (G-Eval); judge digit "
                  "mass %: the probability the judge put on those five digits (low: it is not answering with a "
                  f"score). Examples with no digit among the judge's top tokens: {j.get('unscored', 0)}."
                  + (f" NOTE: {j['note']}." if j.get("note") else ""), ""]
    if res.get("unhashed_cells"):
        lines += [f"Cells without a settings hash, reused on the user's word (--adopt-unhashed-cells): "
                  f"{', '.join(res['unhashed_cells'])}.", ""]
    run = res.get("run", {})
    lines += [f"Machine: {run.get('machine')}; date {run.get('date')}; git {run.get('git_commit')}.",
              f"Train settings: `{json.dumps(res['train'])}`; decoding: `{json.dumps(res['decoding'])}`; "
              f"prompt: `{json.dumps(res['prompt'])}`.", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    """Bars with t-intervals per method (one grid point), or metric vs learning rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = res["metrics"]
    lrs = sorted({g["lr"] for g in res["groups"]})
    evals = list(dict.fromkeys(g["eval_set"] for g in res["groups"]))
    fig, axes = plt.subplots(len(evals), len(metrics), figsize=(4.2 * len(metrics), 3.4 * len(evals)),
                             squeeze=False)
    for i, ev in enumerate(evals):
        groups = [g for g in res["groups"] if g["eval_set"] == ev]
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            if len(lrs) > 1:  # learning-rate robustness: one line per method (and clip)
                series: dict[str, list] = {}
                for g in groups:
                    for r in g["rows"]:
                        label = r["method"] if r["method"] in ("ce",) + BASE_METHODS or len(
                            {(x["clip_min"], x["clip_max"]) for x in groups}) == 1 \
                            else f"{r['method']} [{g['clip_min']:g},{g['clip_max']:g}]"
                        series.setdefault(label, []).append((g["lr"], r["metrics"][metric]))
                for label, pts in series.items():
                    pts = sorted(set((lr, d["mean"], d["lo"], d["hi"]) for lr, d in pts))
                    xs = [p[0] for p in pts]
                    ys = [100 * p[1] for p in pts]
                    ax.plot(xs, ys, marker="o", label=label)
                    if all(p[2] is not None for p in pts):
                        ax.fill_between(xs, [100 * p[2] for p in pts], [100 * p[3] for p in pts], alpha=0.15)
                ax.set_xscale("log")
                ax.set_xlabel("learning rate")
            else:
                g = groups[0]
                k = 1 if metric in _UNSCALED else 100
                names = [r["method"] for r in g["rows"]]
                means = [k * r["metrics"][metric]["mean"] for r in g["rows"]]
                err = [[k * (r["metrics"][metric]["mean"] - (r["metrics"][metric]["lo"] or r["metrics"][metric]["mean"]))
                        for r in g["rows"]],
                       [k * ((r["metrics"][metric]["hi"] or r["metrics"][metric]["mean"]) - r["metrics"][metric]["mean"])
                        for r in g["rows"]]]
                ax.bar(range(len(names)), means, yerr=err, capsize=3,
                       color=["#d62728" if n == "perce" else "#1f77b4" if n == "ce" else "#999999" for n in names])
                ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
            ax.set_title(f"{ev}: {_LABEL.get(metric, metric)}" + ("" if metric in _UNSCALED else " (x100)"))
            ax.grid(alpha=0.3)
        if len(lrs) > 1:
            axes[i][-1].legend(fontsize=7)
    fig.suptitle(f"{res['model']} / {res['task']}: mean over seeds, 95% t-interval", fontsize=10)
    save_figure(fig, path)
