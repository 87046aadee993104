"""scripts/budget_choice.py: the budget configs' choice rule applied to a folder of cells."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "budget_choice.py"
GRID = [1e-4, 3e-4, 1e-3, 3e-3]


def _run(argv, capsys):
    old = sys.argv
    sys.argv = [str(SCRIPT), *map(str, argv)]
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _folder(tmp_path, nll: dict, methods=("ce", "perce", "ce+noprofile")):
    d = tmp_path / "run"
    (d / "cells").mkdir(parents=True)
    (d / "compare_config.json").write_text(json.dumps({"learning_rates": GRID, "methods": list(methods)}))
    for (m, lr), v in nll.items():
        cell = {"method": m, "lr": lr, "trained": True, "eval_set": "val", "metrics": {"nll": v},
                "train": {"best_step": 68, "steps": 200, "stopped_early": True, "train_s": 600.0}}
        (d / "cells" / f"{m}__seed0__lr{lr:g}__val.json").write_text(json.dumps(cell))
    # a cell of another eval set and an untrained one never decide
    (d / "cells" / "ce__seed0__lr0.003__test.json").write_text(json.dumps(
        {"method": "ce", "lr": 3e-3, "trained": True, "eval_set": "test", "metrics": {"nll": 0.1}}))
    (d / "cells" / "base_profile__seed0__val.json").write_text(json.dumps(
        {"method": "base_profile", "lr": None, "trained": False, "eval_set": "val", "metrics": {"nll": 0.1}}))
    return d


def test_lowest_nll_inside_the_grid_is_chosen(tmp_path, capsys):
    ce = dict(zip(GRID, [3.50, 3.40, 3.45, 3.60]))
    pe = dict(zip(GRID, [3.55, 3.52, 3.41, 3.48]))
    d = _folder(tmp_path, {**{("ce", k): v for k, v in ce.items()}, **{("perce", k): v for k, v in pe.items()}})
    rc, out, _ = _run([d, "--yaml"], capsys)
    assert rc == 0
    assert "- ce: lr 0.0003\n" in out and "- perce: lr 0.001\n" in out
    assert "method_learning_rates: {ce: 0.0003, perce: 0.001}" in out
    assert "| ce | 0.0003 **chosen** | 3.4000 |" in out


def test_an_edge_or_a_missing_rate_is_no_final_choice(tmp_path, capsys):
    ce = dict(zip(GRID, [3.30, 3.40, 3.45, 3.60]))          # best at the low end
    pe = dict(zip(GRID[:3], [3.55, 3.52, 3.41]))            # 3e-3 not run yet
    d = _folder(tmp_path, {**{("ce", k): v for k, v in ce.items()}, **{("perce", k): v for k, v in pe.items()}})
    rc, out, _ = _run([d, "--yaml"], capsys)
    assert rc == 1 and "method_learning_rates" not in out
    assert "- ce: lr 0.0001 (at the LOW end of the grid" in out
    assert "- perce: no choice (pending: no cell yet at lr 0.003)" in out


def test_user_errors_are_one_line(tmp_path, capsys):
    rc, _, err = _run([tmp_path / "nope"], capsys)
    assert rc == 2 and err.startswith("error:") and "compare_config.json" in err and err.count("\n") == 1
    d = _folder(tmp_path, {("ce", 1e-4): 3.5})
    bad = d / "cells" / "ce__seed0__lr0.0001__val.json"
    bad.write_text(json.dumps({"method": "ce", "lr": 1e-4, "trained": True, "eval_set": "val", "metrics": {}}))
    rc, _, err = _run([d], capsys)
    assert rc == 2 and str(bad) in err and "metrics.nll" in err and err.count("\n") == 1
