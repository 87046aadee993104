"""The command line: each command on the tiny model, and one clear line for each user mistake."""
import json

import pytest

from percontrast.cli import main

GOOD = {"id": "a", "user_id": "u1", "input": "Write about the weekend", "output": "Cycling by the river. Cheers",
        "profile": [{"title": "Ride", "text": "I cycle along the river"}, {"title": "Food", "text": "lentils"}]}
GOOD2 = {**GOOD, "id": "b", "user_id": "u2", "profile": [{"title": "Chess", "text": "the chess club meets"}]}


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in (GOOD, GOOD2)), encoding="utf-8")
    return p


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_score_writes_json_and_escaped_heatmap(tmp_path, data, capsys):
    rc, out, err = _run(capsys, "score", "--model", "tiny-random", "--data", data, "--task", "email",
                        "--output-dir", tmp_path / "s")
    assert rc == 0, err
    payload = json.loads((tmp_path / "s" / "scores.json").read_text())
    ex = payload["examples"][0]
    assert len(ex["tokens"]) == len(ex["pir"]) == len(ex["weights"])
    # PIR is a float32 subtraction of the two float32 log-probs (stored as exact Python floats): IEEE
    # rounding makes it round32(a - b), within half an ulp, i.e. |a - b| * 2**-24
    for v, a, b in zip(ex["pir"], ex["logp_with"], ex["logp_without"]):
        assert abs(v - (a - b)) <= abs(a - b) * 2.0 ** -24
    assert "<span" in (tmp_path / "s" / "heatmap.html").read_text()


# Three users whose profile texts are unique, so a decoded prompt tells whose profile it holds.
SWAP_USERS = {"u1": "I cycle along the river every morning", "u2": "the chess club meets on thursdays",
              "u3": "violin lessons by the old harbour"}
SWAP_RECORDS = [{"id": f"r{i}", "user_id": u, "input": f"Write about the weekend plans number {i}",
                 "output": f"Cycling and chess and violin, note {i}. Cheers",
                 "profile": [{"title": "Hobby", "text": text}]}
                for i, (u, text) in enumerate(list(SWAP_USERS.items()) * 2)]


def _score_capturing_prompts(capsys, monkeypatch, data, out, counterfactual):
    """Run ``score`` and record every batch that reaches the model: (scores.json, [(with-profile prompt,
    counterfactual prompt) decoded, one per record, in record order])."""
    import torch

    import percontrast.scoring as scoring
    from percontrast.models import load_model
    batches, orig = [], scoring.score_batch

    def spy(model, batch, **kw):
        batches.append({k: v.detach().cpu().clone() for k, v in batch.items() if torch.is_tensor(v)})
        return orig(model, batch, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(scoring, "score_batch", spy)
        rc, _, err = _run(capsys, "score", "--model", "tiny-random", "--data", data, "--task", "email",
                          "--counterfactual", counterfactual, "--batch-size", "4", "--output-dir", out, "--no-html")
    assert rc == 0, err
    assert batches, "score never reached scoring.score_batch"
    tok = load_model("tiny-random")[1]
    prompts = []
    for b in batches:
        P, Q = int(b["resp_start"]), int(b["cf_resp_start"])
        for i in range(b["input_ids"].shape[0]):
            w = b["input_ids"][i, :P][b["attention_mask"][i, :P].bool()].tolist()
            c = b["cf_input_ids"][i, :Q][b["cf_attention_mask"][i, :Q].bool()].tolist()
            prompts.append((int(b["idx"][i]), tok.decode(w), tok.decode(c)))
    # batches come length-bucketed; ``idx`` is each row's record position
    return json.loads((out / "scores.json").read_text()), [p[1:] for p in sorted(prompts)]


def _owners(prompt: str) -> set:
    return {u for u, text in SWAP_USERS.items() if text in prompt}


def test_score_swap_counterfactual(tmp_path, capsys, monkeypatch):
    """swap: PIR = log p(y | own profile) - log p(y | ANOTHER user's profile). The counterfactual prompt that
    reaches the model holds exactly one other user's profile text (not the record's own, not none), the
    with-profile prompt is the same as under remove, and so the PIR differs from remove's."""
    data = tmp_path / "swap.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in SWAP_RECORDS), encoding="utf-8")
    rem, rem_prompts = _score_capturing_prompts(capsys, monkeypatch, data, tmp_path / "remove", "remove")
    swp, swp_prompts = _score_capturing_prompts(capsys, monkeypatch, data, tmp_path / "swap", "swap")
    assert swp["summary"]["counterfactual"] == "swap" and rem["summary"]["counterfactual"] == "remove"
    assert len(rem_prompts) == len(swp_prompts) == len(SWAP_RECORDS)
    assert [e["id"] for e in swp["examples"]] == [e["id"] for e in rem["examples"]] == [r["id"] for r in SWAP_RECORDS]
    for r, (rw, rc), (sw, sc), re_, se in zip(SWAP_RECORDS, rem_prompts, swp_prompts, rem["examples"],
                                              swp["examples"]):
        own = r["user_id"]
        # remove: own profile in the with-prompt, no profile at all in the counterfactual
        assert _owners(rw) == {own} and _owners(rc) == set(), (rw, rc)
        # swap: the with-prompt is untouched; the counterfactual holds one OTHER user's profile
        assert sw == rw
        others = _owners(sc)
        assert len(others) == 1 and own not in others, (own, sc)
        assert r["input"] in sc
        # scores. The with-profile pass is the same computation on the same ids and shapes in both runs
        # (same records, same batches, same with-prompts), so its log-probs are bit-identical; the
        # counterfactual pass runs on different ids, so PIR must change (if swap were ignored, both runs
        # would compute bit-identical PIR and this inequality would fail).
        assert se["token_ids"] == re_["token_ids"]
        assert se["logp_with"] == re_["logp_with"]
        assert se["logp_without"] != re_["logp_without"] and se["pir"] != re_["pir"]
        # float32 PIR = round32(logp_with - logp_without), exact to half an ulp (IEEE subtraction)
        for v, a, b in zip(se["pir"], se["logp_with"], se["logp_without"]):
            assert abs(v - (a - b)) <= abs(a - b) * 2.0 ** -24


def test_train_then_generate_from_checkpoint(tmp_path, data, capsys):
    run = tmp_path / "run"
    rc, _, err = _run(capsys, "train", "--model", "tiny-random", "--data", data, "--task", "email",
                      "--method", "perce", "--max-steps", "2", "--batch-size", "2", "--output-dir", run,
                      "--no-progress")
    assert rc == 0, err
    res = json.loads((run / "train_results.json").read_text())
    assert res["steps"] == 2 and res["method"] == "perce"
    assert (run / "model.safetensors").exists()
    rc, _, err = _run(capsys, "generate", "--model", run, "--data", data, "--task", "email",
                      "--max-new-tokens", "5", "--output-dir", tmp_path / "g")
    assert rc == 0, err
    preds = json.loads((tmp_path / "g" / "predictions.json").read_text())
    assert preds["task"] == "email" and [g["id"] for g in preds["golds"]] == ["a", "b"]


def test_train_lora_from_yaml_config(tmp_path, data, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: tiny-random\ndata: {data}\ntask: email\nmethod: perce\nlora: true\nmax_steps: 1\n"
                   f"batch_size: 2\nclip_min: 0.5\nprogress: false\n")
    rc, _, err = _run(capsys, "train", "--config", cfg, "--output-dir", tmp_path / "r", "--clip-max", "8")
    assert rc == 0, err
    saved = (tmp_path / "r" / "train_config.yaml").read_text()
    assert "clip_min: 0.5" in saved and "clip_max: 8.0" in saved and "lora: true" in saved
    assert (tmp_path / "r" / "adapter_model.safetensors").exists()
    rc, _, err = _run(capsys, "generate", "--model", tmp_path / "r", "--data", data, "--task", "email",
                      "--max-new-tokens", "3", "--output-dir", tmp_path / "g")
    assert rc == 0, err  # the adapter folder loads on top of its recorded base model


def _bad(tmp_path, name, rows=None, raw=None):
    p = tmp_path / name
    if raw is not None:
        p.write_bytes(raw)
    else:
        p.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return p


@pytest.mark.parametrize("case,needle", [
    ("missing_output", "record a: field 'output': missing"),
    ("empty_output", "record a: field 'output': is empty"),
    ("empty_profile", "record a: field 'profile': is empty"),
    ("item_missing_field", "field 'profile[0].text': missing"),
    ("duplicate_ids", "field 'id': duplicate id"),
    ("not_utf8", "not valid UTF-8"),
    ("truncated", "invalid JSON"),
])
def test_bad_data_one_line_error(tmp_path, capsys, case, needle):
    rows = {
        "missing_output": [{k: v for k, v in GOOD.items() if k != "output"}],
        "empty_output": [{**GOOD, "output": "  "}],
        "empty_profile": [{**GOOD, "profile": []}],
        "item_missing_field": [{**GOOD, "profile": [{"title": "x"}]}],
        "duplicate_ids": [GOOD, GOOD],
    }.get(case)
    raw = {"not_utf8": b'{"id": "a", "input": "\xff\xfe"}\n', "truncated": b'{"id": "a", "input": "x", "outp'}.get(case)
    p = _bad(tmp_path, f"{case}.jsonl", rows, raw)
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "train", "--model", "tiny-random", "--data", p, "--task", "email",
                      "--output-dir", out)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0] and str(p) in lines[0]
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("argv,needle", [
    (["--clip-min", "3", "--clip-max", "2"], "clip_min (3.0) must be <= clip_max (2.0)"),
    (["--clip-min", "-1"], "clip_min -1.0 < 0"),
    (["--k", "-2"], "k must be >= 0"),
    (["--learning-rate", "abc"], "expected a number"),
])
def test_bad_flags(tmp_path, data, capsys, argv, needle):
    rc, _, err = _run(capsys, "train", "--model", "tiny-random", "--data", data, "--task", "email",
                      "--output-dir", tmp_path / "o", *argv)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_unknown_config_key(tmp_path, data, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {data}\nlearning_rat: 0.1\n")
    rc, _, err = _run(capsys, "train", "--config", cfg)
    assert rc == 2 and f"{cfg}: unknown key 'learning_rat'" in err and "did you mean 'learning_rate'" in err


def test_model_dir_without_weights(tmp_path, data, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    rc, _, err = _run(capsys, "score", "--model", d, "--data", data, "--task", "email",
                      "--output-dir", tmp_path / "s")
    assert rc == 2 and "has no weights" in err and not (tmp_path / "s").exists()


def test_existing_run_not_overwritten(tmp_path, data, capsys):
    out = tmp_path / "s"
    out.mkdir()
    (out / "scores.json").write_text("keep me")
    rc, _, err = _run(capsys, "score", "--model", "tiny-random", "--data", data, "--task", "email",
                      "--output-dir", out)
    assert rc == 2 and "--overwrite" in err and (out / "scores.json").read_text() == "keep me"
    run = tmp_path / "run"
    run.mkdir()
    (run / "x").write_text("old")
    rc, _, err = _run(capsys, "train", "--model", "tiny-random", "--data", data, "--task", "email",
                      "--output-dir", run)
    assert rc == 2 and "already holds a run" in err and (run / "x").read_text() == "old"


def test_help_lists_every_flag_with_text(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--data", "--method", "--clip-min", "--clip-max", "--lora", "--output-dir", "--config"):
        assert flag in out
