"""Paired differences between any two arms of a finished ``compare`` run, beyond compare's own "vs ce"
columns: the protocol check (ce - untrained), what the profile does (untrained with - without), and
what contrastive decoding adds to each model (X+contrast - X). Same statistics as compare: pairs on
shared seeds and examples (an untrained greedy arm, run once, stands for every seed of the other),
mean difference with a 95% bootstrap interval over seeds, then examples (10,000 resamples, RNG seed 0).

    .venv/bin/python scripts/study_pairs.py results/study/email-main

Writes pairs.md (with a per-seed table: overlap scores and mean generated tokens, or the likelihood
metrics of a run without generations) and pairs.json into
that folder (``--out DIR``: into DIR instead); pairs whose arms have no cells are skipped. A method that
the run trained at several clips is one arm per clip, named with it: ``perce[0:5]``, ``perce[0.8:5]``.

Beside the bootstrap, per pair and metric (``percontrast.stats``; pairs.json row key ``intervals``):
the seed-level t-interval (per-seed mean differences, t on seeds - 1 df, with its p-value), the
user-clustered interval (seed variance + the variance from which users were tested, each user's
examples kept together; t with Welch-Satterthwaite df, with its p-value), Holm-adjusted p-values of
both within each metric, and the per-user (macro) mean difference. The user of each test example is
the ``user_id`` of the records the run scored (the eval set's data in compare_config.json, checked
against the cells' records digest) or of ``--records FILE``. ``--primary "A - B" --metric M`` names
the one contrast tested alone, unadjusted; every other pair x metric is Holm-adjusted within its
metric (without ``--primary`` all of them are).

    .venv/bin/python scripts/study_pairs.py results/study/email-main --primary "perce - ce" --metric rougeL
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

DEFAULT_PAIRS = ["ce - base_profile", "perce - base_profile", "perce - ce", "base_profile - base_noprofile",
                 "ce - base_noprofile", "base_profile+contrast - base_profile", "ce+contrast - ce",
                 "perce+contrast - perce", "perce+contrast - ce+contrast", "ce+contrast - base_profile+contrast",
                 # PerCE's ablations against PerCE itself and against ce; the other baselines against ce
                 "perce@norm - perce", "perce@norm - ce", "perce@every4 - perce", "lossce - ce", "entce - ce",
                 "jsd - ce", "threshold - ce", "jsd - perce", "threshold - perce",
                 # a clip ablation (email-clip.yaml): a method run at several clips is named "perce[0:5]" etc.
                 "perce[0:5] - perce[0.8:5]", "perce[1:5] - perce[0.8:5]", "perce[0:5] - ce", "perce[1:5] - ce",
                 "perce[0.8:5] - ce",
                 # study v2: do trained models use the profile (X - X+noprofile); the peer baselines; pure copying
                 "ce - ce+noprofile", "perce - perce+noprofile", "perce+noprofile - ce+noprofile", "nextquill - ce",
                 "dft - ce", "nextquill - perce", "dft - perce", "copy_retrieved - ce", "copy_retrieved - base_profile"]
# shown x100, as compare's tables show them (compare_report: every metric but the likelihood ones and judge)
SCALED = {"rouge1", "rouge2", "rougeL", "rougeLsum", "meteor", "attributed", "hit_cap", "loop", "judge_mass",
          "seq_rep_4", "distinct_2", "noban_seq_rep_4", "noban_distinct_2", "noban_loop", "noban_hit_cap",
          "copy_rate", "attributed_loo", "attributed_loo_macro", "attributed_macro",
          *(f"{r}_{part}" for r in ("rouge1", "rouge2", "rougeL", "rougeLsum") for part in ("precision", "recall"))}
# overlap scores that grow with the output's length: also reported at equal length (length-controlled)
LENGTH_SENSITIVE = {m for m in SCALED if m.startswith("rouge") or m == "meteor"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--pairs", nargs="*", default=DEFAULT_PAIRS, help='"A - B" each (difference A minus B).')
    ap.add_argument("--eval-set", default="test")
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--records", help="JSONL with the eval set's records ('id' and 'user_id' are read); default: "
                                      "the eval set's data named in the run's compare_config.json")
    ap.add_argument("--primary", help='the one pre-specified contrast "A - B", tested without adjustment '
                                      "(needs --metric)")
    ap.add_argument("--metric", help="the primary contrast's metric (e.g. rougeL)")
    ap.add_argument("--out", help="folder for pairs.md / pairs.json (default: the run folder)")
    a = ap.parse_args(argv)

    from percontrast.commands.compare_report import _LABEL, is_base, pair_by_seed, vs_reference
    from percontrast.files import write_text_atomic

    run = Path(a.run_dir)
    if not (run / "results.json").exists():
        raise SystemExit(f"{run / 'results.json'}: not found; give the output_dir of a finished compare run")
    bad = [p for p in a.pairs + ([a.primary] if a.primary else []) if len(p.split(" - ")) != 2]
    if bad:
        raise SystemExit(f"--pairs: {bad[0]!r} is not of the form 'A - B' (spaces around the minus)")
    if (a.primary is None) != (a.metric is None):
        raise SystemExit("--primary and --metric go together: the primary contrast is one pair on one metric")
    res = json.loads((run / "results.json").read_text())
    metrics = res["metrics"]
    if a.metric is not None and a.metric not in metrics:
        raise SystemExit(f"--metric: {a.metric!r} is not a metric of this run ({', '.join(metrics)})")
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
    rows, pair_tables = [], []
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
        tables = {}
        for m in metrics:
            d, _ = vs_reference(ca, cb, m, a.resamples)
            row["metrics"][m] = None if d is None else {k: d["two_level"][k] for k in ("diff", "lo", "hi")}
            if d is not None:
                tables[m] = _diff_table(ca, cb, m, d["two_level"]["diff"])
                if m in LENGTH_SENSITIVE:
                    tables[m] = (*tables[m], _length_table(ca, cb, tables[m][0]))
        rows.append(row)
        pair_tables.append(tables)
    if a.primary is not None and a.primary.strip() not in {r["pair"] for r in rows}:
        raise SystemExit(f"--primary: {a.primary!r} is not among the pairs with cells in this run")
    users, users_from = _user_ids(run, cells, a.eval_set, a.records)
    primary = None if a.primary is None else {"pair": a.primary.strip(), "metric": a.metric}
    add_intervals(rows, pair_tables, metrics, users, primary)
    out = Path(a.out) if a.out else run
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "pairs.json", json.dumps(
        {"eval_set": a.eval_set, "rows": rows, "level": LEVEL, "users_from": users_from,
         "n_users": len(set(users.values())), "primary": primary,
         "holm": "within each metric, over every pair with a p-value except the primary contrast"}, indent=1))
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
    lines += interval_tables(rows, metrics, primary, users_from, len(set(users.values())))
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
    write_text_atomic(out / "pairs.md", "\n".join(lines) + "\n")
    print("\n".join(lines))



# ---------------------------------------------------------------- intervals over seeds and users

LEVEL = 0.95


def _diff_table(ca: list[dict], cb: list[dict], metric: str, want_diff: float) -> tuple[list[str], np.ndarray]:
    """(example ids, [seeds, examples] table of A - B): the examples vs_reference pairs (those every cell
    of both arms defines). Its mean must be vs_reference's difference bit for bit (the same numpy
    operations on the same table): if compare's pairing ever changes, this refuses instead of
    reporting intervals around another number."""
    from percontrast.commands.compare_report import paired_ids, score_table

    ids, all_ids = paired_ids(ca, cb, metric)
    d = np.asarray(score_table(ca, metric, ids, all_ids)) - np.asarray(score_table(cb, metric, ids, all_ids))
    if float(d.mean()) != want_diff:
        raise SystemExit(f"internal: {metric} pairing differs from compare's vs_reference "
                         f"({float(d.mean())!r} != {want_diff!r}); update _diff_table")
    return ids, d


def _length_table(ca: list[dict], cb: list[dict], ids: list[str]) -> np.ndarray | None:
    """[seeds, examples] of A's generated tokens - B's, on ``_diff_table``'s examples; None when a cell
    has no generated lengths (a likelihood-only run)."""
    rows = []
    for a, b in zip(ca, cb):
        na = {e["id"]: e.get("new_tokens") for e in a["examples"]}
        nb = {e["id"]: e.get("new_tokens") for e in b["examples"]}
        if any(na.get(i) is None or nb.get(i) is None for i in ids):
            return None
        rows.append([na[i] - nb[i] for i in ids])
    return np.asarray(rows, dtype=float)


def _eval_set_spec(run: Path, eval_set: str) -> dict | None:
    """The eval set's data, task and limit as compare resolved them (CompareConfig.eval_sets_resolved)."""
    p = run / "compare_config.json"
    if not p.exists():
        return None
    from percontrast.commands.compare import resolve_eval_sets

    cfg = json.loads(p.read_text())
    sets = resolve_eval_sets(cfg.get("test_data"), cfg["task"], cfg.get("test_limit"), cfg.get("eval_sets") or [])
    return next((es for es in sets if es["name"] == eval_set), None)


def _user_ids(run: Path, cells: list[dict], eval_set: str, records: str | None) -> tuple[dict[str, str], str]:
    """{example id: user id} for the eval set's examples, and where they came from.

    Default: the records compare scored, read as compare read them, and refused unless their digest is
    the one in the cells' definitions (a regenerated data folder could pair ids with other users).
    ``--records`` is taken as given: only 'id' and 'user_id' are read."""
    if records is not None:
        from percontrast.data import read_rows
        from percontrast.errors import UserError
        try:
            rows, source = read_rows(records), records
        except UserError as e:   # one line, as the CLI prints a user mistake
            raise SystemExit(f"error: {e}") from None
    else:
        spec = _eval_set_spec(run, eval_set)
        if spec is None:
            raise SystemExit(f"{run / 'compare_config.json'}: no data for eval set {eval_set!r}; "
                             "give the records with --records FILE")
        from percontrast.commands.compare import digest
        from percontrast.datasets import load_records
        from percontrast.prompts import get_task
        try:
            rows = load_records(spec["data"], get_task(spec["task"]), limit=spec["limit"])
        except Exception as e:  # noqa: BLE001 - any reason the file cannot be read: say which and how to fix
            raise SystemExit(f"cannot read the eval set's records {spec['data']} ({e}); "
                             "give them with --records FILE") from None
        want = {c.get("definition", {}).get("eval_set", {}).get("records_sha256") for c in cells} - {None}
        if want and digest(rows) not in want:
            raise SystemExit(f"{spec['data']}: these are not the records the cells were scored on (digest "
                             "differs); give the run's records with --records FILE")
        source = spec["data"]
    users = {}
    for k, r in enumerate(rows, 1):
        if not isinstance(r, dict) or "id" not in r:
            raise SystemExit(f"{source}: record {k} has no 'id'")
        if r.get("user_id") is None:
            raise SystemExit(f"{source}: record {r['id']} has no 'user_id'; the user-clustered interval needs "
                             "the user of every test example")
        users[str(r["id"])] = str(r["user_id"])
    missing = sorted({e["id"] for c in cells for e in c["examples"]} - set(users))
    if missing:
        raise SystemExit(f"{source}: no record for test example {missing[0]!r} ({len(missing)} missing)")
    return users, str(source)


def add_intervals(rows: list[dict], pair_tables: list[dict], metrics: list[str], users: dict[str, str],
                  primary: dict | None) -> None:
    """Fill each row's ``intervals[metric]``: seed-level t, user-clustered interval, per-user mean
    difference, and Holm-adjusted p-values within each metric (the primary contrast left out)."""
    from percontrast.stats import holm, length_adjusted, macro_mean, seed_t_interval, user_clustered_interval

    for row, tables in zip(rows, pair_tables):
        row["intervals"] = {}
        for m in metrics:
            if m not in tables:
                row["intervals"][m] = None
                continue
            ids, d, lengths = (*tables[m], None)[:3]
            uid = [users[i] for i in ids]
            # identical scores on every seed and example (two decodings' likelihood under one model,
            # a bit-identical variant): not a hypothesis, so no p-value and no place in a Holm family
            identical = not d.any()
            st, uc = seed_t_interval(d, LEVEL), user_clustered_interval(d, uid, LEVEL)
            if identical:
                st["p"] = uc["p"] = None
            row["intervals"][m] = {"n": len(ids), "n_users": len(set(uid)), "identical": identical,
                                   "seed_t": st, "user_clustered": uc,
                                   "macro_diff": macro_mean(d.mean(axis=0), uid),
                                   "primary": primary == {"pair": row["pair"], "metric": m},
                                   "holm_p_seed_t": None, "holm_p_user_clustered": None}
            if lengths is not None and not identical and d.size >= 2:
                # the difference at equal output length (stats.length_adjusted), same intervals
                adj, beta = length_adjusted(d, lengths)
                row["intervals"][m]["length_controlled"] = {
                    "slope_per_token": beta, "mean_length_diff": float(lengths.mean()), "diff": float(adj.mean()),
                    "user_clustered": user_clustered_interval(adj, uid, LEVEL)}
    for m in metrics:
        for kind in ("seed_t", "user_clustered"):
            fam = [iv for r in rows if (iv := r["intervals"][m]) is not None and not iv["primary"]
                   and iv[kind]["p"] is not None]
            for iv, adj in zip(fam, holm([iv[kind]["p"] for iv in fam]) if fam else []):
                iv[f"holm_p_{kind}"] = adj


def _p(p: float | None) -> str:
    return "—" if p is None else f"{p:.3f}" if p >= 0.001 else f"{p:.0e}"


def interval_tables(rows: list[dict], metrics: list[str], primary: dict | None, users_from: str,
                    n_users: int) -> list[str]:
    """pairs.md's section with the seed-level and user-clustered intervals, one table per metric."""
    lines = ["", f"## The same differences under intervals over seeds and users ({n_users} users in "
             f"{users_from})", "",
             "Bootstrap: the column above (95% percentile, seeds then examples). Seed t: the mean of the per-seed "
             "mean differences, 95% Student-t interval on seeds - 1 df (the test set fixed: what other training "
             "seeds would do on these examples); one seed has none. User-clustered: the same mean, for new seeds "
             "and new users: a 95% t-interval whose variance adds the between-seed variance / seeds and the "
             "user-cluster variance of the seed-averaged differences (each user's examples together), minus the "
             "seed x example interaction that both hold, df by Welch-Satterthwaite; widened where needed to hold "
             "the seeds-only (t, seeds - 1 df) and the users-only (t, users - 1 df) intervals, p the largest of "
             "the three (percontrast.stats.user_clustered_interval). With one seed it covers users only: exact "
             "for two untrained greedy arms, seed variance missing otherwise (marked *). p: two-sided, H0 "
             "difference 0. "
             "Holm: Holm-Bonferroni within each metric over every pair with a p-value"
             + (f" except the primary contrast {primary['pair']} on {primary['metric']}, which is tested alone"
                if primary else " (no primary contrast named)")
             + ". Per-user: the mean over users of each user's mean difference (each user weighs the same). "
             "ROUGE/METEOR and shares x100, NLL in nats/token; 'identical': the same scores everywhere, no test."]
    if primary:
        lines += ["", f"Primary contrast: **{primary['pair']}** on **{primary['metric']}** (named by --primary)."]
    from percontrast.commands.compare_report import _LABEL
    for m in metrics:
        k, fmt = (100, "{:+.2f}") if m in SCALED else (1, "{:+.3f}")
        f = lambda v: fmt.format(k * v)

        def iv(x: dict) -> str:
            return "—" if x["lo"] is None else f"[{f(x['lo'])}, {f(x['hi'])}]"

        lines += ["", f"### {_LABEL.get(m, m)}", "",
                  "| A - B | n (users) | Δ | bootstrap | seed t | p | Holm p | user-clustered | p | Holm p | per-user Δ |",
                  "|" + "---|" * 11]
        for r in rows:
            x = r["intervals"][m]
            if x is None:
                lines.append(f"| {r['pair']} |" + " — |" * 10)
                continue
            name = f"**{r['pair']} (primary)**" if x["primary"] else r["pair"]
            b = r["metrics"][m]
            if x["identical"]:
                lines.append(f"| {name} | {x['n']} ({x['n_users']}) | identical |" + " — |" * 8)
                continue
            st, uc = x["seed_t"], x["user_clustered"]
            star = "*" if not uc["seed_level"] and r["seeds"] else ""
            holm_st = "primary" if x["primary"] else _p(x["holm_p_seed_t"])
            holm_uc = "primary" if x["primary"] else _p(x["holm_p_user_clustered"])
            lines.append(f"| {name} | {x['n']} ({x['n_users']}) | {f(b['diff'])} | [{f(b['lo'])}, {f(b['hi'])}] | "
                         f"{iv(st)} | {_p(st['p'])} | {holm_st if st['p'] is not None else '—'} | "
                         f"{iv(uc)}{star} | {_p(uc['p'])} | {holm_uc} | {f(x['macro_diff'])} |")
    lines += _length_lines(rows, metrics)
    return lines


def _length_lines(rows: list[dict], metrics: list[str]) -> list[str]:
    """pairs.md's length-controlled table: each overlap score's difference at equal output length."""
    found = [(r, m) for m in metrics for r in rows
             if (r["intervals"].get(m) or {}).get("length_controlled") is not None]
    if not found:
        return []
    lines = ["", "## At equal output length (length-controlled)", "",
             "Per pair and overlap score: the per-example differences regressed on the difference in generated "
             "tokens (least squares pooled over seeds and examples, percontrast.stats.length_adjusted); Δ at equal "
             "length is the intercept, the difference two outputs of the same length would have, with the "
             "user-clustered interval of the adjusted differences (the slope taken as known). x100.", "",
             "| metric | A - B | mean length Δ (tokens) | raw Δ | slope per 10 tokens | Δ at equal length | "
             "user-clustered | p |", "|" + "---|" * 8]
    from percontrast.commands.compare_report import _LABEL
    for r, m in found:
        x = r["intervals"][m]["length_controlled"]
        uc = x["user_clustered"]
        iv = "—" if uc["lo"] is None else f"[{100 * uc['lo']:+.2f}, {100 * uc['hi']:+.2f}]"
        lines.append(f"| {_LABEL.get(m, m)} | {r['pair']} | {x['mean_length_diff']:+.1f} | "
                     f"{100 * r['metrics'][m]['diff']:+.2f} | {1000 * x['slope_per_token']:+.2f} | "
                     f"{100 * x['diff']:+.2f} | {iv} | {_p(uc['p'])} |")
    return lines


if __name__ == "__main__":
    main()
