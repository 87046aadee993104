"""percontrast report: train and compare folders to report.html + PNGs; train writes it; the progress line."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from percontrast import cli
from percontrast.commands import report as R
from percontrast.errors import UserError

REPO = Path(__file__).resolve().parents[1]
HOSTILE_METHOD = "<script>alert(1)</script>"
HOSTILE_RUN = "\"><img src=x onerror=alert(2)>&"

TRAIN_ARGS = ["--model", "tiny-random", "--data", "builtin:sample-train", "--task", "email", "--k", "1",
              "--limit", "4", "--batch-size", "2", "--max-steps", "2", "--max-length", "256"]


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def perce_run(tmp_path_factory):
    """A real 2-step tiny perce run with the defaults: progress on, report on."""
    run = tmp_path_factory.mktemp("report") / "perce"
    rc, out, err = _cli(["train", *TRAIN_ARGS, "--method", "perce", "--output-dir", str(run)])
    assert rc == 0, err
    return run, out, err


def _assert_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def _data_uris_are_pngs(text: str) -> int:
    import base64
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    for u in uris:
        assert base64.b64decode(u)[:4] == b"\x89PNG"
    return len(uris)


def _self_contained(text: str) -> None:
    """Parsed as a browser would: only the expected tags, no handler, no script, nothing remote."""
    from html.parser import HTMLParser

    tags: list[tuple[str, dict]] = []

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append((tag, dict(attrs)))

    P().feed(text)
    names = {t for t, _ in tags}
    assert names <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "table", "thead", "tbody",
                     "tr", "th", "td", "figure", "img", "figcaption", "a", "details", "summary", "ul", "li"}, names
    csp = [a["content"] for t, a in tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and csp[0].startswith("default-src 'none'; img-src data:; style-src 'sha256-")
    for t, a in tags:
        assert not [k for k in a if k.startswith("on")], (t, a)
        if t == "img":
            assert a["src"].startswith("data:image/png;base64,")
        if t == "a":
            assert re.fullmatch(r"[\w.-]+\.png", a["href"]), a   # a plot beside the page


# ---------------------------------------------------------------- train folders

def test_train_writes_report_and_progress_lines_by_default(perce_run):
    run, out, err = perce_run
    assert (run / "model.safetensors").exists()
    text = (run / "report.html").read_text()
    _self_contained(text)
    for key in ("loss", "learning_rate", "mean_pir", "mean_weight", "share_pir_above_min"):
        _assert_png(run / f"report_{key}.png")
        assert f"report_{key}.png" in text and f"({key})" in text, key   # each plotted series is named
    assert "mean PIR" in text and "share of tokens with PIR &gt; m = 0.8" in text
    assert _data_uris_are_pngs(text) >= 5
    assert json.loads(out)["report"] == str(run / "report.html")
    # the live progress: one compact line per logged step on stderr, next to the bar
    lines = [ln for ln in re.split(r"[\r\n]", err) if ln.startswith("step ")]
    assert len(lines) == 2, err
    assert lines[0].startswith("step 1/2  loss ") and "mean PIR " in lines[0] and "weight " in lines[0]
    assert lines[1].startswith("step 2/2  loss ")
    assert "{'loss'" not in err   # the Trainer's raw log dicts are gone


def test_no_report_and_no_progress_is_silent(tmp_path):
    run = tmp_path / "ce"
    rc, out, err = _cli(["train", *TRAIN_ARGS, "--method", "ce", "--max-steps", "1", "--no-report",
                         "--no-progress", "--output-dir", str(run)])
    assert rc == 0, err
    assert (run / "model.safetensors").exists() and (run / "train_results.json").exists()
    assert not (run / "report.html").exists() and not list(run.glob("report_*.png"))
    assert "step 1" not in err and "'loss'" not in out   # --no-progress: no lines, no dicts on stdout
    assert json.loads(out)["method"] == "ce" and "report" not in json.loads(out)
    # the report afterwards: ce logs no PIR, so those plots are skipped and the page says why
    res = R.run(R.ReportConfig(run_dir=str(run)))
    assert res["kind"] == "train" and "report_loss.png" in res["plots"]
    assert "report_mean_pir.png" not in res["plots"] and not (run / "report_mean_pir.png").exists()
    text = (run / "report.html").read_text()
    assert "Not plotted" in text and "mean PIR: method ce logs no PIR" in text


def test_report_failure_keeps_the_model(tmp_path, monkeypatch):
    def broken(cfg):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(R, "run", broken)
    run = tmp_path / "x"
    rc, out, err = _cli(["train", *TRAIN_ARGS, "--method", "ce", "--max-steps", "1", "--no-progress",
                         "--output-dir", str(run)])
    assert rc == 0 and "warning: report.html not written (RuntimeError: disk on fire)" in err
    assert (run / "model.safetensors").exists() and (run / "train_results.json").exists()
    assert json.loads(out)["report"] is None


def test_hostile_strings_are_escaped(perce_run, tmp_path):
    run = tmp_path / "hostile"
    run.mkdir()
    res = json.loads((perce_run[0] / "train_results.json").read_text())
    res["method"] = HOSTILE_METHOD
    res["run"]["git_commit"] = HOSTILE_RUN
    res["run"]["config"]["data"] = HOSTILE_METHOD
    res["log"][0]["loss"] = float("nan")      # a non-finite point is left out, not plotted
    (run / "train_results.json").write_text(json.dumps(res))
    R.run(R.ReportConfig(run_dir=str(run)))
    text = (run / "report.html").read_text()
    _self_contained(text)
    assert HOSTILE_METHOD not in text and HOSTILE_RUN not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;&amp;" in text
    _assert_png(run / "report_loss.png")
    assert "report_loss.png" in text and "1 logged steps" in text


def test_eval_summaries_in_the_folder_and_by_flag(perce_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(perce_run[0] / "train_results.json", run)
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text(json.dumps(
        {"task": "email", "data": "test.jsonl", "examples": 12, "model": str(run), "use_profile": True,
         "profile_cut": 1, "profile_removed": 0, "metrics": {"rouge1": 0.25, "rougeL": 0.125, "meteor": 0.1}}))
    other = tmp_path / "noprofile"
    other.mkdir()
    (other / "summary.json").write_text(json.dumps(
        {"task": "email", "data": "test.jsonl", "examples": 12, "use_profile": False,
         "metrics": {"rougeL": 0.0625}}))
    rc, out, err = _cli(["report", str(run), "--eval", str(other)])
    assert rc == 0, err
    text = (run / "report.html").read_text()
    assert "eval/summary.json" in text and "12.50" in text and "25.00" in text and "ROUGE-L x100" in text
    assert "6.25" in text and str(other / "summary.json") in text


# ---------------------------------------------------------------- compare folders

def _fake_compare(out: Path, model: str = "tiny-random") -> None:
    iv = lambda m, lo, hi, n: {"mean": m, "lo": lo, "hi": hi, "n": n}   # noqa: E731
    delta = {"diff": -0.01, "lo": -0.03, "hi": 0.01, "share_boot_le_0": 0.8, "n": 4, "resamples": 200, "seed": 0,
             "seeds": [0, 1], "two_level": {"diff": -0.01, "lo": -0.05, "hi": 0.03, "seed_level": True,
                                             "n_seeds": 2, "share_boot_le_0": 0.7}}
    common = {"train_s": 3.0, "eval_s": 1.0, "peak_mem_mb": 120.0, "mem_kind": "rss", "deterministic": False,
              "profile_cut": 0, "profile_removed": 0}
    rows = [dict(common, method="ce", seeds=[0, 1], metrics={"rougeL": iv(0.2, 0.15, 0.25, 2)}, vs_ce={},
                 gain_pct={}, shared_seeds=None),
            dict(common, method="perce", seeds=[0, 1], metrics={"rougeL": iv(0.19, 0.17, 0.21, 2)},
                 vs_ce={"rougeL": delta}, gain_pct={"rougeL": -5.0}, shared_seeds=[0, 1])]
    res = {"model": model, "train_data": "builtin:sample-train", "task": "email", "methods": ["ce", "perce"],
           "seeds": [0, 1], "train": {"max_steps": 2}, "decoding": {"max_new_tokens": 3},
           "prompt": {"k": 1, "retriever": "bm25", "max_length": 192}, "metrics": ["rougeL"],
           "bootstrap_resamples": 200, "unhashed_cells": [],
           "groups": [{"eval_set": "test", "task": "email", "data": "builtin:sample-test", "n_examples": 4,
                       "lr": 2e-5, "clip_min": 0.8, "clip_max": 5.0, "rows": rows}],
           "run": {"date": "2026-11-28", "machine": "CPU", "git_commit": "abc"}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res))
    (out / "cells").mkdir(exist_ok=True)
    for m in ("ce", "perce"):
        for s in (0, 1):
            log = [{"step": i, "loss": 4.0 - 0.1 * i - 0.05 * s, "learning_rate": 1e-5}
                   | ({"mean_pir": 0.5 + 0.01 * i} if m == "perce" else {}) for i in (1, 2)]
            cell = {"method": m, "seed": s, "eval_set": "test", "trained": True, "lr": 2e-5,
                    "clip_min": 0.8 if m == "perce" else None, "clip_max": 5.0 if m == "perce" else None,
                    "train": {"steps": 2, "log": log}, "examples": []}
            (out / "cells" / f"{m}__seed{s}__test.json").write_text(json.dumps(cell))


def test_compare_folder_page(tmp_path):
    out = tmp_path / "cmp"
    _fake_compare(out, model=HOSTILE_METHOD)
    rc, stdout, err = _cli(["report", str(out)])
    assert rc == 0, err
    res = json.loads(stdout)
    assert res["kind"] == "compare"
    assert res["plots"] == ["report_results.png", "report_train_loss.png", "report_train_mean_pir.png"]
    for name in res["plots"]:
        _assert_png(out / name)
    text = (out / "report.html").read_text()
    _self_contained(text)
    assert HOSTILE_METHOD not in text and "&lt;script&gt;" in text
    assert "<td>perce</td><td>2</td><td>19.00 [17.00, 21.00]</td>" in text      # the table with intervals
    assert "-1.00 [-3.00, +1.00] [-5.00, +3.00]" in text and "-5.0" in text    # Δ vs ce, both intervals, gain
    assert "ROUGE-L" in text and "Prompt length" in text and _data_uris_are_pngs(text) == 3


def test_compare_folder_of_an_older_results_json(tmp_path):
    out = tmp_path / "email"
    shutil.copytree(REPO / "results" / "email", out)
    res = R.run(R.ReportConfig(run_dir=str(out)))
    text = (out / "report.html").read_text()
    assert res["plots"] == [] and "results.png" in text and _data_uris_are_pngs(text) == 1
    assert "<td>perce</td><td>3</td><td>10.15 [9.74, 10.57]</td>" in text and "no cells/ folder" in text


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("case", ["missing", "file", "empty", "bad_train_json", "bad_results_json",
                                  "not_a_train_run", "not_compare", "missing_eval", "bad_eval", "bad_cell", "no_arg"])
def test_errors_are_one_line_exit_2(tmp_path, case):
    d = tmp_path / "d"
    d.mkdir()
    argv = ["report", str(d)]
    expect = str(d)
    if case == "missing":
        argv, expect = ["report", str(tmp_path / "nope")], "nope: folder not found"
    elif case == "file":
        (tmp_path / "f").write_text("x")
        argv, expect = ["report", str(tmp_path / "f")], "f: not a folder"
    elif case == "empty":
        expect = "neither a train folder (train_results.json) nor a compare folder"
    elif case == "bad_train_json":
        (d / "train_results.json").write_text('{"log": [')
        expect = "train_results.json: invalid JSON at line 1"
    elif case == "bad_results_json":
        (d / "results.json").write_bytes(b"\xff\xfe")
        expect = "results.json: not valid UTF-8"
    elif case == "not_a_train_run":
        (d / "train_results.json").write_text('{"method": "ce"}')
        expect = "train_results.json: no 'log' list"
    elif case == "not_compare":
        (d / "results.json").write_text('{"groups": [{"rows": []}]}')
        expect = "results.json: not a percontrast compare results.json"
    elif case == "missing_eval":
        (d / "train_results.json").write_text('{"log": []}')
        argv += ["--eval", str(tmp_path / "noeval")]
        expect = "--eval: " + str(tmp_path / "noeval") + ": not found"
    elif case == "bad_eval":
        (d / "train_results.json").write_text('{"log": []}')
        (tmp_path / "ev").mkdir()
        (tmp_path / "ev" / "summary.json").write_text('{"metrics": 3}')
        argv += ["--eval", str(tmp_path / "ev")]
        expect = "ev/summary.json: no 'metrics' object"
    elif case == "bad_cell":
        _fake_compare(d)
        (d / "cells" / "ce__seed0__test.json").write_text("[")
        expect = "ce__seed0__test.json: invalid JSON"
    elif case == "no_arg":
        argv, expect = ["report"], "missing required option(s): run_dir"
    rc, out, err = _cli(argv)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err, err
    assert not (d / "report.html").exists()


def test_report_config_in_python_and_yaml(tmp_path):
    with pytest.raises(UserError, match="folder not found"):
        R.run(R.ReportConfig(run_dir=str(tmp_path / "nope")))
    assert R.ReportConfig(run_dir="x").eval == []


# ---------------------------------------------------------------- the progress callback

def test_progress_line_callback_prints_step_loss_pir(capsys):
    from transformers import TrainerCallback

    from percontrast.commands.report import ProgressLineCallback

    cb = ProgressLineCallback()
    assert isinstance(cb, TrainerCallback)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=18)
    cb.on_train_begin(None, state, None)
    state.global_step = 3
    cb.on_log(None, state, None, logs={"loss": 4.2134, "mean_pir": 1.0871, "mean_weight": 1.1234,
                                       "learning_rate": 2e-5, "share_pir_above_min": 0.4})
    cb.on_log(None, state, None, logs={"train_runtime": 1.0, "train_loss": 4.0})   # the end-of-run summary: no line
    cb.on_log(None, SimpleNamespace(is_world_process_zero=False, global_step=3, max_steps=18), None,
              logs={"loss": 1.0})                                                # not the main process: no line
    cb.on_log(None, state, None, logs={"loss": 3.5, "mean_weight": 1.0})          # ce: no PIR
    cb.on_train_end(None, state, None)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and len(lines) == 2
    assert re.fullmatch(r"step 3/18  loss 4\.2134  mean PIR 1\.087  weight 1\.123  lr 2\.0e-05  0:\d\d", lines[0])
    assert lines[1].startswith("step 3/18  loss 3.5000  weight 1.000") and "PIR" not in lines[1]
    assert R.format_log_line({"loss": 1.0}, 5) == "step 5  loss 1.0000"
