"""The learning rate each method chose in a budget search (a ``compare`` run over ``learning_rates`` that
reads only validation data), by the rule the study-v2 budget configs fix in their headers: per method,
the rate whose kept model has the lowest NLL on the eval set (default ``val``); a choice at an end of
the grid means "extend the grid on that side first", and a method with cells missing has no choice yet.

    .venv/bin/python scripts/budget_choice.py results/study-v2/email-budget            # table + choice
    .venv/bin/python scripts/budget_choice.py results/study-v2/email-budget --yaml     # + method_learning_rates

Reads ``RUN_DIR/compare_config.json`` (the grid and the methods) and ``RUN_DIR/cells/*.json``; trains
and loads nothing. Exit 0 when every method has a choice inside the grid, 1 when any is pending or at an
edge (so a session script can tell), 2 on a user error.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class Failure(Exception):
    pass


def load(run_dir: Path, eval_set: str) -> tuple[dict, list[dict]]:
    cfg_file = run_dir / "compare_config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise Failure(f"{cfg_file}: not found; RUN_DIR must be a compare output_dir") from None
    except json.JSONDecodeError as e:
        raise Failure(f"{cfg_file}: not valid JSON ({e})") from None
    if not cfg.get("learning_rates"):
        raise Failure(f"{cfg_file}: field 'learning_rates' is empty; this run is not a learning-rate search")
    cells = []
    for p in sorted((run_dir / "cells").glob("*.json")):
        try:
            c = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise Failure(f"{p}: not valid JSON ({e})") from None
        if c.get("trained") and c.get("eval_set") == eval_set:
            if not isinstance((c.get("metrics") or {}).get("nll"), (int, float)):
                raise Failure(f"{p}: field 'metrics.nll' is missing (the search needs likelihood: true)")
            cells.append(c)
    return cfg, cells


def choose(cfg: dict, cells: list[dict]) -> dict:
    """Per trained method: its rows (one per learning rate, lowest NLL first) and its choice."""
    grid = sorted(float(x) for x in cfg["learning_rates"])
    out = {}
    # trained models only: untrained arms have no rate, X+contrast / X+noprofile share X's model
    for m in [m for m in cfg["methods"] if not m.startswith("base_") and m != "copy_retrieved" and "+" not in m]:
        rows = sorted((c for c in cells if c["method"] == m), key=lambda c: c["metrics"]["nll"])
        have = {float(c["lr"]) for c in rows}
        missing = [lr for lr in grid if lr not in have]
        choice, note = None, ""
        if missing:
            note = "pending: no cell yet at lr " + ", ".join(f"{x:g}" for x in missing)
        else:
            choice = float(rows[0]["lr"])
            if choice == grid[0]:
                note = "at the LOW end of the grid: extend it below before the main run"
            elif choice == grid[-1]:
                note = "at the HIGH end of the grid: extend it above before the main run"
        out[m] = {"rows": rows, "choice": choice, "note": note,
                  "final": choice is not None and not note}
    return out


def render(run_dir: Path, eval_set: str, result: dict, grid: list[float]) -> str:
    lines = [f"# Budget search: {run_dir}", "",
             f"Rule: per method, the learning rate whose kept model has the lowest NLL on `{eval_set}`; grid "
             + ", ".join(f"{x:g}" for x in sorted(grid)) + ".", "",
             "| method | lr | NLL (kept model) | best step | steps | stopped early | train min |",
             "|---|---|---|---|---|---|---|"]
    for m, r in result.items():
        for c in r["rows"]:
            t = c.get("train") or {}
            mark = " **chosen**" if r["choice"] is not None and float(c["lr"]) == r["choice"] else ""
            lines.append(f"| {m} | {float(c['lr']):g}{mark} | {c['metrics']['nll']:.4f} | {t.get('best_step', '')} | "
                         f"{t.get('steps', '')} | {t.get('stopped_early', '')} | "
                         f"{(t.get('train_s') or 0) / 60:.0f} |")
    lines.append("")
    for m, r in result.items():
        what = f"lr {r['choice']:g}" if r["choice"] is not None else "no choice"
        lines.append(f"- {m}: {what}" + (f" ({r['note']})" if r["note"] else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--eval-set", default="val", help="the eval set whose NLL decides (default val)")
    ap.add_argument("--yaml", action="store_true", help="also print method_learning_rates for the main config")
    a = ap.parse_args(argv)
    try:
        cfg, cells = load(a.run_dir, a.eval_set)
    except Failure as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = choose(cfg, cells)
    print(render(a.run_dir, a.eval_set, result, cfg["learning_rates"]), end="")
    if a.yaml and all(r["final"] for r in result.values()):
        print("\nmethod_learning_rates: {" + ", ".join(f"{m}: {r['choice']:g}" for m, r in result.items()) + "}")
    return 0 if all(r["final"] for r in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
