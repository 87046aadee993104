"""Hostile and broken input through the real CLI: one clear ``error:`` line, exit 2, no traceback,
nothing written. Inputs that are legitimately fine (RTL, control characters, BOM, emoji, a 1 MB
token, a tokenizer without a chat template) must work instead.

Fixtures: ``tests/fixtures/broken/data/*`` (records), ``tests/fixtures/broken/config/*.yaml``;
broken model directories are derived at test time from a saved tiny-random model (weights
are 13 MB, too big to keep several copies in the repository), and so is the 1 MB token.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import ROOT, run_cli, run_cli_subprocess, snapshot

BROKEN = ROOT / "tests" / "fixtures" / "broken"

# file -> substrings the one error line must contain (besides the file name)
DATA_ERRORS = {
    "truncated_line.jsonl": ["invalid JSON at line 2"],
    "truncated_list.json": ["invalid JSON at line 1"],
    "input_wrong_type.jsonl": ["record r1", "field 'input'", "expected a string, got int"],
    "output_wrong_type.jsonl": ["record r0", "field 'output'", "got dict"],
    "profile_wrong_type.jsonl": ["record r0", "field 'profile'", "expected a list"],
    "profile_item_not_object.jsonl": ["field 'profile[0]'", "expected an object"],
    "output_missing.jsonl": ["record r0", "field 'output'", "missing"],
    "output_null.jsonl": ["field 'output'", "missing"],
    "id_missing.jsonl": ["record #0", "field 'id'", "missing"],
    "id_bool.jsonl": ["record #0", "field 'id'", "got bool"],
    "id_duplicate.jsonl": ["record r0", "field 'id'", "duplicate id"],
    "profile_missing.jsonl": ["field 'profile'", "missing"],
    "profile_empty.jsonl": ["field 'profile'", "is empty"],
    "profile_item_no_text.jsonl": ["field 'profile[0]'", "no non-empty string field"],
    "output_empty.jsonl": ["field 'output'", "is empty"],
    "input_whitespace.jsonl": ["field 'input'", "is empty"],
    "record_not_object.jsonl": ["record #1", "expected a JSON object, got list"],
    "invalid_utf8.jsonl": ["not valid UTF-8 at line 2"],
    "lone_surrogate.jsonl": ["record r1", "field 'output'", "unpaired surrogate"],
    "empty.jsonl": ["file is empty"],
    "only_blank_lines.jsonl": ["file is empty"],
    "top_level_number.json": ["expected a list of records, got int"],
    "object_without_records.json": ["expected a list of records"],
    "corrupt.parquet": ["cannot read Parquet"],
}
CONFIG_ERRORS = {
    "unknown_key.yaml": ["unknown key 'batchsize'", "batch_size"],
    "wrong_type.yaml": ["key 'batch_size'", "expected an integer"],
    "bool_for_int.yaml": ["key 'max_steps'", "expected an integer"],
    "list_for_float.yaml": ["key 'learning_rate'", "expected a number"],
    "invalid_yaml.yaml": ["invalid YAML at line 2"],
    "top_level_list.yaml": ["expected a mapping"],
    "python_object.yaml": ["invalid YAML", "python/object"],     # safe loader: no code runs
    "invalid_value.yaml": ["key 'batch_size'", "must be >= 1"],
    "bad_choice.yaml": ["key 'method'", "'magic' is not one of"],
    "invalid_utf8.yaml": ["not valid UTF-8"],
}
FLAG_ERRORS = {
    "max_length_too_small": (["--max-length", "4"], ["max_length must be >= 8"]),
    "negative_clip": (["--clip-min", "-1"], ["clip_min", "--allow-negative-clip"]),
    "zero_batch": (["--batch-size", "0"], ["batch_size must be >= 1"]),
    "not_a_number": (["--learning-rate", "abc"], ["learning_rate", "expected a number"]),
    "missing_data_file": (["--data", "/nonexistent/records.jsonl"], ["/nonexistent/records.jsonl", "not found"]),
    "data_is_a_directory": (["--data", str(BROKEN)], ["is a directory"]),
    "unknown_builtin": (["--data", "builtin:nope"], ["unknown built-in data"]),
    "unknown_lora_module": (["--lora", "--lora-target-modules", "nope"], ["lora_target_modules", "nope"]),
    "unknown_flag": (["--bogus"], ["unrecognized arguments: --bogus"]),
    "bad_choice_flag": (["--method", "magic"], ["invalid choice: 'magic'"]),
}


def _train(data, out, *extra, model="tiny-random"):
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps", "1",
            "--batch-size", "2", "--max-length", "256", "--no-progress", *extra]


def assert_clean_failure(rc: int, err: str, *must: str):
    assert rc == 2, f"exit {rc}: {err[-1500:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err[-2000:]
    for m in must:
        assert m in lines[0], f"{m!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("name", sorted(DATA_ERRORS))
def test_broken_data(name, tmp_path):
    path = BROKEN / "data" / name
    out = tmp_path / "out"
    rc, _, err = run_cli(_train(path, out))
    assert_clean_failure(rc, err, str(path), *DATA_ERRORS[name])
    assert not out.exists()


@pytest.mark.parametrize("name", sorted(CONFIG_ERRORS))
def test_broken_config(name, tmp_path):
    path = BROKEN / "config" / name
    out = tmp_path / "out"
    rc, _, err = run_cli(["train", "--config", str(path), "--model", "tiny-random", "--data", "builtin:sample-train",
                          "--output-dir", str(out), "--max-steps", "1", "--no-progress"])
    assert_clean_failure(rc, err, str(path), *CONFIG_ERRORS[name])
    assert not out.exists()
    assert not Path("/tmp/percontrast_pwned").exists()


@pytest.mark.parametrize("name", sorted(FLAG_ERRORS))
def test_bad_flags(name, tmp_path):
    extra, must = FLAG_ERRORS[name]
    argv = _train("builtin:sample-train", tmp_path / "out") + extra   # argparse: the last value of a flag wins
    rc, _, err = run_cli(argv)
    assert_clean_failure(rc, err, *must)
    assert not (tmp_path / "out").exists()


def test_failed_overwrite_leaves_the_old_run_unchanged(tmp_path):
    """--overwrite with broken data: the previous run in the folder is untouched."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "train_results.json").write_text('{"steps": 7}')
    (out / "checkpoint-7").mkdir()
    (out / "checkpoint-7" / "trainer_state.json").write_text("{}")
    before = snapshot(out)
    for name in ("truncated_line.jsonl", "lone_surrogate.jsonl", "id_duplicate.jsonl"):
        rc, _, err = run_cli(_train(BROKEN / "data" / name, out, "--overwrite"))
        assert_clean_failure(rc, err, name)
        assert snapshot(out) == before


# -- broken model directories ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    from percontrast.models import load_model
    d = tmp_path_factory.mktemp("tiny") / "model"
    model, tok = load_model("tiny-random")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _rewrite_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


MODEL_BREAKERS = {
    "missing_weights": (lambda d: (d / "model.safetensors").unlink(), ["has no weights"]),
    "corrupt_weights": (lambda d: (d / "model.safetensors").write_bytes(b"\x00garbage" * 64), ["deserializing"]),
    "truncated_weights": (lambda d: os.truncate(d / "model.safetensors", (d / "model.safetensors").stat().st_size // 2),
                          ["deserializing"]),
    "config_not_json": (lambda d: (d / "config.json").write_text("{not json"), ["not a valid JSON"]),
    "config_wrong_type": (lambda d: _rewrite_json(d / "config.json", hidden_size="big"), ["hidden_size"]),
    "no_config": (lambda d: (d / "config.json").unlink(), ["has no config.json"]),
    "no_tokenizer": (lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")], ["tokenizer"]),
    "corrupt_tokenizer": (lambda d: (d / "tokenizer.json").write_text('{"version": "1.0", "model": 5}'),
                          ["missing key"]),
    "model_is_a_file": (lambda d: None, ["is a file"]),
}


@pytest.mark.parametrize("name", sorted(MODEL_BREAKERS))
def test_broken_model_directory(name, saved_tiny, tmp_path):
    breaker, must = MODEL_BREAKERS[name]
    d = tmp_path / name
    shutil.copytree(saved_tiny, d)
    breaker(d)
    if name == "model_is_a_file":
        d = d / "config.json"
    out = tmp_path / "out"
    rc, _, err = run_cli(_train("builtin:sample-train", out, "--limit", "4", model=d))
    line = assert_clean_failure(rc, err, *must)
    assert str(d) in line
    assert not out.exists()


def test_tokenizer_without_chat_template_works(saved_tiny, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(saved_tiny, d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    from percontrast.models import load_model
    assert not load_model(str(d))[1].chat_template
    rc, _, err = run_cli(["score", "--model", str(d), "--data", "builtin:sample-test", "--limit", "2",
                          "--output-dir", str(tmp_path / "out"), "--max-length", "256"])
    assert rc == 0, err
    assert len(json.loads((tmp_path / "out" / "scores.json").read_text())["examples"]) == 2


# -- inputs that are fine -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ok_rtl.jsonl", "ok_control_chars.jsonl", "ok_bom.jsonl",
                                  "ok_emoji_and_combining.jsonl"])
def test_unusual_but_valid_text_works(name, tmp_path):
    path = BROKEN / "data" / name
    out = tmp_path / "out"
    rc, _, err = run_cli(["score", "--model", "tiny-random", "--data", str(path), "--output-dir", str(out),
                          "--max-length", "256"])
    assert rc == 0, err
    scores = json.loads((out / "scores.json").read_text())
    raw = [json.loads(ln) for ln in path.read_text(encoding="utf-8-sig").split("\n") if ln.strip()]
    assert [e["output"] for e in scores["examples"]] == [r["output"] for r in raw]   # text kept exactly
    # decoding the response ids gives back the text (plus the end-of-turn token)
    from percontrast.models import load_model
    tok = load_model("tiny-random")[1]
    for e, r in zip(scores["examples"], raw):
        assert tok.decode(e["token_ids"][:-1]) == r["output"]
    assert (out / "heatmap.html").exists()


def test_one_megabyte_token_is_cut_and_counted(tmp_path):
    good = json.loads((BROKEN / "data" / "ok_bom.jsonl").read_text(encoding="utf-8-sig"))
    rows = [dict(good, id="big-output", output="x" * 1_000_000),
            dict(good, id="big-input", input="Z" * 1_000_000)]
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    rc, stdout, err = run_cli(_train(path, out))
    assert rc == 0, err
    res = json.loads((out / "train_results.json").read_text())
    assert res["response_cut"] == 1            # never silent
    assert res["profile_cut"] >= 1


# -- a few through a real subprocess (exit status, stderr of the process) ---------------------------------

@pytest.mark.parametrize("argv_tail,must", [
    (["--data", str(BROKEN / "data" / "truncated_line.jsonl")], ["invalid JSON at line 2"]),
    (["--data", "builtin:sample-train", "--config", str(BROKEN / "config" / "python_object.yaml")], ["invalid YAML"]),
])
def test_subprocess_exit_code(argv_tail, must, tmp_path):
    out = tmp_path / "out"
    p = run_cli_subprocess(["train", "--model", "tiny-random", "--output-dir", str(out), *argv_tail])
    assert_clean_failure(p.returncode, p.stderr, *must)
    assert not out.exists()
