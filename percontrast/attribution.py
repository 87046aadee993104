"""Who wrote it: author attribution of generated text, a metric that sees personalization.

A standard authorship-attribution classifier is trained on the profile texts of the users being
evaluated, and nothing else. A generation counts as personalized, in this metric's sense, when
the classifier attributes it to the user it was written for. ``attribution_share`` gives that
share for any list of texts; ``gold_ceiling`` gives it for the users' own gold responses (what
the users' real text scores: a reference point, not a bound, since a generation that copies a
profile item can score higher); chance is what a text-blind guess scores.

The classifier (``fit_attributor``), fixed before any model output was seen:

* Features: TF-IDF of character n-grams, ``TfidfVectorizer(analyzer="char_wb",
  ngram_range=(2, 4), sublinear_tf=True, lowercase=False)``, computed as its two steps
  (``CountVectorizer`` counts, then ``TfidfTransformer``) with the count matrix's indices sorted
  in between: the same values, but in a canonical order, so that a refit on a subset of the items
  sees bit for bit the sub-block of the full count matrix (the leave-shown-out refits below rest
  on that; the plain vectorizer orders each row by first appearance in the corpus, which moves
  when items are left out and changes the last bits of the fit). Character n-grams are the most
  robust single feature family for authorship (Stamatatos 2009, "A survey of modern authorship
  attribution methods"); they carry spelling, punctuation, casing, function words and signatures,
  and also topic. ``char_wb`` builds n-grams inside word boundaries (padded with a space), so
  they do not depend on how two words are joined. Case is kept: it is style.
* Model: a one-vs-rest linear SVM, ``LinearSVC(C=1.0, class_weight="balanced",
  random_state=0)``, the baseline of the PAN shared tasks on authorship attribution (character
  n-grams + linear SVM; Kestemont et al. 2018, 2019). ``balanced`` weights each user by the
  inverse of their number of profile items, so a user with many items is not predicted by
  default.
* Chosen on the validation splits (users that are neither trained on nor tested): gold share
  on ``data/email-short/val.jsonl`` (7 users) / ``data/sotu/val.jsonl`` (4 users): this choice
  0.652 / 0.825; without ``balanced`` 0.640 / 0.787; ``char_wb`` 1-4 0.663 / 0.819; ``char``
  1-4 0.663 / 0.787; ``char`` 3-5 0.618 / 0.794; logistic regression (C=10, balanced) 0.674 /
  0.825 but 5-10x slower; title + text as the training text 0.652 / 0.831. The leaders differ by
  one or two examples of 89 / 160, i.e. not at all; among them the PAN baseline was kept.
  ``class_weight="balanced"`` was the one choice that helped on both splits.
* Training texts: each profile item's ``profile_fields`` joined by a newline; by default
  ``("text",)``, the field that is the same kind of text as a generation (an email body, a
  speech paragraph). Pass ``(task.text_field,)`` for other tasks. Items are deduplicated per
  user (the same item sits in the profiles of many records of one user).
* No gold output of the evaluated records is trained on: an item is dropped when it copies
  any of their outputs by the rule of ``datasets/splits.py`` (lower-cased ``\\w+`` words;
  a shared 13-word n-gram, or, for an output under 13 words, the whole output inside the item).
  The user split already keeps test outputs out of test profiles, so on ``data/email-short``
  and ``data/sotu`` this drops nothing; records from elsewhere (LongLaMP, a temporal split, a
  user's own file) may need it.
* Deterministic: items sorted by (user, normalized text) before training, a fixed ``random_state``; the
  same records in any order give the same classifier.

Chance: a text-blind classifier (one that never looks at the text, constant or random) scores
at most the share of the most frequent user among the evaluated examples, ``chance_majority``;
that is the ``chance`` reported, because the evaluated users are often unbalanced (email test:
one sender has 40 of 155 examples, 0.258, against 1/14 = 0.071). ``chance_uniform`` = 1 / the
number of users the classifier knows, the chance of a balanced set. ``share_macro`` (the mean
over evaluated users of each user's own share) has chance 1 / the number of evaluated users
(``chance_macro``) whatever the balance.

Leave shown out (``fit_leave_shown_out``). The classifier above is trained on every profile
item, the items retrieved into the prompts included; a generation that copies its retrieved
item then meets that item's own training vector and is credited to its user more surely than
the user's real text is (profile-contrastive decoding at alpha 2 scored 100%, above the gold
share). The leave-shown-out classifier of example i is a full refit (vocabulary, idf and SVM)
without the items shown in example i's prompt, so a copy of them earns only what the rest of the
user's profile says about its style. One classifier is fitted per distinct excluded set
(examples that showed the same items share one); see ``fit_leave_shown_out`` for the matching
rule and the cost. ``attribution_share`` and ``gold_ceiling`` take it in place of an
``Attributor``: the gold share under the same classifiers is the reference for generations.
Measured on ``data/email-short`` test (BM25, k = 1): the retrieved item itself, cut to the
64-word output budget, scores 1.000 with the all-items classifier and 0.626 left out; the gold
outputs 0.626 and 0.548. A copy still beats the gold text left out (it is the user's real
writing too), so the copy baseline (``copying.retrieved_item_baseline``) belongs beside the
gold share in a report.
"""
from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

LEAK_NGRAM = 13                     # as datasets/splits.py: a shared 13-word run is a copy
SHOWN_PREFIX_WORDS = 4              # leave-shown-out: an item's opening run that marks it as shown
_WORD = re.compile(r"\w+")


def _norm_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class CopyIndex:
    """Index of texts that must not be trained on: their 13-word n-grams, and the shorter ones whole.
    Same rule as ``datasets.splits._HeldOut`` (the library cannot import the datasets layer)."""

    def __init__(self, texts: Iterable[str], n: int = LEAK_NGRAM):
        self.n, self.grams, self.short = n, set(), []
        for t in texts:
            ws = _norm_words(t)
            if len(ws) >= n:
                self.grams.update(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))
            elif ws:
                self.short.append(" " + " ".join(ws) + " ")

    def hit(self, text: str) -> bool:
        ws = _norm_words(text)
        if self.grams and any(tuple(ws[i:i + self.n]) in self.grams for i in range(len(ws) - self.n + 1)):
            return True
        joined = " " + " ".join(ws) + " "
        return any(s in joined for s in self.short)


def _new_counter():
    from sklearn.feature_extraction.text import CountVectorizer
    return CountVectorizer(analyzer="char_wb", ngram_range=(2, 4), lowercase=False, dtype=np.float64)


class _Features:
    """Char n-gram TF-IDF: ``counter`` (fitted on all training items) counts, ``cols`` keeps the
    n-grams of the items this classifier was fitted on (sorted column ids), ``tfidf`` weights."""

    def __init__(self, counter, cols: np.ndarray, tfidf):
        self.counter, self.cols, self.tfidf = counter, cols, tfidf

    def transform(self, texts: Sequence[str]):
        C = self.counter.transform(texts)[:, self.cols]
        C.sort_indices()
        return self.tfidf.transform(C)

    @property
    def vocabulary_(self) -> dict[str, int]:
        names = self.counter.get_feature_names_out()[self.cols]
        return {str(t): j for j, t in enumerate(names)}


def _fit_rows(counts, rows: np.ndarray, labels: Sequence[str], seed: int) -> tuple[np.ndarray, Any, Any]:
    """Fit TF-IDF and the SVM on rows ``rows`` of ``counts`` (a sorted count matrix) alone: the
    n-grams none of them has are dropped, as a vectorizer fitted on them would. Returns the kept
    columns, the TF-IDF weighting and the SVM."""
    from sklearn.feature_extraction.text import TfidfTransformer
    from sklearn.svm import LinearSVC

    C = counts[rows]
    cols = np.flatnonzero(np.bincount(C.indices, minlength=C.shape[1]))
    C = C[:, cols]
    C.sort_indices()
    tfidf = TfidfTransformer(sublinear_tf=True)
    X = tfidf.fit_transform(C)
    model = LinearSVC(C=1.0, class_weight="balanced", random_state=seed, max_iter=10000)
    model.fit(X, [labels[r] for r in rows])
    return cols, tfidf, model


def _fit_many(counts, row_sets: list[np.ndarray], labels: Sequence[str], seed: int) -> list:
    return [_fit_rows(counts, rows, labels, seed) for rows in row_sets]


@dataclass
class Attributor:
    """A fitted classifier. ``users``: the labels it can predict (sorted); ``known_users``: every
    user of the records it was fitted on (a user whose items were all dropped is known but never
    predicted); ``n_items``: training items per user; ``dropped_copies``: items dropped because
    they copy an evaluated gold output."""
    vectorizer: Any
    model: Any
    users: tuple[str, ...]
    known_users: tuple[str, ...]
    n_items: dict[str, int]
    dropped_copies: int
    profile_fields: tuple[str, ...]
    settings: dict = field(default_factory=dict)

    def predict(self, texts: Sequence[str | None]) -> list[str | None]:
        """The predicted user of each text; None (not attributed) for an empty text or one with no
        character n-gram the classifier has seen, whose prediction would not depend on the text."""
        texts = [t if isinstance(t, str) else "" for t in texts]
        out: list[str | None] = [None] * len(texts)
        idx = [i for i, t in enumerate(texts) if t.strip()]
        if not idx:
            return out
        X = self.vectorizer.transform([texts[i] for i in idx])
        seen = X.getnnz(axis=1) > 0
        keep = [i for i, s in zip(idx, seen) if s]
        if keep:
            rows = [k for k, s in enumerate(seen) if s]
            for i, label in zip(keep, self.model.predict(X[rows])):
                out[i] = str(label)
        return out


def item_text(item: dict, fields: Sequence[str]) -> str:
    """A profile item's ``fields`` that hold text, joined by newlines (what attribution trains on)."""
    return "\n".join(str(item[f]) for f in fields if isinstance(item.get(f), (str, int, float))
                     and not isinstance(item.get(f), bool) and str(item[f]).strip())


def _settings(seed: int) -> dict:
    return {"features": "CountVectorizer(analyzer='char_wb', ngram_range=(2, 4), lowercase=False) + "
                        "TfidfTransformer(sublinear_tf=True), indices sorted (= TfidfVectorizer(analyzer="
                        "'char_wb', ngram_range=(2, 4), sublinear_tf=True, lowercase=False))",
            "model": f"LinearSVC(C=1.0, class_weight='balanced', random_state={seed}, max_iter=10000)"}


@dataclass
class _Pool:
    """Every distinct profile item of the records, and the training rows among them."""
    known_users: tuple[str, ...]
    dropped: int
    keys: tuple[str, ...]                 # normalized text of every distinct item, copies included
    texts: list[str]                      # training rows, sorted by (user, normalized text)
    labels: list[str]
    row_keys: list[str]
    counter: Any = None
    counts: Any = None                    # [rows, n-grams] sorted counts


def _pool(records: Sequence[dict], fields: tuple[str, ...], user_field: str) -> _Pool:
    if not fields:
        raise ValueError("profile_fields is empty: name the profile item fields to train on, e.g. ('text',)")
    golds = CopyIndex(r.get("output") or "" for r in records)
    # user -> {normalized text: text, or None when it copies a gold output}; one entry per distinct item
    items: dict[str, dict[str, str | None]] = {}
    for r in records:
        user = r.get(user_field)
        if user is None:
            raise ValueError(f"record {r.get('id')!r} has no {user_field!r}: attribution needs the author "
                             f"of every record (pass user_field= if it is named otherwise)")
        mine = items.setdefault(str(user), {})
        for item in r.get("profile") or []:
            text = item_text(item, fields) if isinstance(item, dict) else ""
            key = " ".join(_norm_words(text))
            if key and key not in mine:
                mine[key] = None if golds.hit(text) else text
    trainable = {u: {k: t for k, t in d.items() if t is not None} for u, d in items.items()}
    trainable = {u: d for u, d in trainable.items() if d}
    if len(trainable) < 2:
        raise ValueError(f"attribution needs profile items of at least 2 users in fields {fields}; "
                         f"got {len(trainable)} (check profile_fields and {user_field!r})")
    pool = _Pool(known_users=tuple(sorted(items)), dropped=sum(t is None for d in items.values() for t in d.values()),
                 keys=tuple(sorted({k for d in items.values() for k in d})), texts=[], labels=[], row_keys=[])
    for u in sorted(trainable):
        for key in sorted(trainable[u]):
            pool.texts.append(trainable[u][key])
            pool.labels.append(u)
            pool.row_keys.append(key)
    pool.counter = _new_counter()
    pool.counts = pool.counter.fit_transform(pool.texts)
    pool.counts.sort_indices()
    return pool


def _attributor(pool: _Pool, rows: np.ndarray, fitted: tuple, fields: tuple[str, ...], seed: int) -> Attributor:
    cols, tfidf, model = fitted
    return Attributor(vectorizer=_Features(pool.counter, cols, tfidf), model=model,
                      users=tuple(str(c) for c in model.classes_), known_users=pool.known_users,
                      n_items=dict(Counter(pool.labels[r] for r in rows)), dropped_copies=pool.dropped,
                      profile_fields=fields, settings=_settings(seed))


def fit_attributor(records: Sequence[dict], profile_fields: Sequence[str] = ("text",), *,
                   user_field: str = "user_id", seed: int = 0) -> Attributor:
    """Train the classifier on the profile items of ``records`` (the evaluated records: their
    users are the classes, their gold outputs are never trained on). See the module docstring."""
    fields = tuple(profile_fields)
    pool = _pool(records, fields, user_field)
    rows = np.arange(len(pool.texts))
    return _attributor(pool, rows, _fit_rows(pool.counts, rows, pool.labels, seed), fields, seed)


@dataclass
class LeaveShownOut:
    """One classifier per example, fitted without the items shown in that example's prompt
    (``fit_leave_shown_out``). ``ids``: the records' ids, in the order they were fitted on (the
    order ``predict``'s texts must follow); ``excluded[i]``: the (user, normalized text) of the
    training items left out for example i; ``unmatched[i]``: the positions in ``shown[i]`` that
    matched no profile item (a sign of the wrong ``profile_fields``, or of items from elsewhere);
    ``fit_s``: seconds spent fitting."""
    ids: tuple[str, ...]
    known_users: tuple[str, ...]
    excluded: tuple[tuple[tuple[str, str], ...], ...]
    unmatched: tuple[tuple[int, ...], ...]
    profile_fields: tuple[str, ...]
    min_prefix_words: int
    dropped_copies: int
    fit_s: float
    settings: dict
    _set_of: list = field(repr=False, default_factory=list)      # example -> frozenset of left-out rows
    _by_set: dict = field(repr=False, default_factory=dict)      # frozenset -> Attributor

    @property
    def n_classifiers(self) -> int:
        return len(self._by_set)

    def attributor_for(self, i: int) -> Attributor:
        """The classifier that attributes example ``i``."""
        return self._by_set[self._set_of[i]]

    def predict(self, texts: Sequence[str | None]) -> list[str | None]:
        """``texts[i]`` attributed by example i's classifier (as ``Attributor.predict``)."""
        if len(texts) != len(self.ids):
            raise ValueError(f"{len(texts)} texts for a leave-shown-out classifier of {len(self.ids)} examples: "
                             f"pass one text per fitted record, in the records' order")
        out: list[str | None] = [None] * len(texts)
        groups: dict[frozenset, list[int]] = {}
        for i, s in enumerate(self._set_of):
            groups.setdefault(s, []).append(i)
        for s, idx in groups.items():
            for i, p in zip(idx, self._by_set[s].predict([texts[i] for i in idx])):
                out[i] = p
        return out


def _shown_words(entry: Any, fields: tuple[str, ...], where: str) -> str:
    if isinstance(entry, str):
        text = entry
    elif isinstance(entry, dict):
        text = item_text(entry, fields)
    else:
        raise ValueError(f"{where} has type {type(entry).__name__}: a shown item is its text (str) or the item (dict)")
    return " " + " ".join(_norm_words(text)) + " "


def _opening_run(words: list[str], text: str, known: int) -> int:
    """Words of the longest opening run of ``words`` that occurs in ``text`` (a space-padded
    normalized text), given that the first ``known`` do (a longer run contains every shorter one)."""
    lo, hi = known, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if " " + " ".join(words[:mid]) + " " in text:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _match_shown(keys: Iterable[str], shown: Sequence, fields: tuple[str, ...], min_prefix_words: int,
                 records: Sequence[dict]) -> tuple[list[set[str]], list[tuple[int, ...]]]:
    """For each example, the item keys (normalized texts) its ``shown`` entries match by the rule
    of ``fit_leave_shown_out``, and the positions of the entries that matched none."""
    words = {k: k.split() for k in keys}
    openings = {k: " " + " ".join(ws[:min_prefix_words]) + " " for k, ws in words.items()}
    cache: dict[str, frozenset] = {}      # the same entry is shown in many prompts

    def match(text: str) -> frozenset:
        best, rendered, whole = 0, set(), set()
        for k, o in openings.items():
            if o not in text:
                continue
            run = _opening_run(words[k], text, min(len(words[k]), min_prefix_words))
            if run == len(words[k]):
                whole.add(k)
            if run > best:
                best, rendered = run, {k}
            elif run == best:
                rendered.add(k)
        return frozenset(rendered | whole)

    out, missed_all = [], []
    for i, (r, entries) in enumerate(zip(records, shown)):
        if isinstance(entries, (str, dict)):
            raise ValueError(f"shown[{i}] is a single {type(entries).__name__}: pass a list of the items shown "
                             f"in record {r.get('id')!r}'s prompt")
        got: set[str] = set()
        missed = []
        for j, e in enumerate(entries or []):
            text = _shown_words(e, fields, f"shown[{i}][{j}]")
            if text not in cache:
                cache[text] = match(text) if text.strip() else frozenset()
            got |= cache[text]
            if not cache[text]:
                missed.append(j)
        out.append(got)
        missed_all.append(tuple(missed))
    return out, missed_all


def fit_leave_shown_out(records: Sequence[dict], shown: Sequence[Sequence[str | dict] | None],
                        profile_fields: Sequence[str] = ("text",), *, user_field: str = "user_id", seed: int = 0,
                        min_prefix_words: int = SHOWN_PREFIX_WORDS, n_jobs: int = 1) -> LeaveShownOut:
    """Classifiers that attribute example i without the profile items shown in its prompt.

    ``shown[i]``: what record i's prompt showed, a list of item dicts (read through
    ``profile_fields``, as training reads them) or of texts; ``PromptBuilder.encode``'s
    ``profile_shown`` works as it is: the rendered items after retrieval and any length cut,
    i.e. the template's words and the other fields around each item's text, and the long field
    cut to its first words when the prompt was too long. None or [] for a prompt with no profile.

    Matching rule (in the module's normalized words: lower-cased ``\\w+`` runs). Each entry of
    ``shown[i]`` is one shown item, and it shows (a) the profile item whose opening run of words
    occurs, consecutively, the furthest inside the entry, when that run has at least
    ``min_prefix_words`` words or is the whole item (all items tied on it), and (b) any item
    whose whole text occurs inside the entry. So an item shown whole, or cut to at least its
    first ``min_prefix_words`` words, is matched wherever the template puts it, under every user
    who has that text; an item cut to fewer words stays in training (those few words carry
    little of its n-grams); an item that merely opens with a phrase of the shown one is not
    matched. Measured on the test splits with the one item BM25 retrieves, rendered by
    ``profile_parts`` (``data/email-short`` / ``data/sotu-short``, 155 / 160 prompts): shown whole
    or cut to 30 words, the retrieved item is matched in every prompt and nothing else is; cut to
    8 words, 5 / 4 prompts also match items that open with the same 8 words (quoted mail headers,
    "The report of the Secretary of the Navy ..."), which costs training items and never
    credits a copy. ``unmatched`` lists the entries that match nothing. With ``profile_fields``
    of more than one field a rendered entry puts template words between the fields: pass item
    dicts then.

    Each distinct excluded set is fitted once, on the rows of the full item count matrix that
    remain (bit for bit what ``fit_attributor`` fits on the records with those items removed:
    vocabulary, idf and SVM); the items that copy a gold output stay out as there. The
    character counting is done once; the per-set cost is the TF-IDF weighting and, most of it,
    the SVM: measured, 0.04 s of CPU for the 156 items of the email test split, 0.23 s for the
    1,170 of the sotu one, 0.40 s for 547 synthetic items of 80 words. ``n_jobs`` processes fit
    sets in parallel; the classifiers do not depend on it.
    Raises ``ValueError`` when leaving an example's items out leaves fewer than 2 users.
    """
    t0 = time.perf_counter()
    fields = tuple(profile_fields)
    if len(shown) != len(records):
        raise ValueError(f"{len(shown)} shown lists for {len(records)} records: pass one list per record "
                         f"(None or [] where the prompt showed no profile)")
    if int(min_prefix_words) < 1:
        raise ValueError(f"min_prefix_words must be >= 1, got {min_prefix_words}")
    n_jobs = int(n_jobs)
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1, got {n_jobs}")
    pool = _pool(records, fields, user_field)
    shown_keys, unmatched = _match_shown(pool.keys, shown, fields, int(min_prefix_words), records)
    rows_of: dict[str, list[int]] = {}
    for x, k in enumerate(pool.row_keys):
        rows_of.setdefault(k, []).append(x)
    set_of, excluded = [], []
    for r, keys in zip(records, shown_keys):
        rows = frozenset(x for k in keys for x in rows_of.get(k, ()))
        set_of.append(rows)
        excluded.append(tuple(sorted((pool.labels[x], pool.row_keys[x]) for x in rows)))
        left = {pool.labels[x] for x in range(len(pool.texts)) if x not in rows}
        if len(left) < 2:
            raise ValueError(f"record {r.get('id')!r}: leaving out the {len(rows)} items shown in its prompt "
                             f"leaves profile items of {len(left)} user(s); attribution needs at least 2")

    every = np.arange(len(pool.texts))
    sets = sorted(set(set_of), key=lambda s: sorted(s))        # a fixed order, for the record
    row_sets = [every[~np.isin(every, sorted(s))] for s in sets]
    if n_jobs == 1 or len(sets) == 1:
        fitted = _fit_many(pool.counts, row_sets, pool.labels, seed)
    else:
        # processes, not threads: liblinear's random generator is one per process, so two fits
        # in threads would draw from it in turn and the result would depend on the timing
        from joblib import Parallel, delayed
        chunks = [list(range(len(sets)))[j::n_jobs] for j in range(min(n_jobs, len(sets)))]
        parts = Parallel(n_jobs=len(chunks))(delayed(_fit_many)(pool.counts, [row_sets[k] for k in c],
                                                                 pool.labels, seed) for c in chunks)
        fitted = [None] * len(sets)
        for c, part in zip(chunks, parts):
            for k, f in zip(c, part):
                fitted[k] = f
    by_set = {s: _attributor(pool, rows, f, fields, seed) for s, rows, f in zip(sets, row_sets, fitted)}
    return LeaveShownOut(ids=tuple(str(r.get("id")) for r in records), known_users=pool.known_users,
                         excluded=tuple(excluded), unmatched=tuple(unmatched), profile_fields=fields,
                         min_prefix_words=int(min_prefix_words), dropped_copies=pool.dropped,
                         fit_s=time.perf_counter() - t0,
                         settings={**_settings(seed), "leave_shown_out": f"min_prefix_words={int(min_prefix_words)}"},
                         _set_of=set_of, _by_set=by_set)


def attribution_share(attributor: Attributor | LeaveShownOut, texts: Sequence[str | None],
                      users: Sequence[Any]) -> dict:
    """Share of ``texts`` attributed to their own user (``users[i]`` wrote, or was written for,
    ``texts[i]``), with chance beside it and the per-example 0/1 (``correct``) for a paired
    bootstrap. An empty text is not attributed (0). See the module docstring for the chances.
    With a ``LeaveShownOut``, ``texts[i]`` is example i's and is attributed by its own
    classifier; the dict then also holds ``leave_shown_out`` (classifiers, items left out)."""
    if len(texts) != len(users):
        raise ValueError(f"{len(texts)} texts but {len(users)} users")
    users = [str(u) for u in users]
    unknown = sorted(set(users) - set(attributor.known_users))
    if unknown:
        raise ValueError(f"users the attributor was not fitted on: {', '.join(unknown[:5])}"
                         f"{' ...' if len(unknown) > 5 else ''} (fit it on the evaluated records)")
    predicted = attributor.predict(texts)
    correct = [int(p is not None and p == u) for p, u in zip(predicted, users)]
    n = len(users)
    counts = Counter(users)
    per_user = {u: {"n": counts[u], "share": sum(c for c, v in zip(correct, users) if v == u) / counts[u]}
                for u in sorted(counts)}
    majority = max(counts.values()) / n if n else None
    out = {
        "share": sum(correct) / n if n else None,
        "n": n,
        "correct": correct,
        "predicted": predicted,
        "unattributed": sum(p is None for p in predicted),
        "chance": majority,
        "chance_rule": "majority: the most frequent evaluated user's share, the most a text-blind guess scores",
        "chance_majority": majority,
        "chance_uniform": 1 / len(attributor.known_users),
        "share_macro": sum(v["share"] for v in per_user.values()) / len(per_user) if per_user else None,
        "chance_macro": 1 / len(per_user) if per_user else None,
        "per_user": per_user,
    }
    if isinstance(attributor, LeaveShownOut):
        out["leave_shown_out"] = {
            "classifiers": attributor.n_classifiers,
            "excluded_per_example": [len(e) for e in attributor.excluded],
            "examples_with_unmatched_shown": sum(bool(u) for u in attributor.unmatched),
            "min_prefix_words": attributor.min_prefix_words}
    return out


def gold_ceiling(attributor: Attributor | LeaveShownOut, records: Sequence[dict], *,
                 user_field: str = "user_id") -> dict:
    """``attribution_share`` of the records' own gold outputs: what the users' real text scores.
    With a ``LeaveShownOut``, ``records`` must be the ones it was fitted on, in the same order."""
    if isinstance(attributor, LeaveShownOut) and tuple(str(r.get("id")) for r in records) != attributor.ids:
        raise ValueError("records are not the ones the leave-shown-out classifier was fitted on (same ids, "
                         "same order): pass the records given to fit_leave_shown_out")
    return attribution_share(attributor, [r.get("output") for r in records], [r[user_field] for r in records])
