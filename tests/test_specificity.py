"""specificity.py: the Fightin' Words log-odds by hand, specific words on a synthetic corpus, the mapping
to gold tokens on SmolLM2's tokenizer (U+FFFD pieces included), and likelihood.py's second token set."""
import math

import pytest

from percontrast.likelihood import example_likelihood, personal_positions, summarize_likelihood
from percontrast.specificity import (align_tokens, log_odds_z, overlap, profile_word_counts, specific_positions,
                                     specific_words, word_log_odds)


# ----------------------------------------------------------------------------- the formula
def test_log_odds_z_equals_a_hand_computation():
    # y_u=6 of n_u=100, y_o=4 of n_o=400, a_w=2 of a0=50:
    # delta = log(8 / (100 + 50 - 6 - 2)) - log(6 / (400 + 50 - 4 - 2)) = log(8/142) - log(6/444)
    # var = 1/8 + 1/6 = 7/24
    delta, z = log_odds_z(6, 100, 4, 400, 2, 50)
    want = math.log(8 / 142) - math.log(6 / 444)
    assert delta == want                                    # the same operations in the same order
    # 1/8 + 1/6 vs 7/24: one rounding apart (2^-53 relative), so z within a few ulps
    assert z == pytest.approx(want / math.sqrt(7 / 24), rel=1e-15, abs=0)
    assert round(delta, 5) == 1.42768 and round(z, 4) == 2.6435   # log(3552 / 852), by a calculator


def test_equal_rates_give_exactly_zero():
    # with a_w = a0 * pooled rate, equal rates make both odds p / (1 - p): delta is 0 whatever a0
    for a0 in (10.0, 1000.0, 1e5):
        p = (3 + 30) / (100 + 1000)
        delta, z = log_odds_z(3, 100, 30, 1000, a0 * p, a0)
        assert abs(delta) < 1e-12 and abs(z) < 1e-12


def test_the_prior_must_leave_mass_for_other_words():
    with pytest.raises(ValueError, match="0 < a_w < a0"):
        log_odds_z(1, 10, 1, 10, 5, 5)
    with pytest.raises(ValueError, match="0 < a_w < a0"):
        log_odds_z(1, 10, 1, 10, 0, 5)


# ----------------------------------------------------------------------------- specific words
FILLER = "the cat sat on the mat and the dog ran to the park".split()


def _records():
    """Users a, b, c with 6 profile items each: the same filler, plus 'gadzooks' in every item of a."""
    recs = []
    for u in "abc":
        items = []
        for i in range(6):
            words = FILLER[i:] + FILLER[:i] + [f"{u}item{i}"]
            if u == "a":
                words.append("gadzooks")
            items.append({"title": "t", "text": " ".join(words)})
        # the same items again in a second record: counted once (deduplicated per user)
        recs += [{"id": f"{u}-{j}", "user_id": u, "input": "Write", "output": f"Gadzooks, the {u} note.",
                  "profile": items} for j in range(2)]
    return recs


def test_gadzooks_is_specific_to_a_only_and_the_is_nobodys():
    recs = _records()
    counts, dropped = profile_word_counts(recs)
    # every gold output says "Gadzooks": never counted (a: 6 uses, b: none)
    assert dropped == 0 and counts["a"]["gadzooks"] == 6 and counts["b"]["gadzooks"] == 0
    assert counts["a"]["the"] == counts["b"]["the"] == 4 * 6          # deduplicated: 6 items, not 12
    spec = specific_words(recs)
    assert "gadzooks" in spec["a"]
    assert "gadzooks" not in spec["b"] and "gadzooks" not in spec["c"]
    assert not any("the" in s for s in spec.values())
    # each item's own word is used once: a hapax is never specific (min_count 2)
    assert not any(w.endswith(f"item{i}") for s in spec.values() for w in s for i in range(6))
    scores = word_log_odds(counts)
    assert scores["a"]["gadzooks"][1] > 1.96 and scores["a"]["gadzooks"][0] > math.log(2)
    # 'the' 24 times each; a's items are a word longer, so a's rate 24/90 < the others' 48/168: delta < 0;
    # b's 24/84 is a little above the others' 48/174, far from significant
    assert scores["a"]["the"][0] < 0 < scores["b"]["the"][0] and scores["b"]["the"][1] < 0.5


def test_gadzooks_z_is_the_formula_on_the_pooled_counts():
    counts, _ = profile_word_counts(_records())
    n = {u: sum(c.values()) for u, c in counts.items()}
    total = sum(n.values())
    a0 = total / 3                                    # the default prior mass: N / U
    want = log_odds_z(6, n["a"], 0, total - n["a"], a0 * 6 / total, a0)
    assert word_log_odds(counts)["a"]["gadzooks"] == want
    # the pooled counts as they are (a0 = N) outweigh a user 3-fold: the same word is not specific
    assert word_log_odds(counts, prior_mass=total)["a"]["gadzooks"][1] < 1.96
    assert "gadzooks" not in specific_words(_records(), prior_mass=total)["a"]


def test_min_count_and_both_thresholds_bind():
    recs = [{"id": "a", "user_id": "a", "profile": [{"text": "often " * 9 + "x " * 20 + "rare"}]},
            {"id": "b", "user_id": "b", "profile": [{"text": "x " * 30}]}]
    counts, _ = profile_word_counts(recs)
    assert "rare" not in word_log_odds(counts)["a"]                    # below min_count: not even scored
    assert "rare" in word_log_odds(counts, min_count=1)["a"]
    d, z = word_log_odds(counts)["a"]["often"]
    assert "often" in specific_words(recs, z_min=z - 1e-9, delta_min=d - 1e-9)["a"]
    assert "often" not in specific_words(recs, z_min=z, delta_min=d - 1e-9)["a"]
    assert "often" not in specific_words(recs, z_min=z - 1e-9, delta_min=d)["a"]


def test_gold_outputs_are_never_counted_and_a_copying_item_is_dropped():
    recs = _records()
    gold = "zounds " * 14                                          # a 14-word output ...
    recs[2] = {**recs[2], "output": gold}
    recs[2]["profile"] = recs[2]["profile"] + [{"text": gold}]    # ... that one of b's items copies
    counts, dropped = profile_word_counts(recs)
    assert dropped == 1 and counts["b"]["zounds"] == 0 and all(c["zounds"] == 0 for c in counts.values())


def test_one_user_or_no_author_is_refused():
    recs = [r for r in _records() if r["user_id"] == "a"]
    with pytest.raises(ValueError, match="at least 2 users"):
        specific_words(recs)
    with pytest.raises(ValueError, match="has no 'user_id'"):
        specific_words([{"id": "x", "profile": []}])


def test_the_words_do_not_depend_on_record_order():
    recs = _records()
    assert specific_words(recs) == specific_words(recs[::-1])
    counts, _ = profile_word_counts(recs)
    assert word_log_odds(counts) == word_log_odds(profile_word_counts(recs[::-1])[0])


# ----------------------------------------------------------------------------- gold tokens
@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from percontrast.models import ensure_smollm2
    return AutoTokenizer.from_pretrained(ensure_smollm2())


def _row(tok, id_, text, end=True):
    """A score_row-like row: the response is tokenized alone, each token decoded alone, the end id last."""
    ids = tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if end else [])
    return {"id": id_, "tokens": [tok.decode([t]) for t in ids], "token_ids": ids}


def test_positions_are_the_tokens_of_specific_words(tok):
    text = "Gadzooks, the gadzookery of gadzooks!"
    row = _row(tok, "a-0", text)
    assert row["tokens"] == ["G", "ad", "z", "ooks", ",", " the", " gad", "z", "ook", "ery", " of", " gad", "z",
                             "ooks", "!", "<|im_end|>"]
    recs = [{"id": "a-0", "user_id": "a", "output": text}]
    got = specific_positions([row], recs, specific={"a": {"gadzooks"}})["a-0"]
    # every piece of both "gadzooks" (its leading space rides along), nothing of "gadzookery" or the end
    assert got["positions"] == [0, 1, 2, 3, 11, 12, 13]
    assert got["words"] == ["gadzooks"] and got["aligned"] and got["token_ids"] == row["token_ids"]
    # another user's specific words do not count
    assert specific_positions([row], recs, specific={"b": {"gadzooks"}})["a-0"]["positions"] == []


def test_split_multibyte_characters_map_to_their_words(tok):
    text = "Le café 日本語 🎉 naïve “fin” 本"
    row = _row(tok, "a-1", text)
    # 日, 語 and 🎉 are each split over three tokens that decode alone to U+FFFD; 本 is one token
    assert row["tokens"] == ["Le", " café", " \ufffd", "\ufffd", "\ufffd", "本", "\ufffd", "\ufffd", "\ufffd",
                             " \ufffd", "\ufffd", "\ufffd", " na", "ïve", " “", "fin", "”", " ", "本", "<|im_end|>"]
    spans, indexed, aligned = align_tokens(row["tokens"], text)
    assert aligned and indexed == text
    assert [text[a:b] for a, b in spans[2:9]] == [" 日", "日", "日", "本", "語", "語", "語"]
    assert all(text[s[0]:s[1]] == t for t, s in zip(row["tokens"], spans) if s and "\ufffd" not in t)
    recs = [{"id": "a-1", "user_id": "a", "output": text}]
    got = specific_positions([row], recs, specific={"a": {"日本語", "naïve"}})["a-1"]
    assert got["positions"] == [2, 3, 4, 5, 6, 7, 8, 12, 13] and got["words"] == ["naïve", "日本語"]
    # a word is a whole \w+ run: "本" is specific only where it stands alone, not inside 日本語
    assert specific_positions([row], recs, specific={"a": {"本"}})["a-1"]["positions"] == [18]


def test_a_cut_response_and_tokens_that_spell_something_else(tok):
    text = "gadzooks and more gadzooks"
    row = _row(tok, "a-2", text, end=False)
    row = {**row, "tokens": row["tokens"][:3], "token_ids": row["token_ids"][:3]}   # cut to max_length
    recs = [{"id": "a-2", "user_id": "a", "output": text}]
    got = specific_positions([row], recs, specific={"a": {"gadzooks"}})["a-2"]
    assert got["aligned"] and got["positions"] == [i for i, t in enumerate(row["tokens"]) if "and" not in t]
    # cut inside a split character: its pieces still map to it
    text = "gadzooks 日本語"
    row = _row(tok, "a-3", text, end=False)
    assert row["tokens"][-3:] == ["\ufffd", "\ufffd", "\ufffd"]
    row = {**row, "tokens": row["tokens"][:-2], "token_ids": row["token_ids"][:-2]}
    recs3 = [{"id": "a-3", "user_id": "a", "output": text}]
    got = specific_positions([row], recs3, specific={"a": {"日本語"}})["a-3"]
    assert got["aligned"] and got["positions"] == list(range(4, len(row["tokens"]))) and got["words"] == ["日本語"]
    # decoded text that is not the gold at all: no crash, indexed on the tokens themselves
    other = {"id": "a-2", "tokens": ["gad", "zooks", "\ufffd", "x"], "token_ids": [1, 2, 3, 4]}
    got = specific_positions([other], recs, specific={"a": {"gadzooks"}})["a-2"]
    assert not got["aligned"] and got["positions"] == [0, 1]


def test_spaces_dropped_by_a_decoder_still_align():
    # a SentencePiece-style decoder drops the leading space of a token decoded alone
    spans, _, aligned = align_tokens(["Hello", "world", "</s>"], "Hello world")
    assert aligned and spans == [(0, 5), (6, 11), None]


def test_positions_on_real_rows_of_score_records(tiny, email_task):
    """The tiny model's score_records rows on the sample data: every row aligns, the end token is
    never specific, and the maria signature words are Maria's."""
    from percontrast.commands.score import score_records
    from percontrast.datasets import load_records
    from percontrast.encoding import PromptBuilder
    model, tk = tiny
    recs = load_records("builtin:sample-test", email_task)
    rows = score_records(model, tk, recs, PromptBuilder(tk, email_task, k=2), batch_size=8, progress=False)
    spec = specific_words(recs)
    assert "maria" in spec["maria"]
    pos = specific_positions(rows, recs, specific=spec)
    assert all(p["aligned"] for p in pos.values())
    for r in rows:
        p = pos[r["id"]]
        assert p["token_ids"] == r["token_ids"] and len(r["token_ids"]) - 1 not in p["positions"]
    maria = next(r for r in rows if r["id"] == "maria-4")
    assert "Maria" in [maria["tokens"][i].strip() for i in pos["maria-4"]["positions"]]
    assert pos == specific_positions(rows[::-1], recs[::-1])        # deterministic, order-free


# ----------------------------------------------------------------------------- likelihood and overlap
def _lrow(id_, logp, pir, toks=None):
    return {"id": id_, "logp_with": logp, "pir": pir, "token_ids": toks or list(range(len(logp)))}


def test_example_likelihood_adds_the_specific_split_and_keeps_the_old_keys():
    base = [_lrow("a", [-1.0, -2.0, -3.0, -0.5], [0.9, 0.8, 2.0, 0.0]), _lrow("b", [-1.0], [0.1])]
    personal = personal_positions(base)
    specific = {"a": {"positions": [1, 2], "token_ids": [0, 1, 2, 3]}, "b": {"positions": [], "token_ids": [0]}}
    old = [example_likelihood(r, personal[r["id"]]) for r in base]
    new = [example_likelihood(r, personal[r["id"]], specific[r["id"]]) for r in base]
    for o, n in zip(old, new):
        assert {k: n[k] for k in o} == o                              # identical values, old keys
    assert set(new[0]) - set(old[0]) == {"n_specific", "nll_specific_sum", "n_nonspecific", "nll_nonspecific_sum",
                                         "nll_specific", "nll_nonspecific"}
    assert new[0]["nll_specific"] == (2.0 + 3.0) / 2 and new[0]["nll_nonspecific"] == (1.0 + 0.5) / 2
    assert new[1]["nll_specific"] is None and new[1]["nll_nonspecific"] == 1.0
    s_old, s_new = summarize_likelihood(old), summarize_likelihood(new)
    assert {k: s_new[k] for k in s_old} == s_old and "nll_specific" not in s_old
    # token-weighted: specific (2 + 3) / 2; the rest (1 + 0.5 + 1) / 3; 2 of 5 tokens
    assert s_new["nll_specific"] == 2.5 and s_new["nll_nonspecific"] == 2.5 / 3
    assert s_new["specific_tokens"] == 2 and s_new["share_specific"] == 2 / 5


def test_mixed_or_mismatched_specific_sets_are_refused():
    row = _lrow("a", [-1.0, -1.0], [1.0, 1.0], toks=[5, 6])
    personal = personal_positions([row])["a"]
    with pytest.raises(ValueError, match="specific-token set"):
        example_likelihood(row, personal, {"positions": [0], "token_ids": [5, 7]})
    a = example_likelihood(row, personal, {"positions": [0], "token_ids": [5, 6]})
    with pytest.raises(ValueError, match="to every example_likelihood call or to none"):
        summarize_likelihood([a, example_likelihood(row, personal)])


def test_overlap_counts_the_four_cells():
    personal = {"a": {"positions": [0, 1], "token_ids": [1, 2, 3, 4]}, "b": {"positions": [], "token_ids": [9]}}
    specific = {"a": {"positions": [1, 2], "token_ids": [1, 2, 3, 4]}, "b": {"positions": [0], "token_ids": [9]}}
    o = overlap(personal, specific)
    assert (o["both"], o["only_pir"], o["only_specific"], o["neither"], o["tokens"]) == (1, 1, 2, 1, 5)
    assert o["share_pir"] == 2 / 5 and o["share_specific"] == 3 / 5 and o["jaccard"] == 1 / 4
    with pytest.raises(ValueError, match="different gold tokens"):
        overlap(personal, {**specific, "b": {"positions": [], "token_ids": [8]}})
    with pytest.raises(ValueError, match="different examples"):
        overlap(personal, {"a": specific["a"]})
