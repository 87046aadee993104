"""percontrast.stats' intervals over seeds and users (seed-level t, user-clustered interval, Holm, macro
mean) against hand and brute-force computations, and scripts/study_pairs.py's columns built from them."""
from __future__ import annotations

import importlib.util
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from percontrast.errors import UserError
from percontrast.stats import (cluster_variance, holm, length_adjusted, macro_mean, seed_t_interval, t_interval, t_ppf,
                               t_two_sided_p, user_clustered_interval)

scipy_stats = pytest.importorskip("scipy.stats")   # installed with scikit-learn (requirements.txt)


# ---------------------------------------------------------------- t quantiles and p-values

def test_t_p_values_and_quantiles_match_scipy():
    # the module's incomplete beta is accurate to ~1e-10 (its docstring); scipy's to ~1e-15:
    # 1e-9 relative on p leaves room for both. Quantiles: bisection to 1e-12 on a CDF good to 1e-10,
    # divided by a density >= 0.01 at these points, gives <= 1e-8.
    for df in (1, 2, 3, 4, 5.5, 7.9, 13, 30):
        for t in (0.0, 0.3, 1.0, 2.0, 4.3, 12.0):
            assert t_two_sided_p(t, df) == pytest.approx(2 * scipy_stats.t.sf(t, df), rel=1e-9, abs=1e-15)
            assert t_two_sided_p(-t, df) == t_two_sided_p(t, df)
        assert t_ppf(0.975, df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-8)
    # table values: t_{0.975, 4} = 2.7764451 has two-sided p 0.05
    assert t_two_sided_p(2.7764451, 4) == pytest.approx(0.05, abs=1e-8)
    assert t_two_sided_p(math.inf, 3) == 0.0 and t_two_sided_p(0.0, 3) == 1.0


# ---------------------------------------------------------------- seed-level t

def test_seed_t_interval_hand_computed():
    # per-seed mean differences 0.01, 0.03, 0.02: mean 0.02, s = 0.01, se = 0.01/sqrt(3),
    # half = 4.3026527 * 0.01 / sqrt(3) = 0.0248414; t = 0.02 / se = 2 sqrt(3), and for df 2 the
    # two-sided p has a closed form: 1 - t / sqrt(2 + t^2) = 1 - sqrt(12/14) = 0.0741799
    r = seed_t_interval([0.01, 0.03, 0.02])
    assert r["diff"] == pytest.approx(0.02, abs=1e-15) and r["n_seeds"] == 3 and r["df"] == 2
    assert r["lo"] == pytest.approx(0.02 - 0.0248414, abs=1e-7) and r["hi"] == pytest.approx(0.02 + 0.0248414, abs=1e-7)
    assert r["p"] == pytest.approx(1 - math.sqrt(12 / 14), rel=1e-9)
    # the same as the seed t-interval compare reports for a method (stats.t_interval)
    iv = t_interval([0.01, 0.03, 0.02])
    assert (r["lo"], r["hi"]) == (pytest.approx(iv.lo, abs=1e-15), pytest.approx(iv.hi, abs=1e-15))
    # a [seeds, examples] table is averaged over examples first
    table = np.array([[0.0, 0.02], [0.02, 0.04], [0.01, 0.03]])
    assert seed_t_interval(table)["lo"] == pytest.approx(r["lo"], abs=1e-15)


def test_seed_t_interval_one_seed_and_no_variance():
    one = seed_t_interval([0.02])
    assert one["diff"] == 0.02 and one["lo"] is None and one["p"] is None and "one seed" in one["note"]
    same = seed_t_interval([0.02, 0.02, 0.02])
    assert same["lo"] == same["hi"] == pytest.approx(0.02) and same["p"] == 0.0
    assert seed_t_interval([0.0, 0.0])["p"] == 1.0
    with pytest.raises(UserError):
        seed_t_interval([])
    with pytest.raises(UserError):
        seed_t_interval([0.1, 0.2], level=95)


# ---------------------------------------------------------------- cluster variance

def test_cluster_variance_is_the_plain_variance_with_one_example_per_user():
    x = np.array([0.3, -0.1, 0.8, 0.5, 0.2])
    # s^2 / n; the two computations differ only in summation order: rel 1e-12
    assert cluster_variance(x, ["a", "b", "c", "d", "e"]) == pytest.approx(x.var(ddof=1) / x.size, rel=1e-12)


def test_cluster_variance_against_an_exhaustive_cluster_bootstrap():
    # 4 users x 3 examples: all 4^4 = 256 draws of users with replacement, each equally likely, give
    # the exact bootstrap variance of the mean; with equally many examples per user the CR1 variance
    # is exactly G/(G-1) times it (both are sum_g (ybar_g - ybar)^2 / G^2, up to that factor)
    rng = np.random.default_rng(5)
    x = rng.normal(size=12) + np.repeat(rng.normal(size=4) * 2, 3)
    users = np.repeat(["u0", "u1", "u2", "u3"], 3)
    blocks = [x[users == u] for u in ["u0", "u1", "u2", "u3"]]
    means = [np.concatenate([blocks[k] for k in draw]).mean() for draw in itertools.product(range(4), repeat=4)]
    boot_var = float(np.mean((np.array(means) - np.mean(means)) ** 2))
    assert cluster_variance(x, users) == pytest.approx(4 / 3 * boot_var, rel=1e-10)


def test_cluster_variance_unequal_users_is_the_sandwich():
    # the intercept-only regression's cluster-robust sandwich, written out with a loop:
    # (X'X)^-1 [sum_g (X_g' u_g)^2] (X'X)^-1 * G/(G-1), X a column of ones
    x = np.array([0.3, -0.1, 0.8, 0.5, 0.2, 0.9, -0.4])
    users = ["a", "a", "a", "b", "c", "c", "d"]
    u = x - x.mean()
    meat = 0.0
    for g in set(users):
        meat += sum(u[i] for i in range(len(x)) if users[i] == g) ** 2
    want = 4 / 3 * meat / len(x) ** 2
    assert cluster_variance(x, users) == pytest.approx(want, rel=1e-12)
    with pytest.raises(UserError, match="2 users"):
        cluster_variance(x, ["a"] * 7)
    with pytest.raises(UserError, match="one user id per example"):
        cluster_variance(x, ["a", "b"])


# ---------------------------------------------------------------- user-clustered interval

def _brute_force_clustered(d: np.ndarray, users: list[str], level: float = 0.95) -> dict:
    """user_clustered_interval's docstring, term by term, with loops and scipy's t."""
    S, n = d.shape
    G = len(set(users))
    D = sum(d[s, i] for s in range(S) for i in range(n)) / (S * n)
    Ds = [sum(d[s, i] for i in range(n)) / n for s in range(S)]
    dbar = [sum(d[s, i] for s in range(S)) / S for i in range(n)]
    v_seed = sum((x - D) ** 2 for x in Ds) / ((S - 1) * S)
    tot = {g: 0.0 for g in users}
    for i in range(n):
        tot[users[i]] += dbar[i] - D
    v_user = G / (G - 1) * sum(t * t for t in tot.values()) / n ** 2
    rss = sum((d[s, i] - Ds[s] - dbar[i] + D) ** 2 for s in range(S) for i in range(n))
    v_int = rss / ((S - 1) * (n - 1)) / (S * n)
    v = v_seed + v_user - v_int
    q = (1 + level) / 2
    pieces = [(v_seed, S - 1), (v_user, G - 1)]
    if v > 0:
        pieces.append((v, v * v / (v_seed ** 2 / (S - 1) + v_user ** 2 / (G - 1) + v_int ** 2 / ((S - 1) * (n - 1)))))
    half = max(scipy_stats.t.ppf(q, df) * math.sqrt(var) for var, df in pieces)
    p = max(2 * scipy_stats.t.sf(abs(D) / math.sqrt(var), df) for var, df in pieces)
    return {"diff": D, "lo": D - half, "hi": D + half, "p": p, "v_seed": v_seed, "v_user": v_user, "v_int": v_int}


def test_user_clustered_interval_brute_force():
    rng = np.random.default_rng(11)
    users = ["a", "a", "a", "a", "b", "c", "c", "d", "d", "d"]
    user_effect = {"a": 0.05, "b": -0.03, "c": 0.0, "d": 0.02}
    for seed_sd in (0.0, 0.01, 0.05):   # from "users dominate" to "seeds dominate"
        d = (0.01 + rng.normal(size=(4, 1)) * seed_sd + np.array([user_effect[u] for u in users])
             + rng.normal(size=(4, 10)) * 0.02)
        got, want = user_clustered_interval(d, users), _brute_force_clustered(d, users)
        for k in want:   # loops vs numpy: summation order only; quantiles as in the scipy test above
            assert got[k] == pytest.approx(want[k], rel=1e-7, abs=1e-12), (seed_sd, k)
        assert got["n_users"] == 4 and got["seed_level"]
        # never narrower than the seeds-only interval (which is seed_t_interval)
        st = seed_t_interval(d)
        assert got["lo"] <= st["lo"] + 1e-15 and got["hi"] >= st["hi"] - 1e-15 and got["p"] >= st["p"]


def test_user_clustered_equals_the_plain_interval_with_one_example_per_user():
    d = np.array([0.3, -0.1, 0.8, 0.5, 0.2, 0.4])
    one = user_clustered_interval(d[None, :], list("abcdef"))
    plain = t_interval(d)   # mean +- t_{n-1} s / sqrt(n)
    assert not one["seed_level"] and one["width_from"] == "users"
    assert (one["lo"], one["hi"]) == (pytest.approx(plain.lo, rel=1e-12), pytest.approx(plain.hi, rel=1e-12))
    # several seeds: the user piece is the plain variance of the seed-averaged differences
    table = np.stack([d, d + 0.1, d - 0.05])
    many = user_clustered_interval(table, list("abcdef"))
    assert many["v_user"] == pytest.approx(table.mean(0).var(ddof=1) / 6, rel=1e-12)


def test_user_clustered_widens_when_users_are_strongly_clustered():
    # 4 users x 10 examples; the same within-user noise, plus a large per-user offset: 40 examples
    # but only 4 independent users. The examples-only interval treats them as 40 draws.
    rng = np.random.default_rng(3)
    users = np.repeat(list("abcd"), 10).tolist()
    noise = rng.normal(size=40) * 0.01
    clustered = noise + np.repeat([0.1, -0.05, 0.08, -0.02], 10)
    plain, cl = t_interval(clustered), user_clustered_interval(clustered[None, :], users)
    assert (cl["hi"] - cl["lo"]) > 3 * (plain.hi - plain.lo)
    # without the offsets the two are close (users uninformative): within 40%, where the
    # df (3 against 39) alone makes a factor t_{.975,3} / t_{.975,39} = 1.57 at equal variance
    weak = user_clustered_interval(noise[None, :], users)
    flat = t_interval(noise)
    assert (weak["hi"] - weak["lo"]) < 1.6 * 1.4 * (flat.hi - flat.lo)


def test_user_clustered_variance_is_unbiased_under_its_model():
    # d_si = a_s + b_i + c_si, 6 users x 4 examples (equal sizes: V_user exact in expectation), 3
    # seeds; b_i = user offset + example noise. Var(D) = sa^2/S + (su^2/G + se^2/n) + sc^2/(S n).
    rng = np.random.default_rng(0)
    S, G, m, R = 3, 6, 4, 4000
    n = G * m
    sa, su, se, sc = 0.5, 1.0, 0.5, 3.0
    truth = sa ** 2 / S + su ** 2 / G + se ** 2 / n + sc ** 2 / (S * n)
    users = np.repeat(np.arange(G), m).astype(str).tolist()
    v, naive, means, covered = [], [], [], 0
    for _ in range(R):
        b = np.repeat(rng.normal(size=G) * su, m) + rng.normal(size=n) * se
        d = rng.normal(size=(S, 1)) * sa + b[None, :] + rng.normal(size=(S, n)) * sc
        r = user_clustered_interval(d, users)
        v.append(r["v_seed"] + r["v_user"] - r["v_int"])
        naive.append(r["v_seed"] + r["v_user"])
        means.append(r["diff"])
        covered += r["lo"] <= 0 <= r["hi"]
    # R = 4000: the empirical Var(D) has relative sd sqrt(2/R) = 2.2%, the mean of V about 1%;
    # 8% is > 3 sd of their difference. The naive sum is off by sc^2/(S n) / truth = 33%.
    assert np.mean(v) == pytest.approx(truth, rel=0.08)
    assert np.var(means) == pytest.approx(truth, rel=0.08)
    assert np.mean(naive) > 1.2 * truth
    # the widest of three t-intervals covers at least 95% (binomial sd at R = 4000: 0.0034)
    assert covered / R >= 0.94


def test_user_clustered_edge_cases():
    assert user_clustered_interval([[0.1, 0.2]], ["a", "a"])["lo"] is None   # one user: no interval
    zero = user_clustered_interval(np.zeros((3, 4)), list("abcd"))
    assert zero["lo"] == zero["hi"] == 0.0 and zero["p"] == 1.0
    with pytest.raises(UserError, match="one user id per example"):
        user_clustered_interval(np.zeros((2, 3)), ["a", "b"])


# ---------------------------------------------------------------- Holm and macro mean

def test_holm_worked_example():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> running max 0.06;
    # back in input order. (One multiplication each: within an ulp, rel 1e-12.) At alpha 0.05 the
    # step-down rejects 0.005 (< 0.05/4) and 0.01 (< 0.05/3), then stops at 0.03 (> 0.05/2): the two
    # adjusted values <= 0.05 are exactly those.
    got = holm([0.01, 0.04, 0.03, 0.005])
    assert got == [pytest.approx(v, rel=1e-12) for v in (0.03, 0.06, 0.06, 0.02)]
    assert holm([0.3, 0.5]) == [pytest.approx(0.6), pytest.approx(0.6)]       # monotone: 0.5 x 1 < 0.6
    assert holm([0.6, 0.9]) == [1.0, 1.0]                                       # capped at 1
    assert holm([0.02]) == [0.02] and holm([]) == []
    assert holm([0.01, 0.01]) == [0.02, 0.02]                                   # ties: one value
    with pytest.raises(UserError):
        holm([0.1, float("nan")])
    with pytest.raises(UserError):
        holm([1.2])


def test_macro_mean_weighs_users_equally():
    # user a: 1 hit in 4 (share 0.25), user b: 1 in 1: per user (0.25 + 1) / 2 = 0.625, plain 2/5
    values, users = [1, 0, 0, 0, 1], ["a", "a", "a", "a", "b"]
    assert macro_mean(values, users) == 0.625 and np.mean(values) == 0.4
    assert macro_mean([0.2, 0.4], ["x", "y"]) == pytest.approx(0.3, abs=1e-16)
    with pytest.raises(UserError):
        macro_mean([1, 2], ["a"])


# ---------------------------------------------------------------- scripts/study_pairs.py

def _study_pairs():
    spec = importlib.util.spec_from_file_location(
        "study_pairs", Path(__file__).resolve().parent.parent / "scripts" / "study_pairs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    """A finished compare folder (base_profile once, ce and perce at 3 seeds, 12 test examples of 6 users),
    its ROUGE-L / METEOR per-example scores then replaced by known random numbers: the fake training
    makes every arm the same model, and the intervals need differences."""
    from percontrast.commands import compare as C
    tmp = tmp_path_factory.mktemp("sp")
    mp = pytest.MonkeyPatch()

    def fake(tcfg, records):
        from percontrast.models import load_model
        model, tok = load_model("tiny-random")
        return model, tok, {"steps": 0, "train_s": 0.0}
    mp.setattr(C, "train_model", fake)
    try:
        C.run(C.CompareConfig(model="tiny-random", data="builtin:sample-train", test_data="builtin:sample-test",
                              task="email", k=1, max_length=192, max_new_tokens=2, limit=8, test_limit=12,
                              seeds=[0, 1, 2], methods=["base_profile", "ce", "perce"],
                              train={"max_steps": 1, "batch_size": 4}, bootstrap_resamples=200,
                              output_dir=str(tmp / "cmp"), progress=False))
    finally:
        mp.undo()
    out = tmp / "cmp"
    rng = np.random.default_rng(2)
    user_shift = {}
    for p in sorted((out / "cells").glob("*.json")):
        c = json.loads(p.read_text())
        for e in c["examples"]:
            u = e["id"].rsplit("-", 1)[0]     # builtin sample ids are "<user>-<k>"
            user_shift.setdefault(u, rng.normal() * 0.05)
            arm = 0.02 if c["method"] == "perce" else 0.0
            for m in ("rougeL", "meteor"):
                e["scores"][m] = 0.2 + arm + (user_shift[u] if c["method"] == "perce" else 0) + rng.normal() * 0.03
        p.write_text(json.dumps(c))
    return out


def _table(run: Path, method: str, metric: str, ids: list[str]) -> np.ndarray:
    """[seeds, examples] scores of one method, straight from its cell files."""
    cells = sorted((json.loads(p.read_text()) for p in (run / "cells").glob(f"{method}__*.json")),
                   key=lambda c: c["seed"])
    return np.array([[{e["id"]: e["scores"][metric] for e in c["examples"]}[i] for i in ids] for c in cells])


def test_study_pairs_reports_seed_t_clustered_and_holm(compare_run, tmp_path):
    from percontrast.datasets import load_records
    from percontrast.prompts import get_task
    out = tmp_path / "o"
    _study_pairs().main([str(compare_run), "--resamples", "200", "--out", str(out), "--primary", "perce - ce",
                         "--metric", "rougeL", "--pairs", "perce - ce", "perce - base_profile", "ce - base_profile"])
    assert not (compare_run / "pairs.md").exists()           # --out: the run folder is left alone
    res = json.loads((out / "pairs.json").read_text())
    rows = {r["pair"]: r for r in res["rows"]}
    recs = load_records("builtin:sample-test", get_task("email"), limit=12)
    ids, users = [r["id"] for r in recs], [r["user_id"] for r in recs]
    assert res["n_users"] == 6 and res["primary"] == {"pair": "perce - ce", "metric": "rougeL"}
    for m in ("rougeL", "meteor"):
        d = _table(compare_run, "perce", m, ids) - _table(compare_run, "ce", m, ids)
        iv = rows["perce - ce"]["intervals"][m]
        assert set(rows["perce - ce"]["metrics"][m]) == {"diff", "lo", "hi"}     # the bootstrap entry as before
        assert iv["seed_t"] == seed_t_interval(d) and iv["user_clustered"] == user_clustered_interval(d, users)
        assert iv["user_clustered"]["diff"] == pytest.approx(rows["perce - ce"]["metrics"][m]["diff"], abs=1e-15)
        assert iv["macro_diff"] == pytest.approx(macro_mean(d.mean(0), users), abs=1e-15)
        # the once-run base arm stands for every ce seed: 3 seeds of differences
        db = _table(compare_run, "ce", m, ids) - _table(compare_run, "base_profile", m, ids)[[0, 0, 0]]
        assert rows["ce - base_profile"]["intervals"][m]["seed_t"] == seed_t_interval(db)
    # Holm: rougeL's family leaves the primary contrast out; meteor's holds all three pairs
    rl = {p: rows[p]["intervals"]["rougeL"] for p in rows}
    assert rl["perce - ce"]["primary"] and rl["perce - ce"]["holm_p_user_clustered"] is None
    others = ["perce - base_profile", "ce - base_profile"]
    want = holm([rl[p]["user_clustered"]["p"] for p in others])
    assert [rl[p]["holm_p_user_clustered"] for p in others] == want
    me = [rows[p]["intervals"]["meteor"] for p in rows]
    assert [x["holm_p_seed_t"] for x in me] == holm([x["seed_t"]["p"] for x in me])
    # ROUGE-1 was not replaced: every arm is the same untrained greedy model, so no test
    assert rows["perce - ce"]["intervals"]["rouge1"]["identical"]
    assert rows["perce - ce"]["intervals"]["rouge1"]["holm_p_user_clustered"] is None
    text = (out / "pairs.md").read_text()
    assert "| perce - ce | 0, 1, 2 |" in text                 # the bootstrap table as before
    assert "**perce - ce (primary)**" in text and "### ROUGE-L" in text and "(6 users in builtin:sample-test)" in text
    uc = rl["perce - ce"]["user_clustered"]
    assert f"[{100 * uc['lo']:+.2f}, {100 * uc['hi']:+.2f}]" in text


def test_study_pairs_user_ids_from_records_and_refusals(compare_run, tmp_path):
    mod = _study_pairs()
    base = [str(compare_run), "--resamples", "100", "--out", str(tmp_path / "o"), "--pairs", "perce - ce"]
    # --records: another grouping (two users of 6 examples each) gives another clustered interval
    recs = [{"id": f"{u}-{k}", "user_id": "g1" if u in ("maria", "tom", "aiko") else "g2"}
            for u in ("maria", "tom", "aiko", "daniel", "priya", "lucas") for k in (4, 5)]
    f = tmp_path / "users.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    mod.main(base + ["--records", str(f)])
    res = json.loads((tmp_path / "o" / "pairs.json").read_text())
    assert res["n_users"] == 2 and res["users_from"] == str(f)
    iv = res["rows"][0]["intervals"]["rougeL"]["user_clustered"]
    ids = [r["id"] for r in recs]
    d = _table(compare_run, "perce", "rougeL", ids) - _table(compare_run, "ce", "rougeL", ids)
    assert iv == user_clustered_interval(d, [r["user_id"] for r in recs]) and iv["n_users"] == 2
    # without a primary contrast every pair is in its metric's Holm family (one pair: p unchanged)
    x = res["rows"][0]["intervals"]["rougeL"]
    assert res["primary"] is None and x["holm_p_user_clustered"] == x["user_clustered"]["p"]
    # refusals: a record without user_id, a missing example, --primary without --metric, an unknown pair
    f.write_text("".join(json.dumps({"id": r["id"]}) + "\n" for r in recs))
    with pytest.raises(SystemExit, match="has no 'user_id'"):
        mod.main(base + ["--records", str(f)])
    f.write_text("".join(json.dumps(r) + "\n" for r in recs[1:]))
    with pytest.raises(SystemExit, match="no record for test example 'maria-4'"):
        mod.main(base + ["--records", str(f)])
    with pytest.raises(SystemExit, match="go together"):
        mod.main(base + ["--primary", "perce - ce"])
    with pytest.raises(SystemExit, match="not among the pairs"):
        mod.main(base + ["--primary", "jsd - ce", "--metric", "rougeL"])
    with pytest.raises(SystemExit, match="not a metric"):
        mod.main(base + ["--primary", "perce - ce", "--metric", "bleu"])


def test_study_pairs_refuses_records_other_than_the_scored_ones(compare_run, tmp_path):
    """The default user source is the eval set's data in compare_config.json, checked against the cells'
    records digest: a changed file (here one output edited) is refused, not silently regrouped."""
    from percontrast.datasets import load_records
    from percontrast.prompts import get_task
    run = tmp_path / "run"
    run.mkdir()
    for name in ("results.json", "cells"):
        src = compare_run / name
        (run / name).mkdir() if src.is_dir() else (run / name).write_text(src.read_text())
    for p in (compare_run / "cells").glob("*.json"):
        (run / "cells" / p.name).write_text(p.read_text())
    recs = load_records("builtin:sample-test", get_task("email"), limit=12)
    recs[0]["output"] += " (edited)"
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = json.loads((compare_run / "compare_config.json").read_text())
    cfg["test_data"] = str(data)
    (run / "compare_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match="not the records the cells were scored on"):
        _study_pairs().main([str(run), "--resamples", "100", "--pairs", "perce - ce"])
    assert not (run / "pairs.json").exists()


def test_length_adjusted_by_hand_and_exact_line():
    # d = 0.5 - 0.1 l exactly: the slope is -0.1 and every adjusted difference is the intercept 0.5
    l = np.array([[-10.0, 0.0, 5.0], [2.0, -4.0, 7.0]])
    d = 0.5 - 0.1 * l
    adj, beta = length_adjusted(d, l)
    assert beta == pytest.approx(-0.1, abs=1e-12) and np.allclose(adj, 0.5, atol=1e-12, rtol=0)
    # by hand: l = (0, 1, 2), d = (1, 0, 2): mean l 1, mean d 1, slope (-1*0 + 0*-1 + 1*1) / 2 = 0.5,
    # adjusted (1, -0.5, 1), mean 0.5 = intercept 1 - 0.5 * 1
    adj, beta = length_adjusted([1.0, 0.0, 2.0], [0.0, 1.0, 2.0])
    assert beta == 0.5 and adj.tolist() == [1.0, -0.5, 1.0]
    # equal lengths everywhere: nothing to regress on, the differences come back unchanged
    adj, beta = length_adjusted([0.1, 0.3], [4.0, 4.0])
    assert beta == 0.0 and adj.tolist() == [0.1, 0.3]
    with pytest.raises(UserError, match="one shape"):
        length_adjusted([0.1, 0.2], [1.0])


def test_study_pairs_length_controlled_rows():
    """study_pairs: an overlap score's difference at equal length is length_adjusted's intercept on the pair's
    [seeds, examples] tables, with the user-clustered interval of the adjusted differences; pairs.md gets its
    table (x100, slope per 10 tokens)."""
    mod = _study_pairs()
    ids = ["a", "b", "c", "d"]
    users = {"a": "u1", "b": "u1", "c": "u2", "d": "u3"}
    lengths = np.array([[-10.0, 0.0, 5.0, 2.0], [-4.0, 7.0, 1.0, 3.0]])
    d = 0.02 + 0.004 * lengths + np.array([[0.01, -0.01, 0.0, 0.005], [0.0, 0.01, -0.005, 0.0]])
    rows = [{"pair": "perce - ce", "seeds": [0, 1], "metrics": {"rougeL": {"diff": float(d.mean()), "lo": 0, "hi": 0}}}]
    mod.add_intervals(rows, [{"rougeL": (ids, d, lengths)}], ["rougeL"], users, None)
    lc = rows[0]["intervals"]["rougeL"]["length_controlled"]
    adj, beta = length_adjusted(d, lengths)
    assert lc["slope_per_token"] == beta and lc["diff"] == float(adj.mean())
    assert lc["user_clustered"] == user_clustered_interval(adj, [users[i] for i in ids], 0.95)
    assert abs(lc["diff"] - 0.02) < abs(float(d.mean()) - 0.02)   # the length effect is taken out
    text = "\n".join(mod.interval_tables(rows, ["rougeL"], None, "x", 3))
    assert "## At equal output length" in text and f"{1000 * beta:+.2f}" in text
