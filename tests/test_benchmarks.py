"""LongLaMP and LaMP loaders on fixture files in the exact public layouts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from percontrast.datasets import longlamp as bm
from percontrast.errors import DataError, UserError
from percontrast.commands.prepare import PrepareConfig, run

FIX = Path(__file__).parent / "fixtures" / "corpora"


def review_rows(n: int = 3) -> list[dict]:
    """Rows as the hub publishes product_review_user (reviewerId, input, output, profile)."""
    rows = []
    for i in range(n):
        rows.append({
            "reviewerId": f"A{i}XYZ",
            "input": f"Generate the review text written by a reviewer who has given an overall rating of \"{i + 1}.0\" "
                     f"for a product with description \"A kettle\". The summary of the review text is \"Ok {i}\".",
            "output": f"The kettle number {i} boils fast and looks fine on the counter.",
            "profile": [{"overall": "5.0", "summary": f"Great {i}-{k}", "description": "A lamp",
                         "reviewText": f"Bright lamp {i}-{k}, works well."} for k in range(i + 1)],
        })
    return rows


def abstract_rows() -> list[dict]:
    return [{"name": "Ada Lovelace", "input": "Generate an abstract for the title \"Engines\" using the following "
                                              "items: 1. engines 2. numbers",
             "output": "We describe an analytical engine.",
             "profile": [{"abstract": "Notes on an engine.", "id": "p1", "title": "Notes", "year": 1843}]}]


def write_layout(root: Path, config: str, split: str, rows: list[dict], fmt: str) -> Path:
    d = root / config
    d.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        p = d / f"{split}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        p = d / f"{split}.json"
        p.write_text(json.dumps(rows), encoding="utf-8")
    else:  # parquet, written by `datasets` as the hub's converted files are
        from datasets import Dataset
        p = d / f"{split}-00000-of-00001.parquet"
        Dataset.from_list(rows).to_parquet(str(p))
    return p


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_longlamp_local_layouts(tmp_path, fmt):
    write_layout(tmp_path, "product_review_user", "test", review_rows(), fmt)
    recs = bm.load_longlamp("product_review_user", "test", source=tmp_path)
    assert [r["id"] for r in recs] == [f"product_review_user-test-{i}" for i in range(3)]
    assert recs[1]["user_id"] == "A1XYZ"
    assert recs[2]["output"] == "The kettle number 2 boils fast and looks fine on the counter."
    assert recs[2]["profile"][1] == {"overall": "5.0", "summary": "Great 2-1", "description": "A lamp",
                                     "reviewText": "Bright lamp 2-1, works well."}  # kept exactly as published
    # the spec form used by datasets.load_records goes through the same path
    assert bm.load(f"longlamp:product_review_user:test@{tmp_path}") == recs
    if fmt == "jsonl":  # and the front door itself (it moved from data.py to percontrast.datasets)
        from percontrast.datasets import load_records
        from percontrast.prompts import get_task
        got = load_records(f"longlamp:product_review_user:test@{tmp_path}", get_task("product_review"), limit=2)
        assert [r["id"] for r in got] == [r["id"] for r in recs[:2]]


def test_longlamp_jsonl_keeps_records_with_unicode_line_separators(tmp_path):
    """U+2028 and U+0085 are valid raw inside JSON strings (json.dumps(ensure_ascii=False) writes them
    so); str.splitlines() would cut such a record in two. The LongLaMP reader is data.py's JSONL reader."""
    rows = review_rows(2)
    rows[0]["output"] = "First line\u2028second line\u0085third line."
    rows[1]["profile"][0]["reviewText"] = "Bright\u2028lamp\u0085indeed."
    p = tmp_path / "product_review_user" / "test.jsonl"
    p.parent.mkdir()
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert "\u2028" in p.read_text(encoding="utf-8")  # raw, not escaped: the case that broke
    recs = bm.load_longlamp("product_review_user", "test", source=tmp_path)
    assert len(recs) == 2
    assert recs[0]["output"] == "First line\u2028second line\u0085third line."
    assert recs[1]["profile"][0]["reviewText"] == "Bright\u2028lamp\u0085indeed."


def test_longlamp_abstract_and_topic_fields(tmp_path, monkeypatch):
    write_layout(tmp_path, "abstract_generation_temporal", "val", abstract_rows(), "jsonl")
    monkeypatch.setenv(bm.ENV_DIR, str(tmp_path))
    (rec,) = bm.load("longlamp:abstract_generation_temporal:val")
    assert rec["user_id"] == "Ada Lovelace" and rec["profile"][0]["year"] == 1843
    recs = bm.load_longlamp("topic_writing_user", "test", source=FIX / "longlamp")
    item = recs[0]["profile"][0]
    assert item["summary"] == "First marathon finished." and item["content"].startswith("I finally")
    assert item["input"] == item["summary"] and item["output"] == item["content"]  # aliases for prompts.py
    assert recs[1]["user_id"] == "reddit_user_2"
    from percontrast.data import validate_records
    from percontrast.prompts import get_task
    validate_records(recs, get_task("topic_writing"), "fixture")


def test_longlamp_spec_parsing():
    s = bm.parse_longlamp_spec("longlamp:product_review_user")
    assert (s.config, s.task, s.split, s.source) == ("product_review_user", "product_review", "test", None)
    s = bm.parse_longlamp_spec("longlamp:topic_writing_temporal:validation@/data/ll")
    assert (s.split, s.source) == ("val", "/data/ll")
    assert bm.parse_longlamp_spec("longlamp:abstract_generation", split_kind="temporal").config == \
        "abstract_generation_temporal"
    assert bm.task_of_spec("longlamp:product_review_temporal:train") == "product_review"
    with pytest.raises(UserError, match="unknown LongLaMP configuration 'email_generation_user'"):
        bm.parse_longlamp_spec("longlamp:email_generation_user")
    with pytest.raises(UserError, match="unknown LongLaMP split 'dev'"):
        bm.parse_longlamp_spec("longlamp:product_review_user:dev")


def test_longlamp_hub_unreachable_is_one_clear_error(monkeypatch):
    calls = []

    def offline(*a, **k):
        calls.append(a)
        raise ConnectionError("Couldn't reach 'LongLaMP/LongLaMP' on the Hub (LocalEntryNotFoundError)")
    for var in (bm.ENV_DIR, "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UserError) as e:
        bm.load_longlamp("product_review_user", "test", loader=offline)
    msg = str(e.value)
    assert "hub is unreachable" in msg and "--source DIR" in msg and "\n" not in msg and calls
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="unreachable \\(offline mode is set\\).*--source DIR"):
        bm.load_longlamp("product_review_user", "test", loader=offline)
    assert len(calls) == 1  # offline mode does not even try


def test_longlamp_via_hub_loader_is_normalized(monkeypatch):
    monkeypatch.delenv(bm.ENV_DIR, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    got = bm.load_longlamp("product_review_user", "val", loader=lambda hub, cfg, split: review_rows(2))
    assert got[0]["id"] == "product_review_user-val-0" and got[1]["user_id"] == "A1XYZ"


def test_longlamp_bad_types_name_record_and_index(tmp_path):
    rows = review_rows(3)
    rows[2]["profile"][2]["reviewText"] = 42
    p = write_layout(tmp_path, "product_review_user", "train", rows, "jsonl")
    with pytest.raises(DataError) as e:
        bm.load_longlamp("product_review_user", "train", source=tmp_path)
    assert str(e.value) == (f"{p}: record product_review_user-train-2: field 'profile[2].reviewText': "
                            f"expected a string, got int")
    rows = review_rows(1)
    rows[0]["id"] = "abc"
    rows[0]["profile"][0]["overall"] = [5]
    write_layout(tmp_path, "product_review_user", "train", rows, "jsonl")
    with pytest.raises(DataError, match=r"record abc: field 'profile\[0\]\.overall': expected a string or number, "
                                        r"got list"):
        bm.load_longlamp("product_review_user", "train", source=tmp_path)
    rows = review_rows(1)
    del rows[0]["output"]
    write_layout(tmp_path, "product_review_user", "train", rows, "jsonl")
    with pytest.raises(DataError, match="field 'output': missing .*reviewerId, input, output, profile"):
        bm.load_longlamp("product_review_user", "train", source=tmp_path)


def test_longlamp_missing_truncated_or_foreign_files(tmp_path):
    with pytest.raises(UserError, match="no file for LongLaMP product_review_user split test"):
        (tmp_path / "product_review_user").mkdir()
        bm.load_longlamp("product_review_user", "test", source=tmp_path)
    with pytest.raises(UserError, match="not found"):
        bm.load_longlamp("product_review_user", "test", source=tmp_path / "nowhere")
    p = write_layout(tmp_path, "product_review_user", "test", review_rows(), "jsonl")
    p.write_bytes(p.read_bytes()[:-40])  # cut inside the last record
    with pytest.raises(UserError, match="line 3.*truncated file"):
        bm.load_longlamp("product_review_user", "test", source=tmp_path)
    p.unlink()
    q = write_layout(tmp_path, "product_review_user", "test", review_rows(), "parquet")
    q.write_bytes(q.read_bytes()[:100])
    with pytest.raises(UserError, match="not a readable Parquet file"):
        bm.load_longlamp("product_review_user", "test", source=tmp_path)
    q.unlink()
    (tmp_path / "product_review_user" / "test.json").write_text(json.dumps({"rows_of": "something else"}))
    with pytest.raises(UserError, match="expected a list of records"):
        bm.load_longlamp("product_review_user", "test", source=tmp_path)
    (tmp_path / "product_review_user" / "test.json").write_text(json.dumps([{"text": "a", "label": 1}]))
    with pytest.raises(DataError, match="field 'input': missing"):
        bm.load_longlamp("product_review_user", "test", source=tmp_path)


# ----------------------------------------------------------------------------- LaMP

def write_lamp(root: Path, task: int = 4, prefix: str = "dev", n: int = 3, golds: list[str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    fields = {4: lambda k: {"title": f"Headline {k}", "text": f"Story {k}"},
              5: lambda k: {"title": f"Paper {k}", "abstract": f"Abstract {k}"},
              7: lambda k: {"text": f"tweet {k}"}}[task]
    qs = [{"id": str(100 + i), "input": f"Generate a headline for the following article: story {i}",
           "profile": [{"id": f"{100 + i}{k}", **fields(k), "date": "2019-01-01"} for k in range(2)]}
          for i in range(n)]
    ids = golds if golds is not None else [q["id"] for q in qs]
    (root / f"{prefix}_questions.json").write_text(json.dumps(qs))
    (root / f"{prefix}_outputs.json").write_text(json.dumps(
        {"task": f"LaMP_{task}", "golds": [{"id": i, "output": f"Gold {i}"} for i in ids]}))
    return root / f"{prefix}_questions.json"


@pytest.mark.parametrize("task,name", [(4, "news_headline"), (5, "scholarly_title"), (7, "tweet_paraphrase")])
def test_lamp_join(tmp_path, task, name):
    q = write_lamp(tmp_path, task)
    got_task, recs = bm.load_lamp(q)
    assert got_task == name and [r["output"] for r in recs] == ["Gold 100", "Gold 101", "Gold 102"]
    assert recs[0]["profile"][1]["id"] == "1001"
    assert bm.load(f"lamp:{q}") == recs and bm.task_of_spec(f"lamp:{q}") == name


def test_lamp_id_mismatches_listed_in_one_error(tmp_path):
    q = write_lamp(tmp_path, golds=["100", "100", "999"])
    with pytest.raises(UserError) as e:
        bm.load_lamp(q)
    msg = str(e.value)
    assert "2 question ids without a gold in dev_outputs.json (101, 102)" in msg
    assert "1 gold ids without a question in dev_questions.json (999)" in msg
    assert "1 duplicated gold ids (100)" in msg and "\n" not in msg
    qs = json.loads(q.read_text())
    (tmp_path / "x_questions.json").write_text(json.dumps(qs + [qs[0]]))
    (tmp_path / "x_outputs.json").write_text(json.dumps(
        {"task": "LaMP_4", "golds": [{"id": i, "output": "g"} for i in ("100", "101", "102")]}))
    with pytest.raises(UserError, match=r"1 duplicated question ids \(100\)"):
        bm.load_lamp(tmp_path / "x_questions.json")


def test_lamp_bad_inputs(tmp_path):
    q = write_lamp(tmp_path, 4)
    (tmp_path / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_2", "golds": []}))
    with pytest.raises(UserError, match="not a LaMP generation task"):
        bm.load_lamp(q)
    (tmp_path / "dev_outputs.json").write_text('{"task": "LaMP_4", "golds": [{"id": "100", "out')
    with pytest.raises(UserError, match="invalid JSON.*truncated"):
        bm.load_lamp(q)
    q = write_lamp(tmp_path / "b", 4)
    qs = json.loads(q.read_text())
    qs[1]["profile"][1]["text"] = 3
    q.write_text(json.dumps(qs))
    with pytest.raises(DataError, match=r"record 101: field 'profile\[1\]\.text': expected a string, got int"):
        bm.load_lamp(q)
    with pytest.raises(UserError, match="not found"):
        bm.load_lamp(tmp_path / "none_questions.json")


# ----------------------------------------------------------------------------- prepare

def test_prepare_longlamp_and_lamp(tmp_path, monkeypatch):
    for s in ("train", "val", "test"):
        write_layout(tmp_path / "ll", "product_review_user", s, review_rows(3), "jsonl")
    counts = run(PrepareConfig(name="longlamp:product_review", split="user", out=str(tmp_path / "o1"),
                               source=str(tmp_path / "ll"), max_profile_items=1, max_examples=2))
    assert counts["task"] == "product_review" and counts["train"] == counts["test"] == 2
    recs = [json.loads(x) for x in (tmp_path / "o1" / "test.jsonl").read_text().splitlines()]
    assert all(len(r["profile"]) == 1 for r in recs)
    assert "LongLaMP product_review_user" in (tmp_path / "o1" / "DATASHEET.md").read_text()
    write_lamp(tmp_path / "lamp", 5, "train")
    write_lamp(tmp_path / "lamp", 5, "dev")
    counts = run(PrepareConfig(name="lamp", out=str(tmp_path / "o2"), source=str(tmp_path / "lamp")))
    assert counts["task"] == "scholarly_title" and counts["train"] == counts["val"] == 3 and counts["test"] == 0
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == ["DATASHEET.md", "meta.json", "train.jsonl",
                                                                  "val.jsonl"]
    # no source and no network: a clear error, and no output folder left behind
    for var in (bm.ENV_DIR, "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(bm, "hub_reachable", lambda timeout=5.0: False)
    with pytest.raises(UserError, match="hub is unreachable"):
        run(PrepareConfig(name="longlamp:topic_writing_user", out=str(tmp_path / "o3")))
    assert not (tmp_path / "o3").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_hub_connection_precheck_fails_fast(monkeypatch):
    monkeypatch.delenv(bm.ENV_DIR, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(bm, "hub_reachable", lambda timeout=5.0: False)
    with pytest.raises(UserError, match=r"unreachable \(no connection to huggingface.co\).*--source DIR"):
        bm.load("longlamp:topic_writing_temporal:train")
