"""Copying from the prompt: copy rate, longest copied span and the retrieved-item baseline, each
value counted by hand in the comment beside it."""
from __future__ import annotations

import itertools

import pytest

from percontrast.copying import COPY_NGRAM, copy_rate, longest_copied_span, retrieved_item_baseline

ITEM = {"title": "Re: lunch", "text": "The cat sat on the mat. Then it left, for good!"}


def test_copy_rate_by_hand():
    # words: the cat sat on the mat today (7) -> 4 four-grams; the first 3 are in the source,
    # "on the mat today" is not: 3/4
    assert copy_rate("The cat sat on the mat today", [ITEM["text"]]) == 3 / 4
    # n = 2: the cat | cat sat | sat on | on the | the mat | mat today -> 5 of 6 in the source
    assert copy_rate("The cat sat on the mat today", [ITEM["text"]], n=2) == 5 / 6
    # n = 1: 7 words, "today" is the only one the source lacks -> 6/7
    assert copy_rate("The cat sat on the mat today", [ITEM["text"]], n=1) == 6 / 7
    assert COPY_NGRAM == 4


def test_repeated_ngrams_count_each_time():
    # a b c d a b c d: abcd bcda cdab dabc abcd -> 5 four-grams, abcd (twice) in the source: 2/5
    assert copy_rate("a b c d a b c d", ["a b c d"]) == 2 / 5


def test_a_verbatim_copy_scores_one_whatever_its_case_and_punctuation():
    assert copy_rate(ITEM["text"], [ITEM["text"]]) == 1.0
    assert copy_rate("the CAT sat -- on the mat; then it LEFT", [ITEM["text"]]) == 1.0
    # the baseline prediction copies the shown item, whole or cut to a budget
    base = retrieved_item_baseline([ITEM, {"title": "x", "text": "other words entirely here"}])
    assert copy_rate(base, [ITEM["text"]]) == 1.0 and copy_rate(" ".join(base.split()[:6]), [ITEM["text"]]) == 1.0
    assert longest_copied_span(base, [ITEM["text"]]) == 11      # the cat sat on the mat then it left for good


def test_short_and_empty_generations_and_no_sources():
    assert copy_rate("the cat sat", [ITEM["text"]]) == 0.0         # 3 words < 4: no four-gram
    assert copy_rate("", [ITEM["text"]]) == 0.0 and copy_rate("?!", [ITEM["text"]]) == 0.0
    assert copy_rate(ITEM["text"], []) == 0.0
    assert longest_copied_span("the cat sat", [ITEM["text"]]) == 3   # the short copy is still seen
    assert longest_copied_span("", [ITEM["text"]]) == 0 and longest_copied_span(ITEM["text"], []) == 0


def test_longest_copied_span_by_hand():
    # "sat on the mat" is the longest run of the generation found in the source (4 words)
    assert longest_copied_span("a dog sat on the mat and the cat", [ITEM["text"]]) == 4
    assert longest_copied_span("a b c d", ["a b", "c d"]) == 2       # a run does not join two sources
    assert longest_copied_span("b a", ["a b"]) == 1                  # order counts
    assert longest_copied_span("x y z", ["a b"]) == 0
    assert longest_copied_span("a a a a", ["a a x a a a"]) == 3      # the longest of several matches


def test_independent_of_source_order():
    gen = "then it left for good, the cat sat on the mat. And the dog sat on the rug"
    sources = [ITEM["text"], "the dog sat on the rug", "nothing in common"]
    rates = {copy_rate(gen, list(p)) for p in itertools.permutations(sources)}
    spans = {longest_copied_span(gen, list(p)) for p in itertools.permutations(sources)}
    # 18 words -> 15 four-grams; in a source: then it left for, it left for good, the cat sat on,
    # cat sat on the, sat on the mat (ITEM), the dog sat on, dog sat on the, sat on the rug -> 8/15.
    # Longest run: "the cat sat on the mat" (ITEM) and "the dog sat on the rug" (6 words each).
    assert rates == {8 / 15} and spans == {6}


def test_retrieved_item_baseline():
    assert retrieved_item_baseline([ITEM]) == ITEM["text"]
    assert retrieved_item_baseline([{"summary": "s", "content": "c"}], field="content") == "c"
    rendered = '"Re: lunch" is the title for "The cat"'          # a str is taken as the text itself
    assert retrieved_item_baseline([rendered, ITEM]) == rendered
    assert retrieved_item_baseline([]) == ""


def test_user_errors():
    with pytest.raises(ValueError, match="sources must be a list"):
        copy_rate("a b c d", "a b c d")
    with pytest.raises(ValueError, match="sources must be a list"):
        longest_copied_span("a b", [ITEM])
    with pytest.raises(ValueError, match="generation must be a str"):
        copy_rate(None, ["a"])
    with pytest.raises(ValueError, match="n must be >= 1"):
        copy_rate("a b", ["a b"], n=0)
    with pytest.raises(ValueError, match="no text field 'content'"):
        retrieved_item_baseline([ITEM], field="content")
    with pytest.raises(ValueError, match="must be a list"):
        retrieved_item_baseline(ITEM)
