"""Prompt building: a profile cut to nothing is counted apart, generation prompts keep the profile
training keeps, and chat templates (thinking switch, end-of-turn token, every stop id) are honoured."""
import copy
import json
import logging

import pytest
import torch

from percontrast.encoding import EncodeStats, PromptBuilder, end_of_turn_id
from percontrast.prompts import get_task

LONG = " ".join(f"word{i}" for i in range(120))


def _record(i=0, input_words=12, output_words=20):
    return {"id": f"r{i}", "user_id": f"u{i}", "input": "Write an email about " + " ".join(["plans"] * input_words),
            "output": " ".join(["reply"] * output_words),
            "profile": [{"title": f"t{j}", "text": LONG} for j in range(3)]}


def _builder(tok, max_length, **kw):
    return PromptBuilder(tok, get_task("email"), k=2, max_length=max_length, **kw)


def _bare_length(tok, rec):
    """Tokens of the prompt with no profile at all, plus the response."""
    b = _builder(tok, 4096)
    return len(b.prompt_ids(rec["input"])) + len(b.response_ids(rec["output"]))


def test_profile_cut_to_nothing_is_counted_and_warned(tiny, caplog):
    _, tok = tiny
    rec = _record()
    b = _builder(tok, _bare_length(tok, rec) + 2)   # room for 2 tokens: not even one profile word fits
    with caplog.at_level(logging.WARNING, logger="percontrast.encoding"):
        e = b.encode(rec)
        b.stats.warn()
    assert e["profile_removed"] and e["prompt_with"] == e["prompt_without"]
    assert b.stats.profile_removed == 1 and b.stats.profile_cut == 1
    assert "WHOLE profile of 1/1" in caplog.text
    partial = _builder(tok, _bare_length(tok, rec) + 60)   # a partial cut is not a removal
    e = partial.encode(rec)
    assert not e["profile_removed"] and partial.stats.profile_cut == 1 and partial.stats.profile_removed == 0
    assert len(e["prompt_with"]) > len(e["prompt_without"])
    # the user text it returns is the cut prompt's (a text-level export renders it again)
    assert partial.prompt_ids(e["prompt_with_text"]) == e["prompt_with"]
    assert "word0" in e["prompt_with_text"] and "word119" not in e["prompt_with_text"]


@pytest.mark.parametrize("room", [2, 40, 400])
def test_generation_prompt_keeps_the_profile_training_keeps(tiny, room):
    """The budget reserves the gold response whether or not it is returned (old code: generation
    had the whole max_length for the prompt and kept profile text training had dropped)."""
    _, tok = tiny
    rec = _record()
    b = _builder(tok, _bare_length(tok, rec) + room)
    train, gen = b.encode(rec), b.encode(rec, with_response=False)
    assert gen["prompt_with"] == train["prompt_with"] and gen["prompt_without"] == train["prompt_without"]
    assert gen["response"] == [] and train["response"]
    assert gen["profile_removed"] == train["profile_removed"]


def test_record_without_gold_reserves_the_generation_length(tiny):
    _, tok = tiny
    rec = {**_record(), "output": ""}
    b = _builder(tok, 300, reserve_tokens=100)
    assert len(b.encode(rec, with_response=False)["prompt_with"]) <= 200


def test_train_score_and_eval_report_profile_removed(tmp_path, tiny):
    from percontrast.cli import main
    _, tok = tiny
    recs = [_record(i) for i in range(4)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ml = str(_bare_length(tok, recs[0]) + 2)
    common = ["--model", "tiny-random", "--data", str(data), "--task", "email", "--max-length", ml]
    assert main(["train", *common, "--max-steps", "1", "--batch-size", "2", "--no-progress",
                 "--output-dir", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "train_results.json").read_text())["profile_removed"] == 4
    assert main(["score", *common, "--output-dir", str(tmp_path / "s")]) == 0
    scores = json.loads((tmp_path / "s" / "scores.json").read_text())
    assert scores["summary"]["profile_removed"] == 4 and all(ex["profile_removed"] for ex in scores["examples"])
    assert main(["eval", *common, "--max-new-tokens", "2", "--output-dir", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["profile_removed"] == 4


def test_stats_counts_are_complete():
    assert set(EncodeStats().counts()) >= {"profile_cut", "profile_removed", "input_cut", "response_cut"}


# -- chat templates ------------------------------------------------------------------------------
# A ChatML-like template whose turns end with <|endoftext|> (not the tokenizer's EOS <|im_end|>) and
# that opens a <think> block unless enable_thinking is false (as Qwen3's does).
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|endoftext|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% if enable_thinking is not defined or enable_thinking %}<think>\n{% endif %}{% endif %}")


@pytest.fixture
def odd_tok(tiny):
    tok = copy.deepcopy(tiny[1])
    tok.chat_template = TEMPLATE
    assert tok.convert_tokens_to_ids("<|endoftext|>") != tok.eos_token_id
    return tok


def test_end_of_turn_comes_from_the_template(odd_tok, tiny):
    eot = odd_tok.convert_tokens_to_ids("<|endoftext|>")
    assert end_of_turn_id(odd_tok) == eot
    assert end_of_turn_id(tiny[1]) == tiny[1].convert_tokens_to_ids("<|im_end|>")   # SmolLM2: = EOS
    b = _builder(odd_tok, 1024)
    assert b.response_ids("hello there")[-1] == eot


def test_prompts_disable_thinking(odd_tok):
    e = _builder(odd_tok, 1024).encode(_record())
    for ids in (e["prompt_with"], e["prompt_without"]):
        text = odd_tok.decode(ids)
        assert "<think>" not in text and text.endswith("<|im_start|>assistant\n")


def test_generation_stops_at_every_end_id_on_both_paths(tiny, odd_tok):
    """Both the greedy loop and the model.generate path stop at any id of the stop set: the template's
    end of turn and the model's generation-config EOS ids, not only tokenizer.eos_token_id."""
    from percontrast.generation import DecodingOptions, end_ids, generate_from_ids

    model, _ = tiny
    assert odd_tok.convert_tokens_to_ids("<|endoftext|>") in end_ids(model, odd_tok)
    prompts = [odd_tok("a note about figs and the harbour", add_special_tokens=False)["input_ids"],
               odd_tok("plans", add_special_tokens=False)["input_ids"]]
    for opts in (DecodingOptions(max_new_tokens=8), DecodingOptions(max_new_tokens=8, repetition_penalty=1.3)):
        free = generate_from_ids(model, odd_tok, prompts, opts, progress=False, return_ids=True)
        row = free[0]
        cut = next(i for i in range(1, len(row)) if row[i] not in row[:i])   # a token not seen before it
        gen_cfg = copy.deepcopy(model.generation_config)
        try:
            model.generation_config.eos_token_id = [odd_tok.eos_token_id, row[cut]]
            stopped = generate_from_ids(model, odd_tok, prompts, opts, progress=False, return_ids=True)
        finally:
            model.generation_config = gen_cfg
        assert stopped[0] == row[:cut], (opts, row, stopped[0])
