"""Who wrote it: author attribution of generated text, a metric that sees personalization.

A standard authorship-attribution classifier is trained on the profile texts of the users being
evaluated, and nothing else. A generation counts as personalized, in this metric's sense, when
the classifier attributes it to the user it was written for. ``attribution_share`` gives that
share for any list of texts; ``gold_ceiling`` gives it for the users' own gold responses (what
the users' real text scores: a reference point, not a bound, since a generation that copies a
profile item can score higher); chance is what a text-blind guess scores.

The classifier (``fit_attributor``), fixed before any model output was seen:

* Features: TF-IDF of character n-grams, ``TfidfVectorizer(analyzer="char_wb",
  ngram_range=(2, 4), sublinear_tf=True, lowercase=False)``. Character n-grams are the most
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
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

LEAK_NGRAM = 13                     # as datasets/splits.py: a shared 13-word run is a copy
_WORD = re.compile(r"\w+")


def _norm_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class _Copies:
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


def _item_text(item: dict, fields: Sequence[str]) -> str:
    return "\n".join(str(item[f]) for f in fields if isinstance(item.get(f), (str, int, float))
                     and not isinstance(item.get(f), bool) and str(item[f]).strip())


def fit_attributor(records: Sequence[dict], profile_fields: Sequence[str] = ("text",), *,
                   user_field: str = "user_id", seed: int = 0) -> Attributor:
    """Train the classifier on the profile items of ``records`` (the evaluated records: their
    users are the classes, their gold outputs are never trained on). See the module docstring."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC

    fields = tuple(profile_fields)
    if not fields:
        raise ValueError("profile_fields is empty: name the profile item fields to train on, e.g. ('text',)")
    golds = _Copies(r.get("output") or "" for r in records)
    # user -> {normalized text: text, or None when it copies a gold output}; one entry per distinct item
    items: dict[str, dict[str, str | None]] = {}
    for r in records:
        user = r.get(user_field)
        if user is None:
            raise ValueError(f"record {r.get('id')!r} has no {user_field!r}: attribution needs the author "
                             f"of every record (pass user_field= if it is named otherwise)")
        mine = items.setdefault(str(user), {})
        for item in r.get("profile") or []:
            text = _item_text(item, fields) if isinstance(item, dict) else ""
            key = " ".join(_norm_words(text))
            if key and key not in mine:
                mine[key] = None if golds.hit(text) else text
    dropped = sum(t is None for d in items.values() for t in d.values())
    trainable = {u: {k: t for k, t in d.items() if t is not None} for u, d in items.items()}
    trainable = {u: d for u, d in trainable.items() if d}
    if len(trainable) < 2:
        raise ValueError(f"attribution needs profile items of at least 2 users in fields {fields}; "
                         f"got {len(trainable)} (check profile_fields and {user_field!r})")
    X, y = [], []
    for u in sorted(trainable):
        for key in sorted(trainable[u]):
            X.append(trainable[u][key])
            y.append(u)
    settings = {"features": "TfidfVectorizer(analyzer='char_wb', ngram_range=(2, 4), sublinear_tf=True, "
                            "lowercase=False)",
                "model": f"LinearSVC(C=1.0, class_weight='balanced', random_state={seed}, max_iter=10000)"}
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, lowercase=False)
    model = LinearSVC(C=1.0, class_weight="balanced", random_state=seed, max_iter=10000)
    model.fit(vec.fit_transform(X), y)
    return Attributor(vectorizer=vec, model=model, users=tuple(str(c) for c in model.classes_),
                      known_users=tuple(sorted(items)), n_items=dict(Counter(y)), dropped_copies=dropped,
                      profile_fields=fields, settings=settings)


def attribution_share(attributor: Attributor, texts: Sequence[str | None], users: Sequence[Any]) -> dict:
    """Share of ``texts`` attributed to their own user (``users[i]`` wrote, or was written for,
    ``texts[i]``), with chance beside it and the per-example 0/1 (``correct``) for a paired
    bootstrap. An empty text is not attributed (0). See the module docstring for the chances."""
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
    return {
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


def gold_ceiling(attributor: Attributor, records: Sequence[dict], *, user_field: str = "user_id") -> dict:
    """``attribution_share`` of the records' own gold outputs: what the users' real text scores."""
    return attribution_share(attributor, [r.get("output") for r in records], [r[user_field] for r in records])
