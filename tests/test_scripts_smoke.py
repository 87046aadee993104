"""Every script under benchmarks/ and scripts/ runs end to end on the tiny model, in seconds.

The scripts are part of the product but no command imports them, so a refactor of the library could
break one silently (``generation_throughput.py`` crashed for weeks after ``_hf_generate_batch`` gained
an argument). Each runs here as ``python SCRIPT ...`` would run it (``runpy`` with its own argv, in
this process so the heavy imports are paid once), with tiny settings, and must write its result.
``test_every_script_has_a_smoke_test`` fails when a new script is added without an entry below.
"""
from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# script -> (argv after the script name, with {tmp} for the test's folder; the file it must write).
# Scripts whose smoke run needs a finished compare folder are covered by the named tests instead.
SMOKE: dict[str, tuple[list[str], str] | str] = {
    "benchmarks/generation_throughput.py": (
        ["--model", "tiny-random", "--reps", "1", "--max-new-tokens", "4", "--n", "4", "--out", "{tmp}/gt.md"],
        "gt.md"),
    "benchmarks/eval_cell.py": (
        ["--model", "tiny-random", "--limit", "6", "--max-new-tokens", "4",
         "--data", "builtin:sample-test", "--out", "{tmp}/ec"], "ec.md"),
    "benchmarks/contrast_cost.py": (
        ["--model", "tiny-random", "--reps", "1", "--max-new-tokens", "4", "--out", "{tmp}/cc.md"], "cc.md"),
    "benchmarks/bf16_cpu.py": (
        ["--model", "tiny-random", "--rounds", "1", "--data", "builtin:sample-train", "--out", "{tmp}/bf.md"],
        "bf.md"),
    "benchmarks/step_time.py": (
        ["--model", "tiny-random", "--quick", "--warmup", "1", "--steps", "1", "--no-memory", "--out", "{tmp}/st"],
        "st.md"),
    "benchmarks/scaling.py": (
        ["--model", "tiny-random", "--steps", "2", "--warmup", "1", "--out", "{tmp}/sc"], "sc.md"),
    "benchmarks/train_cost.py": (
        ["--model", "tiny-random", "--tasks", "email", "--data", "email=builtin:sample-train", "--epochs", "1",
         "--warmup", "0", "--rounds", "1", "--gemm-size", "64", "--gemm-reps", "2", "--out", "{tmp}/tc"], "tc.md"),
    "scripts/device_check.py": (
        ["--cpu", "--model", "tiny-random", "--steps", "2", "--max-length", "128", "--out", "{tmp}/dc"],
        "dc/summary.md"),
    "scripts/budget_choice.py": "tests/test_budget_choice.py::test_lowest_nll_inside_the_grid_is_chosen",
    "scripts/gpu_study.py": (
        [str(ROOT / "configs/compare/study-v2/email-budget.yaml"), "--cpu", "--out-root", "{tmp}/gs", "--tar", "{tmp}/gs.tar.gz",
         "--override", "{model: tiny-random, data: builtin:sample-train, limit: 8, learning_rates: [0.001], "
         "eval_sets: [{name: val, data: builtin:sample-test, limit: 4}], train: {epochs: 1, max_steps: 2, "
         "eval_data: builtin:sample-test, eval_limit: 2, eval_every: 1, save_steps: 1}}"],
        "gs/email-budget/GPU_RUN.md"),
    "scripts/study_pairs.py": "tests/test_compare.py::test_study_pairs_script_agrees_with_compare",
    "scripts/study_decoding.py": "tests/test_compare.py::test_study_decoding_trains_the_compare_cell_then_decodes",
}


def _scripts() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for d in ("benchmarks", "scripts") for p in (ROOT / d).glob("*.py")
                  if not p.name.startswith("_"))


def test_every_script_has_a_smoke_test():
    assert _scripts() == sorted(SMOKE), "add each new script under benchmarks/ or scripts/ to SMOKE"
    for script, entry in SMOKE.items():
        if isinstance(entry, str):   # an existing test covers it: it must exist under that name
            path, name = entry.split("::")
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{script}: {entry} is gone"


def run_script(script: str, argv: list[str], monkeypatch) -> int:
    """``python script argv`` in this process: its exit code (0 when main() returns None)."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *argv])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        torch.set_num_threads(threads)   # a script's --threads must not leak into later tests


@pytest.mark.parametrize("script", [s for s, e in SMOKE.items() if not isinstance(e, str)])
def test_script_runs_on_the_tiny_model(script, tmp_path, monkeypatch, capsys):
    argv, output = SMOKE[script]
    rc = run_script(script, [a.replace("{tmp}", str(tmp_path)) for a in argv], monkeypatch)
    printed = capsys.readouterr().out
    assert rc == 0, printed[-3000:]
    if output:
        text = (tmp_path / output).read_text()
        assert "tiny-random" in text, text[:500]   # it reports the model it ran, not a hard-coded one
    else:   # device_check prints one line per check and a summary
        assert re.search(r"SUMMARY (\d+)/\1 checks passed", printed), printed[-2000:]
