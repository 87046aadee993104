"""Who wrote it: the attribution classifier on synthetic users whose styles differ while their
topics do not, the chance levels, the exclusion of gold outputs from training, empty texts,
and (when the data folder is there) the gold ceiling on the real email test split."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from percontrast.attribution import attribution_share, fit_attributor, gold_ceiling

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
