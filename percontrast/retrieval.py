"""Pick the top-k profile items to put in the prompt.

Retrievers, as in the LongLaMP/LaMP code: ``bm25`` (BM25 over lower-cased whitespace
tokens, via the ``bm25s`` package, Lucene idf so that scores stay non-negative on tiny
profiles), ``recent`` (latest ``date`` first), ``random`` (seeded per record), ``first``
(profile order), and ``dense:<model dir>`` (mean-pooled embeddings of a local encoder,
cosine similarity; an optional extra for users who have a Contriever-style checkpoint).
"""
from __future__ import annotations

import hashlib
import logging
import random as _random
import re
from functools import lru_cache
from typing import Sequence

import numpy as np

from .errors import UserError
from .prompts import Task, query_text

RETRIEVERS = ("bm25", "recent", "random", "first", "dense:<model dir>")
_TOKEN = re.compile(r"\S+")


def _tokens(text: str) -> list[str]:
    return [t.lower() for t in _TOKEN.findall(text)]


def item_text(task: Task, item: dict) -> str:
    fields = task.fields or [k for k, v in item.items() if isinstance(v, str)]
    return " ".join(str(item.get(f, "")) for f in fields)


def bm25_rank(query: str, docs: Sequence[str]) -> list[int]:
    """Indices of ``docs`` by decreasing BM25 score; ties keep profile order."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets itself to DEBUG on import
    corpus = [_tokens(d) or ["\u2205"] for d in docs]  # an empty doc still needs a token
    index = bm25s.BM25()
    index.index(corpus, show_progress=False)
    scores = np.asarray(index.get_scores(_tokens(query)), dtype=np.float64)
    return sorted(range(len(docs)), key=lambda i: (-scores[i], i))


def _seed_for(record_id: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{record_id}".encode()).digest()[:8], "little")


@lru_cache(maxsize=2)
def _encoder(path: str):
    from transformers import AutoModel, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path).eval()
    except Exception as e:  # noqa: BLE001 - any load failure is the user's path
        raise UserError(f"dense retriever: could not load encoder from {path!r}: {type(e).__name__}") from None
    return tok, model


def dense_rank(model_dir: str, query: str, docs: Sequence[str]) -> list[int]:
    import torch

    tok, model = _encoder(model_dir)
    with torch.no_grad():
        enc = tok([query, *docs], padding=True, truncation=True, max_length=512, return_tensors="pt")
        hid = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(hid.dtype)
        emb = torch.nn.functional.normalize((hid * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)
        scores = (emb[1:] @ emb[0]).tolist()
    return sorted(range(len(docs)), key=lambda i: (-scores[i], i))


def retrieve_for(task: Task, record: dict, k: int, method: str = "bm25", seed: int = 0,
                 profile: list[dict] | None = None) -> list[dict]:
    """The items a prompt for ``record`` shows: its profile (or ``profile``, another user's) ranked
    against the query text of its input. The one call behind the prompt builder and the judge."""
    profile = (record.get("profile") or []) if profile is None else profile
    return retrieve(task, query_text(task, record["input"]), profile, k, method,
                    record_id=str(record["id"]), seed=seed)


def retrieve(task: Task, query: str, profile: list[dict], k: int, method: str = "bm25",
             record_id: str = "", seed: int = 0) -> list[dict]:
    """The top-``k`` items of ``profile`` for ``query`` (all items when k >= len(profile))."""
    if k < 0:
        raise UserError(f"k must be >= 0, got {k}")
    if k == 0 or not profile:
        return []
    if method == "first":
        order = list(range(len(profile)))
    elif method == "bm25":
        order = bm25_rank(query, [item_text(task, it) for it in profile])
    elif method == "recent":
        order = sorted(range(len(profile)), key=lambda i: (str(profile[i].get("date", "")), -i), reverse=True)
    elif method == "random":
        order = list(range(len(profile)))
        _random.Random(_seed_for(record_id, seed)).shuffle(order)
    elif method.startswith("dense:"):
        order = dense_rank(method.split(":", 1)[1], query, [item_text(task, it) for it in profile])
    else:
        raise UserError(f"unknown retriever {method!r}; choose one of {', '.join(RETRIEVERS)}")
    return [profile[i] for i in order[:k]]


def other_user_profiles(records: Sequence[dict], seed: int) -> list[list[dict]]:
    """For each record, the profile of a record of a different user: the "another user's profile"
    counterfactual (``score --counterfactual swap``, ``identify``'s ``pir_swap``).

    A record's user is its ``user_id`` (a record without one is a user of its own). For each
    record, a ``random.Random`` seeded with ``seed`` and the record's id picks one of the other
    users uniformly (the users sorted by name), then one of that user's records; its profile is
    returned. So the result is
    deterministic by seed, the same in any process, and a record's choice does not depend on the
    order of the records (only on which records are in ``records``: pass the whole split, not a
    cut of it, to keep the choice independent of a ``--limit``). ``UserError`` when fewer than two
    users are present.
    """
    def user(r: dict) -> str:
        u = r.get("user_id")
        return str(r["id"] if u is None else u)

    by_user: dict[str, list[dict]] = {}
    for r in records:
        by_user.setdefault(user(r), []).append(r)
    users = sorted(by_user)
    if len(users) < 2:
        raise UserError("needs records of at least two users (field 'user_id')")
    index = {u: i for i, u in enumerate(users)}
    out = []
    for r in records:
        rng = _random.Random(f"{seed}:{r['id']}")
        j = rng.randrange(len(users) - 1)
        j += j >= index[user(r)]  # skip the record's own user
        out.append(rng.choice(by_user[users[j]])["profile"])
    return out
