"""percontrast compare and percontrast.stats: intervals, resume, validation, end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from percontrast.commands import compare as C
from percontrast.errors import UserError
from percontrast.stats import (paired_bootstrap, relative_gain, share_boot_le_0, t_interval, t_ppf,
                               two_level_bootstrap)

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
    assert b["share_boot_le_0"] == 0.0
    # two examples, d = (0, 1): resample means are 0, .5, 1 with prob 1/4, 1/2, 1/4
    b = paired_bootstrap([0.0, 1.0], [0.0, 0.0], n_resamples=20000, seed=0)
    assert b["diff"] == 0.5 and b["lo"] == 0.0 and b["hi"] == 1.0
    assert b["share_boot_le_0"] == pytest.approx(0.25, abs=0.01)
    # fixed seed: exactly the documented procedure
    a, c = [0.3, 0.1, 0.8, 0.5, 0.2], [0.2, 0.2, 0.5, 0.5, 0.1]
    d = np.array(a) - np.array(c)
    idx = np.random.default_rng(7).integers(0, 5, size=(1000, 5))
    lo, hi = np.quantile(d[idx].mean(1), [0.025, 0.975])
    got = paired_bootstrap(a, c, n_resamples=1000, seed=7)
    assert (got["lo"], got["hi"]) == (pytest.approx(lo), pytest.approx(hi))
    assert got == paired_bootstrap(a, c, n_resamples=1000, seed=7)
    assert relative_gain(0.3, 0.2) == pytest.approx(50.0) and relative_gain(1, 0) is None
    # results written before the rename still read back
    assert share_boot_le_0({"p_le_0": 0.3}) == 0.3 and share_boot_le_0(got) == got["share_boot_le_0"]


def test_two_level_bootstrap_one_seed_is_the_examples_bootstrap():
    a, c = [0.3, 0.1, 0.8, 0.5, 0.2], [0.2, 0.2, 0.5, 0.5, 0.1]
    d = (np.array(a) - np.array(c)).tolist()
    one = two_level_bootstrap([d], n_resamples=1000, seed=7)
    ex = paired_bootstrap(a, c, n_resamples=1000, seed=7)
    assert not one["seed_level"] and one["n_seeds"] == 1
    assert (one["diff"], one["lo"], one["hi"], one["share_boot_le_0"]) == \
        (ex["diff"], ex["lo"], ex["hi"], ex["share_boot_le_0"])


def test_two_level_bootstrap_widens_when_seeds_disagree():
    # seed s shifts every example by +0.1, -0.1, 0: the seed-averaged per-example difference
    # is 0 everywhere, so the examples-only interval is [0, 0]; resampling 3 seeds gives
    # means in {-0.1, ..., +0.1}, each extreme with probability 1/27 > 2.5%, so the 95%
    # interval is exactly [-0.1, +0.1]
    base = np.array([0.2, 0.4, 0.6, 0.3])
    shift = np.array([0.1, -0.1, 0.0])[:, None]
    d = (base + shift) - base
    ex = paired_bootstrap(d.mean(0), np.zeros(4), n_resamples=4000, seed=0)
    two = two_level_bootstrap(d, n_resamples=4000, seed=0)
    assert two["seed_level"] and two["diff"] == pytest.approx(ex["diff"], abs=1e-15)
    assert ex["lo"] == pytest.approx(0, abs=1e-15) and ex["hi"] == pytest.approx(0, abs=1e-15)
    assert two["lo"] == pytest.approx(-0.1) and two["hi"] == pytest.approx(0.1)


# ---------------------------------------------------------------- compare

def _cfg(tmp_path, **kw):
    base = dict(model="tiny-random", data="builtin:sample-train", test_data="builtin:sample-test", task="email",
                k=1, max_length=192, max_new_tokens=3, limit=8, test_limit=4, seeds=[0, 1],
                methods=["ce", "perce"], train={"max_steps": 1, "batch_size": 4},
                bootstrap_resamples=200, output_dir=str(tmp_path / "cmp"), progress=False)
    base.update(kw)
    return C.CompareConfig(**base)


def _fake_trainer(record):
    """A train_model that hands each TrainConfig to ``record`` and returns the untrained tiny model."""
    def fake(tcfg, records):
        from percontrast.models import load_model
        record(tcfg)
        model, tok = load_model("tiny-random")
        return model, tok, {"steps": 0, "train_s": 0.0}
    return fake


@pytest.fixture
def fake_training(monkeypatch):
    """Replace training by loading the untrained tiny model; count the calls."""
    calls = []
    monkeypatch.setattr(C, "train_model",
                        _fake_trainer(lambda t: calls.append((t.method, t.seed, t.learning_rate, t.clip_min))))
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
    # each cell says which machine, commit and date made it (a study's cells span sessions)
    cell = json.loads((tmp_path / "cmp" / "cells" / "ce__seed0__lr2e-05__test.json").read_text())
    assert cell["run"]["machine"] and cell["run"]["date"].endswith("UTC") and "torch" in cell["run"]["versions"]
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


def test_end_to_end_two_methods_two_seeds(tmp_path, monkeypatch):
    """Real (tiny) training: 2 methods x 2 seeds, one step each; table, JSON and plot."""
    import torch

    real_train, weights = C.train_model, {}

    def spy(tcfg, records):  # keep each trained model's weights to compare the seeds
        model, tok, info = real_train(tcfg, records)
        weights[(tcfg.method, tcfg.seed)] = torch.cat([p.detach().flatten().cpu() for p in model.parameters()])
        return model, tok, info

    monkeypatch.setattr(C, "train_model", spy)
    cfg = _cfg(tmp_path)
    r = C.run(cfg)
    # the seed is not a label only: different seeds train different models
    for m in ("ce", "perce"):
        assert not torch.equal(weights[(m, 0)], weights[(m, 1)]), m
    out = tmp_path / "cmp"
    assert r["cells_computed"] == 4
    res = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in res["groups"][0]["rows"]}
    assert set(rows) == {"ce", "perce"}
    assert rows["perce"]["seeds"] == [0, 1] and rows["ce"]["vs_ce"] == {}
    for m in ("rouge1", "rougeL", "meteor"):
        iv = rows["perce"]["metrics"][m]
        assert iv["n"] == 2 and iv["lo"] <= iv["mean"] <= iv["hi"]
        assert set(rows["perce"]["vs_ce"][m]) >= {"diff", "lo", "hi", "share_boot_le_0", "two_level"}
    assert rows["perce"]["shared_seeds"] == [0, 1] and isinstance(rows["perce"]["profile_removed"], int)
    cell = json.loads((out / "cells" / "perce__seed0__lr2e-05__clip0.8-5__test.json").read_text())
    assert cell["train"]["steps"] == 1 and cell["peak_mem_bytes"] > 0 and len(cell["examples"]) == 4
    md = (out / "results.md").read_text()
    assert "| perce | 2 |" in md and "ROUGE-L" in md and "METEOR" in md and "eval prompts" in md
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert res["run"]["git_commit"] is None or isinstance(res["run"]["git_commit"], str)
    assert "versions" in res["run"] and "rouge-score" in res["metric_versions"]


# ---------------------------------------------------------------- Δ vs ce on shared seeds (synthetic cells)

def _cell(method, seed, scores, ids=("a", "b", "c"), trained=True, **extra):
    """A finished cell with known per-example ROUGE-L scores (lr 2e-5, clip 0.8:5: _cfg's default)."""
    ex = [{"id": i, "prediction": "", "scores": {"rougeL": v}} for i, v in zip(ids, scores)]
    return {"method": method, "seed": seed, "eval_set": "test", "trained": trained,
            "lr": 2e-5 if trained else None, "clip_min": 0.8 if trained and method != "ce" else None,
            "clip_max": 5.0 if trained and method != "ce" else None,
            "metrics": {"rougeL": sum(scores) / len(scores)}, "train_s": 1.0, "eval_s": 1.0,
            "peak_mem_bytes": 2 ** 20, "mem_kind": "rss", "examples": ex, **extra}


CE = {0: [0.2, 0.4, 0.6], 1: [0.5, 0.5, 0.5], 2: [0.8, 0.8, 0.8]}


def _summary(tmp_path, cells, methods, seeds=(0, 1, 2)):
    cfg = _cfg(tmp_path, methods=methods, seeds=list(seeds), metrics=["rougeL"], bootstrap_resamples=2000)
    res = C.summarize(cfg, cells, cfg.eval_sets_resolved(), cfg.settings(), list(seeds)[:1])
    return res, {r["method"]: r for r in res["groups"][0]["rows"]}


def test_one_seed_method_uses_only_the_shared_seed(tmp_path):
    # lossce has seed 0 only; its examples are stored in another order (pairing is by id)
    loss0 = _cell("lossce", 0, [0.9, 0.3, 0.3], ids=("c", "a", "b"))
    cells = [_cell("ce", s, v) for s, v in CE.items()] + [loss0]
    res, rows = _summary(tmp_path, cells, ["ce", "lossce"])
    r = rows["lossce"]
    assert r["shared_seeds"] == [0] and r["vs_ce"]["rougeL"]["seeds"] == [0]
    # by hand against ce seed 0 only: a 0.3-0.2, b 0.3-0.4, c 0.9-0.6 -> Δ = 0.3/3 = 0.1;
    # gain = (0.5 - 0.4) / 0.4 = +25%. (Against the 3-seed ce mean it would be -0.0667, -11.8%.)
    assert r["vs_ce"]["rougeL"]["diff"] == pytest.approx(0.1, abs=1e-12)
    assert r["gain_pct"]["rougeL"] == pytest.approx(25.0, abs=1e-9)
    # the examples-only interval is exactly the paired bootstrap of lossce seed 0 vs ce seed 0
    ex = paired_bootstrap([0.3, 0.3, 0.9], CE[0], n_resamples=2000, seed=0)
    got = r["vs_ce"]["rougeL"]
    assert (got["lo"], got["hi"]) == (pytest.approx(ex["lo"]), pytest.approx(ex["hi"]))
    assert got["share_boot_le_0"] == pytest.approx(ex["share_boot_le_0"]) and "p_le_0" not in got
    # one shared seed: no seed level, and the table says so
    assert not got["two_level"]["seed_level"]
    md = C.render_markdown(res)
    assert "| lossce | 1 | +10.00 [" in md and "[n/a: 1 shared seed]" in md
    assert "[CI: examples] [CI: seeds, then examples]" in md


def test_three_seed_delta_and_gain_by_hand(tmp_path):
    # perce seed s = ce seed s + (0.1, -0.1, 0.0)[s] on every example: seeds disagree
    shift = {0: 0.1, 1: -0.1, 2: 0.0}
    cells = [_cell("ce", s, v) for s, v in CE.items()] + \
            [_cell("perce", s, [x + shift[s] for x in v]) for s, v in CE.items()]
    res, rows = _summary(tmp_path, cells, ["ce", "perce"])
    got = rows["perce"]["vs_ce"]["rougeL"]
    assert rows["perce"]["shared_seeds"] == [0, 1, 2]
    # Δ = mean of the shifts = 0; gain = 0 / mean(ce) = 0
    assert got["diff"] == pytest.approx(0, abs=1e-12) and rows["perce"]["gain_pct"]["rougeL"] == pytest.approx(0, abs=1e-9)
    # examples only: every seed-averaged per-example difference is 0 -> [0, 0]; over seeds
    # then examples: the seed shifts show up (each extreme has probability 1/27 > 2.5%)
    assert got["lo"] == pytest.approx(0, abs=1e-12) and got["hi"] == pytest.approx(0, abs=1e-12)
    two = got["two_level"]
    assert two["seed_level"] and two["diff"] == pytest.approx(got["diff"], abs=1e-12)
    assert two["lo"] == pytest.approx(-0.1) and two["hi"] == pytest.approx(0.1)
    assert "| perce | 3 | +0.00 [+0.00, +0.00] [-10.00, +10.00] |" in C.render_markdown(res).replace("-0.00", "+0.00")


def test_no_shared_seed_is_not_compared(tmp_path):
    cells = [_cell("ce", s, v) for s, v in CE.items() if s < 2] + [_cell("entce", 2, [0.1, 0.1, 0.1])]
    res, rows = _summary(tmp_path, cells, ["ce", "entce"])
    assert rows["entce"]["shared_seeds"] == [] and rows["entce"]["vs_ce"] == {} and rows["entce"]["gain_pct"] == {}
    assert "| entce | 0 | no shared seed | — |" in C.render_markdown(res)


def test_untrained_greedy_run_pairs_with_every_ce_seed(tmp_path):
    base = _cell("base_profile", 0, [0.5, 0.5, 0.2], trained=False,
                 prompt_stats={"profile_cut": 2})  # written before profile_removed existed
    cells = [_cell("ce", s, v, prompt_stats={"profile_cut": 2, "profile_removed": 0}) for s, v in CE.items()]
    res, rows = _summary(tmp_path, cells + [base], ["base_profile", "ce"])
    r = rows["base_profile"]
    # mean over the 3 ce seeds x 3 examples of base - ce: (1.2 - (1.2 + 1.5 + 2.4) / 3) / 3 = -0.166..
    assert r["shared_seeds"] == [0, 1, 2] and r["deterministic"]
    assert r["vs_ce"]["rougeL"]["diff"] == pytest.approx((1.2 - 5.1 / 3) / 3, abs=1e-12)
    assert r["gain_pct"]["rougeL"] == pytest.approx(100 * (0.4 - 1.7 / 3) / (1.7 / 3), abs=1e-9)
    assert r["vs_ce"]["rougeL"]["two_level"]["seed_level"]
    assert r["profile_removed"] == 0 and r["profile_cut"] == 2
    md = C.render_markdown(res)
    assert "| base_profile | 3* |" in md
    assert "cut the profile in 2 of 3 eval prompts and removed it entirely in 0" in md


# ---------------------------------------------------------------- resume: the settings hash

def _write_test_records(path, change_first_output=False):
    from percontrast.datasets import load_records
    from percontrast.prompts import get_task
    recs = load_records("builtin:sample-test", get_task("email"), limit=2)
    if change_first_output:
        recs[0]["output"] += " (edited)"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_resume_refuses_a_cell_made_with_other_settings(tmp_path, fake_training, capsys):
    data = _write_test_records(tmp_path / "test.jsonl")
    one = dict(methods=["ce"], seeds=[0], test_data=data, test_limit=None)
    C.run(_cfg(tmp_path, **one))
    cell = tmp_path / "cmp" / "cells" / "ce__seed0__lr2e-05__test.json"
    stored = json.loads(cell.read_text())
    assert len(stored["config_hash"]) == 64 and "profile_removed" in stored["prompt_stats"]
    saved_config = (tmp_path / "cmp" / "compare_config.json").read_text()
    fake_training.clear()
    changes = [({"train": {"max_steps": 2, "batch_size": 4}}, "train.config.max_steps"),
               ({"k": 2}, "shared.k"), ({"max_length": 160}, "shared.max_length"),
               ({"max_new_tokens": 4}, "decoding.max_new_tokens"), ({"retriever": "first"}, "shared.retriever"),
               ({"dtype": "float16"}, "shared.dtype"), ({"test_limit": 1}, "eval_set.records_sha256")]
    for change, path in changes:
        with pytest.raises(UserError) as e:
            C.run(_cfg(tmp_path, **{**one, **change}))
        msg = str(e.value)
        assert str(cell) in msg and path in msg and "delete it" in msg and "\n" not in msg, msg
    # the same file with other content is another experiment, too
    _write_test_records(tmp_path / "test.jsonl", change_first_output=True)
    with pytest.raises(UserError, match="eval_set.records_sha256"):
        C.run(_cfg(tmp_path, **one))
    _write_test_records(tmp_path / "test.jsonl")
    # ... and the CLI prints it as one line, exit 2
    from percontrast import cli
    y = tmp_path / "c.yaml"
    y.write_text(f"model: tiny-random\ndata: builtin:sample-train\ntest_data: {data}\ntask: email\nk: 1\n"
                 f"max_length: 192\nmax_new_tokens: 3\nlimit: 8\nseeds: [0]\nmethods: [ce]\nprogress: false\n"
                 f"train: {{max_steps: 3, batch_size: 4}}\noutput_dir: {tmp_path / 'cmp'}\n")
    assert cli.main(["compare", "--config", str(y)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "ce__seed0__lr2e-05__test.json" in err[0]
    # nothing was trained, the output folder still describes the first run
    assert fake_training == [] and (tmp_path / "cmp" / "compare_config.json").read_text() == saved_config
    # settings that cannot change a model or its outputs do not invalidate it
    r = C.run(_cfg(tmp_path, **one, train={"max_steps": 1, "batch_size": 4, "logging_steps": 5},
                   bootstrap_resamples=300))
    assert r["cells_skipped"] == 1 and fake_training == []


def test_resume_refuses_cells_without_hash_unless_adopted(tmp_path, fake_training):
    one = dict(methods=["ce"], seeds=[0])
    C.run(_cfg(tmp_path, **one))
    cell = tmp_path / "cmp" / "cells" / "ce__seed0__lr2e-05__test.json"
    old = json.loads(cell.read_text())
    for key in ("config_hash", "definition", "prompt_stats"):  # what an older percontrast wrote
        del old[key]
    cell.write_text(json.dumps(old))
    fake_training.clear()
    with pytest.raises(UserError, match="no settings hash.*--adopt-unhashed-cells"):
        C.run(_cfg(tmp_path, **one))
    with pytest.raises(UserError, match="no settings hash"):
        C.run(_cfg(tmp_path, **one, summarize_only=True))
    r = C.run(_cfg(tmp_path, **one, adopt_unhashed_cells=True))
    assert r["cells_skipped"] == 1 and fake_training == []
    res = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert res["unhashed_cells"] == ["ce__seed0__test"]
    assert "--adopt-unhashed-cells" in (tmp_path / "cmp" / "results.md").read_text()


# ---------------------------------------------------------------- likelihood metrics, learning curve, arms

def test_likelihood_only_cells_and_learning_curve(tmp_path, monkeypatch):
    """--no-generate --likelihood: no decoding; per example the gold NLL with the profile, mean PIR and
    NLL on the personal tokens the UNTRAINED model fixed (PIR > 0.8), recomputed here independently;
    the train: block's eval_data / eval_every give a val_nll learning curve in each cell."""
    from percontrast.commands.score import score_records
    from percontrast.datasets import load_records
    from percontrast.models import load_model
    from percontrast.prompts import get_task

    import percontrast.likelihood as L
    # the tiny random model's PIR stays far below 0.8: a threshold inside its range makes both sets non-empty
    monkeypatch.setattr(L, "PERSONAL_PIR", 0.0)
    cfg = _cfg(tmp_path, generate=False, likelihood=True, seeds=[0], methods=["base_profile", "ce"],
               train={"max_steps": 2, "batch_size": 4, "eval_data": "builtin:sample-test", "eval_every": 1,
                      "eval_limit": 3})
    C.run(cfg)
    out = tmp_path / "cmp"
    ce = json.loads((out / "cells" / "ce__seed0__lr2e-05__test.json").read_text())
    assert [s for s, _ in ce["train"]["curve"]] == [0, 1, 2]          # step 0, then every step
    assert all(math.isfinite(v) for _, v in ce["train"]["curve"])
    assert all(e["prediction"] is None for e in ce["examples"])
    base = json.loads((out / "cells" / "base_profile__seed0__test.json").read_text())
    # the personal-token set comes from the untrained model: recompute it and the base cell's numbers
    model, tok = load_model("tiny-random")
    recs = load_records("builtin:sample-test", get_task("email"), limit=4)
    rows = score_records(model, tok, recs, cfg.prompt_builder(tok, "email"), progress=False)
    personal = {r["id"]: [i for i, p in enumerate(r["pir"]) if p > 0.0] for r in rows}
    assert any(personal.values()) and not all(len(v) == len(r["pir"]) for v, r in zip(personal.values(), rows))
    nll_sum = sum(-x for r in rows for x in r["logp_with"])
    n = sum(len(r["logp_with"]) for r in rows)
    pers = [-r["logp_with"][i] for r in rows for i in personal[r["id"]]]
    tol = 1e-9 * n   # same float32 forwards (same batches), summed in a different order in float64
    assert abs(base["metrics"]["nll"] - nll_sum / n) < tol
    assert abs(base["metrics"]["nll_personal"] - sum(pers) / len(pers)) < tol
    assert base["metrics"]["personal_tokens"] == len(pers)
    for e, r in zip(base["examples"], rows):
        if not personal[r["id"]]:
            assert e["scores"]["nll_personal"] is None
    res = json.loads((out / "results.json").read_text())
    assert res["metrics"] == ["nll", "nll_personal", "nll_other", "mean_pir"]
    md = (out / "results.md").read_text()
    assert "NLL personal" in md and "ROUGE" not in md.split("## eval set")[1].split("\n\n")[1]


def test_no_generate_needs_likelihood_and_no_contrast_arms(tmp_path):
    with pytest.raises(UserError, match="measures nothing"):
        _cfg(tmp_path, generate=False)
    with pytest.raises(UserError, match="need generations"):
        _cfg(tmp_path, generate=False, likelihood=True, methods=["ce", "perce+contrast"])
    with pytest.raises(UserError, match="unknown method"):
        _cfg(tmp_path, methods=["ce", "base_noprofile+contrast"])


def _spy_training_and_decoding(monkeypatch, what):
    """Real training and decoding, recorded: the method of every model trained, and ``what(options, kwargs)``
    of every generate_for call."""
    import percontrast.generation as G
    trained, seen = [], []
    real_train, real_gen = C.train_model, G.generate_for
    monkeypatch.setattr(C, "train_model", lambda tcfg, recs: trained.append(tcfg.method) or real_train(tcfg, recs))

    def spy(model, tok, recs, task, prompt_opts, options, **kw):
        seen.append(what(options, kw))
        return real_gen(model, tok, recs, task, prompt_opts, options, **kw)

    monkeypatch.setattr(G, "generate_for", spy)
    return trained, seen


def test_contrast_arm_attribution_and_degeneration(tmp_path, monkeypatch):
    """X+contrast decodes X's model (trained once) with contrast at contrast_arm_alpha; every generating
    cell carries hit_cap / loop per example, and attribution when asked, with chance and ceiling."""
    trained, seen = _spy_training_and_decoding(monkeypatch, lambda options, kw: options.contrast_alpha)
    cfg = _cfg(tmp_path, seeds=[0], methods=["ce", "ce+contrast", "base_profile+contrast"], attribution=True,
               contrast_arm_alpha=1.5, max_new_tokens=4)
    C.run(cfg)
    assert trained == ["ce"]                                   # one model for ce and ce+contrast
    assert sorted(seen) == [0.0, 1.5, 1.5]
    out = tmp_path / "cmp"
    arm = json.loads((out / "cells" / "ce+contrast__seed0__lr2e-05__test.json").read_text())
    assert arm["definition"]["decoding"]["contrast_alpha"] == 1.5
    for e in arm["examples"]:
        assert e["scores"]["hit_cap"] == float(e["new_tokens"] == 4)   # the tiny model rarely ends by itself
        assert e["scores"]["attributed"] in (0.0, 1.0) and e["scores"]["loop"] in (0.0, 1.0)
    res = json.loads((out / "results.json").read_text())
    assert {"attributed", "hit_cap", "loop"} <= set(res["metrics"])
    a = res["attribution"]["test"]
    assert a["n_users"] == 2 and 0 < a["chance"] <= 1 and 0 <= a["ceiling"] <= 1
    rows = {r["method"]: r for r in res["groups"][0]["rows"]}
    assert set(rows) == {"ce", "ce+contrast", "base_profile+contrast"}
    assert rows["base_profile+contrast"]["deterministic"]


def test_method_seeds_run_fewer_seeds_for_named_arms(tmp_path, fake_training):
    """method_seeds: perce+contrast only at seed 0 (ce's model is still built for both seeds; perce's
    model only where an arm needs it); the table pairs it with ce on the seed both have."""
    cfg = _cfg(tmp_path, methods=["ce", "perce", "perce+contrast"], seeds=[0, 1],
               method_seeds={"perce": [1], "perce+contrast": [0]})
    C.run(cfg)
    assert sorted(fake_training) == sorted([("ce", 0, 2e-5, 0.8), ("ce", 1, 2e-5, 0.8),
                                            ("perce", 0, 2e-5, 0.8), ("perce", 1, 2e-5, 0.8)])
    cells = sorted(p.name for p in (tmp_path / "cmp" / "cells").glob("*.json"))
    assert cells == ["ce__seed0__lr2e-05__test.json", "ce__seed1__lr2e-05__test.json",
                     "perce+contrast__seed0__lr2e-05__clip0.8-5__test.json",
                     "perce__seed1__lr2e-05__clip0.8-5__test.json"]
    rows = {r["method"]: r for r in json.loads((tmp_path / "cmp" / "results.json").read_text())["groups"][0]["rows"]}
    assert rows["perce"]["seeds"] == [1] and rows["perce+contrast"]["seeds"] == [0]
    for bad, msg in [({"lossce": [0]}, "not a trained arm in methods"), ({"perce": [2]}, "drawn from seeds"),
                     ({"perce": []}, "drawn from seeds"), ({"base_profile": [0]}, "not a trained arm")]:
        with pytest.raises(UserError, match=msg):
            _cfg(tmp_path, methods=["base_profile", "ce", "perce"], method_seeds=bad)


def test_variants_are_arms_with_train_overrides(tmp_path, monkeypatch):
    """perce@norm trains perce with variants.norm on top of train:, is its own cell and row, and pairs with ce;
    its settings hash differs from perce's (so neither cell can stand in for the other)."""
    seen = []
    monkeypatch.setattr(C, "train_model",
                        _fake_trainer(lambda t: seen.append((t.method, t.normalize, t.refresh, t.max_steps))))
    cfg = _cfg(tmp_path, seeds=[0], methods=["ce", "perce", "perce@norm", "perce@k2+contrast"],
               variants={"norm": {"normalize": "weights"}, "k2": {"refresh": "every_k", "refresh_every": 2}})
    C.run(cfg)
    assert sorted(seen) == sorted([("ce", "tokens", "step", 1), ("perce", "tokens", "step", 1),
                                   ("perce", "weights", "step", 1), ("perce", "tokens", "every_k", 1)])
    cells = {p.name: json.loads(p.read_text()) for p in (tmp_path / "cmp" / "cells").glob("*.json")}
    norm = cells["perce@norm__seed0__lr2e-05__clip0.8-5__test.json"]
    plain = cells["perce__seed0__lr2e-05__clip0.8-5__test.json"]
    assert norm["definition"]["train"]["config"]["normalize"] == "weights"
    assert norm["definition"]["train"]["config"]["method"] == "perce"
    assert norm["config_hash"] != plain["config_hash"]
    assert cells["perce@k2+contrast__seed0__lr2e-05__clip0.8-5__test.json"]["definition"]["decoding"]["contrast_alpha"] > 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "cmp" / "results.json").read_text())["groups"][0]["rows"]}
    assert set(rows) == {"ce", "perce", "perce@norm", "perce@k2+contrast"}
    assert rows["perce@norm"]["vs_ce"]
    for bad, variants, msg in [("perce@nope", {}, "unknown method 'perce@nope'"),
                               ("base_profile@norm", {"norm": {"normalize": "weights"}}, "unknown method"),
                               ("perce@x", {"x": {"clip_min": 1.0}}, "cannot be set by a variant"),
                               ("perce@x", {"x": {"seed": 3}}, "cannot be set by a variant"),
                               ("perce@x", {"x": {"normalise": "weights"}}, "cannot be set by a variant"),
                               ("perce@x", {"x": {}}, "give a mapping")]:
        with pytest.raises(UserError, match=msg):
            _cfg(tmp_path, methods=["ce", bad], variants=variants)
    with pytest.raises(UserError, match=r"train \+ variants.x: key .refresh.: .sometimes"):
        _cfg(tmp_path, methods=["ce", "perce@x"], variants={"x": {"refresh": "sometimes"}})


def test_reuse_cells_from_copies_only_cells_with_the_same_settings(tmp_path, fake_training):
    """An ablation that reuses a finished study: ce and perce come from the main run's folder, only the new
    clip is trained; a main-run cell made with other settings is not taken."""
    main = _cfg(tmp_path, seeds=[0], output_dir=str(tmp_path / "main"))
    C.run(main)
    fake_training.clear()
    abl = _cfg(tmp_path, seeds=[0], clips=["0.8:5", "1:5"], output_dir=str(tmp_path / "abl"),
               reuse_cells_from=[str(tmp_path / "main")])
    r = C.run(abl)
    assert fake_training == [("perce", 0, 2e-5, 1.0)]
    assert r["cells_computed"] == 1
    for name in ["ce__seed0__lr2e-05__test.json", "perce__seed0__lr2e-05__clip0.8-5__test.json"]:
        assert (tmp_path / "abl" / "cells" / name).read_text() == (tmp_path / "main" / "cells" / name).read_text()
    # other decoding settings -> other hashes: nothing reused, everything trained again
    fake_training.clear()
    C.run(_cfg(tmp_path, seeds=[0], max_new_tokens=2, output_dir=str(tmp_path / "abl2"),
               reuse_cells_from=[str(tmp_path / "main")]))
    assert sorted(fake_training) == sorted([("ce", 0, 2e-5, 0.8), ("perce", 0, 2e-5, 0.8)])


def test_study_pairs_script_agrees_with_compare(tmp_path, fake_training):
    """scripts/study_pairs.py pairs arms as compare does: its perce - ce row is compare's vs_ce for perce,
    and ce - base_profile is compare's base_profile - ce negated (the once-run untrained arm stands for
    every ce seed)."""
    import importlib.util
    from pathlib import Path
    cfg = _cfg(tmp_path, methods=["base_profile", "ce", "perce"], seeds=[0, 1])
    C.run(cfg)
    out = tmp_path / "cmp"
    spec = importlib.util.spec_from_file_location(
        "study_pairs", Path(__file__).resolve().parent.parent / "scripts" / "study_pairs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main([str(out), "--resamples", "200", "--pairs", "perce - ce", "ce - base_profile", "nope - ce"])
    got = {r["pair"]: r for r in json.loads((out / "pairs.json").read_text())["rows"]}
    assert set(got) == {"perce - ce", "ce - base_profile"}     # a pair without cells is skipped
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["groups"][0]["rows"]}
    for m in ["rougeL", "meteor"]:
        want = rows["perce"]["vs_ce"][m]["two_level"]
        assert got["perce - ce"]["metrics"][m] == {k: want[k] for k in ("diff", "lo", "hi")}
        base = rows["base_profile"]["vs_ce"][m]["two_level"]
        mine = got["ce - base_profile"]["metrics"][m]
        assert mine["diff"] == -base["diff"]   # a - b is exactly -(b - a) in floating point
    assert got["ce - base_profile"]["seeds"] == [0, 1]
    assert "| perce - ce | 0, 1 |" in (out / "pairs.md").read_text()


def test_study_pairs_per_seed_table_of_a_likelihood_only_run(tmp_path, fake_training):
    """A run without generations (generate: false) has no ROUGE: pairs.md's per-seed table shows each
    cell's likelihood metrics instead of a column of dashes."""
    import importlib.util
    from pathlib import Path
    cfg = _cfg(tmp_path, generate=False, likelihood=True, methods=["ce", "perce"], seeds=[0, 1])
    C.run(cfg)
    out = tmp_path / "cmp"
    spec = importlib.util.spec_from_file_location(
        "study_pairs", Path(__file__).resolve().parent.parent / "scripts" / "study_pairs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main([str(out), "--resamples", "50", "--pairs", "perce - ce"])
    text = (out / "pairs.md").read_text()
    assert "ROUGE-1 |" not in text.split("Per seed")[1]
    (cell_file,) = (out / "cells").glob("perce__seed1_*.json")
    cell = json.loads(cell_file.read_text())
    assert f"| perce | 1 | {cell['metrics']['nll']:.3f} | " in text


def test_study_pairs_names_one_arm_per_clip(tmp_path, fake_training):
    """A clip ablation: perce at two clips is two arms, "perce[0.8:5]" and "perce[1:5]"; each one's
    difference to ce is compare's vs_ce at that clip, and they are paired with each other."""
    import importlib.util
    from pathlib import Path
    C.run(_cfg(tmp_path, seeds=[0, 1], clips=["0.8:5", "1:5"]))
    out = tmp_path / "cmp"
    spec = importlib.util.spec_from_file_location(
        "study_pairs", Path(__file__).resolve().parent.parent / "scripts" / "study_pairs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main([str(out), "--resamples", "200", "--pairs", "perce[1:5] - ce", "perce[1:5] - perce[0.8:5]",
              "perce - ce"])
    got = {r["pair"]: r for r in json.loads((out / "pairs.json").read_text())["rows"]}
    assert set(got) == {"perce[1:5] - ce", "perce[1:5] - perce[0.8:5]"}   # no arm is plain "perce" here
    groups = json.loads((out / "results.json").read_text())["groups"]
    g = next(g for g in groups if g["clip_min"] == 1.0)
    want = next(r for r in g["rows"] if r["method"] == "perce")["vs_ce"]["rougeL"]["two_level"]
    assert got["perce[1:5] - ce"]["metrics"]["rougeL"] == {k: want[k] for k in ("diff", "lo", "hi")}
    assert got["perce[1:5] - perce[0.8:5]"]["seeds"] == [0, 1]


def test_study_decoding_trains_the_compare_cell_then_decodes(tmp_path, monkeypatch):
    """scripts/study_decoding.py --train-from trains the arm with the TrainConfig compare builds for that
    cell (variant overrides included), decodes with the config's model/k/max_length, and says which model
    it decoded; --resume refuses rows made by another model; a bad arm is one line."""
    import importlib.util

    import yaml
    from pathlib import Path
    seen = []
    monkeypatch.setattr(C, "train_model", _fake_trainer(seen.append))
    spec = importlib.util.spec_from_file_location(
        "study_decoding", Path(__file__).resolve().parent.parent / "scripts" / "study_decoding.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    conf = tmp_path / "cmp.yaml"
    conf.write_text(yaml.safe_dump(dict(
        model="tiny-random", data="builtin:sample-train", test_data="builtin:sample-test", task="email", k=1,
        max_length=192, limit=8, methods=["ce", "perce", "perce@norm"], seeds=[0, 1],
        variants={"norm": {"normalize": "weights"}}, train={"max_steps": 1, "learning_rate": 3e-4},
        output_dir=str(tmp_path / "cmp"))))
    out = tmp_path / "dec"
    common = ["--data", "builtin:sample-test", "--task", "email", "--limit", "3", "--max-new-tokens", "2",
              "--out", str(out), "--no-swap", "--no-plain", "--alphas", "0.5"]
    mod.main(["--train-from", str(conf), "--arm", "perce@norm", "--seed", "1", *common])
    (t,) = seen
    assert (t.method, t.seed, t.normalize, t.learning_rate, t.max_steps) == ("perce", 1, "weights", 3e-4, 1)
    res = json.loads((out / "results.json").read_text())
    assert res["trained"]["arm"] == "perce@norm" and res["trained"]["seed"] == 1
    assert res["run"]["config"]["max_length"] == 192     # from the compare config, not the script's default
    assert [r["variant"] for r in res["rows"]] == ["greedy, no-repeat 3", "contrast alpha 0.5, no-repeat 3"]
    assert "perce@norm seed 1" in (out / "results.md").read_text()
    mod.main(["--curves", str(out), str(out), "--out", str(tmp_path / "fig")])   # one line per run
    assert (tmp_path / "fig" / "alpha_curves.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="--curves: .* not found"):
        mod.main(["--curves", str(tmp_path / "nope"), "--out", str(tmp_path / "fig")])
    with pytest.raises(SystemExit, match=r"perce@norm seed 1 .*\), not .*'untrained'\)"):
        # the same data, model and lengths: only the model's training differs
        mod.main([*common, "--model", "tiny-random", "--max-length", "192", "--resume"])
    with pytest.raises(SystemExit, match="--arm: give a trained arm"):
        mod.main(["--train-from", str(conf), "--arm", "base_profile", *common])
    with pytest.raises(SystemExit, match="methods has no arm 'lossce'"):
        mod.main(["--train-from", str(conf), "--arm", "lossce", *common])
    grid = tmp_path / "grid.yaml"
    grid.write_text(conf.read_text() + "learning_rates: [1.0e-4, 3.0e-4]\n")
    with pytest.raises(SystemExit, match="2 \\(learning rate, clip\\) settings"):
        mod.main(["--train-from", str(grid), "--arm", "ce", *common])
    assert len(seen) == 1      # nothing trained for a refused arm or config


def test_options_added_later_keep_earlier_cells_hashes():
    """A training option added after cells existed (group_by_length) enters a cell's definition only when
    set away from its default: the study's finished cells, computed before it existed, keep their hashes
    (without this, `compare --summarize-only` refused every shipped cell), and turning it on is a change."""
    cfg = C.CompareConfig(model="tiny-random", data="builtin:sample-train", test_data="builtin:sample-test",
                          task="email", methods=["base_profile", "ce", "perce"], seeds=[0])
    es = cfg.eval_sets_resolved()[0]
    digests = {es["name"]: "x", C.TRAIN_RECORDS: "y"}
    setting = cfg.settings()[0]
    plain = C.cell_definition(cfg, "perce", 0, setting, es, digests)
    assert not {"group_by_length", "keep_best", "early_stopping_patience", "early_stopping_threshold"} \
        & set(plain["train"]["config"])
    cfg.train = {**(cfg.train or {}), "group_by_length": True}
    grouped = C.cell_definition(cfg, "perce", 0, setting, es, digests)
    assert grouped["train"]["config"]["group_by_length"] is True and C.digest(grouped) != C.digest(plain)


def test_method_learning_rates_train_each_model_at_its_own_rate(tmp_path, fake_training):
    """method_learning_rates: each named model trains at its own rate, in the same table as the reference
    (paired with ce, its row showing its rate); a grid of rates beside it, or an unknown model, is refused."""
    cfg = _cfg(tmp_path, seeds=[0], methods=["ce", "perce", "perce+noprofile"],
               method_learning_rates={"perce": 0.003})
    C.run(cfg)
    assert sorted(fake_training) == [("ce", 0, 2e-05, 0.8), ("perce", 0, 0.003, 0.8)]
    names = sorted(p.name for p in (tmp_path / "cmp" / "cells").glob("*.json"))
    assert names == ["ce__seed0__lr2e-05__test.json", "perce+noprofile__seed0__lr0.003__clip0.8-5__test.json",
                     "perce__seed0__lr0.003__clip0.8-5__test.json"]
    res = json.loads((tmp_path / "cmp" / "results.json").read_text())
    (group,) = res["groups"]
    rows = {r["method"]: r for r in group["rows"]}
    assert rows["perce"]["lr"] == 0.003 and rows["ce"]["lr"] == 2e-05
    assert rows["perce"]["vs_ce"]["rougeL"] is not None
    assert "perce (lr 0.003)" in (tmp_path / "cmp" / "results.md").read_text()
    with pytest.raises(UserError, match="at most one rate"):
        _cfg(tmp_path, methods=["ce", "perce"], learning_rates=[1e-4, 1e-3], method_learning_rates={"perce": 0.003})
    with pytest.raises(UserError, match="'lossce' is not a trained model"):
        _cfg(tmp_path, methods=["ce", "perce"], method_learning_rates={"lossce": 0.003})


def test_noprofile_copy_arms_repetition_and_copy_control(tmp_path, monkeypatch):
    """X+noprofile decodes X's model (trained once) from the profile-free prompt; copy_retrieved predicts the
    first shown item cut to max_new_tokens, with no decoding; repetition decodes each arm again with the
    n-gram ban off; copy_control scores copying and leave-shown-out attribution."""
    trained, seen = _spy_training_and_decoding(
        monkeypatch, lambda options, kw: (kw["use_profile"], options.no_repeat_ngram_size))
    cfg = _cfg(tmp_path, seeds=[0], methods=["ce", "ce+noprofile", "copy_retrieved"], attribution=True,
               repetition=True, copy_control=True, no_repeat_ngram_size=2, max_new_tokens=6)
    C.run(cfg)
    assert trained == ["ce"]
    # ce and ce+noprofile, each with the ban (2) and again without it (0); copy_retrieved decodes nothing
    assert sorted(seen) == [(False, 0), (False, 2), (True, 0), (True, 2)]
    out = tmp_path / "cmp" / "cells"
    from percontrast.datasets import load_records
    from percontrast.models import load_model
    from percontrast.prompts import get_task
    _, tok = load_model("tiny-random")
    recs = load_records("builtin:sample-test", get_task("email"), limit=4)
    builder = cfg.prompt_builder(tok, "email", reserve_tokens=6)
    copy = json.loads((out / "copy_retrieved__seed0__test.json").read_text())
    from percontrast.degeneration import words
    assert any(len(words(e["prediction"])) >= 4 for e in copy["examples"])   # the copy_rate check below runs
    for r, e in zip(recs, copy["examples"]):
        first = builder.encode(r, with_response=False)["profile_items_shown"][0]["text"]
        ids = tok(first, add_special_tokens=False)["input_ids"]
        assert e["prediction"] == tok.decode(ids[:6], skip_special_tokens=True).strip()
        assert e["new_tokens"] == min(len(ids), 6)
        # a verbatim copy: every 4-gram is in the shown item (when it has one), its span is all its words
        if len(words(e["prediction"])) >= 4:
            assert e["scores"]["copy_rate"] == 1.0
        assert e["scores"]["copy_span"] == len(words(e["prediction"]))
    ce = json.loads((out / "ce__seed0__lr2e-05__test.json").read_text())
    keys = {"seq_rep_4", "noban_seq_rep_4", "noban_loop", "noban_hit_cap", "copy_rate", "copy_span",
            "attributed", "attributed_loo"}
    assert all(keys <= set(e["scores"]) for e in ce["examples"])
    assert {"distinct_2", "noban_distinct_2", "attributed_macro", "attributed_loo_macro"} <= set(ce["metrics"])
    res = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert {"seq_rep_4", "noban_loop", "copy_rate", "attributed_loo"} <= set(res["metrics"])
    loo = res["attribution_loo"]["test"]
    assert 0 <= loo["ceiling"] <= 1 and loo["classifiers"] >= 1
    with pytest.raises(UserError, match="unknown method 'base_profile\\+noprofile'"):
        _cfg(tmp_path, methods=["ce", "base_profile+noprofile"])
    with pytest.raises(UserError, match="unknown method 'copy_retrieved\\+contrast'"):
        _cfg(tmp_path, methods=["ce", "copy_retrieved+contrast"])


def test_specific_tokens_add_a_model_free_personal_token_set(tmp_path, fake_training):
    """specific_tokens: NLL on the gold tokens specific to the user (specificity.py) beside the PIR-defined
    personal tokens, and how the two sets overlap; refused without likelihood."""
    cfg = _cfg(tmp_path, seeds=[0], methods=["base_profile", "ce"], generate=False, likelihood=True,
               specific_tokens=True, test_limit=6)
    C.run(cfg)
    cell = json.loads((tmp_path / "cmp" / "cells" / "ce__seed0__lr2e-05__test.json").read_text())
    assert {"nll_specific", "nll_nonspecific"} <= set(cell["metrics"])
    res = json.loads((tmp_path / "cmp" / "results.json").read_text())
    sets = res["token_sets"]["test"]
    assert sets["examples"] == 6
    assert sets["both"] + sets["only_pir"] + sets["only_specific"] + sets["neither"] == sets["tokens"]
    assert cell["metrics"]["tokens"] == sets["tokens"]
    assert cell["metrics"]["specific_tokens"] == sets["both"] + sets["only_specific"]
    with pytest.raises(UserError, match="specific_tokens is a likelihood metric"):
        _cfg(tmp_path, specific_tokens=True)
