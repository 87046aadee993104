"""Personal-token identification: label mapping, metrics against hand computation, end to end."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from percontrast import stats
from percontrast.commands import identify as I
from percontrast.errors import DataError, UserError
from percontrast.retrieval import other_user_profiles


@pytest.fixture(scope="module")
def tok():
    from percontrast.models import load_model
    return load_model("tiny-random")[1]


# ----------------------------------------------------------------------------- metrics
def _auroc_pairs(s, y):
    pos = [a for a, l in zip(s, y) if l]
    neg = [a for a, l in zip(s, y) if not l]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))


def test_auroc_hand_cases():
    assert stats.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # ties count one half: pos {2, 1} vs neg {1, 0} -> (1 + 1 + 0.5 + 1) / 4
    assert stats.auroc([2, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx(0.875)
    assert stats.auroc([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)
    assert stats.auroc([5, 5, 5], [1, 0, 0]) == pytest.approx(0.5)
    assert stats.auroc([0, 1], [1, 0]) == 0.0
    assert np.isnan(stats.auroc([1, 2], [1, 1]))


def test_auroc_equals_pairwise_count_with_many_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.integers(0, 4, 30).astype(float)  # heavy ties
        y = rng.random(30) < 0.4
        if 0 < y.sum() < 30:
            assert stats.auroc(s, y) == pytest.approx(_auroc_pairs(s, y))


def test_best_f1_hand_case():
    # thresholds 0.9..0.5 give F1 = 2TP/(2TP+FP+FN): 0.5, 0.4, 0.667, 0.857, 0.75
    t, f1 = stats.f1_curve([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 1, 0])
    assert t.tolist() == [0.9, 0.8, 0.7, 0.6, 0.5]
    assert f1 == pytest.approx([0.5, 0.4, 4 / 6, 6 / 7, 0.75])
    assert stats.best_f1([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 1, 0]) == pytest.approx((6 / 7, 0.6))


def test_f1_keeps_ties_on_one_side():
    # Splitting the tie at 1 would give 2/3; with ties kept together: t=1 -> 0.5, t=0 -> 0.8.
    assert stats.best_f1([1, 1, 0], [1, 0, 1]) == pytest.approx((0.8, 0.0))
    assert stats.best_f1([1, 1, 0], [0, 1, 1]) == pytest.approx((0.8, 0.0))
    assert stats.f1_at([1, 1, 0], [1, 0, 1], 1.0) == pytest.approx(0.5)
    assert stats.f1_at([1, 1, 0], [1, 0, 1], 2.0) == 0.0
    assert np.isnan(stats.best_f1([1, 2], [0, 0])[0])


def test_identify_uses_the_stats_helpers():
    assert (I.auroc, I.best_f1, I.f1_at) == (stats.auroc, stats.best_f1, stats.f1_at)


def test_evaluate_groups_each_kind_against_generic_only():
    kinds = [None, "copied", "implied", "style", None]
    rec = {"kinds": kinds, **{s: np.zeros(5) for s in I.SIGNALS}}
    rec["pir_remove"] = np.array([0.0, 1.0, 0.5, 0.2, 0.1])      # every personal token above generic
    rec["word_match"] = np.array([1.0, 1.0, 0.0, 0.0, 0.0])
    m = I.evaluate([rec], [rec])
    for g in I.GROUPS:
        assert m["pir_remove"][g]["auroc"] == 1.0 and m["pir_remove"][g]["best_f1"] == 1.0
        assert m["pir_remove"][g]["f1_at_dev"] == 1.0
    # overall: pos {1, 0, 0} vs neg {1, 0} -> (0.5 + 1 + 0 + 0.5 + 0 + 0.5) / 6
    assert m["word_match"]["overall"]["auroc"] == pytest.approx(2.5 / 6)
    assert m["word_match"]["copied"]["auroc"] == pytest.approx(0.75)   # pos {1} vs neg {1, 0}
    assert m["word_match"]["implied"]["auroc"] == pytest.approx(0.25)  # pos {0} vs neg {1, 0}
    assert m["pir_remove"]["copied"]["n_pos"] == 1 and m["pir_remove"]["copied"]["n_neg"] == 2


def test_to_words_takes_max_and_first_personal_kind():
    rec = {"id": "r", "kinds": [None, "copied", "copied", None, None, "style"],
           "words": np.array([0, 1, 1, -1, 2, 2])}
    for sig in I.SIGNALS:
        rec[sig] = np.array([0.1, 2.0, -1.0, 9.0, 0.3, 0.2])
    (w,) = I.to_words([rec])
    assert w["kinds"] == [None, "copied", "style"]           # the whitespace-only token (-1) is dropped
    assert w["pir_remove"].tolist() == [0.1, 2.0, 0.3]


def test_dev_threshold_is_applied_to_test():
    dev = {"kinds": [None, "copied"], **{s: np.array([0.0, 1.0]) for s in I.SIGNALS}}
    test = {"kinds": [None, "copied", "copied"], **{s: np.array([0.0, 2.0, 0.5]) for s in I.SIGNALS}}
    m = I.evaluate([dev], [test])["loss"]["overall"]
    assert m["dev_threshold"] == 1.0
    assert m["f1_at_dev"] == pytest.approx(2 / 3)   # predicts only the 2.0 token: TP 1, FN 1
    assert m["best_f1"] == 1.0


# ----------------------------------------------------------------------------- labels
def test_token_kinds_on_hand_made_record(tok):
    from percontrast.encoding import PromptBuilder
    from percontrast.prompts import get_task
    out = "I love Lisbon!! 🌿 We walked by the Tagus.\n\nCheers, Ana"
    spans = [{"start": 7, "end": 13, "kind": "copied"}, {"start": 13, "end": 15, "kind": "style"},
             {"start": 16, "end": 17, "kind": "style"}, {"start": 35, "end": 40, "kind": "implied"},
             {"start": 43, "end": 54, "kind": "style"}]
    assert [out[s["start"]:s["end"]] for s in spans] == ["Lisbon", "!!", "🌿", "Tagus", "Cheers, Ana"]
    ids, offsets = I.response_offsets(tok, out)
    builder = PromptBuilder(tok, get_task("email"))
    assert ids + [tok.eos_token_id] == builder.response_ids(out)   # same ids, EOS not scored
    kinds = I.token_kinds(offsets, spans)
    by_text = {}
    for (s, e), k in zip(offsets, kinds):
        by_text.setdefault(out[s:e].strip(), set()).add(k)
    assert by_text["I"] == {None} and by_text["love"] == {None} and by_text["walked"] == {None}
    assert by_text["the"] == {None} and by_text["."] == {None}
    joined = {k: "".join(out[s:e] for (s, e), kk in zip(offsets, kinds) if kk == k) for k in ("copied", "implied")}
    assert joined["copied"].strip() == "Lisbon" and joined["implied"].strip() == "Tagus"
    assert {k for (s, e), k in zip(offsets, kinds) if s >= 43} == {"style"}        # the sign-off
    assert all(k == "style" for (s, e), k in zip(offsets, kinds) if s <= 16 < e)   # every emoji byte piece


def test_token_kinds_overlap_rules():
    offsets = [(0, 3), (3, 6), (6, 9), (9, 12)]
    spans = [{"start": 4, "end": 5, "kind": "implied"}, {"start": 9, "end": 10, "kind": "copied"},
             {"start": 10, "end": 12, "kind": "style"}]
    # a token touching a span only at its edge is generic; the larger overlap wins
    assert I.token_kinds(offsets, spans) == [None, "implied", None, "style"]


def test_word_match_uses_the_whole_word_and_strips_punctuation(tok):
    out = "Hello, Lisbon! the Tagus"
    _, offsets = I.response_offsets(tok, out)
    wm = I.word_match(out, offsets, {"hello", "lisbon"})
    got = {out[s:e].strip(): v for (s, e), v in zip(offsets, wm)}
    assert got["Hello"] == 1 and got[","] == 1 and got["!"] == 1   # punctuation belongs to its word
    assert got["the"] == 0
    assert all(v == 0 for (s, e), v in zip(offsets, wm) if s >= 18)
    assert I.profile_word_set(__import__("percontrast.prompts").prompts.get_task("email"),
                              [{"title": "Hi", "text": "LISBON, rocks!"}]) == {"hi", "lisbon", "rocks"}


def test_other_user_profiles_deterministic_never_own():
    recs = [{"id": f"r{i}", "user_id": f"u{i % 3}", "profile": [{"title": f"t{i % 3}", "text": "x"}]}
            for i in range(9)]
    a, b = other_user_profiles(recs, 0), other_user_profiles(recs, 0)
    assert a == b and len(a) == len(recs)
    for r, other in zip(recs, a):
        assert other != r["profile"]
    assert any(other_user_profiles(recs, s) != a for s in range(1, 5))
    # a record's choice does not depend on the order of the records
    assert other_user_profiles(recs[::-1], 0) == a[::-1]
    with pytest.raises(UserError, match="at least two users"):
        other_user_profiles(recs[:1], 0)
    with pytest.raises(UserError, match="at least two users"):
        other_user_profiles([{**r, "user_id": "same"} for r in recs], 0)


def test_synthetic_split_names_and_old_dev_folder(tmp_path):
    """The generator writes train/val/test; a folder prepared before the rename (dev.jsonl) still loads."""
    from percontrast.datasets.synthetic import prepare_synthetic
    d = tmp_path / "d"
    prepare_synthetic(d, seed=1, n_personas=10)
    val, test = I.load_data(I.IdentifyConfig(data=str(d)))
    assert val and test and {r["user_id"] for r in val}.isdisjoint(r["user_id"] for r in test)
    (d / "val.jsonl").rename(d / "dev.jsonl")
    assert I.load_data(I.IdentifyConfig(data=str(d))) == (val, test)
    (d / "dev.jsonl").unlink()
    with pytest.raises(DataError, match="val.jsonl or dev.jsonl"):
        I.load_data(I.IdentifyConfig(data=str(d)))


def test_config_validation():
    with pytest.raises(UserError):
        I.IdentifyConfig(k=0)
    with pytest.raises(UserError):
        I.IdentifyConfig(limit=0)
    with pytest.raises(UserError):
        I.IdentifyConfig(task="nope")


# ----------------------------------------------------------------------------- end to end
def test_run_end_to_end_tiny(tmp_path):
    cfg = I.IdentifyConfig(model="tiny-random", data="synthetic", n_personas=9, limit=4, dev_limit=4, k=4,
                           batch_size=4, max_length=768, bootstrap=3, output_dir=str(tmp_path / "out"))
    res = I.run(cfg)
    js = json.loads((tmp_path / "out" / "identify.json").read_text())
    md = (tmp_path / "out" / "identify.md").read_text()
    assert js["counts"]["test"]["records"] == 4 and js["counts"]["dev"]["records"] == 4
    c = js["counts"]["test"]
    assert c["tokens"] == c["generic"] + c["copied"] + c["implied"] + c["style"] > 0
    assert set(js["metrics"]) == set(I.SIGNALS)
    for g in I.GROUPS:
        assert f"## {g}" in md
    for sig in I.SIGNALS:
        assert md.count(f"| {sig} |") == len(I.GROUPS) + 1   # + the word-level table
    # word matching flags every copied token (copied words are in the profile by construction)
    assert js["metrics"]["word_match"]["copied"]["mean_pos"] == 1.0
    # The metrics against an independent computation from the per-token scores the run wrote:
    # AUROC as the pairwise count, best F1 by trying every threshold. word_match is 0/1, so the
    # 5-decimal rounding in scores.jsonl changes nothing and the values must agree exactly.
    rows = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text().split("\n") if line]
    test = [r for r in rows if r["split"] == "test"]
    assert len(test) == 4
    for group in I.GROUPS:
        pairs = [(sc, k is not None) for r in test for sc, k in zip(r["word_match"], r["kinds"])
                 if k is None or group == "overall" or k == group]
        s, y = [a for a, _ in pairs], [b for _, b in pairs]
        m = js["metrics"]["word_match"][group]
        assert (m["n_pos"], m["n_neg"]) == (sum(y), len(y) - sum(y))
        if 0 < sum(y) < len(y):
            assert m["auroc"] == pytest.approx(_auroc_pairs(s, y), abs=1e-12)
        if sum(y):
            f1s = []
            for t in sorted(set(s)):
                tp = sum(a >= t and b for a, b in zip(s, y))
                fp = sum(a >= t and not b for a, b in zip(s, y))
                f1s.append(2 * tp / (2 * tp + fp + (sum(y) - tp)))
            assert m["best_f1"] == pytest.approx(max(f1s), abs=1e-12)
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_run_reads_a_prepared_folder_and_rejects_missing_spans(tmp_path):
    from percontrast.datasets.synthetic import prepare_synthetic
    prepare_synthetic(tmp_path / "d", seed=1, n_personas=10)
    res = I.run(I.IdentifyConfig(model="tiny-random", data=str(tmp_path / "d"), limit=3, bootstrap=0,
                                 batch_size=4, output_dir=str(tmp_path / "o")))
    assert res["counts"]["test"]["records"] == 3
    lines = (tmp_path / "d" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    bad = json.loads(lines[0])
    del bad["spans"]
    (tmp_path / "d" / "test.jsonl").write_text("\n".join([json.dumps(bad)] + lines[1:]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="spans"):
        I.run(I.IdentifyConfig(model="tiny-random", data=str(tmp_path / "d"), limit=3, bootstrap=0,
                               output_dir=str(tmp_path / "o2")))


def test_run_loads_the_model_with_dtype_and_trust_remote_code(tmp_path, monkeypatch):
    """identify honours the shared model options (it used to load every model in float32, no remote code)."""
    from helpers import model_load_args
    calls = model_load_args(monkeypatch, I, I.IdentifyConfig, [
        "--model", "some/model", "--dtype", "bfloat16", "--trust-remote-code", "--n-personas", "9",
        "--output-dir", str(tmp_path / "o")])
    assert calls == [("some/model", {"dtype": "bfloat16", "trust_remote_code": True, "device": None})]


def test_config_drives_cli_flags():
    import argparse

    from percontrast import config as C
    p = argparse.ArgumentParser()
    C.add_arguments(p, I.IdentifyConfig)
    assert "--dev-limit" in p.format_help()          # help text renders (no stray % for argparse)
    cfg = C.from_args(I.IdentifyConfig, p.parse_args(["--limit", "5", "--model", "tiny-random"]))
    assert cfg.limit == 5 and cfg.model == "tiny-random" and cfg.k == 4
