"""Batched generation must give exactly the one-at-a-time outputs (greedy)."""
from __future__ import annotations

import pytest
import torch

from percontrast.generation import DecodingOptions, generate_from_ids


@pytest.fixture(scope="module")
def tiny():
    from percontrast.models import load_model
    return load_model("tiny-random")


def _prompts(tok, n=7):
    texts = ["Hi", "Write an email about the team dinner on Friday please",
             "Short", "A much longer prompt " * 12, "Subject: budget review for the third quarter",
             "ok", "Tell me about Lisbon and the tram line 28 on a rainy day in November"]
    return [tok(t)["input_ids"] for t in texts[:n]]


def test_batched_equals_one_at_a_time(tiny):
    model, tok = tiny
    prompts = _prompts(tok)
    assert len({len(p) for p in prompts}) > 3  # really different lengths -> real left padding
    opts = DecodingOptions(max_new_tokens=12)
    single = [generate_from_ids(model, tok, [p], opts, batch_size=1, progress=False, return_ids=True)[0]
              for p in prompts]
    for bs in (3, 16):
        batched = generate_from_ids(model, tok, prompts, opts, batch_size=bs, progress=False, return_ids=True)
        assert batched == single, f"batch_size={bs}"
    assert any(len(s) > 0 for s in single)


@pytest.fixture(scope="module")
def tiny_abs_pos(tiny):
    """A tiny GPT-2 with LEARNED ABSOLUTE position embeddings and a large init. Llama's RoPE is
    shift-invariant, so a left-padding position bug can hide there; here it changes the tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel
    _, tok = tiny
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256, initializer_range=0.3,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg).eval()
    return model, tok


def test_batched_equals_one_at_a_time_absolute_positions(tiny_abs_pos):
    model, tok = tiny_abs_pos
    prompts = _prompts(tok)
    opts = DecodingOptions(max_new_tokens=12)
    single = [generate_from_ids(model, tok, [p], opts, batch_size=1, progress=False, return_ids=True)[0]
              for p in prompts]
    assert len({tuple(s) for s in single}) == len(single)  # the model really depends on its input
    batched = generate_from_ids(model, tok, prompts, opts, batch_size=16, progress=False, return_ids=True)
    assert batched == single


def test_matches_hf_generate_unpadded(tiny):
    """Our loop vs transformers' own greedy generate on each prompt alone (no padding at all)."""
    model, tok = tiny
    prompts = _prompts(tok, 4)
    opts = DecodingOptions(max_new_tokens=10)
    ours = generate_from_ids(model, tok, prompts, opts, batch_size=4, progress=False, return_ids=True)
    for p, o in zip(prompts, ours):
        ref = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             **opts.generate_kwargs(tok))[0, len(p):].tolist()
        ref = ref[: ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref
        assert o == ref


def test_stops_at_eos_and_strips_it(tiny, monkeypatch):
    model, tok = tiny
    eos = tok.eos_token_id
    prompts = _prompts(tok, 3)

    # force EOS as the 3rd generated token for every row: bias the LM head
    calls = {"n": 0}
    orig = model.forward

    def forward(*a, **kw):
        out = orig(*a, **kw)
        calls["n"] += 1
        if calls["n"] == 3:
            out.logits[:, -1, :] = -1e9
            out.logits[:, -1, eos] = 0
        return out

    monkeypatch.setattr(model, "forward", forward)
    ids = generate_from_ids(model, tok, prompts, DecodingOptions(max_new_tokens=20), batch_size=3,
                            progress=False, return_ids=True)
    assert all(len(x) == 2 and eos not in x for x in ids)
    monkeypatch.undo()
    calls["n"] = 0
    monkeypatch.setattr(model, "forward", forward)
    texts = generate_from_ids(model, tok, prompts, DecodingOptions(max_new_tokens=20), batch_size=3, progress=False)
    assert all("<|im_end|>" not in t for t in texts)


def test_order_preserved_and_empty_input(tiny):
    model, tok = tiny
    prompts = _prompts(tok)
    opts = DecodingOptions(max_new_tokens=5)
    out = generate_from_ids(model, tok, prompts, opts, batch_size=4, progress=False, return_ids=True)
    rev = generate_from_ids(model, tok, prompts[::-1], opts, batch_size=4, progress=False, return_ids=True)
    assert out == rev[::-1]
    assert generate_from_ids(model, tok, [], opts, progress=False) == []
