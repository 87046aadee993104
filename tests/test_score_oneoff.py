"""One-off scoring (``score --profile/--input/--output``), ``percontrast.score_text`` and ``--top-k``,
on the tiny random model."""
import io
import json

import pytest
import torch

from percontrast import score_text
from percontrast.cli import build_parser, main
from percontrast.commands.score import ScoreConfig, print_tokens

PROFILE = ["I cycle along the river every morning", "lentil soup is my favourite lunch"]
INPUT = "Write about the weekend"
OUTPUT = "Cycling by the river, then soup. Cheers"


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_error_line(rc, err):
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def _scores(path):
    return json.loads((path / "scores.json").read_text(encoding="utf-8"))


def test_one_off_writes_scores_heatmap_and_plain_columns(tmp_path, capsys):
    rc, out, err = _run(capsys, "score", "--model", "tiny-random", "--profile", PROFILE[0], "--input", INPUT,
                        "--output", OUTPUT, "--output-dir", tmp_path / "s")
    assert rc == 0, err
    payload = _scores(tmp_path / "s")
    (ex,) = payload["examples"]
    assert ex["profile"] and PROFILE[0] in ex["profile"][0]          # the item as it stood in the prompt
    assert ex["input"] == INPUT and ex["output"] == OUTPUT
    assert len(ex["tokens"]) == len(ex["pir"]) == len(ex["weights"]) == len(ex["logp_with"]) > 1
    assert "top_with" not in ex and "top_without" not in ex          # --top-k defaults to 0: no extra keys
    assert "<span" in (tmp_path / "s" / "heatmap.html").read_text(encoding="utf-8")
    # stdout is not a terminal here: a plain "token<TAB>pir" table (tokens as JSON strings), no colour codes
    assert "\x1b[" not in out
    lines = out.splitlines()
    assert lines[0] == "token\tpir"
    rows = [ln.split("\t") for ln in lines[1:1 + len(ex["tokens"])]]
    assert [json.loads(t) for t, _ in rows] == ex["tokens"]
    assert [float(v) for _, v in rows] == pytest.approx(ex["pir"], abs=5e-5)


def test_several_profile_items_after_one_flag(tmp_path, capsys):
    rc, _, err = _run(capsys, "score", "--model", "tiny-random", "--profile", *PROFILE, "--input", INPUT,
                      "--output", OUTPUT, "--output-dir", tmp_path / "s")
    assert rc == 0, err
    (ex,) = _scores(tmp_path / "s")["examples"]
    assert ex["n_profile_items"] == 2
    assert all(any(p in shown for shown in ex["profile"]) for p in PROFILE)


def test_repeated_profile_flag(tmp_path, capsys):
    rc, _, err = _run(capsys, "score", "--model", "tiny-random", "--profile", PROFILE[0], "--profile", PROFILE[1],
                      "--input", INPUT, "--output", OUTPUT, "--output-dir", tmp_path / "s")
    assert rc == 0, err
    (ex,) = _scores(tmp_path / "s")["examples"]
    assert ex["n_profile_items"] == 2
    assert all(any(p in shown for shown in ex["profile"]) for p in PROFILE)


def test_at_file_values_and_a_missing_file(tmp_path, capsys):
    (tmp_path / "p.txt").write_text(PROFILE[1] + "\n", encoding="utf-8")
    (tmp_path / "o.txt").write_text(OUTPUT + "\r\n", encoding="utf-8")
    rc, _, err = _run(capsys, "score", "--model", "tiny-random", "--profile", f"@{tmp_path / 'p.txt'}",
                      "--input", "@@bob asks: " + INPUT, "--output", f"@{tmp_path / 'o.txt'}",
                      "--output-dir", tmp_path / "s")
    assert rc == 0, err
    (ex,) = _scores(tmp_path / "s")["examples"]
    assert PROFILE[1] in ex["profile"][0] and "@" not in ex["profile"][0]
    assert ex["output"] == OUTPUT                                   # one trailing line break dropped
    assert ex["input"] == "@bob asks: " + INPUT                     # @@ is a literal @

    missing = tmp_path / "nope.txt"
    rc, _, err = _run(capsys, "score", "--model", "tiny-random", "--profile", PROFILE[0], "--input", INPUT,
                      "--output", f"@{missing}", "--output-dir", tmp_path / "t")
    assert str(missing) in _one_error_line(rc, err) and "--output" in err
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("argv, words", [
    (["--data", "builtin:sample-test", "--profile", "x", "--input", "y", "--output", "z"], ["--data", "not both"]),
    (["--data", "builtin:sample-test", "--output", "z"], ["--data", "not both"]),
    ([], ["--data", "--profile"]),
    (["--profile", "x"], ["missing", "--input", "--output"]),
    (["--profile", "x", "--input", "y", "--output", "z", "--task", "email"], ["email", "title, text", "generic"]),
    (["--profile", "x", "--input", "y", "--output", "z", "--counterfactual", "swap"], ["swap", "--data"]),
    (["--profile", " ", "--input", "y", "--output", "z"], ["--profile #1", "empty"]),
])
def test_one_off_mistakes_are_one_line(tmp_path, capsys, argv, words):
    rc, out, err = _run(capsys, "score", "--model", "tiny-random", "--output-dir", tmp_path / "s", *argv)
    line = _one_error_line(rc, err)
    assert all(w in line for w in words), line
    assert not (tmp_path / "s").exists()


def test_score_text_equals_file_mode_exactly(tmp_path, capsys):
    record = {"id": "one-off", "input": INPUT, "output": OUTPUT, "profile": [{"text": p} for p in PROFILE]}
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps(record) + "\n", encoding="utf-8")
    rc, _, err = _run(capsys, "score", "--model", "tiny-random", "--data", data, "--output-dir", tmp_path / "s")
    assert rc == 0, err
    (ex,) = _scores(tmp_path / "s")["examples"]
    rows = score_text(profile=PROFILE, input=INPUT, output=OUTPUT, model="tiny-random")
    assert [r["token"] for r in rows] == ex["tokens"]
    for key, col in (("token_id", "token_ids"), ("pir", "pir"), ("logp_with", "logp_with"),
                     ("logp_without", "logp_without"), ("entropy", "entropy"), ("weight", "weights")):
        assert [r[key] for r in rows] == ex[col], key                # bit for bit, through JSON
    assert set(rows[0]) == {"token", "token_id", "pir", "logp_with", "logp_without", "entropy", "weight"}


def test_score_text_rejects_data_and_unknown_options():
    from percontrast.errors import UserError
    with pytest.raises(UserError, match="not both"):
        score_text(profile=PROFILE, input=INPUT, output=OUTPUT, model="tiny-random", data="builtin:sample-test")
    with pytest.raises(UserError, match="unknown key 'nonsense'"):
        score_text(profile=PROFILE, input=INPUT, output=OUTPUT, model="tiny-random", nonsense=1)


def _direct_logits(model, prompt, response):
    """Next-token logits at the response-predicting positions from one plain, full forward."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    return logits[len(prompt) - 1: len(prompt) - 1 + len(response)]


def test_top_k_candidates_match_a_direct_model_call():
    from percontrast.models import load_model
    k = 5
    opts = dict(model="tiny-random", dtype="float64", top_k=k)     # float64: no near-ties flip the argmax
    rows = score_text(profile=PROFILE, input=INPUT, output=OUTPUT, **opts)
    model, tok = load_model("tiny-random", dtype="float64")
    model.eval()
    cfg = ScoreConfig(profile=PROFILE, input=INPUT, output=OUTPUT, **opts)
    from percontrast.commands.score import one_off_record
    enc = cfg.prompt_builder(tok).encode(one_off_record(cfg.task, PROFILE, INPUT, OUTPUT))
    assert [r["token_id"] for r in rows] == enc["response"]
    for key, prompt in (("top_with", enc["prompt_with"]), ("top_without", enc["prompt_without"])):
        probs = torch.softmax(_direct_logits(model, prompt, enc["response"]), dim=-1)
        for i, r in enumerate(rows):
            cands = r[key]
            assert len(cands) == k and all(isinstance(t, str) and isinstance(p, float) for t, p in cands)
            ps = [p for _, p in cands]
            assert ps == sorted(ps, reverse=True) and all(0 < p <= 1 for p in ps) and sum(ps) <= 1 + 1e-12
            top = int(probs[i].argmax())
            assert cands[0][0] == tok.decode([top]), (key, i)
            assert cands[0][1] == pytest.approx(float(probs[i, top]), rel=1e-9)
    # the probability of the token that was there is exp(log-prob) when it is among the candidates
    for r in rows:
        for t, p in r["top_with"]:
            if t == r["token"]:
                assert p == pytest.approx(float(torch.tensor(r["logp_with"]).exp()), rel=1e-9)


def test_score_batch_top_ids_are_the_argmax_and_top_k_zero_keeps_none(tiny):
    from percontrast.encoding import PairedCollator
    from percontrast.scoring import score_batch
    model, tok = tiny
    feats = [{"prompt_with": [11, 12, 13, 14, 15], "prompt_without": [11, 15], "response": [21, 22, 23]},
             {"prompt_with": [31, 32], "prompt_without": [32], "response": [41]}]
    batch = PairedCollator(tok.pad_token_id)(feats)
    plain = score_batch(model, batch)
    assert plain.top_with is None and plain.top_without is None
    s = score_batch(model, batch, top_k=3)
    for name in ("logp_with", "logp_without", "entropy"):
        assert torch.equal(getattr(s, name), getattr(plain, name))   # top-k changes no score
    for (probs, ids), key in ((s.top_with, "prompt_with"), (s.top_without, "prompt_without")):
        assert probs.shape == ids.shape == (2, 3, 3)
        for b, f in enumerate(feats):
            logits = _direct_logits(model, f[key], f["response"])
            assert ids[b, : len(f["response"]), 0].tolist() == logits.argmax(-1).tolist()


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_output_is_coloured(monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("COLUMNS", "120")
    ex = {"tokens": ["Cycl", "ing", " <b>", "\n", "!"], "pir": [2.5, -1.0, 0.0, 0.3, float("nan")]}
    term, pipe = _Terminal(), io.StringIO()
    print_tokens(ex, file=term)
    print_tokens(ex, file=pipe)
    assert "\x1b[" in term.getvalue() and "Cycl" in term.getvalue() and "<b>" in term.getvalue()
    assert "\x1b[" not in pipe.getvalue() and pipe.getvalue().startswith("token\tpir\n")
