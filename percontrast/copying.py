"""Copying from the prompt: how much of a generation is said word for word in the profile items
its prompt showed, and the "copy the retrieved item" baseline.

Words are those of ``degeneration.words`` (lower-cased ``\\w+`` runs), so case, punctuation and
whitespace never count; ``sources`` are the texts of the items shown in the prompt.

* ``copy_rate(generation, sources, n=4)``: the share of the generation's word n-grams (counted
  with their repeats) that occur in some source. Why n = 4: the user's own new text, which does
  not copy, should score about 0 against the item retrieved for it, and a verbatim copy scores 1.
  Measured on the test splits' gold outputs against the one item BM25 retrieves for each (k = 1;
  ``data/email-short`` / ``data/sotu-short``, 155 / 160 texts), the mean copy rate is 0.193 /
  0.319 at n = 1, 0.016 / 0.033 at n = 2 (shared common phrases), 0.006 / 0.001 at n = 3, 0.004 /
  0.000 at n = 4 (the largest single value 0.33: an email that quotes a 12-word run). n = 3 is
  nearly as quiet; 4 keeps a margin and is the usual length of a "copied phrase".
  A generation with fewer than n words has no n-gram and scores 0.0 (as
  ``degeneration.seq_rep_n``); ``longest_copied_span`` still sees what such a text copies.
* ``longest_copied_span(generation, sources)``: the most consecutive generation words found
  verbatim, in the same order, in one source (0 for no word in common).
* ``retrieved_item_baseline(shown_items)``: the first shown item's text, the prediction of a
  model that copies its retrieved item; the caller cuts it to the generation budget (e.g. the
  tokens of ``max_new_tokens``) so that it competes on the generations' terms.

Pure functions of strings; no model, no tokenizer.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from .degeneration import words

COPY_NGRAM = 4


def _check(generation: str, sources: Sequence[str]) -> None:
    if not isinstance(generation, str):
        raise ValueError(f"generation must be a str, got {type(generation).__name__}")
    if isinstance(sources, str) or not all(isinstance(s, str) for s in sources):
        raise ValueError("sources must be a list of texts (str), e.g. [item['text'] for item in shown_items]")


def copy_rate(generation: str, sources: Sequence[str], n: int = COPY_NGRAM) -> float:
    """Share of ``generation``'s word n-grams that occur in any of ``sources``; 0.0 when it has
    fewer than ``n`` words (or there are no sources)."""
    _check(generation, sources)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ws = words(generation)
    grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
    if not grams:
        return 0.0
    seen = set()
    for s in sources:
        sw = words(s)
        seen.update(tuple(sw[i:i + n]) for i in range(len(sw) - n + 1))
    return sum(g in seen for g in grams) / len(grams)


def longest_copied_span(generation: str, sources: Sequence[str]) -> int:
    """The most consecutive words of ``generation`` that occur verbatim (consecutive, in order)
    in one of ``sources``."""
    _check(generation, sources)
    gen = words(generation)
    best = 0
    for s in sources:
        at = defaultdict(list)               # word -> its positions in the source
        for j, w in enumerate(words(s)):
            at[w].append(j)
        run: dict[int, int] = {}             # source position j -> length of the match ending at (word, j)
        for w in gen:
            run = {j: run.get(j - 1, 0) + 1 for j in at.get(w, ())}
            if run:
                best = max(best, max(run.values()))
    return best


def retrieved_item_baseline(shown_items: Sequence[dict | str], field: str = "text") -> str:
    """The text of the first item shown in the prompt (``item[field]``; a str is the text
    itself), "" when none was shown. Not cut: the caller cuts it to the generation budget."""
    if isinstance(shown_items, (str, dict)):
        raise ValueError("shown_items must be a list of the items shown in the prompt (dicts or texts)")
    if not shown_items:
        return ""
    first = shown_items[0]
    if isinstance(first, str):
        return first
    if not isinstance(first, dict) or not isinstance(first.get(field), str):
        raise ValueError(f"the first shown item has no text field {field!r}: pass field= (the task's text field)")
    return first[field]
