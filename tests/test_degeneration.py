"""Degeneration flags and their summary, each value computed by hand in the comment beside it."""
from __future__ import annotations

import pytest

from percontrast.degeneration import (degeneration_flags, degeneration_summary, distinct_n, find_loop,
                                      seq_rep_n, words)

DEMO = "Cheers, Maria, team dinner at the local bistro. Cheers, Maria"   # the demo's real output
UNIT = "Cheers, Maria, team dinner at the local bistro. "              # its 8-word cycle


def test_words_ignore_case_and_punctuation():
    assert words("Cheers, Maria!  TEAM-dinner") == ["cheers", "maria", "team", "dinner"]
    assert words("... !!! ") == []


def test_the_demo_output_repeats_a_phrase_but_is_no_loop():
    f = degeneration_flags(DEMO, ended=True)
    # words: cheers maria team dinner at the local bistro cheers maria (10)
    # 9 bigrams, "cheers maria" twice -> 8 unique: 1 - 8/9; 7 four-grams, all unique: 0
    assert f["n_words"] == 10 and f["seq_rep_2"] == pytest.approx(1 / 9) and f["seq_rep_4"] == 0.0
    assert not f["loop"] and not f["hit_cap"] and not f["empty"] and f["loop_period"] is None


def test_the_demo_output_looping_to_the_cap():
    text = UNIT * 4 + "Cheers, Maria"            # 4 x 8 + 2 = 34 words, cut by the cap
    f = degeneration_flags(text, ended=False)
    assert f["hit_cap"] and f["loop"] and f["n_words"] == 34
    # the whole text is periodic with period 8: one stretch of 34 words
    assert (f["loop_period"], f["loop_words"]) == (8, 34)
    assert f["loop_unit"] == "cheers maria team dinner at the local bistro"
    # a period-8 text has 8 distinct n-grams for any n <= 8 (one per phase):
    # 33 bigrams -> 1 - 8/33; 31 four-grams -> 1 - 8/31
    assert f["seq_rep_2"] == pytest.approx(25 / 33) and f["seq_rep_4"] == pytest.approx(23 / 31)


def test_a_loop_needs_three_copies():
    assert not degeneration_flags(UNIT * 2, True)["loop"]                                  # 2 copies
    assert not degeneration_flags(UNIT * 2 + "Cheers, Maria, team dinner at the local", True)["loop"]  # 23 < 24
    f = degeneration_flags(UNIT * 3, True)                                                 # exactly 3 x 8
    assert f["loop"] and (f["loop_period"], f["loop_words"]) == (8, 24)


def test_a_loop_needs_eight_words():
    assert not degeneration_flags("ha ha ha", True)["loop"]            # 3 copies, 3 words
    assert not degeneration_flags("No, no, no.", True)["loop"]
    assert not degeneration_flags("ha " * 7, True)["loop"]             # 7 words
    f = degeneration_flags("ha " * 8, True)
    assert f["loop"] and (f["loop_period"], f["loop_words"]) == (1, 8)
    # "and they dug" x 3 = 9 words: a loop by this definition (one of the 2 human hits measured)
    assert degeneration_flags("And they dug, and they dug, and they dug.", True)["loop_period"] == 3


def test_a_loop_left_before_the_end_still_counts():
    text = "Dear team, see you soon, see you soon, see you soon. Best, Ann"
    f = degeneration_flags(text, ended=True)
    assert f["loop"] and not f["hit_cap"]
    assert find_loop(words(text)) == {"period": 3, "start": 2, "words": 9, "copies": 3.0, "unit": "see you soon"}


def test_the_shortest_period_is_reported():
    # "a b a b a b a b" is periodic with period 2 (8 words, 4 copies) and with period 4 (2 copies)
    assert find_loop("a b a b a b a b".split())["period"] == 2


def test_empty_and_short_texts():
    f = degeneration_flags("", ended=True)
    assert f["empty"] and f["n_words"] == 0 and f["seq_rep_4"] == 0.0 and not f["loop"] and not f["hit_cap"]
    assert degeneration_flags("  ...", ended=False)["hit_cap"]
    assert seq_rep_n(["a", "b", "c"], 4) == 0.0                       # no 4-gram
    with pytest.raises(TypeError):
        degeneration_flags(None, True)


def test_summary_shares_and_means():
    texts = [UNIT * 4, "short and fine", "x y " * 5, ""]
    ended = [False, False, True, True]
    flags = [degeneration_flags(t, e) for t, e in zip(texts, ended)]
    # loop+cap, cap only, loop only (period 2, 10 words), empty
    s = degeneration_summary(flags, texts)
    assert s["n"] == 4
    shares = (s["hit_cap"], s["loop"], s["loop_and_cap"], s["hit_cap_or_loop"], s["empty"])
    assert shares == (0.5, 0.5, 0.25, 0.75, 0.25)
    # seq-rep-4: UNIT*4 (32 words, 29 four-grams, 8 unique) 21/29; "short and fine" 0;
    # "x y"*5 (7 four-grams, 2 unique) 5/7; "" 0
    assert s["seq_rep_4"] == pytest.approx((21 / 29 + 5 / 7) / 4)
    assert s["n_words"] == (32 + 3 + 10 + 0) / 4
    # pooled unigrams: 32 + 3 + 10 = 45 words; distinct: 8 + 3 + 2 = 13
    assert s["distinct_1"] == pytest.approx(13 / 45)
    # pooled bigrams: 31 + 2 + 9 = 42; distinct: 8 + 2 + 2 ("x y", "y x") = 12
    assert s["distinct_2"] == pytest.approx(12 / 42)


def test_distinct_n_by_hand():
    assert distinct_n(["a b a", "a c"], 1) == 3 / 5
    assert distinct_n(["a b a", "a c"], 2) == 1.0                     # (a b) (b a) (a c); none spans texts
    assert distinct_n(["x y", "x y"], 2) == 0.5                       # the same text twice
    assert distinct_n(["", "a"], 2) is None


def test_summary_edge_cases():
    assert degeneration_summary([]) == {"n": 0, "hit_cap": None, "loop": None, "loop_and_cap": None,
                                        "hit_cap_or_loop": None, "empty": None, "seq_rep_2": None,
                                        "seq_rep_4": None, "n_words": None}
    with pytest.raises(ValueError, match="same generations"):
        degeneration_summary([degeneration_flags("a", True)], ["a", "b"])
