"""Record validation, prompt building, retrieval and length budgeting."""
import json

import pytest

from percontrast.data import parse_jsonl, read_rows
from percontrast.datasets import load_records
from percontrast.encoding import PromptBuilder
from percontrast.errors import DataError, UserError
from percontrast.prompts import get_task
from percontrast.retrieval import retrieve

EMAIL = get_task("email")
GOOD = {"id": "a", "input": "Write about x", "output": "text", "profile": [{"title": "t", "text": "body"}]}


def _write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return p


@pytest.mark.parametrize("bad,needle", [
    ({**GOOD, "output": ""}, "record a: field 'output': is empty"),
    ({k: v for k, v in GOOD.items() if k != "output"}, "record a: field 'output': missing"),
    ({**GOOD, "profile": []}, "record a: field 'profile': is empty"),
    ({**GOOD, "profile": [{"title": "t"}]}, "record a: field 'profile[0].text': missing"),
    ({**GOOD, "profile": [{"title": "t", "text": 3}]}, "field 'profile[0].text': expected a string, got int"),
    ({**GOOD, "input": 5}, "field 'input': expected a string"),
    ({**GOOD, "id": None}, "record #0: field 'id': missing"),
])
def test_bad_records_name_file_record_field(tmp_path, bad, needle):
    p = _write(tmp_path, [bad])
    with pytest.raises(DataError) as e:
        load_records(str(p), EMAIL)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_duplicate_ids(tmp_path):
    p = _write(tmp_path, [GOOD, GOOD])
    with pytest.raises(DataError, match="record a: field 'id': duplicate id"):
        load_records(str(p), EMAIL)


def test_truncated_json_and_bad_utf8(tmp_path):
    p = tmp_path / "t.json"
    p.write_text('[{"id": "a", "input": "x"', encoding="utf-8")
    with pytest.raises(DataError, match="invalid JSON at line 1"):
        read_rows(p)
    q = tmp_path / "b.jsonl"
    q.write_bytes(b'{"id": "\xff"}\n')
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_rows(q)
    with pytest.raises(DataError, match="file not found"):
        read_rows(tmp_path / "missing.jsonl")


def test_jsonl_lines_split_on_newline_only():
    """Every character str.splitlines() breaks at, raw inside a JSON string, stays in the record;
    CRLF line ends work; the truncation hint is given for the unterminated last line only."""
    odd = "a\x0bb\x0cc\x1cd\x1de\x1ef\x85g\u2028h\u2029i"
    text = json.dumps({"t": odd}, ensure_ascii=False) + "\r\n\r\n" + json.dumps({"t": 2}) + "\r\n"
    assert parse_jsonl(text, "x.jsonl") == [{"t": odd}, {"t": 2}]
    with pytest.raises(DataError, match=r"^x\.jsonl: invalid JSON at line 2, column \d+: .*truncated file\?\)$"):
        parse_jsonl('{"t": 1}\n{"t": ', "x.jsonl")
    with pytest.raises(DataError, match=r"^x\.jsonl: invalid JSON at line 1, column \d+: [^(]*; expected rows$"):
        parse_jsonl('{"t": \n{"t": 1}\n', "x.jsonl", expected="rows")


def test_json_list_and_jsonl_agree(tmp_path):
    a = load_records(str(_write(tmp_path, [GOOD], "a.jsonl")), EMAIL)
    (tmp_path / "b.json").write_text(json.dumps([GOOD]))
    assert a == load_records(str(tmp_path / "b.json"), EMAIL)


def test_generate_does_not_need_output(tmp_path):
    rows = [{k: v for k, v in GOOD.items() if k != "output"}]
    assert load_records(str(_write(tmp_path, rows)), EMAIL, require_output=False)[0]["id"] == "a"


def test_bm25_ranks_relevant_item_first():
    profile = [{"title": "cars", "text": "engine oil wheels"}, {"title": "cooking", "text": "lentil soup recipe"}]
    assert retrieve(EMAIL, "a soup with lentils", profile, k=1)[0]["title"] == "cooking"
    assert retrieve(EMAIL, "engine wheels", profile, k=1)[0]["title"] == "cars"
    assert len(retrieve(EMAIL, "x", profile, k=5)) == 2
    with pytest.raises(UserError):
        retrieve(EMAIL, "x", profile, k=-1)


def test_recent_and_random_retrievers():
    profile = [{"title": str(i), "text": "t", "date": f"2020-01-0{i}"} for i in range(1, 5)]
    assert [it["title"] for it in retrieve(EMAIL, "q", profile, 2, "recent")] == ["4", "3"]
    r1 = retrieve(EMAIL, "q", profile, 4, "random", record_id="x", seed=1)
    assert r1 == retrieve(EMAIL, "q", profile, 4, "random", record_id="x", seed=1)
    with pytest.raises(UserError, match="unknown retriever"):
        retrieve(EMAIL, "q", profile, 1, "nope")


def test_too_long_cuts_profile_first_then_input_then_response(tiny):
    _, tok = tiny
    long_item = {"title": "t", "text": " ".join(["profile"] * 400)}
    rec = {"id": "a", "input": "Write about " + " ".join(["input"] * 50), "output": "short answer",
           "profile": [long_item]}
    b = PromptBuilder(tok, EMAIL, k=1, max_length=160)
    e = b.encode(rec)
    assert len(e["prompt_with"]) + len(e["response"]) <= 160
    assert b.stats.profile_cut == 1 and b.stats.input_cut == 0 and b.stats.response_cut == 0
    assert e["response"][-1] == tok.eos_token_id  # response untouched
    # so short that the input must go too, and finally the response (counted, warned)
    b2 = PromptBuilder(tok, EMAIL, k=1, max_length=60)
    rec2 = {**rec, "output": " ".join(["resp"] * 80)}
    e2 = b2.encode(rec2)
    assert len(e2["prompt_with"]) + len(e2["response"]) <= 60
    assert b2.stats.input_cut == 1 and b2.stats.response_cut == 1 and b2.stats.response_tokens_dropped > 0


def test_topic_writing_uses_published_fields():
    task = get_task("topic_writing")
    assert task.fields == ("summary", "content")


def test_hugging_face_dataset_folder(tmp_path):
    import datasets
    datasets.Dataset.from_list([GOOD]).save_to_disk(str(tmp_path / "ds"))
    assert load_records(str(tmp_path / "ds"), EMAIL)[0]["output"] == "text"


def test_load_records_old_path_warns_and_data_does_not_import_datasets():
    import subprocess
    import sys
    import warnings

    import percontrast.data as data
    import percontrast.datasets as datasets
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        old = data.load_records
    assert old is datasets.load_records
    assert any(issubclass(x.category, DeprecationWarning) and "percontrast.datasets.load_records" in str(x.message)
               for x in w)
    with pytest.raises(AttributeError):
        data.no_such_name  # noqa: B018
    # The library module reads and validates without loading the datasets room; the front door
    # loads neither the Hugging Face datasets package nor a source module until a spec needs it.
    code = ("import sys, percontrast.data; a = 'percontrast.datasets' in sys.modules; "
            "import percontrast.datasets; "
            "print(a, 'datasets' in sys.modules, 'percontrast.datasets.longlamp' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False False False"


def test_builtin_sample_and_unknown_builtin():
    recs = load_records("builtin:sample-test", EMAIL)
    assert recs and all(r["profile"] for r in recs)
    with pytest.raises(UserError, match="unknown built-in"):
        load_records("builtin:nope", EMAIL)
