"""percontrast compare and percontrast.stats: intervals, resume, validation, end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from percontrast import compare as C
from percontrast.errors import UserError
from percontrast.stats import paired_bootstrap, relative_gain, t_interval, t_ppf

# ---------------------------------------------------------------- stats


def test_t_quantiles_match_tables():
    # two-sided 95% critical values from any t table
    for df, t in [(1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (10, 2.2281389), (30, 2.0422725)]:
        assert t_ppf(0.975, df) == pytest.approx(t, abs=1e-6)
    assert t_ppf(0.025, 3) == pytest.approx(-3.1824463, abs=1e-6)


def test_t_interval_hand_computed():
    iv = t_interval([0.1, 0.2, 0.3])
    # mean 0.2, s = 0.1, half = 4.3026527 * 0.1 / sqrt(3) = 0.2484138
    assert iv.mean == pytest.approx(0.2)
    assert iv.lo == pytest.approx(0.2 - 0.2484138, abs=1e-6)
    assert iv.hi == pytest.approx(0.2 + 0.2484138, abs=1e-6)
    one = t_interval([0.5])
    assert one.mean == 0.5 and math.isnan(one.lo) and one.as_dict()["lo"] is None


def test_paired_bootstrap_hand_computed():
    # constant difference: every resample has the same mean
    b = paired_bootstrap([0.5, 0.7, 0.9], [0.4, 0.6, 0.8], n_resamples=500, seed=3)
    assert b["diff"] == pytest.approx(0.1) and b["lo"] == pytest.approx(0.1) and b["hi"] == pytest.approx(0.1)
    assert b["p_le_0"] == 0.0
    # two examples, d = (0, 1): resample means are 0, .5, 1 with prob 1/4, 1/2, 1/4
    b = paired_bootstrap([0.0, 1.0], [0.0, 0.0], n_resamples=20000, seed=0)
    assert b["diff"] == 0.5 and b["lo"] == 0.0 and b["hi"] == 1.0
    assert b["p_le_0"] == pytest.approx(0.25, abs=0.01)
    # fixed seed: exactly the documented procedure
    a, c = [0.3, 0.1, 0.8, 0.5, 0.2], [0.2, 0.2, 0.5, 0.5, 0.1]
    d = np.array(a) - np.array(c)
    idx = np.random.default_rng(7).integers(0, 5, size=(1000, 5))
    lo, hi = np.quantile(d[idx].mean(1), [0.025, 0.975])
    got = paired_bootstrap(a, c, n_resamples=1000, seed=7)
    assert (got["lo"], got["hi"]) == (pytest.approx(lo), pytest.approx(hi))
    assert got == paired_bootstrap(a, c, n_resamples=1000, seed=7)
    assert relative_gain(0.3, 0.2) == pytest.approx(50.0) and relative_gain(1, 0) is None


# ---------------------------------------------------------------- compare

def _cfg(tmp_path, **kw):
    base = dict(model="tiny-random", data="builtin:sample-train", test_data="builtin:sample-test", task="email",
                k=1, max_length=192, max_new_tokens=3, limit=8, test_limit=4, seeds=[0, 1],
                methods=["ce", "perce"], train={"max_steps": 1, "batch_size": 4},
                bootstrap_resamples=200, output_dir=str(tmp_path / "cmp"), progress=False)
    base.update(kw)
    return C.CompareConfig(**base)


@pytest.fixture
def fake_training(monkeypatch):
    """Replace training by loading the untrained tiny model; count the calls."""
    calls = []

    def fake(tcfg, records):
        from percontrast.models import load_model
        calls.append((tcfg.method, tcfg.seed, tcfg.learning_rate, tcfg.clip_min))
        model, tok = load_model("tiny-random")
        return model, tok, {"steps": 0, "train_s": 0.0}

    monkeypatch.setattr(C, "train_model", fake)
    return calls


def test_unknown_method_refused_before_training(tmp_path, fake_training):
    with pytest.raises(UserError, match="unknown method 'cee'"):
        _cfg(tmp_path, methods=["ce", "cee"])
    with pytest.raises(UserError, match="unknown metric"):
        _cfg(tmp_path, metrics=["rougeL", "bleu"])
    with pytest.raises(UserError, match="unknown key 'max_stepz'"):
        _cfg(tmp_path, train={"max_stepz": 3})
    # a missing eval file is found before the first training call
    cfg = _cfg(tmp_path, eval_sets=[{"name": "other", "data": str(tmp_path / "nope.jsonl")}])
    with pytest.raises(UserError, match="nope.jsonl"):
        C.run(cfg)
    assert fake_training == []
    assert not (tmp_path / "cmp" / "cells").exists()


def test_cli_unknown_method_exit_2(tmp_path, capsys):
    from percontrast import cli
    y = tmp_path / "c.yaml"
    y.write_text("data: builtin:sample-train\ntest_data: builtin:sample-test\ntask: email\nmethods: [ce, rho1]\n")
    assert cli.main(["compare", "--config", str(y)]) == 2
    assert "unknown method 'rho1'" in capsys.readouterr().err


def test_resume_skips_finished_cells(tmp_path, fake_training):
    cfg = _cfg(tmp_path)
    r1 = C.run(cfg)
    assert sorted(fake_training) == sorted([("ce", 0, 2e-5, 0.8), ("ce", 1, 2e-5, 0.8),
                                            ("perce", 0, 2e-5, 0.8), ("perce", 1, 2e-5, 0.8)])
    assert r1["cells_computed"] == 4
    fake_training.clear()
    r2 = C.run(cfg)
    assert fake_training == [] and r2["cells_skipped"] == 4 and r2["cells_computed"] == 0
    (tmp_path / "cmp" / "cells" / "perce__seed1__lr2e-05__clip0.8-5__test.json").unlink()
    # summarize_only trains nothing and reports the seeds that are there
    r3 = C.run(_cfg(tmp_path, summarize_only=True))
    assert fake_training == [] and r3["cells_computed"] == 0
    res = json.loads((tmp_path / "cmp" / "results.json").read_text())
    rows = {r["method"]: r for r in res["groups"][0]["rows"]}
    assert rows["perce"]["seeds"] == [0] and rows["ce"]["seeds"] == [0, 1]
    C.run(cfg)
    assert fake_training == [("perce", 1, 2e-5, 0.8)]
    # no temp files left behind
    assert not [p for p in (tmp_path / "cmp").rglob("*") if p.name.startswith(".")]


def test_grid_and_transfer_cells(tmp_path, fake_training):
    cfg = _cfg(tmp_path, methods=["base_profile", "ce", "perce"], seeds=[0], learning_rates=[1e-5, 1e-4],
               clips=["0.8:5", "0.5:5"], eval_sets=[{"name": "again", "data": "builtin:sample-train", "limit": 3}])
    C.run(cfg)
    # ce once per lr (it ignores the clip), perce per (lr, clip); base never trains
    assert sorted(fake_training) == sorted([("ce", 0, 1e-5, 0.8), ("ce", 0, 1e-4, 0.8),
                                            ("perce", 0, 1e-5, 0.8), ("perce", 0, 1e-5, 0.5),
                                            ("perce", 0, 1e-4, 0.8), ("perce", 0, 1e-4, 0.5)])
    res = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert len(res["groups"]) == 2 * 4  # eval sets x grid points
    again = [g for g in res["groups"] if g["eval_set"] == "again"]
    assert all(g["n_examples"] == 3 for g in again)
    assert (tmp_path / "cmp" / "results.png").stat().st_size > 1000


def test_end_to_end_two_methods_two_seeds(tmp_path):
    """Real (tiny) training: 2 methods x 2 seeds, one step each; table, JSON and plot."""
    cfg = _cfg(tmp_path)
    r = C.run(cfg)
    out = tmp_path / "cmp"
    assert r["cells_computed"] == 4
    res = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in res["groups"][0]["rows"]}
    assert set(rows) == {"ce", "perce"}
    assert rows["perce"]["seeds"] == [0, 1] and rows["ce"]["vs_ce"] == {}
    for m in ("rouge1", "rougeL", "meteor"):
        iv = rows["perce"]["metrics"][m]
        assert iv["n"] == 2 and iv["lo"] <= iv["mean"] <= iv["hi"]
        assert set(rows["perce"]["vs_ce"][m]) >= {"diff", "lo", "hi"}
    cell = json.loads((out / "cells" / "perce__seed0__lr2e-05__clip0.8-5__test.json").read_text())
    assert cell["train"]["steps"] == 1 and cell["peak_mem_bytes"] > 0 and len(cell["examples"]) == 4
    md = (out / "results.md").read_text()
    assert "| perce | 2 |" in md and "ROUGE-L" in md and "METEOR" in md
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert res["run"]["git_commit"] is None or isinstance(res["run"]["git_commit"], str)
    assert "versions" in res["run"] and "rouge-score" in res["metric_versions"]
