"""percontrast eval: exchange format, id checks, empty predictions, scoring a file."""
from __future__ import annotations

import json

import pytest

from percontrast import cli
from percontrast.errors import UserError
from percontrast.commands.evaluate import EvalConfig, run
from percontrast.data import align_predictions, read_predictions

SAMPLE = "builtin:sample-test"


def _gold_ids(n=None):
    from percontrast.datasets import load_records
    from percontrast.prompts import get_task
    return [r["id"] for r in load_records(SAMPLE, get_task("email"), limit=n)]


def test_generate_and_score_writes_exchange_format(tmp_path):
    out = tmp_path / "ev"
    res = run(EvalConfig(model="tiny-random", data=SAMPLE, task="email", limit=3, k=1, max_length=256,
                         max_new_tokens=4, output_dir=str(out)))
    ids = _gold_ids(3)
    pred = json.loads((out / "predictions.json").read_text())
    assert set(pred) == {"task", "golds"} and pred["task"] == "email"
    assert [g["id"] for g in pred["golds"]] == ids
    assert all(set(g) == {"id", "output"} and isinstance(g["output"], str) for g in pred["golds"])
    rows = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ids
    assert all(set(r["scores"]) == {"rouge1", "rougeL", "meteor"} for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    # the end info: a row that did not end ran to max_new_tokens, and the summary's share counts those rows
    assert all(isinstance(r["ended"], bool) and 0 <= r["new_tokens"] <= 4 and (r["ended"] or r["new_tokens"] == 4)
               for r in rows)
    assert summary["hit_max_new_tokens"] == sum(not r["ended"] for r in rows) / 3
    assert summary["examples"] == 3 and summary["use_profile"] is True
    assert "rouge-score" in summary["metric_versions"] and "versions" in summary["run"]
    assert res["metrics"] == summary["metrics"]
    # a second run refuses to overwrite
    with pytest.raises(UserError, match="overwrite"):
        run(EvalConfig(model="tiny-random", data=SAMPLE, task="email", limit=3, output_dir=str(out)))


def test_align_reports_every_bad_id_in_one_error():
    gold = ["a", "b", "c", "d"]
    preds = [{"id": "a", "output": "x"}, {"id": "a", "output": "y"}, {"id": "c", "output": ""},
             {"id": "zz", "output": "q"}]
    with pytest.raises(UserError) as e:
        align_predictions(preds, gold, source="p.json")
    msg = str(e.value)
    assert "missing 2 id(s): b, d" in msg and "extra 1 id(s): zz" in msg and "duplicated 1 id(s): a" in msg
    assert "\n" not in msg
    ok = align_predictions([{"id": i, "output": i.upper()} for i in reversed(gold)], gold)
    assert ok == ["A", "B", "C", "D"]  # gold order, whatever the file order


def test_score_predictions_file_empty_scores_zero(tmp_path):
    from percontrast.datasets import load_records
    from percontrast.prompts import get_task
    recs = load_records(SAMPLE, get_task("email"))
    golds = [{"id": r["id"], "output": r["output"]} for r in recs]
    golds[1]["output"] = ""          # empty prediction: kept, scores 0
    golds[2]["output"] = "   "       # blank too
    f = tmp_path / "preds.json"
    f.write_text(json.dumps({"task": "email", "golds": golds}))
    out = tmp_path / "scored"
    res = run(EvalConfig(data=SAMPLE, task="email", predictions=str(f), output_dir=str(out)))
    rows = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(recs)
    assert rows[1]["scores"] == {"rouge1": 0.0, "rougeL": 0.0, "meteor": 0.0}
    assert rows[2]["scores"]["rouge1"] == 0.0
    assert rows[0]["scores"]["rouge1"] == pytest.approx(1.0)
    n = len(recs)
    assert res["metrics"]["rouge1"] == pytest.approx((n - 2) / n)  # the two empties count in the mean
    summary = json.loads((out / "summary.json").read_text())
    assert summary["empty_predictions"] == 2


def test_predictions_jsonl_and_cli_mismatch_exit_code(tmp_path, capsys):
    ids = _gold_ids()
    f = tmp_path / "preds.jsonl"
    f.write_text("".join(json.dumps({"id": i, "prediction": "hello"}) + "\n" for i in ids[1:]))
    assert [p["id"] for p in read_predictions(f)] == ids[1:]
    code = cli.main(["eval", "--data", SAMPLE, "--task", "email", "--predictions", str(f),
                     "--output-dir", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and ids[0] in err and "missing 1 id(s)" in err
    assert not (tmp_path / "o" / "summary.json").exists()


def test_unknown_metric_refused():
    with pytest.raises(UserError, match="unknown metric 'bleu'"):
        EvalConfig(data=SAMPLE, task="email", metrics=["rouge1", "bleu"])


def test_end_info_reaches_predictions_and_summary(tmp_path, monkeypatch):
    """Rows that end early and rows that hit max_new_tokens, in record order: the generation's info is written
    per example and summarized as the share that hit the limit (the stock tiny model never ends by itself)."""
    import percontrast.commands.evaluate as ev

    def fake(model, tok, records, task, prompt_opts, options, *, info=None, **kw):
        info.extend({"new_tokens": 2 if i % 2 else options.max_new_tokens, "ended": bool(i % 2)}
                    for i in range(len(records)))
        return ["x y"] * len(records)

    monkeypatch.setattr(ev, "generate_for", fake)
    monkeypatch.setattr(EvalConfig, "load_model", lambda self, device=None: (None, None))
    out = tmp_path / "ev"
    run(EvalConfig(model="tiny-random", data=SAMPLE, task="email", limit=5, max_new_tokens=4, metrics=["rouge1"],
                   output_dir=str(out)))
    rows = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(r["new_tokens"], r["ended"]) for r in rows] == [(4, False), (2, True), (4, False), (2, True), (4, False)]
    assert json.loads((out / "summary.json").read_text())["hit_max_new_tokens"] == 3 / 5
    scored = tmp_path / "scored"                       # scoring a file: no generation, no end info
    run(EvalConfig(data=SAMPLE, task="email", limit=5, predictions=str(out / "predictions.json"), metrics=["rouge1"],
                   output_dir=str(scored)))
    assert "hit_max_new_tokens" not in json.loads((scored / "summary.json").read_text())
    assert "ended" not in json.loads((scored / "predictions.jsonl").read_text().splitlines()[0])
