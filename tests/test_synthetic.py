"""The synthetic personal-token benchmark: determinism, persona splits, and label truth."""
from __future__ import annotations

import json
import re

import pytest

from percontrast.datasets import synthetic as S
from percontrast.datasets.synthetic import generate, prepare_synthetic, words_of


@pytest.fixture(scope="module")
def splits():
    return generate(seed=0, n_personas=60)


def _profile_words(record) -> set[str]:
    return set(words_of(" ".join(f"{it['title']} {it['text']}" for it in record["profile"])))


def _all(splits):
    return [r for s in S.SPLITS for r in splits[s]]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    counts = prepare_synthetic(a, seed=3, n_personas=15)
    prepare_synthetic(b, seed=3, n_personas=15)
    prepare_synthetic(c, seed=4, n_personas=15)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "meta.json", "DATASHEET.md"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "test.jsonl").read_bytes() != (c / "test.jsonl").read_bytes()
    assert not (a / "dev.jsonl").exists()  # train/val/test, like every prepared dataset
    lines = (a / "val.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == counts["val"] and all(json.loads(line)["spans"] is not None for line in lines)


def test_splits_are_disjoint_by_persona(splits):
    users = {s: {r["user_id"] for r in splits[s]} for s in S.SPLITS}
    assert S.SPLITS == ("train", "val", "test")
    assert users["train"] and users["val"] and users["test"]
    assert not users["train"] & users["val"]
    assert not users["train"] & users["test"]
    assert not users["val"] & users["test"]
    assert sum(len(u) for u in users.values()) == 60
    ids = [r["id"] for r in _all(splits)]
    assert len(ids) == len(set(ids))


def test_records_validate_as_email_task(splits):
    from percontrast.data import validate_records
    from percontrast.prompts import get_task
    recs = validate_records(splits["test"], get_task("email"), "synthetic")
    assert len(recs) == len(splits["test"])
    assert all(set(it) == {"title", "text"} for r in recs for it in r["profile"])


def test_spans_sorted_disjoint_in_bounds(splits):
    for r in _all(splits):
        prev = 0
        for sp in r["spans"]:
            assert sp["kind"] in S.KINDS
            assert prev <= sp["start"] < sp["end"] <= len(r["output"]), r["id"]
            prev = sp["end"]


def test_copied_words_in_profile_implied_words_not(splits):
    n = {"copied": 0, "implied": 0}
    for r in _all(splits):
        pw = _profile_words(r)
        for sp in r["spans"]:
            words = set(words_of(r["output"][sp["start"]:sp["end"]]))
            if sp["kind"] == "copied":
                assert words and words <= pw, (r["id"], words - pw)
                n["copied"] += 1
            elif sp["kind"] == "implied":
                assert words and not words & pw, (r["id"], words & pw)
                n["implied"] += 1
    assert n["copied"] > 20 and n["implied"] > 20


def test_style_spans_are_the_users_habits(splits):
    seen = set()
    for r in _all(splits):
        profile = " ".join(it["text"] for it in r["profile"])
        for sp in r["spans"]:
            if sp["kind"] != "style":
                continue
            text = r["output"][sp["start"]:sp["end"]]
            seen.add(sp["attribute"])
            if sp["attribute"] == "signoff":
                assert r["output"].endswith(text) and text in profile
            elif sp["attribute"] == "emoji":
                assert not re.search(r"\w", text) and text in profile
            elif sp["attribute"] == "exclaim":
                assert set(text) == {"!"} and len(text) >= 2 and text in profile
            elif sp["attribute"] == "lowercase":
                assert text == text.lower() and r["output"] == r["output"].lower()
                assert profile == profile.lower()
            else:
                raise AssertionError(sp["attribute"])
    assert seen == {"signoff", "emoji", "exclaim", "lowercase"}


def test_generic_text_never_contains_personal_vocabulary():
    # An implied word (or pet name) that also occurs in generic sentences, requests or template glue
    # could be predicted without the profile, or would be filtered out of most records.
    personal = {w.lower() for w in S.PET_NAMES}
    for table in (S.CITIES, S.DIETS, S.JOBS, S.PETS, S.HOBBIES):
        for values in table.values():
            for v in values:
                personal |= set(words_of(v.rpartition("|")[2]))
    texts = list(S.GENERIC)
    for _, instr, subj, openers in S.REQUESTS:
        texts += [*instr, *subj, *openers]
    for by_kind in S.ATTR_TEMPLATES.values():
        for templates in by_kind.values():
            texts += list(templates)
    for templates in S.PROFILE_TEMPLATES.values():
        texts += list(templates)
    for prefix, titles in S.PROFILE_KINDS.values():
        texts += [prefix, *titles]
    generic = set(words_of(re.sub(r"\{\w+\}", " ", " ".join(texts))))
    assert not generic & personal, generic & personal


def test_enough_variety_that_templates_do_not_give_the_answer(splits):
    recs = _all(splits)
    outputs = {r["output"] for r in recs}
    assert len(outputs) == len(recs)
    implied = {r["output"][sp["start"]:sp["end"]].lower() for r in recs for sp in r["spans"] if sp["kind"] == "implied"}
    assert len(implied) >= 40
    # The same implied template is filled with different words for different personas.
    first_words = {}
    for r in recs:
        for sp in r["spans"]:
            if sp["kind"] == "implied":
                prefix = r["output"][max(0, sp["start"] - 12):sp["start"]].lower()
                first_words.setdefault(prefix, set()).add(r["output"][sp["start"]:sp["end"]].lower())
    assert max(len(v) for v in first_words.values()) >= 5


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        generate(n_personas=2)
    with pytest.raises(ValueError):
        generate(n_personas=10, requests_per_persona=0)


def test_registered_in_prepare(tmp_path):
    from percontrast.commands import prepare
    assert "synthetic" in prepare.PREPARERS  # registered like email and sotu, no special case
    counts = prepare.run(prepare.PrepareConfig(name="synthetic", out=str(tmp_path / "syn"), seed=1))
    assert sorted(p.name for p in (tmp_path / "syn").iterdir()) == [
        "DATASHEET.md", "meta.json", "test.jsonl", "train.jsonl", "val.jsonl"]
    assert counts["val"] > 0 and counts["test"] > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left
