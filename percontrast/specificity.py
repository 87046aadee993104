"""User-specific gold tokens: a personal-token set that no model and no method defines.

``likelihood.personal_positions`` marks the gold tokens to which the untrained model gives PIR
> 0.8, PerCE's own clip floor, so a gain there is what PerCE's reweighting optimizes. This
module marks instead the gold tokens whose word is *specific to the record's user* against the
other evaluated users, from the profile texts alone:

* Words: lower-cased ``\\w+`` runs (``degeneration.words``), counted per user over that user's
  distinct profile items (deduplicated by their normalized words, as ``attribution`` does: one
  item sits in the profiles of many records of a user). Only the ``profile_fields`` of items
  count (default ``("text",)``, the field that is the same kind of text as a gold output; pass
  ``(task.text_field,)`` for other tasks). Gold outputs are never counted: they are what is
  evaluated, and an item that copies one of them (``attribution``'s 13-word rule) is dropped.
* Specific word: Monroe, Colaresi & Quinn 2008 ("Fightin' Words", Political Analysis 16(4)),
  the log-odds ratio delta of user u against the other users pooled, with an informative
  Dirichlet prior a_w = a0 * (pooled count of w) / N, N the pooled count of all words, and its
  z = delta / sd (``log_odds_z``). The word is specific to u when z > ``Z_MIN`` (1.96), delta >
  ``DELTA_MIN`` (log 2) and u's profile has it at least ``MIN_COUNT`` (2) times. Defaults:

  - a0 = N / U, U the users with profile words (``prior_mass=None``): the prior weighs as much
    as one average user's profile, so it never outweighs a user's own evidence. a0 = N (the
    pooled counts as they are) outweighs a user U-fold: with 3 users of equal size, a word one
    of them writes in each of their 6 items and the others never gets z 1.83, not specific
    (2.27 with N / U; tests/test_specificity.py). More figures below.
  - z > 1.96, one-sided: only words u uses more than the others are u's. Not corrected for the
    many words tested: the label is descriptive (which words are u's habits), and the prior
    already shrinks rare words.
  - delta > log 2: u's (smoothed) odds of the word at least twice the others'. z alone also
    passes function words whose rate differs a little over much text (SOTU: "the", "of", "to",
    "our" for some presidents); they mark many gold tokens and say little about the user.
  - ``MIN_COUNT`` 2: one use is one event, not a habit (with these U a single use does not
    reach z 1.96 anyway; a guard for a smaller prior or fewer users).

  Chosen on the validation splits (users neither trained nor tested), against the share of
  each user's gold words in their own specific set ("own") and, as the null, the mean share in
  another user's set ("other"); own / other = lift. email-short/val (7 users) / sotu-short/val
  (4 users): this choice own 0.050 / 0.032, lift 4.9 / 2.9; without the delta floor 0.089 /
  0.133, lift 4.0 / 1.8; a0 = N 0.024 / 0.073, lift 7.5 / 1.9; a0 = N with the floor 0.013 /
  0.004, lift 21 / 7.8 (3 / 6 words per user: too few gold tokens to measure NLL on).

* Gold tokens (``specific_positions``): a token position is specific when its text overlaps a
  specific word of the record's user; a token that is part of a word counts when the word is
  specific (``" gad"`` of ``"gadzooks"``), and a leading space rides along with its word. Char
  spans come from concatenating the row's per-token decoded strings (``tokens``) and aligning
  that with the record's gold output (``_token_spans``): byte-level BPE tokens decoded alone
  give U+FFFD for the pieces of a split multibyte character; such a run is matched to the
  non-ASCII characters it stands for, and every token in it gets that whole run's span. An
  end token that is not in the output (``<|im_end|>``) gets no span.

The result has the shape of ``likelihood.personal_positions``, so ``example_likelihood`` takes
it as its ``specific`` set; ``overlap`` counts how the two sets cross.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Mapping, Sequence

from .attribution import CopyIndex, item_text
from .degeneration import words

Z_MIN = 1.96
DELTA_MIN = math.log(2)
MIN_COUNT = 2
_WORD = re.compile(r"\w+")
_BAD = "\ufffd"
_NON_ASCII_RUN = "([^\\x00-\\x7f]+?)"   # what a U+FFFD run stands for: bytes >= 0x80 are never ASCII


# ----------------------------------------------------------------------------- the statistic
def log_odds_z(y_u: float, n_u: float, y_o: float, n_o: float, a_w: float, a0: float) -> tuple[float, float]:
    """(delta, z) of one word: user u's log-odds minus the others', with prior a_w (prior mass a0).

    delta = log((y_u + a_w) / (n_u + a0 - y_u - a_w)) - log((y_o + a_w) / (n_o + a0 - y_o - a_w))
    var   = 1 / (y_u + a_w) + 1 / (y_o + a_w),   z = delta / sqrt(var)
    (Monroe, Colaresi & Quinn 2008). y: the word's count, n: all words' count."""
    if not 0 < a_w < a0:
        raise ValueError(f"the prior needs 0 < a_w < a0, got a_w={a_w}, a0={a0}")
    delta = (math.log((y_u + a_w) / (n_u + a0 - y_u - a_w))
             - math.log((y_o + a_w) / (n_o + a0 - y_o - a_w)))
    return delta, delta / math.sqrt(1 / (y_u + a_w) + 1 / (y_o + a_w))


def profile_word_counts(records: Sequence[dict], profile_fields: Sequence[str] = ("text",), *,
                        user_field: str = "user_id") -> tuple[dict[str, Counter], int]:
    """(user -> word counts over the user's distinct profile items, items dropped as copies of a
    gold output). The records' outputs are only used to drop such copies, never counted."""
    fields = tuple(profile_fields)
    if not fields:
        raise ValueError("profile_fields is empty: name the profile item fields to count, e.g. ('text',)")
    golds = CopyIndex(r.get("output") or "" for r in records)
    seen: dict[str, set[str]] = {}
    counts: dict[str, Counter] = {}
    dropped = 0
    for r in records:
        user = r.get(user_field)
        if user is None:
            raise ValueError(f"record {r.get('id')!r} has no {user_field!r}: specificity needs the author "
                             f"of every record (pass user_field= if it is named otherwise)")
        mine, c = seen.setdefault(str(user), set()), counts.setdefault(str(user), Counter())
        for item in r.get("profile") or []:
            text = item_text(item, fields) if isinstance(item, dict) else ""
            ws = words(text)
            key = " ".join(ws)
            if not key or key in mine:
                continue
            mine.add(key)
            if golds.hit(text):
                dropped += 1
            else:
                c.update(ws)
    return counts, dropped


def word_log_odds(counts: Mapping[str, Counter], *, min_count: int = MIN_COUNT,
                  prior_mass: float | None = None) -> dict[str, dict[str, tuple[float, float]]]:
    """user -> {word: (delta, z) of u against the other users pooled} for the words u uses >=
    min_count times; prior a_w = a0 * pooled_w / N with a0 = ``prior_mass`` (None: N / U, U the
    users with profile words)."""
    pooled: Counter = Counter()
    for c in counts.values():
        pooled.update(c)
    total = sum(pooled.values())
    users = sum(1 for c in counts.values() if c)
    if users < 2:
        raise ValueError("specific words need profile words of at least 2 users (check profile_fields "
                         "and user_field)")
    a0 = float(total / users if prior_mass is None else prior_mass)
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for u in sorted(counts):
        n_u = sum(counts[u].values())
        out[u] = {w: log_odds_z(y, n_u, pooled[w] - y, total - n_u, a0 * pooled[w] / total, a0)
                  for w, y in sorted(counts[u].items()) if y >= min_count}
    return out


def specific_words(records: Sequence[dict], profile_fields: Sequence[str] = ("text",), *,
                   user_field: str = "user_id", z_min: float = Z_MIN, delta_min: float = DELTA_MIN,
                   min_count: int = MIN_COUNT, prior_mass: float | None = None) -> dict[str, set[str]]:
    """user -> the words specific to that user (z > z_min, delta > delta_min, used >= min_count
    times in the profile), from the profile items of ``records`` (the evaluated records)."""
    counts, _ = profile_word_counts(records, profile_fields, user_field=user_field)
    scores = word_log_odds(counts, min_count=min_count, prior_mass=prior_mass)
    return {u: {w for w, (d, z) in scores[u].items() if z > z_min and d > delta_min} for u in counts}


# ----------------------------------------------------------------------------- gold tokens
def _token_spans(tokens: Sequence[str], text: str, *, loose: bool) -> list[tuple[int, int] | None] | None:
    """Char span in ``text`` of each token (None: no char), or None when the tokens do not spell a
    prefix of ``text``. A U+FFFD run (across tokens too) matches one or more non-ASCII chars, and
    each of its chars maps to the whole run; ``loose`` lets whitespace sit between tokens (decoders
    that drop a token's leading space when it is decoded alone)."""
    # atoms: [is a U+FFFD run, text] in concatenation order; a run that crosses tokens stays one atom
    atoms: list[list] = []
    pos, starts = 0, []
    for t in tokens:
        starts.append(pos)
        for piece in re.findall(f"{_BAD}+|[^{_BAD}]+", t):
            bad = piece[0] == _BAD
            if bad and atoms and atoms[-1][0]:      # the previous token ended in U+FFFD: same run
                atoms[-1][1] += piece
            else:
                atoms.append([bad, piece])
            pos += len(piece)
    sep = r"\s*?" if loose else ""
    pattern = sep.join(_NON_ASCII_RUN if bad else f"({re.escape(s)})" for bad, s in atoms)
    m = re.match(pattern, text)
    if m is None:
        return None
    # concat char -> (start, end) in text
    char_map: list[tuple[int, int]] = []
    for g, (bad, s) in enumerate(atoms, start=1):
        a, b = m.span(g)
        char_map.extend([(a, b)] * len(s) if bad else [(a + i, a + i + 1) for i in range(len(s))])
    return [(char_map[s][0], char_map[s + len(t) - 1][1]) if t else None for s, t in zip(starts, tokens)]


def _concat_spans(tokens: Sequence[str]) -> list[tuple[int, int] | None]:
    spans, pos = [], 0
    for t in tokens:
        spans.append((pos, pos + len(t)) if t else None)
        pos += len(t)
    return spans


def align_tokens(tokens: Sequence[str], text: str) -> tuple[list[tuple[int, int] | None], str, bool]:
    """(spans, the text they index, aligned). Tried in turn: all tokens, then all but the last
    (an end token that is not in the text); first as they are (U+FFFD runs matched to non-ASCII
    chars), then letting whitespace sit between tokens. When none spells a prefix of ``text``
    the spans index the concatenation itself (aligned False): its U+FFFD then split words, so a
    split word is missed, but nothing crashes."""
    for loose in (False, True):
        for n in (len(tokens), len(tokens) - 1):
            if n <= 0:
                continue
            if not loose and text.startswith("".join(tokens[:n])):   # every token decoded to itself
                spans = _concat_spans(tokens[:n])
            else:
                spans = _token_spans(tokens[:n], text, loose=loose)
            if spans is not None:
                return spans + [None] * (len(tokens) - n), text, True
    return _concat_spans(tokens), "".join(tokens), False


def specific_positions(rows: Sequence[dict], records: Sequence[dict], *, specific: Mapping[str, set[str]] | None = None,
                       user_field: str = "user_id", **word_options) -> dict[str, dict]:
    """Per example id: the gold-token positions whose text overlaps a word specific to the
    record's user, and the token ids they index (``personal_positions``' shape), plus ``words``
    (the specific words found, sorted) and ``aligned`` (the tokens spelled the gold output).

    ``rows``: ``score_records`` rows (``id``, ``tokens``, ``token_ids``); ``records``: the
    evaluated records (their users, and profiles for ``specific_words`` when ``specific`` is not
    given; ``word_options`` go there)."""
    if specific is None:
        specific = specific_words(records, user_field=user_field, **word_options)
    by_id = {str(r["id"]): r for r in records}
    out = {}
    for row in rows:
        rec = by_id.get(str(row["id"]))
        if rec is None:
            raise ValueError(f"row {row['id']!r} has no record among those given (pass the evaluated records)")
        if len(row["tokens"]) != len(row["token_ids"]):
            raise ValueError(f"row {row['id']!r}: {len(row['tokens'])} tokens but {len(row['token_ids'])} token ids")
        mine = specific.get(str(rec[user_field]), set())
        spans, text, aligned = align_tokens(row["tokens"], rec.get("output") or "")
        # \w+ runs of the text as it stands, lower-cased one by one, so their spans index ``text``
        hits = [(m.start(), m.end(), m.group().lower()) for m in _WORD.finditer(text)
                if m.group().lower() in mine]
        positions, found = [], set()
        for i, span in enumerate(spans):
            if span is None:
                continue
            ws = {w for a, b, w in hits if span[0] < b and a < span[1]}
            if ws:
                positions.append(i)
                found |= ws
        out[str(row["id"])] = {"positions": positions, "token_ids": list(row["token_ids"]),
                               "words": sorted(found), "aligned": aligned}
    return out


def overlap(personal: Mapping[str, dict], specific: Mapping[str, dict]) -> dict:
    """How two token sets of the same gold tokens cross: counts of token positions in both, in the
    PIR set only, in the specific set only, in neither, with each set's share of all tokens."""
    if set(personal) != set(specific):
        raise ValueError(f"the two sets cover different examples ({len(set(personal) ^ set(specific))} "
                         "ids in one only); build both from the same rows")
    c = Counter()
    for id_ in sorted(personal):
        p, s = personal[id_], specific[id_]
        if list(p["token_ids"]) != list(s["token_ids"]):
            raise ValueError(f"example {id_}: the two sets index different gold tokens")
        pp, ss, n = set(p["positions"]), set(s["positions"]), len(p["token_ids"])
        c["both"] += len(pp & ss)
        c["only_pir"] += len(pp - ss)
        c["only_specific"] += len(ss - pp)
        c["neither"] += n - len(pp | ss)
        c["tokens"] += n
    n = c["tokens"]
    union = c["both"] + c["only_pir"] + c["only_specific"]
    return {"examples": len(personal), "tokens": n, "both": c["both"], "only_pir": c["only_pir"],
            "only_specific": c["only_specific"], "neither": c["neither"],
            "share_pir": (c["both"] + c["only_pir"]) / n if n else math.nan,
            "share_specific": (c["both"] + c["only_specific"]) / n if n else math.nan,
            "jaccard": c["both"] / union if union else math.nan}
