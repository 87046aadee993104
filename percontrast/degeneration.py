"""Degeneration of generated text, measured per generation: did it run to the length cap, and
does it contain a repetition loop.

Words: the lower-cased ``\\w+`` runs of the text (``"Cheers, Maria!"`` -> ``cheers maria``);
punctuation, whitespace and case never count. Every measure below is over these words.

Per generation (``degeneration_flags``):

* ``hit_cap``: the generator stopped at ``max_new_tokens`` instead of at an end token
  (``ended`` is the generator's own report; this module cannot see tokens).
* ``loop``: a consecutive repetition, the failure of greedy decoding (Holtzman et al. 2020,
  "The Curious Case of Neural Text Degeneration", count generations that end in a repetition
  loop; Xu et al. 2022, "Learning to Break the Loop", consecutive sentence-level repetition).
  Precisely: some span of ``p >= 1`` words is said at least ``LOOP_MIN_COPIES`` (3) times in a
  row, i.e. there is a stretch of ``L`` consecutive words with ``w[j] == w[j - p]`` for every
  word after its first ``p``, with ``L >= 3p``, and the stretch is at least ``LOOP_MIN_WORDS``
  (8) words long (so "ha ha ha" or "no, no, no" is not a loop; a greedy loop of any unit passes
  both bounds within a few repetitions). It can be anywhere in the text, so a loop that the
  model left before its end token counts too. Why three copies and not two: measured on human
  text, the gold outputs of ``data/email-short`` and ``data/sotu`` (all splits, 2,987 texts),
  "two copies and >= 8 words" fires on 14 (0.47%: rhetoric such as "for the first time since
  the dawn of the nuclear age" said twice, repeated command lines in emails); "three copies"
  fires on 2 (0.07%: a URL full of ``%20`` escapes, and "and they dug, and they dug, and they
  dug"). The price: a unit longer than a third of the generation cannot show three copies
  before the cap; such generations show up in ``hit_cap`` and ``seq_rep_4``. Loops made only
  of punctuation or emoji have no words and are not seen here (``hit_cap`` sees them when they
  run to the cap).
* ``seq_rep_n`` (n = 2, 4): Welleck et al. 2020 ("Neural Text Generation with Unlikelihood
  Training", ICLR; arXiv 2019) seq-rep-n = 1 - |unique n-grams| / |n-grams| of the generation;
  0.0 when it has fewer than n words. Continuous, so it also sees a repeated phrase that is not
  a loop (the demo's "Cheers, Maria, team dinner at the local bistro. Cheers, Maria": no loop,
  seq-rep-2 = 1/9, seq-rep-4 = 0).

Per arm: ``degeneration_summary`` (shares and means of the flags) and ``distinct_n`` (Li et
al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models":
distinct n-grams / all n-grams, pooled over the arm's generations, so it also falls when
different examples get the same text).

Pure functions of strings and booleans; no model, no tokenizer.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

LOOP_MIN_COPIES = 3
LOOP_MIN_WORDS = 8
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The lower-cased ``\\w+`` runs of ``text``: the unit of every measure here."""
    return _WORD.findall(text.lower())


def _ngrams(ws: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]


def seq_rep_n(ws: Sequence[str], n: int) -> float:
    """Welleck et al.'s seq-rep-n: 1 - unique n-grams / n-grams; 0.0 with no n-gram."""
    grams = _ngrams(ws, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def find_loop(ws: Sequence[str], min_copies: int = LOOP_MIN_COPIES,
              min_words: int = LOOP_MIN_WORDS) -> dict | None:
    """The loop of the shortest period in ``ws`` (see the module docstring), or None.

    Returns ``{"period": p, "start": j, "words": L, "copies": L / p, "unit": "w w w"}`` for the
    longest qualifying stretch of the smallest period p that has one.
    """
    n = len(ws)
    if n < max(min_copies, min_words):
        return None
    ids = {}
    a = np.fromiter((ids.setdefault(w, len(ids)) for w in ws), dtype=np.int64, count=n)
    for p in range(1, n // 2 + 1):
        eq = a[p:] == a[:-p]            # eq[i]: w[i + p] == w[i]; a run of r Trues = a stretch of r + p words
        if not eq.any():
            continue
        # longest run of True: positions where a run starts and ends
        padded = np.concatenate(([False], eq, [False]))
        edges = np.flatnonzero(padded[1:] != padded[:-1])
        starts, ends = edges[0::2], edges[1::2]
        runs = ends - starts
        best = int(np.argmax(runs))
        r = int(runs[best])
        if r + p >= min_copies * p and r + p >= min_words:
            j = int(starts[best])
            return {"period": p, "start": j, "words": r + p, "copies": (r + p) / p,
                    "unit": " ".join(ws[j:j + p])}
    return None


def degeneration_flags(text: str, ended: bool) -> dict:
    """One generation's flags. ``ended``: True when the generator stopped at an end token,
    False when it stopped at ``max_new_tokens``.

    ``{"hit_cap", "loop", "empty", "n_words", "seq_rep_2", "seq_rep_4", "loop_period",
    "loop_words", "loop_unit"}`` (the last three None without a loop).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    ws = words(text)
    loop = find_loop(ws)
    return {"hit_cap": not bool(ended), "loop": loop is not None, "empty": not ws, "n_words": len(ws),
            "seq_rep_2": seq_rep_n(ws, 2), "seq_rep_4": seq_rep_n(ws, 4),
            "loop_period": loop["period"] if loop else None, "loop_words": loop["words"] if loop else None,
            "loop_unit": loop["unit"] if loop else None}


def degeneration_summary(flags: Sequence[dict], texts: Iterable[str] | None = None) -> dict:
    """Shares and means over one arm's ``degeneration_flags``.

    ``hit_cap``, ``loop``, ``loop_and_cap`` (a loop that ran into the cap: the classic greedy
    failure), ``hit_cap_or_loop``, ``empty``: shares of generations. ``seq_rep_2``,
    ``seq_rep_4``, ``n_words``: means. With ``texts`` (the same generations), also
    ``distinct_1`` and ``distinct_2`` pooled over them. An empty list gives n = 0 and None
    everywhere else.
    """
    flags = list(flags)
    n = len(flags)
    out: dict = {"n": n}

    def share(pred) -> float | None:
        return sum(1 for f in flags if pred(f)) / n if n else None

    def mean(key) -> float | None:
        return sum(f[key] for f in flags) / n if n else None

    out["hit_cap"] = share(lambda f: f["hit_cap"])
    out["loop"] = share(lambda f: f["loop"])
    out["loop_and_cap"] = share(lambda f: f["loop"] and f["hit_cap"])
    out["hit_cap_or_loop"] = share(lambda f: f["loop"] or f["hit_cap"])
    out["empty"] = share(lambda f: f["empty"])
    for key in ("seq_rep_2", "seq_rep_4", "n_words"):
        out[key] = mean(key)
    if texts is not None:
        texts = list(texts)
        if len(texts) != n:
            raise ValueError(f"{len(texts)} texts for {n} flags: pass the same generations")
        out["distinct_1"] = distinct_n(texts, 1)
        out["distinct_2"] = distinct_n(texts, 2)
    return out


def distinct_n(texts: Iterable[str], n: int) -> float | None:
    """Li et al.'s distinct-n over a set of generations: distinct n-grams / all n-grams, pooled
    (n-grams never span two texts). None when the texts have no n-gram at all."""
    total, seen = 0, set()
    for t in texts:
        grams = _ngrams(words(t), n)
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else None
