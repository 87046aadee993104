"""Who wrote it: the attribution classifier on synthetic users whose styles differ while their
topics do not, the chance levels, the exclusion of gold outputs from training, empty texts,
the leave-shown-out classifiers (a refit is the sub-block of the full fit bit for bit; a copy
of the shown item is no longer credited by its own training vector), and (when the data folder
is there) the gold ceiling on the real email test split."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from percontrast.attribution import (SHOWN_PREFIX_WORDS, _norm_words, attribution_share, fit_attributor,
                                     fit_leave_shown_out, gold_ceiling)
from percontrast.prompts import get_task, profile_parts

ROOT = Path(__file__).resolve().parents[1]
TOPIC = ("meeting budget report train weekend garden dinner project server release coffee "
         "invoice holiday music football kitchen deadline review ticket printer").split()


def _styled(user: str, rng: random.Random) -> str:
    """One short text in ``user``'s style; every user draws the same topic words."""
    sents = [rng.sample(TOPIC, 4) for _ in range(rng.randint(2, 3))]
    if user == "lol":          # lowercase, no punctuation, chat fillers
        return " ".join(" ".join(s) + rng.choice([" lol", " haha", " :)", ""]) for s in sents)
    if user == "formal":       # capitalized, semicolons, formulaic closing
        body = "; ".join(" ".join(s) for s in sents)
        return f"Dear colleagues, regarding the {body[0].upper() + body[1:]}; furthermore, kindly advise. Regards."
    if user == "shout":        # upper case and exclamation marks
        return " ".join(" ".join(w.upper() for w in s) + "!!!" for s in sents)
    if user == "dash":         # dashes, ellipses, British spellings
        return " -- ".join(" ".join(s) for s in sents) + "... cheers, colour and favour all round..."
    raise KeyError(user)


USERS = ("dash", "formal", "lol", "shout")


def _records(n_items: int = 20, n_records: int = 3, seed: int = 0) -> list[dict]:
    """Records per user whose profiles are overlapping samples of the user's item pool (so the
    same item appears in several records, as in real splits)."""
    rng = random.Random(seed)
    recs = []
    for u in USERS:
        pool = [{"title": f"{u} {i}", "text": _styled(u, rng)} for i in range(n_items)]
        for j in range(n_records):
            recs.append({"id": f"{u}-{j}", "user_id": u, "input": "Write something",
                         "output": _styled(u, rng), "profile": rng.sample(pool, 12)})
    return recs


def _held_out(per_user: int, seed: int = 1) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts, users = [], []
    for u in USERS:
        for _ in range(per_user):
            texts.append(_styled(u, rng))
            users.append(u)
    return texts, users


def test_held_out_texts_are_attributed_to_their_author():
    att = fit_attributor(_records())
    assert att.users == USERS and att.dropped_copies == 0
    assert sum(att.n_items.values()) <= 4 * 20          # items deduplicated across the 3 records
    texts, users = _held_out(25)
    res = attribution_share(att, texts, users)
    assert res["n"] == 100 and res["correct"] == [int(p == u) for p, u in zip(res["predicted"], users)]
    assert res["share"] == 1.0 and res["share_macro"] == 1.0
    assert res["chance"] == res["chance_majority"] == 0.25 and res["chance_uniform"] == 0.25


def test_shuffled_users_score_about_chance():
    """Pair the same texts with a permutation of their users. For position i the permuted label
    is a uniform draw from the n labels, so P(match) = (share of the predicted user among the
    labels) = 1/K for K balanced users, whatever the classifier: E[share] = 1/K = 0.25 exactly.
    The number of matches is a sum of n weakly (negatively) dependent indicators with p = 1/4,
    sd <= sqrt(n p (1-p)) (1 + O(1/n)) = 6.1 words for n = 200, i.e. 0.031 in share; the bound
    is 4 sd (a fixed seed makes the value itself fixed; the bound says what it may be)."""
    att = fit_attributor(_records())
    texts, users = _held_out(50)
    assert attribution_share(att, texts, users)["share"] == 1.0
    shuffled = users[:]
    random.Random(0).shuffle(shuffled)
    res = attribution_share(att, texts, shuffled)
    sd = math.sqrt(200 * 0.25 * 0.75) / 200
    assert abs(res["share"] - 0.25) <= 4 * sd, res["share"]


def test_a_profile_item_that_copies_a_gold_output_is_not_trained_on():
    recs = _records()
    leak = "zqxw zqxw vbnm is the whole gold text of one test record"        # < 13 words: a short gold
    near = ("ploq ploq " + " ".join(TOPIC[:13]))                          # shares a 13-word run with a gold
    recs[0]["output"] = leak
    recs[1]["output"] = " ".join(TOPIC[:14]) + " and more"
    # the leak sits in another user's profile, the near copy in the same user's, each in two records
    for r in (recs[3], recs[4]):
        r["profile"] = r["profile"] + [{"title": "x", "text": "Leak: " + leak.upper() + "!"}]
    for r in (recs[1], recs[2]):
        r["profile"] = r["profile"] + [{"title": "y", "text": near}]
    att = fit_attributor(recs)
    assert att.dropped_copies == 2                       # each distinct item counted once
    vocab = att.vectorizer.vocabulary_
    assert not any(g in vocab for g in ("zqx", "ZQX", "plo", "ploq"))
    # an item that merely shares 12 words in a row stays
    recs[1]["profile"][-1] = {"title": "y", "text": "ploq ploq " + " ".join(TOPIC[:12])}
    recs[2]["profile"][-1] = recs[1]["profile"][-1]
    att = fit_attributor(recs)
    assert att.dropped_copies == 1 and "plo" in att.vectorizer.vocabulary_


def test_empty_and_unseen_texts_are_not_attributed():
    att = fit_attributor(_records())
    texts = ["", "   \n", None, "\u2603\u2603\u2603", _styled("lol", random.Random(5))]
    assert att.predict(texts)[:4] == [None] * 4
    res = attribution_share(att, texts, ["lol"] * 5)
    assert res["correct"] == [0, 0, 0, 0, 1] and res["unattributed"] == 4 and res["share"] == 0.2
    assert attribution_share(att, [], [])["share"] is None


def test_chance_levels_for_unbalanced_users():
    att = fit_attributor(_records())
    texts = [_styled("lol", random.Random(i)) for i in range(6)] + [_styled("shout", random.Random(9))] * 2
    res = attribution_share(att, texts, ["lol"] * 6 + ["shout"] * 2)
    assert res["chance"] == 6 / 8 and res["chance_uniform"] == 1 / 4 and res["chance_macro"] == 1 / 2
    assert res["per_user"] == {"lol": {"n": 6, "share": 1.0}, "shout": {"n": 2, "share": 1.0}}


def test_deterministic_and_independent_of_record_order():
    recs = _records()
    a, b = fit_attributor(recs), fit_attributor(list(reversed(recs)))
    texts, _ = _held_out(10, seed=7)
    assert a.predict(texts) == b.predict(texts)
    assert (a.model.coef_ == b.model.coef_).all()


def test_user_errors():
    recs = _records()
    att = fit_attributor(recs)
    with pytest.raises(ValueError, match="not fitted on"):
        attribution_share(att, ["hello"], ["someone-else"])
    with pytest.raises(ValueError, match="2 texts but 1 users"):
        attribution_share(att, ["a", "b"], ["lol"])
    bad = [dict(r) for r in recs]
    del bad[2]["user_id"]
    with pytest.raises(ValueError, match="user_id"):
        fit_attributor(bad)
    with pytest.raises(ValueError, match="at least 2 users"):
        fit_attributor([r for r in recs if r["user_id"] == "lol"])


@pytest.mark.parametrize("name", ["email-short"])
def test_gold_ceiling_on_real_data(name):
    path = ROOT / "data" / name / "test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not here (data/ is not in the repository)")
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    att = fit_attributor(recs)
    g = gold_ceiling(att, recs)
    print(f"\n{name}: {len(att.users)} users, {sum(att.n_items.values())} training items, "
          f"{att.dropped_copies} dropped as copies; gold share {g['share']:.3f} (macro {g['share_macro']:.3f}), "
          f"chance {g['chance']:.3f} (majority), uniform {g['chance_uniform']:.3f}")
    assert g["n"] == len(recs) and g["unattributed"] == 0
    assert g["share"] > g["chance"] + 0.2 and g["share_macro"] > g["chance_macro"] + 0.2


# -- leave shown out --------------------------------------------------------------------------

def _key(text: str) -> str:
    return " ".join(_norm_words(text))


def _without(recs: list[dict], texts) -> list[dict]:
    """The records with every profile item whose text is in ``texts`` removed."""
    drop = {_key(t) for t in texts}
    return [{**r, "profile": [it for it in r["profile"] if _key(it["text"]) not in drop]} for r in recs]


def _same_fit(a, b) -> bool:
    return (a.users == b.users and a.n_items == b.n_items and a.vectorizer.vocabulary_ == b.vectorizer.vocabulary_
            and np.array_equal(a.vectorizer.tfidf.idf_, b.vectorizer.tfidf.idf_)
            and np.array_equal(a.model.coef_, b.model.coef_) and np.array_equal(a.model.intercept_, b.model.intercept_))


def test_a_leave_shown_out_classifier_is_the_refit_without_the_shown_items():
    """Bit for bit what fit_attributor fits on the records with the shown items removed: the same
    vocabulary, idf and SVM; examples that show nothing get the all-items classifier."""
    recs = _records()
    shown = [[r["profile"][0]] if i % 3 else [] for i, r in enumerate(recs)]
    loo = fit_leave_shown_out(recs, shown)
    full = fit_attributor(recs)
    for i, r in enumerate(recs):
        ref = _without(recs, [it["text"] for it in shown[i]]) if shown[i] else recs
        assert _same_fit(loo.attributor_for(i), fit_attributor(ref)), i
        assert len(loo.excluded[i]) == len(shown[i]) and loo.unmatched[i] == ()
        if not shown[i]:
            assert _same_fit(loo.attributor_for(i), full)
    # one classifier per distinct excluded set: 8 examples with one item each, all distinct, + the empty set
    assert loo.n_classifiers == len({_key(s[0]["text"]) for s in shown if s}) + 1 == 9


def test_examples_that_show_the_same_item_share_one_classifier():
    recs = _records()
    item = recs[0]["profile"][0]
    loo = fit_leave_shown_out(recs, [[item]] * len(recs))
    assert loo.n_classifiers == 1
    assert all(loo.attributor_for(i) is loo.attributor_for(0) for i in range(len(recs)))


def _planted(seed: int = 0) -> tuple[list[dict], dict]:
    """lol's records, one of which shows an item written in shout's style (a forwarded shout):
    a copy of it is credited to lol only by the item's own training vector."""
    recs = _records(seed=seed)
    odd = {"title": "fwd", "text": _styled("shout", random.Random(99)) + " FWD FROM LOL"}
    for r in recs:
        if r["user_id"] == "lol":
            r["profile"] = r["profile"] + [odd]
    return recs, odd


def test_a_copy_of_the_shown_item_is_not_credited_by_its_own_training_vector():
    recs, odd = _planted()
    i = next(i for i, r in enumerate(recs) if r["user_id"] == "lol")
    shown = [[odd] if j == i else [] for j in range(len(recs))]
    copy = [odd["text"] if j == i else _styled(r["user_id"], random.Random(j)) for j, r in enumerate(recs)]
    users = [r["user_id"] for r in recs]
    old = attribution_share(fit_attributor(recs), copy, users)
    loo = fit_leave_shown_out(recs, shown)
    new = attribution_share(loo, copy, users)
    # all-items: the copy meets its own training vector and goes to lol; left out, it reads as shout
    assert old["predicted"][i] == "lol" and old["correct"][i] == 1
    assert new["predicted"][i] == "shout" and new["correct"][i] == 0
    assert "LOL" in fit_attributor(recs).vectorizer.vocabulary_
    assert "LOL" not in loo.attributor_for(i).vectorizer.vocabulary_
    assert loo.excluded[i] == (("lol", _key(odd["text"])),)
    # the other examples are attributed by the all-items classifier, as before
    others = [j for j in range(len(recs)) if j != i]
    assert [new["predicted"][j] for j in others] == [old["predicted"][j] for j in others]


def test_a_rendered_and_cut_item_is_matched_by_its_opening_words():
    """``profile_shown`` holds rendered items (template words and the title around the text), the
    text cut to its first words when the prompt was too long: matched when >= 4 words are shown."""
    recs = _records()
    item = recs[0]["profile"][0]                           # a dash item: "w w w w -- ..."
    task = get_task("email")
    n_words = len(item["text"].split())
    for budget, excluded in [(None, 1), (n_words - 1, 1), (SHOWN_PREFIX_WORDS, 1), (SHOWN_PREFIX_WORDS - 1, 0)]:
        part = profile_parts(task, [item], budget)
        assert part[0].startswith(f'"{item["title"]}" is the title for "')
        loo = fit_leave_shown_out(recs, [part] + [[]] * (len(recs) - 1))
        assert len(loo.excluded[0]) == excluded, budget
        assert loo.unmatched[0] == (() if excluded else (0,))
    # the item as a record, its text cut as the prompt cut it
    cut = {**item, "text": " ".join(item["text"].split()[:SHOWN_PREFIX_WORDS + 1])}
    loo = fit_leave_shown_out(recs, [[cut]] + [[]] * (len(recs) - 1))
    assert loo.excluded[0] == (("dash", _key(item["text"])),)
    # a text given as itself, and one that is in no profile
    loo = fit_leave_shown_out(recs, [[item["text"], "nothing like any item at all here"]] + [[]] * (len(recs) - 1))
    assert loo.excluded[0] == (("dash", _key(item["text"])),) and loo.unmatched[0] == (1,)


def test_an_item_shown_whole_inside_another_is_left_out_too_and_a_shared_opening_is_not():
    recs = _records()
    short = {"title": "s", "text": "cheers colour favour"}           # under 4 words: matched whole
    for r in recs[:3]:
        r["profile"] = r["profile"] + [short]
    host = recs[0]["profile"][0]
    text = host["text"] + " cheers colour favour"
    # another dash item that opens with the host's first 4 words but then differs
    twin = {"title": "t", "text": " ".join(host["text"].split()[:4]) + " zzz yyy xxx www"}
    for r in recs[:3]:
        r["profile"] = r["profile"] + [twin]
    host_long = {**host, "text": text}
    for r in recs[:3]:
        r["profile"] = [host_long if it is host else it for it in r["profile"]]
    loo = fit_leave_shown_out(recs, [[host_long]] + [[]] * (len(recs) - 1))
    # the host (longest opening run) and the short item (all of it inside); the twin's run is shorter
    assert {k for _, k in loo.excluded[0]} == {_key(text), _key(short["text"])}


def test_a_user_whose_only_item_is_shown_is_known_but_not_predicted_there():
    recs = _records()
    solo = {"title": "solo", "text": "Hello there, this is the one and only mail of the solo sender."}
    recs.append({"id": "solo-0", "user_id": "solo", "input": "Write something", "output": "Hi, solo again here.",
                 "profile": [solo]})
    shown = [[]] * (len(recs) - 1) + [[solo]]
    loo = fit_leave_shown_out(recs, shown)
    att = loo.attributor_for(len(recs) - 1)
    assert "solo" in loo.known_users and "solo" not in att.users and att.n_items.get("solo") is None
    texts = [r["output"] for r in recs[:-1]] + [solo["text"]]
    res = attribution_share(loo, texts, [r["user_id"] for r in recs])
    assert res["correct"][-1] == 0 and res["predicted"][-1] != "solo"
    assert fit_attributor(recs).predict([solo["text"]]) == ["solo"]      # the all-items one credits the copy
    assert res["chance_uniform"] == 1 / 5


def test_leave_shown_out_is_deterministic_and_independent_of_record_order():
    recs, odd = _planted()
    shown = [[r["profile"][1]] for r in recs]
    a = fit_leave_shown_out(recs, shown)
    b = fit_leave_shown_out(list(reversed(recs)), list(reversed(shown)))
    n = len(recs)
    texts = [_styled(r["user_id"], random.Random(i)) for i, r in enumerate(recs)]
    assert a.predict(texts) == list(reversed(b.predict(list(reversed(texts)))))
    assert all(_same_fit(a.attributor_for(i), b.attributor_for(n - 1 - i)) for i in range(n))
    assert a.excluded == tuple(reversed(b.excluded))


def test_parallel_fits_give_the_same_classifiers():
    """Processes, each with its own liblinear random generator (threads would share one)."""
    recs = _records()
    shown = [[r["profile"][1]] for r in recs]
    a, b = fit_leave_shown_out(recs, shown), fit_leave_shown_out(recs, shown, n_jobs=2)
    assert a.n_classifiers == b.n_classifiers > 2
    assert all(_same_fit(a.attributor_for(i), b.attributor_for(i)) for i in range(len(recs)))


def test_leave_shown_out_shares_have_the_shape_of_attribution_share():
    recs = _records()
    shown = [[r["profile"][0]] for r in recs]
    loo, att = fit_leave_shown_out(recs, shown), fit_attributor(recs)
    g_loo, g = gold_ceiling(loo, recs), gold_ceiling(att, recs)
    assert set(g_loo) == set(g) | {"leave_shown_out"}
    assert g_loo["n"] == g["n"] == 12 and len(g_loo["correct"]) == 12
    assert set(g_loo["per_user"]) == set(USERS) and g_loo["chance"] == g["chance"] == 0.25
    assert g_loo["leave_shown_out"]["classifiers"] == loo.n_classifiers
    assert g_loo["leave_shown_out"]["excluded_per_example"] == [1] * 12
    assert g_loo["leave_shown_out"]["examples_with_unmatched_shown"] == 0
    res = attribution_share(loo, ["", None] + [r["output"] for r in recs[2:]], [r["user_id"] for r in recs])
    assert res["correct"][:2] == [0, 0] and res["unattributed"] >= 2


def test_leave_shown_out_errors():
    recs = _records()
    none = [[] for _ in recs]
    with pytest.raises(ValueError, match="11 shown lists for 12 records"):
        fit_leave_shown_out(recs, none[1:])
    with pytest.raises(ValueError, match=r"shown\[0\] is a single str"):
        fit_leave_shown_out(recs, ["a text"] + none[1:])
    with pytest.raises(ValueError, match=r"shown\[0\]\[0\] has type int"):
        fit_leave_shown_out(recs, [[7]] + none[1:])
    with pytest.raises(ValueError, match="min_prefix_words must be >= 1"):
        fit_leave_shown_out(recs, none, min_prefix_words=0)
    two = [r for r in recs if r["user_id"] in ("lol", "shout")]
    lol_items = [it for r in two if r["user_id"] == "lol" for it in r["profile"]]
    with pytest.raises(ValueError, match="leaves profile items of 1 user"):
        fit_leave_shown_out(two, [lol_items] + [[] for _ in two[1:]])
    loo = fit_leave_shown_out(recs, none)
    with pytest.raises(ValueError, match="3 texts for a leave-shown-out classifier of 12"):
        loo.predict(["a", "b", "c"])
    with pytest.raises(ValueError, match="records are not the ones"):
        gold_ceiling(loo, list(reversed(recs)))


@pytest.mark.parametrize("name", ["email-short"])
def test_leave_shown_out_on_real_data(name):
    """The reviewer's case: copying the retrieved item (BM25, k = 1), cut to the 64-word output
    budget, scores 100% with the all-items classifier; left out, it scores what another of the
    user's real texts scores. The rendered items of the prompt match the retrieved items."""
    path = ROOT / "data" / name / "test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not here (data/ is not in the repository)")
    from percontrast.copying import retrieved_item_baseline
    from percontrast.prompts import query_text
    from percontrast.retrieval import retrieve

    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    task = get_task("email")
    items = [retrieve(task, query_text(task, r["input"]), r["profile"], 1, "bm25", record_id=str(r["id"]))
             for r in recs]
    loo = fit_leave_shown_out(recs, [profile_parts(task, it) for it in items])
    assert [{k for _, k in e} for e in loo.excluded] == [{_key(it[0]["text"])} for it in items]
    att = fit_attributor(recs)
    users = [r["user_id"] for r in recs]
    copies = [" ".join(retrieved_item_baseline(it).split()[:64]) for it in items]
    c_all, c_loo = attribution_share(att, copies, users), attribution_share(loo, copies, users)
    g_all, g_loo = gold_ceiling(att, recs), gold_ceiling(loo, recs)
    print(f"\n{name}: {loo.n_classifiers} classifiers in {loo.fit_s:.1f} s; copy of the retrieved item "
          f"{c_all['share']:.3f} -> {c_loo['share']:.3f} left out; gold {g_all['share']:.3f} -> {g_loo['share']:.3f}")
    assert c_all["share"] >= 0.95 and c_loo["share"] <= c_all["share"] - 0.2
    assert g_loo["share"] <= g_all["share"] and g_loo["share"] > g_loo["chance"] + 0.2
