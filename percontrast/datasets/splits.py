"""Real, author-attributed corpora turned into personalization tasks.

Each corpus module (``email``, ``sotu``) turns its raw source into a flat list of
``Item``s: one piece of text by one user (a mail, a paragraph). This module does the
rest, the same way for every corpus:

* ``build_splits``: a *user* split (held-out users never appear in training) or a
  *temporal* split (each user's latest items are held out), examples and profiles;
* ``remove_leaks`` / ``find_leaks``: no held-out output, and no near-copy of one
  (same text after case/whitespace/punctuation normalization, or any shared
  13-word n-gram), may appear in a profile or in training;
* ``write_dataset``: ``train.jsonl``, ``val.jsonl``, ``test.jsonl``, ``meta.json``
  and a ``DATASHEET.md`` with counts and length statistics.

Everything is deterministic for a given seed: sampling uses ``random.Random`` seeded
with strings (stable across processes, unlike ``hash()``), and every list is sorted
before it is sampled or written.
"""
from __future__ import annotations

import json
import random
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import UserError
from ..files import write_jsonl_atomic, write_text_atomic

SPLITS = ("train", "val", "test")
# Profile eligibility: an example of split S may see groups with these roles.
# "profile" = a held-out user's older groups, used only as that user's profile.
_ALLOWED = {"train": {"train"}, "val": {"train", "profile"}, "test": {"train", "val", "profile"}}
LEAK_NGRAM = 13
_WORD = re.compile(r"\w+")


@dataclass
class Item:
    """One text by one user. ``group`` is the unit that is never in its own profile
    (a mail; a whole address for State of the Union paragraphs)."""
    user: str
    group: str
    key: str                      # unique across the corpus; used in example ids
    date: str                     # ISO 8601; orders items in time
    input: str | None             # None: the item can only be a profile item
    output: str | None
    profile: dict[str, Any]       # how the item looks inside someone's profile


@dataclass
class SplitOptions:
    split: str = "user"                  # "user" | "temporal"
    seed: int = 0
    holdout_groups: int = 1              # latest groups per user held out (val and test each)
    val_fraction: float = 0.1            # user split: share of users in val
    test_fraction: float = 0.2           # user split: share of users in test
    max_users: int = 0                   # 0 = all; else the users with the most items
    max_examples_per_user: int = 0       # per user and split; 0 = all
    max_profile_items: int = 0           # per example; 0 = all
    max_examples: int = 0                # per split, after everything else; 0 = all


# ----------------------------------------------------------------------------- helpers

def cap_words(text: str, max_words: int, *, sentence: bool = True) -> str:
    """Keep at most ``max_words`` whitespace tokens; prefer ending at a sentence end
    (if one exists in the last half) so that targets do not stop mid-sentence."""
    if max_words <= 0:
        return text
    toks = list(re.finditer(r"\S+", text))
    if len(toks) <= max_words:
        return text
    cut = toks[max_words - 1].end()
    if sentence:
        for t in reversed(toks[max_words // 2: max_words]):
            if re.search(r"[.!?][\"')\]]*$", t.group()):
                cut = t.end()
                break
    return text[:cut].rstrip()


def norm_tokens(text: str) -> list[str]:
    """Lower-cased word tokens: the normalization for near-copy detection."""
    return _WORD.findall(text.lower())


def _ngrams(toks: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)}


def _item_text(item: dict) -> str:
    return "\n".join(str(v) for k, v in item.items() if isinstance(v, str) and k not in ("date", "id"))


def seeded_rng(*parts: Any) -> random.Random:
    return random.Random(":".join(str(p) for p in parts))


# ----------------------------------------------------------------------------- splits

def _roles(groups_by_user: dict[str, list[str]], opt: SplitOptions) -> dict[tuple[str, str], str]:
    """Role of each (user, group): train / val / test / profile."""
    k = opt.holdout_groups
    roles: dict[tuple[str, str], str] = {}
    users = sorted(groups_by_user)
    if opt.split == "temporal":
        for u in users:
            gs = groups_by_user[u]
            for i, g in enumerate(gs):
                back = len(gs) - i  # 1 = latest
                roles[(u, g)] = "test" if back <= k else "val" if back <= 2 * k else "train"
        return roles
    # user split: a seeded shuffle of the (sorted) users decides who is held out
    order = users[:]
    seeded_rng("users", opt.seed).shuffle(order)
    n = len(order)
    n_test = max(1, round(opt.test_fraction * n)) if n >= 3 else 0
    n_val = max(1, round(opt.val_fraction * n)) if n >= 3 else 0
    held = {u: "test" for u in order[:n_test]}
    held.update({u: "val" for u in order[n_test:n_test + n_val]})
    for u in users:
        gs = groups_by_user[u]
        role = held.get(u)
        for i, g in enumerate(gs):
            if role is None:
                roles[(u, g)] = "train"
            else:  # the latest half of the user's groups (at least k) are targets, the older ones profile
                n_target = min(len(gs) - 1, max(k, len(gs) // 2))
                roles[(u, g)] = role if i >= len(gs) - n_target else "profile"
    return roles


def build_splits(items: list[Item], opt: SplitOptions, *, id_prefix: str) -> tuple[dict[str, list[dict]], dict]:
    """Examples with profiles for each split, leak-free. Returns (splits, report)."""
    if opt.split not in ("user", "temporal"):
        raise UserError(f"split must be 'user' or 'temporal', got {opt.split!r}")
    k = max(1, opt.holdout_groups)
    by_user: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        by_user[it.user].append(it)
    # order groups in time (first item's date, then name) within each user
    groups_by_user: dict[str, list[str]] = {}
    for u, its in by_user.items():
        first: dict[str, tuple[str, str]] = {}
        for it in its:
            cur = first.get(it.group)
            if cur is None or (it.date, it.key) < cur:
                first[it.group] = (it.date, it.key)
        groups_by_user[u] = sorted(first, key=lambda g: (first[g], g))
    need = 2 * k + 1 if opt.split == "temporal" else k + 1
    report: dict[str, Any] = {"users_in": len(by_user),
                              "users_too_few_groups": sum(len(g) < need for g in groups_by_user.values())}
    eligible = sorted((u for u, g in groups_by_user.items() if len(g) >= need),
                      key=lambda u: (-len(by_user[u]), u))
    if opt.max_users:
        eligible = eligible[:opt.max_users]
    eligible.sort()
    if not eligible:
        raise UserError(f"no user has the {need} groups of items that a {opt.split} split needs "
                        f"(holdout {k}); lower the size limits or add data")
    groups_by_user = {u: groups_by_user[u] for u in eligible}
    roles = _roles(groups_by_user, opt)
    gindex = {(u, g): i for u in eligible for i, g in enumerate(groups_by_user[u])}

    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for u in eligible:
        its = sorted(by_user[u], key=lambda it: (it.date, it.key))
        for s in SPLITS:
            # (item, its profile pool); items whose pool is empty cannot be examples
            cands = []
            for it in its:
                if roles[(u, it.group)] != s or it.input is None or it.output is None:
                    continue
                my = gindex[(u, it.group)]
                pool = [p for p in its if p.group != it.group and roles[(u, p.group)] in _ALLOWED[s]
                        and (opt.split != "temporal" or gindex[(u, p.group)] < my)]
                if pool:
                    cands.append((it, pool))
            if opt.max_examples_per_user and len(cands) > opt.max_examples_per_user:
                cands = seeded_rng(opt.seed, "examples", u, s).sample(cands, opt.max_examples_per_user)
                cands.sort(key=lambda c: (c[0].date, c[0].key))
            for it, pool in cands:
                if opt.max_profile_items and len(pool) > opt.max_profile_items:
                    pool = seeded_rng(opt.seed, "profile", it.key).sample(pool, opt.max_profile_items)
                    pool.sort(key=lambda p: (p.date, p.key))
                rec = {"id": f"{id_prefix}-{it.key}", "input": it.input, "output": it.output,
                       "profile": [p.profile for p in pool], "user_id": u, "date": it.date}
                splits[s].append(rec)
    report.update(remove_leaks(splits))
    for s in SPLITS:
        before = len(splits[s])
        splits[s] = [r for r in splits[s] if r["profile"]]
        report[f"{s}_dropped_empty_profile"] = before - len(splits[s])
        if opt.max_examples and len(splits[s]) > opt.max_examples:
            keep = set(id(r) for r in seeded_rng(opt.seed, "cap", s).sample(splits[s], opt.max_examples))
            splits[s] = [r for r in splits[s] if id(r) in keep]
    report["users"] = {s: len({r["user_id"] for r in splits[s]}) for s in SPLITS}
    return splits, report


# ----------------------------------------------------------------------------- leakage

class _HeldOut:
    """Index of held-out outputs: their n-grams, and the short ones as whole strings."""

    def __init__(self, records: Iterable[dict], n: int = LEAK_NGRAM):
        self.n = n
        self.grams: dict[tuple[str, ...], str] = {}
        self.short: list[tuple[str, str]] = []
        for r in records:
            toks = norm_tokens(r["output"])
            if len(toks) >= n:
                for g in _ngrams(toks, n):
                    self.grams.setdefault(g, r["id"])
            elif toks:
                self.short.append((" " + " ".join(toks) + " ", r["id"]))

    def hit(self, text: str) -> str | None:
        """Id of a held-out example whose output ``text`` copies (or near-copies), or None."""
        toks = norm_tokens(text)
        if self.grams and len(toks) >= self.n:
            for g in _ngrams(toks, self.n):
                if g in self.grams:
                    return self.grams[g]
        if self.short and toks:
            joined = " " + " ".join(toks) + " "
            for s, rid in self.short:
                if s in joined:
                    return rid
        return None


def remove_leaks(splits: dict[str, list[dict]], n: int = LEAK_NGRAM) -> dict[str, int]:
    """Drop whatever would leak a held-out output into training or into a profile.

    The held-out examples stay; what goes is the copy: a validation example that
    copies a test output, a training example whose input or output copies a val/test
    output, a profile item that copies a held-out output (val or test for training
    and validation profiles, test for test profiles). Edits ``splits`` in place.
    """
    test_idx = _HeldOut(splits["test"], n)
    before_val = len(splits["val"])
    splits["val"] = [r for r in splits["val"] if not test_idx.hit(r["output"]) and not test_idx.hit(r["input"])]
    held_idx = _HeldOut(splits["val"] + splits["test"], n)
    before_train = len(splits["train"])
    splits["train"] = [r for r in splits["train"] if not held_idx.hit(r["output"]) and not held_idx.hit(r["input"])]
    cache: dict[tuple[int, str], bool] = {}
    dropped_items = 0
    for s in SPLITS:
        idx, level = (test_idx, "test") if s == "test" else (held_idx, "held")
        for r in splits[s]:
            keep = []
            for item in r["profile"]:
                key = (id(item), level)
                if key not in cache:
                    cache[key] = idx.hit(_item_text(item)) is not None
                if cache[key]:
                    dropped_items += 1
                else:
                    keep.append(item)
            r["profile"] = keep
    return {"val_dropped_leak": before_val - len(splits["val"]),
            "train_dropped_leak": before_train - len(splits["train"]),
            "profile_items_dropped_leak": dropped_items}


def find_leaks(splits: dict[str, list[dict]], n: int = LEAK_NGRAM) -> list[str]:
    """Every leak of a held-out output (see ``remove_leaks``), as readable lines."""
    test_idx = _HeldOut(splits["test"], n)
    held_idx = _HeldOut(splits["val"] + splits["test"], n)
    out = []
    for r in splits["val"]:
        for f in ("input", "output"):
            if (h := test_idx.hit(r[f])):
                out.append(f"val {r['id']} {f} copies test {h}")
    for r in splits["train"]:
        for f in ("input", "output"):
            if (h := held_idx.hit(r[f])):
                out.append(f"train {r['id']} {f} copies held-out {h}")
    cache: dict[tuple[str, str], str | None] = {}
    for s in SPLITS:
        idx, level = (test_idx, "test") if s == "test" else (held_idx, "held")
        for r in splits[s]:
            for i, item in enumerate(r["profile"]):
                text = _item_text(item)
                if (text, level) not in cache:
                    cache[(text, level)] = idx.hit(text)
                if (h := cache[(text, level)]):
                    out.append(f"{s} {r['id']} profile[{i}] copies {h}")
    return out


# ----------------------------------------------------------------------------- output

def _stats(values: list[int]) -> str:
    if not values:
        return "- | -"
    return f"{statistics.fmean(values):.1f} | {statistics.median(values):g}"


def split_stats(splits: dict[str, list[dict]], profile_fields: tuple[str, ...]) -> dict[str, dict]:
    out = {}
    for s in SPLITS:
        rs = splits[s]
        out[s] = {
            "users": len({r.get("user_id") for r in rs}),
            "examples": len(rs),
            "input": [len(r["input"].split()) for r in rs],
            "output": [len(r["output"].split()) for r in rs],
            "profile_items": [len(r["profile"]) for r in rs],
            **{f"profile.{f}": [len(str(it.get(f, "")).split()) for r in rs for it in r["profile"]]
               for f in profile_fields},
        }
    return out


def datasheet_table(stats: dict[str, dict]) -> str:
    lines = ["| split | users | examples |", "|---|---:|---:|"]
    for s in SPLITS:
        lines.append(f"| {s} | {stats[s]['users']} | {stats[s]['examples']} |")
    fields = [k for k in stats["train"] if k not in ("users", "examples")]
    lines += ["", "Whitespace tokens per field (mean | median); `profile_items` is items per example, "
              "`profile.*` is over every profile entry of every example.", "",
              "| field | " + " | ".join(f"{s} mean | {s} median" for s in SPLITS) + " |",
              "|---|" + "---:|---:|" * len(SPLITS)]
    for f in fields:
        lines.append(f"| {f} | " + " | ".join(_stats(stats[s][f]) for s in SPLITS) + " |")
    return "\n".join(lines)


def write_dataset(out_dir: Path, splits: dict[str, list[dict]], *, task: str, profile_fields: tuple[str, ...],
                  datasheet: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Write the three JSONL files, meta.json and DATASHEET.md (``{table}`` in
    ``datasheet`` is replaced by the counts table). Returns the counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        write_jsonl_atomic(out_dir / f"{s}.jsonl", splits[s])
    stats = split_stats(splits, profile_fields)
    counts = {"task": task, **{s: stats[s]["examples"] for s in SPLITS},
              "users": {s: stats[s]["users"] for s in SPLITS}}
    write_text_atomic(out_dir / "meta.json", json.dumps({**meta, **counts}, indent=2, sort_keys=True) + "\n")
    write_text_atomic(out_dir / "DATASHEET.md", datasheet.replace("{table}", datasheet_table(stats)))
    return counts

